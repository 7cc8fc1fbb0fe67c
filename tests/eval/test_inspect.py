"""`qmamba inspect`: the report folder (PNGs, summary.md, stats.json), the statistics against
direct computations (state maxima from prefix-by-prefix parallel scans and from
`selective_scan_ref`, activation maxima from the block's own norm), the SQNR function, and user
mistakes (exit 2, one line, nothing left behind)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from qmamba import load
from qmamba.cli import main
from qmamba.errors import QMambaError
from qmamba.eval import inspect as insp
from qmamba.models.scan.reference import selective_scan_ref
from qmamba.quant.calibrate import calibration_ids
from qmamba.quant.state import StateQuantizer

PNG = b"\x89PNG\r\n\x1a\n"
FAST = ["--nsamples", "2", "--seqlen", "24"]
POINTS = {"mamba2": {"in_proj", "conv", "x", "dt", "B", "C", "z", "out_proj"},
          "mamba1": {"in_proj", "conv", "x", "dt_proj", "dt", "B", "C", "z", "out_proj"}}


@pytest.fixture(autouse=True)
def eager(monkeypatch):
    monkeypatch.setenv("QMAMBA_COMPILE", "0")


@pytest.fixture(scope="module")
def two_layer_mamba2(hf_factory, save_hf_folder, tokenizer_vocab, tmp_path_factory) -> Path:
    model = hf_factory("mamba2", seed=3, vocab_size=tokenizer_vocab, hidden_size=32, num_hidden_layers=2)
    return save_hf_folder(model, tmp_path_factory.mktemp("two_layer_mamba2"))


def fails(argv, capsys, *needles) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith("qmamba inspect: error: "), err
    for needle in needles:
        assert needle in err, (needle, err)
    return err


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".tmp-" in p.name or ".old-" in p.name)


def check_report(out: Path, arch: str, layers: list[int], bits: int) -> dict:
    stats = json.loads((out / "stats.json").read_text())
    assert {"model", "data", "bits", "quantizers", "files", "layers", "seconds", "sqnr_definition"} <= set(stats)
    assert stats["bits"] == bits and stats["model"]["arch"] == arch
    assert [L["layer"] for L in stats["layers"]] == layers
    pngs = sorted(p.name for p in out.glob("*.png"))
    w = 2
    expected = ["state_overview.png", "state_sqnr.png"] + [f"state_heatmap_layer{i:0{w}d}.png" for i in layers] + \
        [f"activations_layer{i:0{w}d}.png" for i in layers]
    assert pngs == sorted(expected) and sorted(stats["files"]) == sorted(expected)
    for name in pngs:
        data = (out / name).read_bytes()
        assert data[:8] == PNG and len(data) > 5000, name
    for L in stats["layers"]:
        s = L["state"]
        assert {"max", "median", "channel_ratio", "state_ratio", "channel_profile", "state_profile",
                "top_channels", "top_state_indices", "argmax"} <= set(s)
        assert len(s["channel_profile"]) == L["channels"] and len(s["state_profile"]) == L["state_size"]
        assert s["channel_ratio"] >= 1 and s["state_ratio"] >= 1
        assert ("head_ratio" in s) == (arch == "mamba2")
        assert set(L["sqnr_db"]) == {f"{k}-{m}" for k, m in insp.QUANTIZERS}
        assert all(math.isfinite(v) and v > 0 for v in L["sqnr_db"].values())
        assert set(L["activations"]) == POINTS[arch]
        assert all(a["ratio"] >= 1 and len(a["profile"]) == a["channels"] for a in L["activations"].values())
    md = (out / "summary.md").read_text()
    assert md.startswith("# qmamba inspect:") and "## Observations" in md and "SQNR dsq-dynamic" in md
    for name in expected:
        assert f"`{name}`" in md
    assert sorted(p.name for p in out.iterdir()) == sorted(expected + ["stats.json", "summary.md"])
    return stats


# ------------------------------------------------------------------------------ the command
def test_report_mamba2(tiny_mamba2, tmp_path, capsys):
    out = tmp_path / "report"
    assert main(["inspect", str(tiny_mamba2[1]), "--out", str(out), *FAST]) == 0
    stats = check_report(out, "mamba2", [0], 4)
    assert stats["data"] == {"text": "the shipped validation text (validation.txt)", "nsamples": 2,
                             "seqlen": 24, "tokens": 48, "seed": 0}
    assert stats["model"]["heads"] == 4 and stats["layers"][0]["state"]["head_profile"]
    assert "wrote 4 plots" in capsys.readouterr().out
    assert leftovers(tmp_path) == []


def test_report_mamba1_bits_and_force(tiny_mamba1, tmp_path, capsys):
    out = tmp_path / "report"
    out.mkdir()
    (out / "old.txt").write_text("x")
    fails(["inspect", str(tiny_mamba1[1]), "--out", str(out), *FAST], capsys, "already exists", "--force")
    assert (out / "old.txt").exists()
    assert main(["inspect", str(tiny_mamba1[1]), "--out", str(out), "--bits", "3", "--layers", "0",
                 "--force", *FAST]) == 0
    check_report(out, "mamba1", [0], 3)
    assert leftovers(tmp_path) == []


def test_layer_subset(two_layer_mamba2, tmp_path):
    out = tmp_path / "r"
    assert main(["inspect", str(two_layer_mamba2), "--out", str(out), "--layers", "1", *FAST]) == 0
    check_report(out, "mamba2", [1], 4)


# ------------------------------------------------------------------------------ against direct computations
@pytest.mark.parametrize("which", ["tiny_mamba2", "tiny_mamba1"])
def test_stats_match_direct_computation(which, request, scan_inputs):
    loaded = load(request.getfixturevalue(which)[1])
    model = loaded.model
    ids = calibration_ids(loaded.tokenizer, nsamples=3, seqlen=20, seed=1)
    (rec,) = insp.collect(model, ids, [0], bits=4, batch_size=2)
    mixer = model.layers[0].mixer
    assert "scan" not in vars(mixer)                 # the probe is gone

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
    assert set(rec.act) == POINTS[model.config.arch]

    # the reported ratios are those of the map
    st = insp.layer_stats(rec)["state"]
    pc, pn = ref.amax(1), ref.amax(0)
    assert st["channel_ratio"] == pytest.approx((pc.max() / pc.median()).item(), rel=1e-3)
    assert st["state_ratio"] == pytest.approx((pn.max() / pn.median()).item(), rel=1e-3)
    assert st["max"] == pytest.approx(ref.max().item(), rel=1e-3)


def test_quantized_model_is_refused(tiny_mamba2):
    model = load(tiny_mamba2[1]).model
    m = model.layers[0].mixer
    m.state_quant = StateQuantizer("tensor", 4, *m.ssm_state_shape())
    with pytest.raises(QMambaError, match="float models"):
        insp.collect(model, torch.zeros(1, 4, dtype=torch.long))


# ------------------------------------------------------------------------------ SQNR
def test_sqnr_db():
    h = torch.ones(2, 3, 4)
    assert insp.sqnr_db(h, 0.9 * h) == pytest.approx(20.0)
    assert insp.sqnr_db(h, h) == math.inf


def planted(seed=0, m=24, d=32, n=16) -> torch.Tensor:
    """States with outliers along both axes: a few large channels and one large state index."""
    g = torch.Generator().manual_seed(seed)
    ch = torch.ones(d)
    ch[3], ch[17] = 40.0, 8.0
    st = torch.ones(n)
    st[5] = 12.0
    return torch.randn(m, d, n, generator=g) * ch[:, None] * st


def test_dsq_beats_per_tensor_on_planted_outliers():
    s = insp.sqnr_of_states(planted(), bits=4)
    assert s["dsq-dynamic"] >= s["tensor-dynamic"] + 3
    assert s["dsq-dynamic"] >= s["channel-dynamic"] - 1e-9     # DSQ includes per-channel (s_n = 1)
    assert s["dsq-static"] >= s["tensor-static"]


def test_sqnr_matches_manual_per_tensor():
    h = planted(seed=1)
    s = insp.sqnr_of_states(h, bits=4, configs=[("tensor", "dynamic")])["tensor-dynamic"]
    scale = (h.abs().amax((1, 2), keepdim=True) / 7).half().float()
    q = torch.round(h / scale).clamp(-7, 7) * scale
    expected = 10 * math.log10(h.pow(2).sum().item() / (h - q).pow(2).sum().item())
    assert s == pytest.approx(expected, rel=1e-6)


# ------------------------------------------------------------------------------ user mistakes
@pytest.mark.parametrize("extra, needles", [
    (["--layers", "a,b"], ["--layers", "'a,b'"]),
    (["--layers", ""], ["--layers"]),
    (["--layers", "0,0"], ["twice"]),
    (["--layers", "5"], ["has 1 layer (indices 0..0)"]),
    (["--bits", "1"], ["--bits must be between 2 and 8"]),
    (["--bits", "9"], ["--bits must be between 2 and 8"]),
    (["--nsamples", "0"], ["--nsamples"]),
    (["--calib", "/nonexistent/calib.txt"], ["does not exist"]),
])
def test_bad_options(extra, needles, tiny_mamba2, tmp_path, capsys):
    out = tmp_path / "out"
    fails(["inspect", str(tiny_mamba2[1]), "--out", str(out), *FAST, *extra], capsys, *needles)
    assert not out.exists() and leftovers(tmp_path) == []


def test_missing_model(tmp_path, capsys):
    out = tmp_path / "out"
    fails(["inspect", str(tmp_path / "nowhere"), "--out", str(out)], capsys, "does not exist")
    assert not out.exists()


def test_out_is_a_file(tiny_mamba2, tmp_path, capsys):
    out = tmp_path / "out"
    out.write_text("x")
    fails(["inspect", str(tiny_mamba2[1]), "--out", str(out), "--force", *FAST], capsys, "is a file")
    assert out.read_text() == "x"


def test_failure_while_writing_leaves_nothing(tiny_mamba2, tmp_path, capsys, monkeypatch):
    def boom(*a, **k):
        raise QMambaError("plotting failed")

    monkeypatch.setattr(insp, "plot_sqnr", boom)
    out = tmp_path / "out"
    fails(["inspect", str(tiny_mamba2[1]), "--out", str(out), *FAST], capsys, "plotting failed")
    assert not out.exists() and leftovers(tmp_path) == []
