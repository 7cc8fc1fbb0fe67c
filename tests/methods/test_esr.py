"""ESR (qmamba.methods.esr) and its state simulations (qmamba.quant.sim) on tiny perturbed models:
the simulations against the exact quantized recurrence, reconstruction that lowers each block's
error (and is undone where it would raise it), recorded errors recomputed from the finished
model, and the block-by-block device handling."""

from __future__ import annotations

import copy

import pytest
import torch

from qmamba.errors import QMambaError
from qmamba.methods import resolve_config
from qmamba.methods.esr import ESRConfig, reconstruct
from qmamba.quant.activation import ActQuantizer
from qmamba.quant.apply import install_quantizers
from qmamba.quant.calibrate import run_calibration
from qmamba.quant.sim import SIMS, StateSim
from qmamba.quant.state import StateQuantizer
from qmamba.quantize import quantize

from test_methods import ARCHS, CALIB, IDS, rel_err, tiny


def calibrated(arch: str, spec: str = "w8a8h4", **opts):
    model = tiny(arch)
    qcfg = resolve_config(spec, "qmamba", **opts)
    install_quantizers(model, qcfg)
    run_calibration(model, CALIB, progress=False)
    return model, qcfg


def mixer_outputs(mixer, x, sim: str, chunk: int = 32):
    """(y under the simulation, y under the exact recurrence) for one mixer on input x."""
    with torch.no_grad():
        exact = mixer(x)
        mixer.state_sim = StateSim(sim, mixer.state_quant, chunk)
        mixer.train()
        try:
            simulated = mixer(x)
        finally:
            mixer.eval()
            mixer.state_sim = None
    return simulated, exact


@pytest.mark.parametrize("arch", ARCHS)
def test_exact_simulation_is_the_exact_recurrence(arch):
    model, _ = calibrated(arch)
    x = model.backbone.layers[0].norm(model.backbone.embeddings(IDS))
    sim, exact = mixer_outputs(model.backbone.layers[0].mixer, x, "exact")
    assert rel_err(sim, exact) < 1e-5


@pytest.mark.parametrize("arch", ARCHS)
def test_chunk_simulation_carries_the_exact_state_at_chunk_one(arch, scan_inputs):
    """With chunks of one token every carried state is quantized, so the final state is the
    exact recurrence's (the read-outs inside a chunk use the float state, by design)."""
    model, _ = calibrated(arch, "w8a8h8")
    mixer = model.backbone.layers[0].mixer
    x = model.backbone.layers[0].norm(model.backbone.embeddings(IDS))
    ((xs, dt, B, C),) = scan_inputs(mixer, lambda: mixer(x))
    q = mixer.state_quant
    with torch.no_grad():
        _, h_sim = StateSim("chunk", q, chunk=1)(mixer, xs, dt, B, C)
        _, h_exact = StateSim("exact", q)(mixer, xs, dt, B, C)
    assert rel_err(h_sim, h_exact) < 1e-3


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("every,trim,with_h0", [(1, 0, False), (5, 3, True), (8, 0, True), (8, 5, False)])
def test_carried_scan_is_the_segment_loop(arch, every, trim, with_h0, scan_inputs):
    """The chunk simulation's two-pass scan (all segments at once) against the plain loop of
    segments (`segmented_scan`, the definition): outputs, carried state and gradients of the
    inputs and of the state scales, with a ragged last segment and with an entering state."""
    model, _ = calibrated(arch, state_scale="static")
    mixer = model.backbone.layers[0].mixer
    x = model.backbone.layers[0].norm(model.backbone.embeddings(IDS)).detach()
    ((xs, dt, B, C),) = scan_inputs(mixer, lambda: mixer(x))
    length = xs.shape[1] - trim
    q = mixer.state_quant
    q.static_scale.requires_grad_(True)
    h0 = 0.5 * q.fake_quant(torch.randn(xs.shape[0], q.d, q.n, generator=torch.Generator().manual_seed(3))).detach() \
        if with_h0 else None
    results = []
    for scan in (mixer.segmented_scan, mixer.carried_scan):
        inputs = [t[:, :length].detach().clone().requires_grad_(True) for t in (xs, dt, B, C)]
        q.static_scale.grad = None
        y, h = scan(*inputs, h0, every, q.fake_quant)
        (y.pow(2).sum() + h.pow(2).sum()).backward()
        results.append((y, h, *(t.grad for t in inputs), q.static_scale.grad.clone()))
    for ref, got in zip(*results):
        assert ref.shape == got.shape
        assert rel_err(got, ref) < 1e-4


