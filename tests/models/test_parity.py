"""Logit parity of models loaded by `qmamba.load` with a written reference of mamba_ssm's math.

The truth is `tests/oracle/mamba_ref.py` (mamba_ssm's Mamba / Mamba2 and transformers'
Falcon-Mamba, computed in float64 with explicit loops), never the installed transformers. For
every config, a perturbed random transformers model is saved with `save_pretrained` and in
mamba_ssm's format (config with d_model/ssm_cfg, pytorch_model.bin with `backbone.embedding`,
vocabulary padded to a multiple of 8); both load with `qmamba.load`, and our float32 logits
along every path (parallel forward, chunked SSD at chunk sizes that do not divide the length,
token-by-token step, prefill + step, two prefills + step) must be within REL_TOL of the
oracle's, relative to the largest oracle logit. Mamba2 runs with n_groups 1, 2 and 8.

The installed transformers is compared too, but only where it is known to compute mamba_ssm's
function: n_groups == 1 in any supported version, n_groups > 1 from 5.23 on (before, its gated
norm spans all of d_inner: `qmamba.models.hf_compat`). Errors are tabled at the end of the run.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from torch import nn

import qmamba
from oracle.mamba_ref import lm_logits, spec_from_hf
from qmamba.models import MambaLM
from qmamba.models.config import from_hf_dict
from qmamba.models.hf_compat import GROUPED_NORM_FIXED, installed_norms_per_group, installed_version

BATCH, LENGTH, PREFILL, PREFILL2 = 2, 37, 18, 11
# float32 against the float64 oracle, relative to the largest |logit|. Where float32 itself cannot
# reach it (the oracle computed in float32 is off by more: m1-s16, 1.3e-5), the bound is twice that
# float32 floor of the model, measured on the same input (`case`): it follows the quantity, not the CPU
REL_TOL = 1e-5
PAD_MULTIPLE = 8
CHUNK_SIZES = (3, 5, 8, 16, 64)                  # none divides LENGTH, PREFILL2 or LENGTH - PREFILL2

CONFIGS = {
    # Mamba1: odd sizes, no conv bias, untied
    "m1-odd": ("mamba", dict(hidden_size=40, intermediate_size=72, time_step_rank=3, state_size=8,
                             use_conv_bias=False, tie_word_embeddings=False)),
    # Mamba1: state 16, tied, with in/out projection biases
    "m1-s16": ("mamba", dict(hidden_size=32, state_size=16, use_bias=True)),
    "falcon": ("falcon_mamba", dict(hidden_size=32, state_size=8)),
    # Mamba2: heads x head_dim, n_groups 1, 2, 8, states; chunk sizes that do not divide LENGTH; untied
    "m2-6x16-g1-n16": ("mamba2", dict(hidden_size=48, num_heads=6, head_dim=16, n_groups=1, state_size=16,
                                      chunk_size=16)),
    "m2-4x32-g2-n64": ("mamba2", dict(hidden_size=64, num_heads=4, head_dim=32, n_groups=2, state_size=64,
                                      chunk_size=8)),
    "m2-8x16-g8-n32": ("mamba2", dict(hidden_size=64, num_heads=8, head_dim=16, n_groups=8, state_size=32,
                                      chunk_size=32, time_step_limit=(0.0, 0.5))),
}


# ----------------------------------------------------------------------------- helpers
def logit_errors(ref: torch.Tensor, out: torch.Tensor) -> tuple[float, float]:
    """(max |out - ref|, that divided by max |ref|)."""
    max_abs = (out.double() - ref.double()).abs().max().item()
    return max_abs, max_abs / ref.abs().max().item()


@torch.no_grad()
def all_paths(model: MambaLM, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """Our logits (b, l, vocab) along forward, token-by-token step, prefill + step, and two
    prefills (the second from a carried state) + step."""
    b, length = ids.shape
    cache = model.allocate_cache(b)
    step = torch.stack([model.step(ids[:, t], cache) for t in range(length)], dim=1)
    cache = model.allocate_cache(b)
    head = model(ids[:, :PREFILL], cache)
    tail = torch.stack([model.step(ids[:, t], cache) for t in range(PREFILL, length)], dim=1)
    cache = model.allocate_cache(b)
    two = [model(ids[:, :PREFILL2], cache), model(ids[:, PREFILL2:PREFILL2 + 17], cache)]
    two += [model.step(ids[:, t], cache)[:, None] for t in range(PREFILL2 + 17, length)]
    return {"forward": model(ids), "step": step, "prefill+step": torch.cat([head, tail], dim=1),
            "2prefill+step": torch.cat(two, dim=1)}


def check(name: str, source: str, path: str, out, ref, parity_log, vocab=None, tol=REL_TOL):
    max_abs, max_rel = logit_errors(ref, out[..., :vocab])
    parity_log.append(dict(config=name, source=source, path=path, max_abs=max_abs, max_rel=max_rel,
                           scale=ref.abs().max().item()))
    print(f"{name:<16} {source:<10} {path:<15} max|diff| {max_abs:.3e}  rel {max_rel:.3e}")
    assert max_rel <= tol, f"{name} {source} {path}: relative error {max_rel:.3e} > {tol:.0e}"


def check_paths(name: str, source: str, model: MambaLM, ids, ref, parity_log, vocab=None, tol=REL_TOL):
    """Compare every path with the oracle's logits ref (ours restricted to the first `vocab`)."""
    for path, out in all_paths(model, ids).items():
        check(name, source, path, out, ref, parity_log, vocab, tol)


