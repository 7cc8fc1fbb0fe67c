"""Logit parity of models loaded by `qmamba.load` with transformers' own forward.

For every config, a perturbed random transformers model is saved with `save_pretrained`, loaded
back with `qmamba.load`, and our logits along three paths are compared with transformers' full
forward of the same ids: (a) `forward`, (b) token-by-token `step`, (c) prefill of the first
half through the parallel path into a cache, then `step`. The same weights written in
mamba_ssm format (config with d_model/ssm_cfg, pytorch_model.bin with `backbone.embedding`,
vocabulary padded to a multiple of 8) must load to the same logits; for Mamba2 with
n_groups > 1 mamba_ssm normalises each group on its own, so there the reference is
transformers' model with its gated norm swapped for a per-group one.
Errors are printed (pytest -s) and tabled at the end of the run.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import qmamba
from qmamba.models import MambaLM
from qmamba.models.config import from_hf_dict

BATCH, LENGTH, PREFILL = 2, 37, 18
REL_TOL = 1e-4
PAD_MULTIPLE = 8

CONFIGS = {
    # Mamba1: odd sizes, no conv bias, untied
    "m1-odd": ("mamba", dict(hidden_size=40, intermediate_size=72, time_step_rank=3, state_size=8,
                             use_conv_bias=False, tie_word_embeddings=False)),
    # Mamba1: state 16, tied, with in/out projection biases
    "m1-s16": ("mamba", dict(hidden_size=32, state_size=16, use_bias=True)),
    "falcon": ("falcon_mamba", dict(hidden_size=32, state_size=8)),
    # Mamba2: heads x head_dim, groups, states; chunk sizes that do not divide LENGTH; untied
    "m2-6x16-g1-n16": ("mamba2", dict(hidden_size=48, num_heads=6, head_dim=16, n_groups=1, state_size=16,
                                      chunk_size=16)),
    "m2-4x32-g2-n64": ("mamba2", dict(hidden_size=64, num_heads=4, head_dim=32, n_groups=2, state_size=64,
                                      chunk_size=8)),
    "m2-8x16-g4-n128": ("mamba2", dict(hidden_size=64, num_heads=8, head_dim=16, n_groups=4, state_size=128,
                                       chunk_size=32, time_step_limit=(0.0, 0.5))),
}


# ----------------------------------------------------------------------------- helpers
def logit_errors(ref: torch.Tensor, out: torch.Tensor) -> tuple[float, float]:
    """(max |out - ref|, that divided by max |ref|)."""
    max_abs = (out - ref).abs().max().item()
    return max_abs, max_abs / ref.abs().max().item()


@torch.no_grad()
def three_paths(model: MambaLM, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """Our logits (b, l, vocab) along forward, token-by-token step, and prefill + step."""
    b, length = ids.shape
    cache = model.allocate_cache(b)
    step = torch.stack([model.step(ids[:, t], cache) for t in range(length)], dim=1)
    cache = model.allocate_cache(b)
    head = model(ids[:, :PREFILL], cache)
    tail = torch.stack([model.step(ids[:, t], cache) for t in range(PREFILL, length)], dim=1)
    return {"forward": model(ids), "step": step, "prefill+step": torch.cat([head, tail], dim=1)}


def check_paths(name: str, source: str, model: MambaLM, ids, ref, parity_log, vocab=None):
    """Compare the three paths with ref (logits restricted to the first `vocab` entries)."""
    for path, out in three_paths(model, ids).items():
        max_abs, max_rel = logit_errors(ref, out[..., :vocab])
        parity_log.append(dict(config=name, source=source, path=path, max_abs=max_abs, max_rel=max_rel,
                               scale=ref.abs().max().item()))
        print(f"{name:<16} {source:<10} {path:<13} max|diff| {max_abs:.3e}  rel {max_rel:.3e}")
        assert max_rel < REL_TOL, f"{name} {source} {path}: relative error {max_rel:.3e}"


class PerGroupGatedNorm(nn.Module):
    """mamba_ssm's RMSNormGated (norm_before_gate=False): y * silu(z), then RMS-normalise each
    group of `group_size` channels on its own (rms_norm_ref of mamba_ssm)."""

    def __init__(self, weight: torch.Tensor, eps: float, group_size: int):
        super().__init__()
        self.weight, self.eps, self.group_size = weight, eps, group_size

    def forward(self, hidden_states, gate=None):
        x = hidden_states.float() * F.silu(gate.float())
        xg = x.unflatten(-1, (-1, self.group_size))
        xg = xg * torch.rsqrt(xg.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xg.flatten(-2).to(hidden_states.dtype)


def tied(hf) -> bool:
    """Whether a transformers model's head IS its embedding (5.x has no tie flag on MambaConfig)."""
    return hf.lm_head.weight is hf.backbone.embeddings.weight


