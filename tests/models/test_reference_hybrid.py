"""The shipped ref-hybrid: a Nemotron-H folder that qmamba and transformers read alike, trained
(far below a uniform model's perplexity), with its model card and evaluation."""

from __future__ import annotations

import json

import pytest
import torch

import qmamba
from qmamba.eval import perplexity, tokenize_text_file
from qmamba.utils import paths

FOLDER = paths.MODELS_DIR / "ref-hybrid"


def test_ref_hybrid_is_a_trained_nemotron_h():
    loaded = qmamba.load("ref-hybrid")
    cfg = loaded.model.config
    assert cfg.model_type == "nemotron_h" and cfg.extra["hybrid_override_pattern"] == "M-M*-M*-"
    assert cfg.layer_types == ["mamba2", "mlp", "mamba2", "attention", "mlp", "mamba2", "attention", "mlp"]
    assert not cfg.tie_embeddings                       # transformers never ties NemotronH's head
    ids = tokenize_text_file(paths.TEST_TEXT, loaded.tokenizer)
    ppl = perplexity(loaded.model, ids, seqlen=256, max_tokens=1024, batch_size=4, progress=False)["perplexity"]
    assert ppl < cfg.vocab_size / 20                    # a trained model, not a near-uniform one
    card = (FOLDER / "README.md").read_text()
    ev = json.loads((FOLDER / "eval.json").read_text())
    assert f"{ev['perplexity']['test@1024']['perplexity']:.2f}" in card and ev["parameters"] == loaded.model.num_parameters()


def test_ref_hybrid_matches_transformers():
    transformers = pytest.importorskip("transformers")
    if not hasattr(transformers, "NemotronHForCausalLM"):
        pytest.skip("this transformers has no nemotron_h (added in 5.x)")
    hf = transformers.AutoModelForCausalLM.from_pretrained(FOLDER, dtype=torch.float32).eval()
    model = qmamba.load("ref-hybrid").model
    ids = torch.randint(0, model.config.vocab_size, (2, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref, out = hf(ids).logits, model(ids)
    assert float((out - ref).abs().max() / ref.abs().max()) < 1e-5
