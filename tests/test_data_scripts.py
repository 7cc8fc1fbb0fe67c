"""Fast tests of the data scripts (no downloads) and of the shipped data assets."""
from __future__ import annotations

import importlib.util
import json
import random
import sys
from pathlib import Path

import pytest

from qmamba.utils import paths

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = ROOT / "scripts"
ASSETS = paths.ASSETS_DIR


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"_scripts_{name}", SCRIPTS / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


bd = _load("build_data")
bp = _load("build_proxy_tasks")


# ----------------------------------------------------------------------------- Brown
def test_split_tagged_uses_last_slash():
    assert bd.split_tagged("and/or/cc") == ("and/or", "cc")
    assert bd.split_tagged("1/2/cd") == ("1/2", "cd")
    assert bd.split_tagged("//in") == ("/", "in")
    assert bd.split_tagged("Atlanta's/np$") == ("Atlanta's", "np$")


@pytest.mark.parametrize("raw, expected", [
    ("\n\n\tThe/at Fulton/np-tl County/nn-tl Grand/jj-tl Jury/nn-tl said/vbd Friday/nr an/at "
     "investigation/nn of/in Atlanta's/np$ recent/jj primary/nn election/nn produced/vbd ``/`` "
     "no/at evidence/nn ''/'' that/cs any/dti irregularities/nns took/vbd place/nn ./.\n",
     ['The Fulton County Grand Jury said Friday an investigation of Atlanta\'s recent primary '
      'election produced "no evidence" that any irregularities took place.']),
    # punctuation that the tagged corpus moved outside a closing quote goes back inside
    ("\t``/`` Only/rb a/at relative/jj handful/nn ''/'' ,/, the/at jury/nn said/vbd ./.\n",
     ['"Only a relative handful," the jury said.']),
    # doubled ?/. tokens of the npm corpus, n't contractions
    ("\tHe/pps asked/vbd ,/, ``/`` Why/wrb didn't/dod* you/ppss come/vb ''/'' ?/. ?/.\n",
     ['He asked, "Why didn\'t you come?"']),
    # dashes, brackets, doubled ;/. and "Jr. ."
    ("\tFifteen/cd children/nns --/-- eight/cd (/( and/or/cc so/rb )/) ;/. ;/. "
     "by/in Ivan/np Allen/np Jr./np ./.\n",
     ["Fifteen children--eight (and/or so); by Ivan Allen Jr."]),
    # lone single quotes resolved from context
    ("\tmore/ap '/' pro/jj '/' letters/nns and/cc said/vbd ,/, '/' Give/vb it/ppo ./. '/'\n",
     ["more 'pro' letters and said, 'Give it.'"]),
    # headline line = own paragraph; sentences of one block = one paragraph; blank lines split
    ("\n\nMerger/nn-hl proposed/vbn-hl \nHowever/wrb ,/, the/at jury/nn said/vbd so/rb ./.\n"
     "It/pps urged/vbd action/nn ./.\n\n\n\tA/at new/jj one/cd ./.\n",
     ["Merger proposed", "However, the jury said so. It urged action.", "A new one."]),
])
def test_brown_paragraphs(raw, expected):
    assert bd.brown_paragraphs(raw) == expected


def test_detokenize_clitics_and_brackets():
    assert bd.detokenize(["I", "do", "n't", "know", "it", "'s", "(", "really", ")", "!"]) == \
        "I don't know it's (really)!"
    assert bd.detokenize(["``", "Yes", "''", "."]) == '"Yes."'


# ----------------------------------------------------------------------------- Austen
def test_austen_paragraphs():
    lines = ["", "", "Chapter 1", "", "", "It is a _truth_ universally",
             "acknowledged,  that a _single man_", "", "   \"Indented", "   verse.\"", "", "", ""]
    assert bd.austen_paragraphs(lines) == [
        "Chapter 1",
        "It is a truth universally acknowledged, that a single man",
        '"Indented verse."',
    ]


def test_join_documents_format():
    assert bd.join_documents([["a b", "c"], ["d"]]) == "a b\n\nc\n\nd\n"


def test_ar_reader():
    def member(name: bytes, data: bytes) -> bytes:
        header = name.ljust(16) + b"0".ljust(12) + b"0".ljust(6) + b"0".ljust(6) + \
            b"100644".ljust(8) + str(len(data)).encode().ljust(10) + b"`\n"
        return header + data + (b"\n" if len(data) % 2 else b"")
    blob = b"!<arch>\n" + member(b"debian-binary", b"2.0\n") + member(b"x.tar/", b"abc")
    assert bd.ar_members(blob) == {"debian-binary": b"2.0\n", "x.tar": b"abc"}


# ----------------------------------------------------------------------------- sentences
def test_split_sentences():
    p = ('Mr. Elliot came. "Yes," said she. "I know Dr. Shepherd!" Anne smiled. '
         '"Oh!" cried she. It was late; Mrs. Smith knew St. Ives. J. Smith left. So did I. I think')
    assert bp.split_sentences(p) == [
        "Mr. Elliot came.", '"Yes," said she.', '"I know Dr. Shepherd!"', "Anne smiled.",
        '"Oh!" cried she.', "It was late; Mrs. Smith knew St. Ives.", "J. Smith left.",
        "So did I.", "I think",
    ]