@pytest.mark.parametrize("sim", SIMS)
def test_every_simulation_is_differentiable_in_the_state_scales(sim):
    model, _ = calibrated("mamba2", state_scale="static")
    mixer = model.backbone.layers[0].mixer
    q = mixer.state_quant
    for p in (q.s_n, q.static_scale):
        p.requires_grad_(True)
    x = model.backbone.layers[0].norm(model.backbone.embeddings(IDS)).detach()
    mixer.state_sim = StateSim(sim, q, 8)
    mixer.train()
    mixer(x).pow(2).mean().backward()
    assert q.s_n.grad is not None and q.s_n.grad.abs().sum() > 0
    assert q.static_scale.grad is not None and q.static_scale.grad.abs().sum() > 0


def float_copy(model):
    """A copy of a calibrated model with every quantizer off: the float blocks ESR targets."""
    fp = copy.deepcopy(model)
    for m in fp.modules():
        if isinstance(m, (ActQuantizer, StateQuantizer)):
            m.mode = "off"
    return fp


def block_errors(fp, model, nsamples: int = 8, seqlen: int = 32) -> list[float]:
    """Recomputed here from the finished model: for each block, the MSE of its exact output on
    the quantized model's own input against the float block's output on the float input (the
    quantity ESR records as mse_after)."""
    ids = CALIB[:nsamples, :seqlen]
    errs = []
    with torch.no_grad():
        x_fp = fp.backbone.embeddings(ids).float()
        x_q = x_fp.clone()
        for block_fp, block_q in zip(fp.backbone.layers, model.backbone.layers):
            x_fp, x_q = block_fp(x_fp).float(), block_q(x_q).float()
            errs.append(torch.nn.functional.mse_loss(x_q, x_fp).item())
    return errs


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("sim", ["chunk", "exact"])
def test_reconstruction_lowers_every_block_error(arch, sim):
    """Two epochs of ESR lower every block's error against its float target on these models
    (measured by 5-13%: after / before 0.87-0.95), the learned s_n move, and the recorded errors
    are what the finished model computes block by block."""
    model, qcfg = calibrated(arch, state_scale="static")
    fp = float_copy(model)
    s_n0 = [m.mixer.state_quant.s_n.detach().clone() for m in model.backbone.layers]
    records = reconstruct(model, qcfg, CALIB, ESRConfig(sim=sim, nsamples=8, seqlen=32, epochs=2, lr=2e-2,
                                                        chunk=8), progress=False)
    assert [r["block"] for r in records] == list(range(model.config.n_layer))
    for r, layer, s_n in zip(records, model.backbone.layers, s_n0):
        assert r["kept"] and r["mse_after"] < 0.98 * r["mse_before"], r
        assert not torch.equal(layer.mixer.state_quant.s_n, s_n)
    for r, err in zip(records, block_errors(fp, model)):
        assert err == pytest.approx(r["mse_after"], rel=1e-4)


@pytest.mark.parametrize("arch", ARCHS)
def test_propagated_inputs_are_the_frozen_models_exact_outputs(arch, tmp_path):
    """The inputs ESR hands from block to block (saved for resuming) are what the finished,
    integer-weight model computes with the exact recurrence, kept and undone blocks alike."""
    model, qcfg = calibrated(arch, state_scale="static")
    cfg = ESRConfig(sim="chunk", nsamples=8, seqlen=32, epochs=1, lr=2e-2, chunk=8)
    records = reconstruct(model, qcfg, CALIB, cfg, resume_dir=tmp_path, progress=False)
    last = len(records) - 1
    saved = torch.load(tmp_path / f"block{last}.pt", weights_only=True)["X_q"]
    with torch.no_grad():
        hidden = model.backbone.embeddings(CALIB[:8, :32]).float()
        for block in model.backbone.layers:
            hidden = block(hidden).float()
    assert all(m.w_bits == 8 for m in model.modules() if hasattr(m, "w_bits"))
    assert rel_err(saved, hidden) < 1e-5


