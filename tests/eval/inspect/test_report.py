"""qmamba.eval.inspect.report through `qmamba inspect`: the report folder (PNGs, summary.md,
stats.json), and user mistakes (exit 2, one line, nothing left behind)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from qmamba.cli import main
from qmamba.errors import QMambaError
from qmamba.eval.inspect import plots
from qmamba.eval.inspect.statistics import QUANTIZERS

PNG = b"\x89PNG\r\n\x1a\n"
FAST = ["--nsamples", "2", "--seqlen", "24"]


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


def check_report(out: Path, arch: str, layers: list[int], bits: int, points: dict) -> dict:
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
        assert set(L["sqnr_db"]) == {f"{k}-{m}" for k, m in QUANTIZERS}
        assert all(math.isfinite(v) and v > 0 for v in L["sqnr_db"].values())
        assert set(L["activations"]) == points[arch]
        assert all(a["ratio"] >= 1 and len(a["profile"]) == a["channels"] for a in L["activations"].values())
    md = (out / "summary.md").read_text()
    assert md.startswith("# qmamba inspect:") and "## Observations" in md and "SQNR dsq-dynamic" in md
    for name in expected:
        assert f"`{name}`" in md
    assert sorted(p.name for p in out.iterdir()) == sorted(expected + ["stats.json", "summary.md"])
    return stats


# ------------------------------------------------------------------------------ the command
def test_report_mamba2(tiny_mamba2, tmp_path, capsys, points):
    out = tmp_path / "report"
    assert main(["inspect", str(tiny_mamba2[1]), "--out", str(out), *FAST]) == 0
    stats = check_report(out, "mamba2", [0], 4, points)
    assert stats["data"] == {"text": "the shipped validation text (validation.txt)", "nsamples": 2,
                             "seqlen": 24, "tokens": 48, "seed": 0}
    assert stats["model"]["heads"] == 4 and stats["layers"][0]["state"]["head_profile"]
    assert "wrote 4 plots" in capsys.readouterr().out
    assert leftovers(tmp_path) == []


def test_report_mamba1_bits_and_force(tiny_mamba1, tmp_path, capsys, points):
    out = tmp_path / "report"
    out.mkdir()
    (out / "old.txt").write_text("x")
    fails(["inspect", str(tiny_mamba1[1]), "--out", str(out), *FAST], capsys, "already exists", "--force")
    assert (out / "old.txt").exists()
    assert main(["inspect", str(tiny_mamba1[1]), "--out", str(out), "--bits", "3", "--layers", "0",
                 "--force", *FAST]) == 0
    check_report(out, "mamba1", [0], 3, points)
    assert leftovers(tmp_path) == []


def test_layer_subset(two_layer_mamba2, tmp_path, points):
    out = tmp_path / "r"
    assert main(["inspect", str(two_layer_mamba2), "--out", str(out), "--layers", "1", *FAST]) == 0
    check_report(out, "mamba2", [1], 4, points)


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

    monkeypatch.setattr(plots, "plot_sqnr", boom)
    out = tmp_path / "out"
    fails(["inspect", str(tiny_mamba2[1]), "--out", str(out), *FAST], capsys, "plotting failed")
    assert not out.exists() and leftovers(tmp_path) == []