def test_cloze_target():
    assert bp.cloze_target('He saw the carriage at last. "The carriage!"') == \
        ('He saw the carriage at last. "The carriage', "carriage")
    assert bp.cloze_target("She thought of Bath and went to Lyme.") is None  # not earlier
    assert bp.cloze_target("Give it to her. And to her.") is None  # function word
    assert bp.cloze_target("It was well-bred and well-bred.") is None  # not alphabetic


def test_proxy_builders_are_deterministic():
    sents = [f"Sentence number {w} is about the garden of house {w}." for w in
             "one two three four five six seven eight nine ten".split()] * 60
    paragraphs = [" ".join(sents[i:i + 5]) for i in range(0, len(sents), 5)]
    books = {"a": paragraphs}
    a = bp.build_nextsent(books, random.Random(1234), min_distance=20)
    b = bp.build_nextsent(books, random.Random(1234), min_distance=20)
    assert a == b and a
    for it in a:
        assert len(set(it["endings"])) == 4


# ----------------------------------------------------------------------------- shipped assets
def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


CLOZE = ASSETS / "tasks" / "cloze_proxy.jsonl"
NEXTSENT = ASSETS / "tasks" / "nextsent_proxy.jsonl"


@pytest.mark.skipif(not CLOZE.exists(), reason="cloze_proxy.jsonl not built")
def test_shipped_cloze_items():
    items = _jsonl(CLOZE)
    assert len(items) >= 500
    texts = set()
    for it in items:
        assert set(it) == {"text"}
        context, target = it["text"].rsplit(" ", 1)
        assert target.isascii() and target.isalpha() and len(target) >= 3
        assert target.lower() in context.lower()
        assert 50 <= len(context.split()) < 200
        texts.add(it["text"])
    assert len(texts) == len(items)


@pytest.mark.skipif(not NEXTSENT.exists(), reason="nextsent_proxy.jsonl not built")
def test_shipped_nextsent_items():
    items = _jsonl(NEXTSENT)
    assert len(items) >= 500
    for it in items:
        assert set(it) == {"ctx", "endings", "label"}
        assert isinstance(it["ctx"], str) and it["ctx"]
        assert isinstance(it["endings"], list) and len(it["endings"]) == 4
        assert len(set(it["endings"])) == 4 and all(isinstance(e, str) and e for e in it["endings"])
        assert isinstance(it["label"], int) and 0 <= it["label"] < 4
        assert len(it["ctx"].split()) <= 200
    labels = [it["label"] for it in items]
    assert all(labels.count(k) > len(items) / 8 for k in range(4))  # shuffled, not constant


@pytest.mark.skipif(not (ASSETS / "tokenizer" / "tokenizer.json").exists(), reason="no tokenizer")
def test_shipped_tokenizer_round_trip():
    # tokenizers directly (importing transformers costs seconds); the script itself checks
    # that AutoTokenizer / PreTrainedTokenizerFast load the folder.
    from tokenizers import Tokenizer

    folder = ASSETS / "tokenizer"
    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    assert tok.token_to_id("<|endoftext|>") == 0 and tok.token_to_id("<|padding|>") == 1
    assert tok.get_vocab_size() == 8192
    text = 'Anne said, "Mr. Elliot\'s letter--dated 1814--isn\'t here."\n\nÉté  ünïcode\ttab'
    ids = tok.encode(text).ids
    assert ids[0] != 0 and tok.decode(ids, skip_special_tokens=False) == text
    config = json.loads((folder / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert config["eos_token"] == config["bos_token"] == "<|endoftext|>"
    assert config["pad_token"] == "<|padding|>"
    assert (folder / "special_tokens_map.json").exists()


@pytest.mark.skipif(not (ASSETS / "text" / "test.txt").exists(), reason="texts not built")
def test_shipped_texts_format():
    for name in ("validation.txt", "test.txt"):
        text = (ASSETS / "text" / name).read_text(encoding="utf-8")
        assert text.endswith("\n") and not text.endswith("\n\n")
        assert "\n\n\n" not in text and "_" not in text
        assert all(p and p == p.strip() and "\n" not in p for p in text[:-1].split("\n\n"))


sys.modules.setdefault("build_data", bd)      # build_heldout imports its sibling, as run from scripts/
bh = _load("build_heldout")


def test_heldout_normalize_keeps_lines_and_collapses_blank_runs():
    assert bh.normalize("\n\nAct I.\r\n\r\n\r\n  Ber.  \nWho's there?\t\n\n\n") == "Act I.\n\n  Ber.\nWho's there?"
    assert bh.join(["a", "b", "c"], max_chars=4) == "a\n\nb\n"      # whole documents until the cap


@pytest.mark.parametrize("name", sorted(bh.OUTPUT_SHA256))
def test_shipped_heldout_texts_are_the_pinned_build(name):
    import hashlib

    data = (ASSETS / "text" / f"{name}.txt").read_bytes()
    assert hashlib.sha256(data).hexdigest() == bh.OUTPUT_SHA256[name]
    text = data.decode("utf-8")
    assert text.endswith("\n") and not text.endswith("\n\n") and "\n\n\n" not in text


def test_heldout_dev_and_test_share_no_document():
    for source in ("drama", "tech"):
        dev = (ASSETS / "text" / f"ood_{source}_dev.txt").read_text(encoding="utf-8")
        test = (ASSETS / "text" / f"ood_{source}_test.txt").read_text(encoding="utf-8")
        long_lines = {ln for ln in test.splitlines() if len(ln) > 60}
        shared = long_lines & {ln for ln in dev.splitlines() if len(ln) > 60}
        assert len(shared) <= 0.01 * len(long_lines), sorted(shared)[:3]