def transformers_trusted(hf) -> tuple[bool, str]:
    """Whether the installed transformers computes mamba_ssm's function for this model."""
    c = hf.config
    if c.model_type != "mamba2" or c.n_groups == 1 or installed_norms_per_group():
        return True, ""
    fixed = ".".join(map(str, GROUPED_NORM_FIXED))
    return False, (f"transformers {'.'.join(map(str, installed_version()))} normalises Mamba2's gated norm "
                   f"over all of d_inner (per group from {fixed}): not an oracle for n_groups={c.n_groups}")


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
                  norm_epsilon=c.layer_norm_epsilon,
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
    """name, transformers model, HF folder, ids, the oracle's logits (float64), the tolerance."""
    name = request.param
    kind, overrides = CONFIGS[name]
    hf = hf_factory(kind, seed=3, **overrides)
    folder = tmp_path_factory.mktemp(name)
    hf.save_pretrained(folder)
    ids = torch.randint(0, hf.config.vocab_size, (BATCH, LENGTH), generator=torch.Generator().manual_seed(4))
    ref = lm_logits(spec_from_hf(hf.config), hf.state_dict(), ids)
    assert ref.std() > 0.5, f"logits too small to test anything: std {ref.std():.3f}"
    floor32 = logit_errors(ref, lm_logits(spec_from_hf(hf.config), hf.state_dict(), ids, torch.float32))[1]
    return name, hf, folder, ids, ref, max(REL_TOL, 2 * floor32)


# ----------------------------------------------------------------------------- tests
def test_hf_folder(case, parity_log):
    name, hf, folder, ids, ref, tol = case
    loaded = qmamba.load(folder)
    assert loaded.format == "hf" and not loaded.model.training
    cfg = loaded.model.config
    if cfg.arch == "mamba2":                      # mamba_ssm's per-group norm, with no override written
        assert cfg.norm_group_size == cfg.d_inner // cfg.ngroups
        assert "qmamba_norm_group_size" not in cfg.to_hf()
    check_paths(name, "hf", loaded.model, ids, ref, parity_log, tol=tol)


@pytest.mark.parametrize("chunk", CHUNK_SIZES)
def test_chunked_ssd(case, chunk, parity_log):
    """Mamba2's parallel path at chunk sizes that divide neither the length nor the pieces of a
    two-part prefill (padding, several chunks, a carried state entering the SSD)."""
    name, hf, folder, ids, ref, tol = case
    if hf.config.model_type != "mamba2":
        pytest.skip("Mamba1's parallel scan has no chunk size")
    model = qmamba.load(folder).model
    for layer in model.backbone.layers:
        layer.mixer.chunk_size = chunk
    with torch.no_grad():
        check(name, "hf", f"chunk {chunk}", model(ids), ref, parity_log, tol=tol)
        cache = model.allocate_cache(ids.shape[0])
        out = torch.cat([model(ids[:, :PREFILL2], cache), model(ids[:, PREFILL2:], cache)], dim=1)
        check(name, "hf", f"chunk {chunk} 2x", out, ref, parity_log, tol=tol)


def test_oracle_matches_transformers(case, parity_log):
    """The oracle against an independent implementation, where that one is known to be right."""
    name, hf, folder, ids, ref, tol = case
    trusted, why = transformers_trusted(hf)
    if not trusted:
        pytest.skip(why)
    with torch.no_grad():
        check(name, "transformers", "forward", hf(ids).logits, ref, parity_log, tol=tol)


def test_transformers_agrees(case, parity_log):
    """qmamba against the installed transformers' forward, where transformers is known right."""
    name, hf, folder, ids, ref, tol = case
    trusted, why = transformers_trusted(hf)
    if not trusted:
        pytest.skip(why)
    with torch.no_grad():
        theirs = hf(ids).logits.double()
        ours = qmamba.load(folder).model(ids)
    # both float32: twice the budget of one float32 implementation against the oracle
    check(name, "hf-vs-tf", "forward", ours, theirs, parity_log, tol=2 * tol)


def test_whole_width_norm_is_not_the_reference(case):
    """The old (transformers < 5.23) gated norm over all of d_inner, set explicitly with
    qmamba_norm_group_size, is written back and read again, and is visibly not the reference
    for n_groups > 1: the parity tests can tell the two apart."""
    name, hf, folder, ids, ref, tol = case
    if hf.config.model_type != "mamba2" or hf.config.n_groups == 1:
        pytest.skip("one group: both norms are the same")
    cfg = dataclasses.replace(qmamba.load(folder).model.config, norm_group_size=0)
    whole = dataclasses.replace(cfg, norm_group_size=cfg.d_inner)
    raw = whole.to_hf()
    assert raw["qmamba_norm_group_size"] == cfg.d_inner and from_hf_dict(raw).norm_group_size == cfg.d_inner
    model = MambaLM(from_hf_dict(raw))
    model.load_state_dict(hf.state_dict())
    with torch.no_grad():
        assert logit_errors(ref, model.eval()(ids))[1] > 1e-3


