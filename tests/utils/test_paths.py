"""qmamba.utils.paths: every shipped asset it names exists, inside the installed package."""

from __future__ import annotations

from pathlib import Path

import qmamba
from qmamba.utils import paths

PACKAGE = Path(qmamba.__file__).resolve().parent


def test_every_path_exists_in_the_package():
    folders = [paths.ASSETS_DIR, paths.MODELS_DIR, paths.TOKENIZER_DIR, paths.TEXT_DIR, paths.TASKS_DIR]
    files = [paths.VALIDATION_TEXT, paths.TEST_TEXT, *paths.HELDOUT_TEXTS.values(), *paths.DEV_TEXTS.values()]
    assert paths.ASSETS_DIR == PACKAGE / "assets"
    for p in folders:
        assert p.is_dir() and p.is_relative_to(paths.ASSETS_DIR), p
    for p in files:
        assert p.is_file() and p.parent == paths.TEXT_DIR, p
    assert (paths.TOKENIZER_DIR / "tokenizer.json").is_file()
    assert {p.name for p in paths.MODELS_DIR.iterdir()} >= {"ref-mamba1", "ref-mamba2"}


def test_heldout_and_dev_texts_are_disjoint_halves():
    assert set(paths.HELDOUT_TEXTS) == set(paths.DEV_TEXTS) == {"ood-drama", "ood-tech"}
    for name in paths.HELDOUT_TEXTS:
        assert paths.HELDOUT_TEXTS[name].name.endswith("_test.txt")
        assert paths.DEV_TEXTS[name].name.endswith("_dev.txt")
        assert paths.HELDOUT_TEXTS[name].read_bytes() != paths.DEV_TEXTS[name].read_bytes()
