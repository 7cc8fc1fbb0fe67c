#!/usr/bin/env python
"""Train the project's byte-level BPE tokenizer on ``data/train.txt`` (train split only).

Settings (fixed, so the result is deterministic): byte-level BPE (GPT-2 / GPT-NeoX style),
vocabulary 8192, ``min_frequency=2``, the full 256-byte initial alphabet, special tokens
``<|endoftext|>`` (id 0) and ``<|padding|>`` (id 1), ByteLevel pre-tokenizer with
``add_prefix_space=False``, ByteLevel decoder, no normalizer and no post-processor (no BOS
is added). Training runs single-threaded (``RAYON_NUM_THREADS=1``).

Why 8192: the reference models have ~10M parameters with d_model 256-384. A 50k vocabulary
would put most parameters into the embedding; 8192 keeps it near 2-3M parameters. The
script measures bytes/token of the validation text for 4096, 8192 and 16384 to back this.

Writes ``qmamba/assets/tokenizer/{tokenizer.json,tokenizer_config.json,
special_tokens_map.json}``; both ``AutoTokenizer.from_pretrained(folder)`` and
``PreTrainedTokenizerFast(tokenizer_file=folder/"tokenizer.json")`` load it. The script
checks ``decode(encode(text)) == text`` on the validation text and that a second training
run gives a byte-identical tokenizer.json.

Usage::

    python scripts/build_data.py       # first: data/train.txt
    python scripts/train_tokenizer.py  # [--vocab-size 8192] [--no-sweep]
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("RAYON_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers  # noqa: E402

from qmamba.utils.paths import TEST_TEXT, TOKENIZER_DIR, VALIDATION_TEXT  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent
EOS = "<|endoftext|>"
PAD = "<|padding|>"
SPECIAL_TOKENS = [EOS, PAD]
DEFAULT_VOCAB = 8192
MODEL_MAX_LENGTH = 1000000000000000019884624838656  # transformers' VERY_LARGE_INTEGER


def iter_chunks(text: str, paragraphs_per_chunk: int = 64):
    """Yield the text in fixed chunks of whole paragraphs ("\\n\\n" kept), in order."""
    paragraphs = text.split("\n\n")
    for i in range(0, len(paragraphs), paragraphs_per_chunk):
        chunk = "\n\n".join(paragraphs[i:i + paragraphs_per_chunk])
        if i + paragraphs_per_chunk < len(paragraphs):
            chunk += "\n\n"
        yield chunk


def train_bpe(text: str, vocab_size: int = DEFAULT_VOCAB) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(iter_chunks(text), trainer=trainer)
    assert tok.token_to_id(EOS) == 0 and tok.token_to_id(PAD) == 1
    return tok


def count_tokens(tok: Tokenizer, text: str) -> int:
    return sum(len(e.ids) for e in tok.encode_batch(list(iter_chunks(text))))


def check_round_trip(tok: Tokenizer, text: str) -> None:
    for chunk in iter_chunks(text):
        ids = tok.encode(chunk).ids
        if tok.decode(ids, skip_special_tokens=False) != chunk:
            raise SystemExit("error: decode(encode(text)) != text on the validation text")


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + path.name + ".", dir=path.parent)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def save(tok: Tokenizer, folder: Path) -> None:
    folder = Path(folder)
    _atomic_write(folder / "tokenizer.json", tok.to_str(pretty=True).encode("utf-8"))
    special = {"bos_token": EOS, "eos_token": EOS, "unk_token": EOS, "pad_token": PAD}
    added = {
        str(tok.token_to_id(t)): {
            "content": t, "lstrip": False, "normalized": False, "rstrip": False,
            "single_word": False, "special": True,
        }
        for t in SPECIAL_TOKENS
    }
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **special,
        "add_bos_token": False,
        "add_eos_token": False,
        "added_tokens_decoder": added,
        "clean_up_tokenization_spaces": False,
        "model_max_length": MODEL_MAX_LENGTH,
    }
    _atomic_write(folder / "tokenizer_config.json", (json.dumps(config, indent=2) + "\n").encode())
    _atomic_write(folder / "special_tokens_map.json", (json.dumps(special, indent=2) + "\n").encode())


def check_transformers(folder: Path, sample: str) -> None:
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    a = AutoTokenizer.from_pretrained(str(folder))
    b = PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"),
                                bos_token=EOS, eos_token=EOS, unk_token=EOS, pad_token=PAD)
    for t in (a, b):
        assert t.eos_token_id == 0 and t.pad_token_id == 1 and t.bos_token_id == 0, t
        ids = t(sample)["input_ids"]
        assert ids == a(sample)["input_ids"] and ids[0] != 0, "unexpected BOS / mismatch"
        assert t.decode(ids) == sample, "transformers round trip failed"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--train", type=Path, default=REPO_ROOT / "data" / "train.txt")
    ap.add_argument("--validation", type=Path, default=VALIDATION_TEXT)
    ap.add_argument("--test", type=Path, default=TEST_TEXT)
    ap.add_argument("--out", type=Path, default=TOKENIZER_DIR)
    ap.add_argument("--vocab-size", type=int, default=DEFAULT_VOCAB)
    ap.add_argument("--no-sweep", action="store_true", help="skip the 4096/8192/16384 comparison")
    args = ap.parse_args(argv)

    if not args.train.exists():
        raise SystemExit(f"error: {args.train} missing; run scripts/build_data.py first")
    train = args.train.read_text(encoding="utf-8")
    val = args.validation.read_text(encoding="utf-8")
    val_bytes = len(val.encode("utf-8"))

    if not args.no_sweep:
        print("vocab  bytes/token(validation)  embedding params @d=256 / d=384")
        for v in (4096, 8192, 16384):
            t = train_bpe(train, v)
            n = count_tokens(t, val)
            print(f"{v:>5}  {val_bytes / n:>6.3f}  ({n:,} tokens)      "
                  f"{v * 256 / 1e6:.2f}M / {v * 384 / 1e6:.2f}M")

    tok = train_bpe(train, args.vocab_size)
    again = train_bpe(train, args.vocab_size)
    if tok.to_str(pretty=True) != again.to_str(pretty=True):
        raise SystemExit("error: BPE training is not deterministic (two runs differ)")
    check_round_trip(tok, val)
    save(tok, args.out)
    check_transformers(args.out, val[:2000])

    digest = hashlib.sha256((args.out / "tokenizer.json").read_bytes()).hexdigest()
    print(f"saved {args.out} (vocab {tok.get_vocab_size()}, tokenizer.json sha256 {digest[:16]})")
    print("round trip OK, two trainings identical, AutoTokenizer/PreTrainedTokenizerFast load OK")
    for name, path in (("train", args.train), ("validation", args.validation), ("test", args.test)):
        if path.exists():
            text = path.read_text(encoding="utf-8")
            n = count_tokens(tok, text)
            print(f"{name:>10}: {len(text):>9,} chars {n:>9,} tokens "
                  f"{len(text.encode('utf-8')) / n:.3f} bytes/token")
    return 0


if __name__ == "__main__":
    sys.exit(main())