@torch.no_grad()
def test_logits_to_keep(case):
    """Only the last positions' logits, as transformers' argument of the same name."""
    name, hf, folder, ids, ref, tol = case
    model = qmamba.load(folder).model
    last = model(ids, logits_to_keep=2)
    assert last.shape == (ids.shape[0], 2, hf.config.vocab_size)
    full = model(ids)[:, -2:]
    assert logit_errors(full, last)[1] <= REL_TOL


@torch.no_grad()
def test_decode_constants_follow_the_parameters(case):
    """The token step's cached A and D are those of the current A_log and D: recomputed after
    an in-place change and after a parameter is replaced, otherwise reused."""
    _, _, folder, ids, _, _ = case
    model = qmamba.load(folder).model
    mixer = model.backbone.layers[0].mixer
    first = mixer.decode_constants()
    assert mixer.decode_constants() is first                          # reused while unchanged
    mixer.A_log.add_(0.5)
    A, D = mixer.decode_constants()
    assert torch.equal(A, mixer.channel_A_D()[0])                     # the same computation
    mixer.D = nn.Parameter(mixer.D * 2)
    assert torch.equal(mixer.decode_constants()[1], mixer.channel_A_D()[1])
    step = [model.step(ids[:, t], cache) for cache in [model.allocate_cache(ids.shape[0])] for t in range(3)]
    assert logit_errors(model(ids[:, :3]), torch.stack(step, 1))[1] <= REL_TOL


def test_inference_mode_model(case):
    """A model loaded under torch.inference_mode (its parameters inference tensors, which keep no
    version counter) decodes, and every path equals the same model's outside inference mode."""
    _, _, folder, ids, _, _ = case
    expected = all_paths(qmamba.load(folder).model, ids)
    with torch.inference_mode():
        model = qmamba.load(folder).model
        assert torch.is_inference(model.backbone.layers[0].mixer.A_log)
        got = all_paths(model, ids)
    for path, out in expected.items():
        assert torch.equal(got[path], out), path


def test_mamba_ssm_folder(case, parity_log, tmp_path):
    name, hf, folder, ids, ref, tol = case
    if hf.config.model_type == "falcon_mamba":
        pytest.skip("mamba_ssm has no Falcon-Mamba format")
    path = save_mamba_ssm(hf, tmp_path / "ssm")
    loaded = qmamba.load(path)
    cfg = loaded.model.config
    assert loaded.format == "mamba_ssm" and cfg.vocab_size % PAD_MULTIPLE == 0
    if cfg.arch == "mamba2":
        assert cfg.norm_group_size == cfg.d_inner // cfg.ngroups
    # the oracle on the padded checkpoint itself, restricted to the real vocabulary
    sd = torch.load(path / "pytorch_model.bin", weights_only=True)
    own = lm_logits(spec_from_hf(hf.config), sd, ids)[..., :hf.config.vocab_size]
    assert logit_errors(ref, own)[1] < 1e-12
    check_paths(name, "mamba_ssm", loaded.model, ids, ref, parity_log, vocab=hf.config.vocab_size, tol=tol)


def test_mamba_ssm_gated_norm_eps(hf_factory, tmp_path, parity_log):
    """mamba_ssm's Mamba2 builds its gated norm with eps=1e-5 whatever norm_epsilon says (the
    block norms use norm_epsilon); the value survives a save in transformers' format."""
    hf = hf_factory("mamba2", seed=8, n_groups=2, layer_norm_epsilon=0.1)
    ids = torch.randint(0, hf.config.vocab_size, (BATCH, 21), generator=torch.Generator().manual_seed(6))
    spec = dataclasses.replace(spec_from_hf(hf.config), gated_norm_eps=1e-5)
    ref = lm_logits(spec, hf.state_dict(), ids)
    assert logit_errors(ref, lm_logits(spec_from_hf(hf.config), hf.state_dict(), ids))[1] > 1e-3
    model = qmamba.load(save_mamba_ssm(hf, tmp_path / "ssm")).model
    assert (model.config.norm_eps, model.config.gated_norm_eps) == (0.1, 1e-5)
    with torch.no_grad():
        check("m2-eps0.1", "mamba_ssm", "forward", model(ids), ref, parity_log, vocab=hf.config.vocab_size)
    raw = model.config.to_hf()
    assert raw["qmamba_gated_norm_eps"] == 1e-5 and from_hf_dict(raw).gated_norm_eps == 1e-5


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
        assert logit_errors(lm_logits(spec_from_hf(hf.config), hf.state_dict(), ids), loaded.model(ids))[1] <= REL_TOL


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
        assert logit_errors(lm_logits(spec_from_hf(hf.config), hf.state_dict(), ids), model(ids))[1] <= REL_TOL
