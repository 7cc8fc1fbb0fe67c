"""`qmamba compare` (the main job) end to end on the tiny Mamba2: every row evaluated the same
way, the Markdown table, the JSON and the plot, and one-line errors for bad input."""

from __future__ import annotations

import copy
import json

import pytest
import torch

import qmamba
from qmamba.cli import main
from qmamba.cli.compare import ROWS
from qmamba.eval import perplexity, tokenize_text_file
from qmamba.eval.memory import cast_float_weights, memory_report
from qmamba.quant.calibrate import calibration_ids
from qmamba.utils import paths

TEST_TEXT = paths.TEST_TEXT

SMALL = ["--max-tokens", "256", "--text-max-tokens", "256", "--seqlen", "64", "--limit", "4", "--nsamples", "4",
         "--calib-seqlen", "64",
         "--tasks", "nextsent_proxy"]


@pytest.fixture(autouse=True)
def eager_fused_scan(monkeypatch):
    monkeypatch.setenv("QMAMBA_COMPILE", "0")
    monkeypatch.setitem(ROWS, "qmamba-fast", ("qmamba", {"method_options": dict(nsamples=2, seqlen=32, epochs=1)}))


def test_compare_rows_table_json_and_plot(tiny_mamba2, tmp_path, capsys):
    out, png = tmp_path / "cmp.json", tmp_path / "cmp.png"
    argv = ["compare", str(tiny_mamba2[1]), "--methods", "fp,rtn,dsq,qmamba-fast", *SMALL,
            "--json", str(out), "--plot", str(png)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    res = json.loads(out.read_text())
    rows = res["results"]
    assert [r["label"] for r in rows] == ["fp", "rtn", "dsq", "qmamba-fast"]
    # the float row is labelled with the dtype it is computed in (the default float32), not FP16
    assert [r["config"] for r in rows] == ["FP32", "W8A8H4", "W8A8H4", "W8A8H4"]
    assert {r["tokens"] for r in rows} == {4 * 63}                    # the same 256 test tokens for every row
    for r in rows:
        assert 0 <= r["tasks"]["nextsent_proxy"]["acc"] <= 1
        assert r["memory"]["estimated"] is True and "meta-device" in r["memory"]["basis"]
    fp, rtn, dsq, qm = rows
    # the oracle: qmamba.eval.perplexity on the float model, and on the model quantized through
    # the Python API with the same calibration windows, as compare evaluates them (batches of 16)
    loaded = qmamba.load(tiny_mamba2[1])
    ids = tokenize_text_file(TEST_TEXT, loaded.tokenizer)

    def ppl(model):
        return perplexity(model, ids, seqlen=64, max_tokens=256, batch_size=16, progress=False)["perplexity"]

    assert fp["perplexity"] == ppl(loaded.model)
    calib = calibration_ids(loaded.tokenizer, None, 4, 64, 0)
    quantized = {}
    for r in (rtn, dsq):
        model = copy.deepcopy(loaded.model)
        qmamba.quantize(model, "w8a8h4", calib=calib, method=r["method"], seed=0, progress=False)
        assert r["perplexity"] == ppl(model), r["label"]
        quantized[r["label"]] = model
    assert rtn["perplexity"] != fp["perplexity"]                      # quantization did something
    # the memory column is an estimate from shapes: it must equal the bytes of the real model in
    # its deployed form (float parts cast to FP16), weights + a batch-1 cache
    for r, model in ((fp, loaded.model), (rtn, quantized["rtn"]), (dsq, quantized["dsq"])):
        real = memory_report(cast_float_weights(copy.deepcopy(model), torch.float16), (1,))
        assert r["memory"]["weights"] == real["weights"]["total"], r["label"]
        assert r["memory"]["total"] == real["batches"]["1"]["total"], r["label"]
    assert fp["memory"]["ratio"] == pytest.approx(1.0, abs=0.05)
    assert dsq["memory"]["total"] < fp["memory"]["total"]              # guaranteed: W8 and H4 codes
    assert "| est. memory (MiB) | vs FP16 model |" in res["markdown"] and "not measured" in res["markdown"]
    assert (dsq["state_quant"], dsq["state_scale"]) == ("dsq", "dynamic")
    assert len(qm["esr"]) == 1                                        # one record per block (1 layer)
    assert rtn["perplexity"] != fp["perplexity"]                      # quantization did something
    for r in rows:                                                    # the table carries every row
        assert f"| {r['label']} | {r['config']} |" in printed
    assert res["markdown"] in printed
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(tmp_path.glob(".*tmp*"))


def test_group_rows_take_the_group_size(tiny_mamba2, tmp_path):
    """The *-group rows quantize the state with one dynamic scale per channel and group of
    --state-group-size state indices: labelled so, and their extra scales are counted."""
    out = tmp_path / "cmp.json"
    assert main(["compare", str(tiny_mamba2[1]), "--methods", "dsq,dsq-group", "--config", "w8a8h2",
                 "--state-group-size", "4", *SMALL, "--json", str(out)]) == 0
    dsq, group = json.loads(out.read_text())["results"]
    assert (group["state_quant"], group["state_scale"]) == ("group4", "dynamic")
    assert group["memory"]["total"] > dsq["memory"]["total"]
    assert group["perplexity"] != dsq["perplexity"]


def test_esr_flags_reach_every_esr_row(tiny_mamba2, tmp_path):
    """--esr-* flags set the ESR options of the rows that run ESR (recorded in the JSON) and change
    what they compute; rows without ESR ignore them."""
    ppl = {}
    for sim in ("chunk", "exact"):
        out = tmp_path / f"{sim}.json"
        assert main(["compare", str(tiny_mamba2[1]), "--methods", "dsq,qmamba-fast", "--esr-sim", sim,
                     "--esr-lr", "0.05", *SMALL, "--no-kld", "--json", str(out)]) == 0
        dsq, esr = json.loads(out.read_text())["results"]
        assert "method_options" not in dsq["options"]
        assert esr["options"]["method_options"] == dict(nsamples=2, seqlen=32, epochs=1, sim=sim, lr=0.05)
        ppl[sim] = (dsq["perplexity"], esr["perplexity"])
    assert ppl["chunk"][0] == ppl["exact"][0] and ppl["chunk"][1] != ppl["exact"][1]


@pytest.mark.parametrize("extra, needle", [
    (["--methods", "fp,dsq", "--esr-epochs", "2"], "--esr-* flags need a row with ESR"),
    (["--methods", "fp,gptq"], "unknown row(s) gptq"),
    (["--config", "w9a8"], "W9 is not supported"),
    (["--seqlen", "1"], "--seqlen must be >= 2"),
    (["--state-group-size", "0"], "--state-group-size >= 1"),
])
def test_bad_input(tiny_mamba2, capsys, extra, needle):
    assert main(["compare", str(tiny_mamba2[1]), *SMALL, *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and needle in err, err


def test_compare_refuses_a_quantized_model(tmp_path, tiny_mamba2, capsys):
    q = tmp_path / "q"
    assert main(["quantize", str(tiny_mamba2[1]), "--method", "rtn", "--nsamples", "2", "--calib-seqlen", "32",
                 "--out", str(q)]) == 0
    assert main(["compare", str(q), *SMALL]) == 2
    assert "already quantized" in capsys.readouterr().err