def save_mamba_ssm(hf, folder: Path) -> Path:
    """The weights of a transformers Mamba/Mamba2 in mamba_ssm's format (config.json and
    pytorch_model.bin), vocabulary padded with random rows to a multiple of PAD_MULTIPLE."""
    c = hf.config
    if c.model_type == "mamba2":
        ssm_cfg = dict(layer="Mamba2", d_state=c.state_size, d_conv=c.conv_kernel, expand=c.expand,
                       headdim=c.head_dim, ngroups=c.n_groups, chunk_size=c.chunk_size,
                       conv_bias=c.use_conv_bias, bias=c.use_bias, dt_limit=list(c.time_step_limit))
    else:
        ssm_cfg = dict(layer="Mamba1", d_state=c.state_size, d_conv=c.conv_kernel,
                       expand=c.intermediate_size / c.hidden_size, dt_rank=c.time_step_rank,
                       conv_bias=c.use_conv_bias, bias=c.use_bias)
    config = dict(d_model=c.hidden_size, d_intermediate=0, n_layer=c.num_hidden_layers,
                  vocab_size=c.vocab_size, ssm_cfg=ssm_cfg, attn_layer_idx=[], attn_cfg={},
                  rms_norm=True, residual_in_fp32=c.residual_in_fp32, fused_add_norm=True,
                  pad_vocab_size_multiple=PAD_MULTIPLE, tie_embeddings=tied(hf))
    pad = -c.vocab_size % PAD_MULTIPLE
    sd = {}
    for k, v in hf.state_dict().items():
        v = v.detach().clone()
        if k in ("backbone.embeddings.weight", "lm_head.weight"):
            v = torch.cat([v, torch.randn(pad, v.shape[1])])
        sd[k.replace("backbone.embeddings.", "backbone.embedding.")] = v
    if tied(hf):                                 # mamba_ssm saves the tied head as well
        sd["lm_head.weight"] = sd["backbone.embedding.weight"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    torch.save(sd, folder / "pytorch_model.bin")
    return folder


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module", params=list(CONFIGS))
def case(request, hf_factory, tmp_path_factory):
    """name, transformers model, HF folder, ids, transformers' logits."""
    name = request.param
    kind, overrides = CONFIGS[name]
    hf = hf_factory(kind, seed=3, **overrides)
    folder = tmp_path_factory.mktemp(name)
    hf.save_pretrained(folder)
    ids = torch.randint(0, hf.config.vocab_size, (BATCH, LENGTH), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ref = hf(ids).logits.float()
    return name, hf, folder, ids, ref


# ----------------------------------------------------------------------------- tests
def test_hf_folder(case, parity_log):
    name, hf, folder, ids, ref = case
    assert ref.std() > 0.5, f"logits too small to test anything: std {ref.std():.3f}"
    loaded = qmamba.load(folder)
    assert loaded.format == "hf" and not loaded.model.training
    check_paths(name, "hf", loaded.model, ids, ref, parity_log)


@torch.no_grad()
def test_logits_to_keep(case):
    """Only the last positions' logits, as transformers' argument of the same name."""
    name, hf, folder, ids, ref = case
    model = qmamba.load(folder).model
    last = model(ids, logits_to_keep=2)
    assert last.shape == (ids.shape[0], 2, hf.config.vocab_size)
    torch.testing.assert_close(last, model(ids)[:, -2:], rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_decode_constants_follow_the_parameters(case):
    """The token step's cached A and D are those of the current A_log and D: recomputed after
    an in-place change and after a parameter is replaced, otherwise reused."""
    _, _, folder, ids, _ = case
    model = qmamba.load(folder).model
    mixer = model.backbone.layers[0].mixer
    first = mixer.decode_constants()
    assert mixer.decode_constants() is first                          # reused while unchanged
    mixer.A_log.add_(0.5)
    A, D = mixer.decode_constants()
    torch.testing.assert_close(A, mixer.channel_A_D()[0])
    mixer.D = nn.Parameter(mixer.D * 2)
    torch.testing.assert_close(mixer.decode_constants()[1], mixer.channel_A_D()[1])
    step = [model.step(ids[:, t], cache) for cache in [model.allocate_cache(ids.shape[0])] for t in range(3)]
    torch.testing.assert_close(torch.stack(step, 1), model(ids[:, :3]), rtol=1e-4, atol=1e-4)


def test_mamba_ssm_folder(case, parity_log, tmp_path):
    name, hf, folder, ids, ref = case
    if hf.config.model_type == "falcon_mamba":
        pytest.skip("mamba_ssm has no Falcon-Mamba format")
    loaded = qmamba.load(save_mamba_ssm(hf, tmp_path / "ssm"))
    cfg = loaded.model.config
    assert loaded.format == "mamba_ssm" and cfg.vocab_size % PAD_MULTIPLE == 0
    grouped = cfg.arch == "mamba2" and cfg.ngroups > 1
    if grouped:
        # reference: transformers' model with mamba_ssm's per-group gated norm
        group_size = cfg.d_inner // cfg.ngroups
        assert cfg.norm_group_size == group_size
        ref_hf = copy.deepcopy(hf)
        for layer in ref_hf.backbone.layers:
            layer.mixer.norm = PerGroupGatedNorm(layer.mixer.norm.weight, layer.mixer.norm.variance_epsilon,
                                                 group_size)
        with torch.no_grad():
            grouped_ref = ref_hf(ids).logits.float()
        _, differs = logit_errors(ref, grouped_ref)
        assert differs > 1e-3, "per-group and whole-d_inner norms should give different logits"
        ref = grouped_ref
    check_paths(name, "mamba_ssm", loaded.model, ids, ref, parity_log, vocab=hf.config.vocab_size)
    if grouped:
        # the same thing from the HF config with the norm group set explicitly
        explicit = dataclasses.replace(from_hf_dict(hf.config.to_dict()), norm_group_size=group_size)
        model = MambaLM(explicit)
        model.load_state_dict(hf.state_dict())
        with torch.no_grad():
            _, rel = logit_errors(ref, model.eval()(ids))
        assert rel < REL_TOL


@pytest.mark.parametrize("limit", [(0.0, float("inf")), (0.0, 0.5)])
@pytest.mark.parametrize("style", ["4.x", "5.x"])
def test_config_float_styles(style, limit, hf_factory, tmp_path):
    """time_step_limit as transformers 4.x (bare Infinity) and 5.x ({"__float__": ...}) write it."""
    hf = hf_factory("mamba2", seed=7, time_step_limit=limit)
    hf.save_pretrained(tmp_path)
    raw = json.loads((tmp_path / "config.json").read_text())
    lo, hi = limit                               # written by hand: the installed version picks one
    if style == "5.x":
        raw["time_step_limit"] = [lo, {"__float__": "Infinity"} if hi == float("inf") else hi]
        raw["transformers_version"] = "5.0.0"
    else:
        raw["time_step_limit"] = [lo, hi]
        raw["transformers_version"] = "4.57.6"
    text = json.dumps(raw)
    assert ('"__float__"' in text) == (style == "5.x" and hi == float("inf"))
    assert ("Infinity" in text) == (hi == float("inf"))
    (tmp_path / "config.json").write_text(text)
    loaded = qmamba.load(tmp_path)
    assert loaded.model.config.dt_limit == limit
    ids = torch.randint(0, hf.config.vocab_size, (BATCH, 21), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        assert logit_errors(hf(ids).logits, loaded.model(ids))[1] < REL_TOL


@pytest.mark.parametrize("kind, expect", [
    ("mamba2", "model.safetensors.index.json"), ("mamba", "model.safetensors.index.json"),
    ("mamba2", "pytorch_model.bin"), ("mamba", "pytorch_model.bin"),
])
def test_weight_file_layouts(kind, expect, hf_factory, tmp_path, save_bin_folder):
    """Sharded safetensors and pytorch_model.bin, tied (mamba) and untied (mamba2) heads."""
    hf = hf_factory(kind, seed=5)
    if expect == "pytorch_model.bin":
        save_bin_folder(hf, tmp_path)
    else:
        hf.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / expect).is_file()
    ids = torch.randint(0, hf.config.vocab_size, (BATCH, 21), generator=torch.Generator().manual_seed(6))
    model = qmamba.load(tmp_path).model
    if tied(hf):
        assert model.lm_head.weight is model.backbone.embeddings.weight
    with torch.no_grad():
        assert logit_errors(hf(ids).logits, model(ids))[1] < REL_TOL
