"""qmamba.eval.inspect.probe: the statistics of the calibration run against direct computations
(state maxima from prefix-by-prefix parallel scans and from `selective_scan_ref`, activation
maxima from the block's own norm), the mixer left as it was, and quantized models refused."""

from __future__ import annotations

import pytest
import torch

from qmamba import load
from qmamba.errors import QMambaError
from qmamba.eval.inspect.probe import collect
from qmamba.eval.inspect.statistics import add_sqnr, layer_stats
from qmamba.models.scan.reference import selective_scan_ref
from qmamba.quant.calibrate import calibration_ids
from qmamba.quant.state import StateQuantizer


@pytest.mark.parametrize("which", ["tiny_mamba2", "tiny_mamba1"])
def test_stats_match_direct_computation(which, request, scan_inputs, points):
    loaded = load(request.getfixturevalue(which)[1])
    model = loaded.model
    ids = calibration_ids(loaded.tokenizer, nsamples=3, seqlen=20, seed=1)
    (rec,) = collect(model, ids, [0], batch_size=2)
    mixer = model.layers[0].mixer
    # the probe is gone: no state hook, no forward hooks left on the mixer or its points
    assert mixer.state_quant is None and "scan" not in vars(mixer)
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in mixer.modules())
    assert 0 < len(rec.samples) <= 3 * 8 and all(s.shape == (rec.d, rec.n) for s in rec.samples)

    # the native scan inputs of the float model, captured independently, in collect's batches of
    # 2 sequences: the exact comparison below needs the same batching (a matmul over 2 or 3
    # sequences, or an elementwise op over a different length, may round differently on some CPUs)
    batches = scan_inputs(mixer, lambda: [model(ids[s:s + 2]) for s in range(0, len(ids), 2)])
    x, dt, B, C = (torch.cat(t) for t in zip(*batches))
    with torch.no_grad():
        # every state h_t as the final state of the parallel scan of the prefix 1..t
        prefix = torch.stack([mixer.parallel_scan(x[:, :t], dt[:, :t], B[:, :t], C[:, :t], None)[1]
                              for t in range(1, ids.shape[1] + 1)])            # (l, b, d, n)
        # and along selective_scan_ref, batch by batch as collect runs it
        states = []
        for inputs in batches:
            selective_scan_ref(*mixer.per_channel(*inputs), None, lambda h: states.append(h.abs().amax(0)) or h)
    ref = torch.stack(states).amax(0)
    torch.testing.assert_close(rec.amax, prefix.abs().amax((0, 1)), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(rec.amax, ref, rtol=0, atol=0)

    # activation maxima: the in_proj input is the block's norm of the embeddings
    with torch.no_grad():
        a = model.layers[0].norm(model.backbone.embeddings(ids)).abs().amax((0, 1))
    torch.testing.assert_close(rec.act["in_proj"], a)
    assert set(rec.act) == points[model.config.arch]

    # the reported ratios are those of the map
    add_sqnr([rec], bits=4)
    assert rec.samples == [] and set(rec.sqnr) and all(v > 0 for v in rec.sqnr.values())
    st = layer_stats(rec)["state"]
    pc, pn = ref.amax(1), ref.amax(0)
    assert st["channel_ratio"] == pytest.approx((pc.max() / pc.median()).item(), rel=1e-3)
    assert st["state_ratio"] == pytest.approx((pn.max() / pn.median()).item(), rel=1e-3)
    assert st["max"] == pytest.approx(ref.max().item(), rel=1e-3)


def test_quantized_model_is_refused(tiny_mamba2):
    model = load(tiny_mamba2[1]).model
    m = model.layers[0].mixer
    m.state_quant = StateQuantizer("tensor", 4, *m.ssm_state_shape())
    with pytest.raises(QMambaError, match="float models"):
        collect(model, torch.zeros(1, 4, dtype=torch.long))
