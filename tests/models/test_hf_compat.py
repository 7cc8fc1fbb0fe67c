"""qmamba.models.hf_compat: the differences between transformers 4.57.x and 5.x, in one place."""

from __future__ import annotations

import inspect
import json
import math

import pytest
import torch

import qmamba
from qmamba.models import hf_compat
from qmamba.models.config import ModelConfig, from_hf_dict


@pytest.mark.parametrize("value, expect", [
    (1.5, 1.5), ("Infinity", math.inf), (math.inf, math.inf), ({"__float__": "Infinity"}, math.inf),
    ({"__float__": "-Infinity"}, -math.inf), ({"__float__": 0.25}, 0.25),
])
def test_json_float(value, expect):
    assert hf_compat.json_float(value) == expect


@pytest.mark.parametrize("text, expect", [
    ("4.57.6", (4, 57, 6)), ("5.23.0", (5, 23, 0)), ("5.23.0.dev0", (5, 23, 0)), ("5.0.0rc1", (5, 0, 0)),
    ("10.1", (10, 1)), ("", (0,)), ("unknown", (0,)),
])
def test_parse_version(text, expect):
    assert hf_compat.parse_version(text) == expect


def test_versions_compare_as_numbers():
    """'5.9' < '5.23' (string comparison would say otherwise)."""
    assert hf_compat.parse_version("5.9.0") < hf_compat.GROUPED_NORM_FIXED <= hf_compat.parse_version("5.23.0")


def test_tied_head():
    emb, other = torch.ones(3, 2), torch.zeros(3, 2)
    keys = ("lm_head.weight", "backbone.embeddings.weight")

    def tied(raw, head):
        return hf_compat.tied_head(raw, {keys[0]: head, keys[1]: emb}, True, *keys)

    assert tied({"tie_word_embeddings": False}, emb) is False                # the config wins
    assert tied({"tie_word_embeddings": True}, other) is True
    assert tied({"transformers_version": "5.25.0"}, other) is False          # 5.x silent: the weights say
    assert tied({"transformers_version": "5.25.0"}, emb.clone()) is True
    assert tied({"transformers_version": "4.57.6"}, other) is True           # 4.x silent: its default


def test_fixed_version_matches_the_installed_source():
    """GROUPED_NORM_FIXED agrees with the installed transformers: its Mamba2 gated norm takes a
    group size (and the mixer passes intermediate_size // n_groups) exactly when the version is
    at least the fixed one."""
    from transformers.models.mamba2 import modeling_mamba2 as m

    norm = getattr(m, "Mamba2RMSNormGated", None) or m.MambaRMSNormGated
    grouped = "group_size" in inspect.signature(norm.__init__).parameters
    if grouped:
        assert "intermediate_size // self.n_groups" in inspect.getsource(m.Mamba2Mixer)
    assert hf_compat.installed_norms_per_group() == grouped


@pytest.mark.parametrize("groups", [1, 2, 8])
def test_norm_group_default_and_override(groups):
    """HF configs: per group by default, with nothing extra written; an explicit override is
    written as qmamba_norm_group_size and read back."""
    cfg = ModelConfig(arch="mamba2", vocab_size=16, d_model=64, n_layer=1, headdim=16, ngroups=groups)
    assert cfg.norm_group_size == cfg.d_inner // groups
    raw = cfg.to_hf()
    assert "qmamba_norm_group_size" not in raw
    assert from_hf_dict(json.loads(json.dumps(raw))).norm_group_size == cfg.d_inner // groups
    if groups > 1:
        whole = ModelConfig(arch="mamba2", vocab_size=16, d_model=64, n_layer=1, headdim=16, ngroups=groups,
                            norm_group_size=cfg.d_inner)
        assert from_hf_dict(whole.to_hf()).norm_group_size == cfg.d_inner


def test_norm_group_must_divide_d_inner():
    from qmamba.errors import QMambaError

    raw = ModelConfig(arch="mamba2", vocab_size=16, d_model=64, n_layer=1, headdim=16, ngroups=2).to_hf()
    with pytest.raises(QMambaError, match="does not divide d_inner 128"):
        from_hf_dict({**raw, "qmamba_norm_group_size": 48})


def test_written_config_reads_under_any_version(tmp_path, hf_factory):
    """What qmamba writes uses the 4.x float form (bare Infinity), which 4.57 and 5.x both read;
    the installed transformers builds the same model from it."""
    import transformers

    hf = hf_factory("mamba2", seed=2, n_groups=2)
    hf.save_pretrained(tmp_path / "src")
    loaded = qmamba.load(tmp_path / "src")
    from qmamba.models.save import save_model

    out = save_model(loaded.model, tmp_path / "out")
    text = (out / "config.json").read_text()
    assert "__float__" not in text and "Infinity" in text
    cfg = transformers.AutoConfig.from_pretrained(out)
    assert cfg.n_groups == 2 and cfg.time_step_limit[1] == math.inf