def test_qmamba_improves_on_dsq_alone():
    """Same calibration, static DSQ state: ESR lowers the logit error against the float model."""
    fp = tiny("mamba2")
    with torch.no_grad():
        ref = fp(IDS)
    errs = {}
    for method, opts in (("dsq", {}), ("qmamba", {"method_options": dict(nsamples=8, seqlen=64, epochs=4, lr=2e-2)})):
        model = copy.deepcopy(fp)
        quantize(model, "w8a8h4", calib=CALIB, method=method, progress=False, state_scale="static", **opts)
        with torch.no_grad():
            errs[method] = rel_err(model(IDS), ref)
    assert errs["qmamba"] < errs["dsq"], errs


def test_bad_esr_config():
    with pytest.raises(QMambaError, match="unknown ESR simulation"):
        ESRConfig(sim="magic")
    with pytest.raises(QMambaError, match="ESR epochs must be positive"):
        ESRConfig(epochs=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_blocks_train_on_the_gpu_and_return():
    model, qcfg = calibrated("mamba2", state_scale="static")
    cpu = copy.deepcopy(model)
    cfg = dict(sim="chunk", nsamples=8, seqlen=32, epochs=1)
    reconstruct(model, qcfg, CALIB, ESRConfig(device="cuda", **cfg), progress=False)
    reconstruct(cpu, qcfg, CALIB, ESRConfig(device="cpu", **cfg), progress=False)
    assert all(p.device.type == "cpu" for p in model.parameters())
    for a, b in zip(model.backbone.layers, cpu.backbone.layers):
        assert torch.allclose(a.mixer.state_quant.s_n, b.mixer.state_quant.s_n, rtol=1e-3)


def test_a_reconstruction_that_hurts_is_undone():
    """A learning rate far too large makes training worse; those blocks keep their calibrated
    parameters and their error."""
    model, qcfg = calibrated("mamba2", state_scale="static")
    fp = float_copy(model)
    s_n0 = [m.mixer.state_quant.s_n.detach().clone() for m in model.backbone.layers]
    records = reconstruct(model, qcfg, CALIB, ESRConfig(sim="chunk", nsamples=8, seqlen=32, epochs=1, lr=50.0,
                                                        chunk=8), progress=False)
    undone = [i for i, r in enumerate(records) if not r["kept"]]
    assert undone, records
    for i in undone:
        assert records[i]["mse_after"] == records[i]["mse_before"]
        assert torch.equal(model.backbone.layers[i].mixer.state_quant.s_n, s_n0[i])
    # the finished model computes the recorded (restored) errors
    for r, err in zip(records, block_errors(fp, model)):
        assert err == pytest.approx(r["mse_after"], rel=1e-4)


def test_fewer_calibration_tokens_than_asked_are_said(caplog):
    """ESR takes the first nsamples x seqlen calibration tokens; asking for more than the
    calibration set holds is said in one warning (and runs on what there is), not silently."""
    model, qcfg = calibrated("mamba2")
    n, length = CALIB.shape
    with caplog.at_level("WARNING", logger="qmamba.esr"):
        reconstruct(model, qcfg, CALIB, ESRConfig(sim="chunk", nsamples=n, seqlen=length, epochs=1), progress=False)
    assert not caplog.records
    model, qcfg = calibrated("mamba2")
    with caplog.at_level("WARNING", logger="qmamba.esr"):
        reconstruct(model, qcfg, CALIB, ESRConfig(sim="chunk", nsamples=2 * n, seqlen=length, epochs=1),
                    progress=False)
    [warning] = caplog.records
    assert f"{n} x {length} calibration tokens, not the {2 * n} x {length}" in warning.getMessage()
