"""Where the shipped assets are (`qmamba/assets/`): the reference models, the project tokenizer,
the texts and the offline proxy tasks. A leaf module, importable from every layer, and the one
place these paths are spelled out."""

from __future__ import annotations

from pathlib import Path

ASSETS_DIR = Path(__file__).resolve().parents[1] / "assets"
MODELS_DIR = ASSETS_DIR / "models"          # the reference models, one folder each
TOKENIZER_DIR = ASSETS_DIR / "tokenizer"    # the project tokenizer (byte-level BPE, 8192 tokens)
TEXT_DIR = ASSETS_DIR / "text"
TASKS_DIR = ASSETS_DIR / "tasks"            # the proxy tasks' YAML templates and data

VALIDATION_TEXT = TEXT_DIR / "validation.txt"   # calibration text
TEST_TEXT = TEXT_DIR / "test.txt"               # held-out perplexity text
# out-of-domain held-out texts, by the names `qmamba compare` gives them: the test halves, and
# the dev halves that settings are tuned on
HELDOUT_TEXTS = {"ood-drama": TEXT_DIR / "ood_drama_test.txt", "ood-tech": TEXT_DIR / "ood_tech_test.txt"}
DEV_TEXTS = {"ood-drama": TEXT_DIR / "ood_drama_dev.txt", "ood-tech": TEXT_DIR / "ood_tech_dev.txt"}
