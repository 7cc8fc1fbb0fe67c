"""`qmamba compare` against the float model on several held-out texts (issue 15): each row's KL
divergence and top-1 agreement equal a direct evaluation, the float model runs once per text, and
the table marks only differences whose paired interval excludes zero."""

from __future__ import annotations

import copy
import json

import pytest

import qmamba
from qmamba.cli import main
from qmamba.cli.compare import HELDOUT
from qmamba.eval import kld, suite, tokenize_text_file
from qmamba.quant.calibrate import calibration_ids

ARGS = ["--max-tokens", "256", "--text-max-tokens", "192", "--seqlen", "64", "--nsamples", "4",
        "--calib-seqlen", "64", "--tasks", ""]


def test_rows_match_a_direct_evaluation_on_every_text(tiny_mamba2, tmp_path, monkeypatch):
    calls = []
    real = kld.fp_reference
    monkeypatch.setattr(kld, "fp_reference", lambda *a, **k: calls.append(1) or real(*a, **k))
    out = tmp_path / "cmp.json"
    assert main(["compare", str(tiny_mamba2[1]), "--methods", "rtn,dsq", *ARGS, "--json", str(out)]) == 0
    assert len(calls) == 3                               # the float model once per text, not per row
    res = json.loads(out.read_text())
    rows = {r["label"]: r for r in res["results"]}
    assert list(rows["dsq"]["texts"]) == ["test", "ood-drama", "ood-tech"]
    # the oracle: the same model quantized through the API, evaluated against the float model
    loaded = qmamba.load(tiny_mamba2[1])
    fp = copy.deepcopy(loaded.model)
    calib = calibration_ids(loaded.tokenizer, None, 4, 64, 0)
    qmamba.quantize(loaded.model, "w8a8h4", calib=calib, method="dsq", seed=0, progress=False)
    ids = tokenize_text_file(HELDOUT["ood-drama"], loaded.tokenizer)[:192]
    want = kld.evaluate_against(loaded.model, real(fp, ids, 64, batch_size=16), batch_size=16)
    got = rows["dsq"]["texts"]["ood-drama"]
    assert got["kld"]["mean"] == pytest.approx(want["kld"]["mean"], rel=1e-6)
    assert got["top1_agreement"]["value"] == want["top1_agreement"]["value"]
    assert got["tokens"] == 3 * 63
    assert rows["dsq"]["perplexity"] == pytest.approx(rows["dsq"]["texts"]["test"]["perplexity"]["value"])
    # rtn's per-tensor static state is worse than dsq's on the same windows
    assert rows["rtn"]["texts"]["test"]["kld"]["mean"] > rows["dsq"]["texts"]["test"]["kld"]["mean"]
    assert "test: KLD [95% CI]" in res["distance_markdown"]


def _row(label, method, kld_sums):
    n = len(kld_sums)
    sums = {"kld": kld_sums, "same_top1": [10.0] * n, "nll": [20.0] * n, "nll_fp": [20.0] * n,
            "dp2": [0.0] * n, "tokens": [10.0] * n}
    text = {"window_sums": sums, "kld": {"mean": sum(kld_sums) / (10 * n), "ci95": [0, 1]},
            "top1_agreement": {"value": 1.0}, "ppl_ratio": {"value": 1.0}, "tokens": 10 * n, "windows": n}
    return {"label": label, "config": "W8A8H4", "method": method, "texts": {"test": text}}


def test_markdown_marks_only_significant_differences():
    base = _row("dsq", "dsq", [1.0, 2.0, 1.5, 1.2] * 8)
    worse = _row("rtn", "rtn", [3.0, 4.0, 3.5, 3.2] * 8)           # +2 on every window
    noise = _row("qmamba", "qmamba", [1.1, 1.9, 1.6, 1.1] * 8)     # +-0.1 around dsq
    table = suite.distance_markdown([base, worse, noise], baseline="dsq")
    lines = {ln.split(" | ")[0].strip("| "): ln for ln in table.splitlines() if ln.startswith("| ")}
    assert "*" in lines["rtn"] and "*" not in lines["qmamba"] and "*" not in lines["dsq"]
    assert "*" not in suite.distance_markdown([base, worse], baseline=None).split("\n\n")[0]


def test_no_kld_and_bad_texts(tiny_mamba2, tmp_path, capsys):
    out = tmp_path / "cmp.json"
    assert main(["compare", str(tiny_mamba2[1]), "--methods", "fp,rtn", *ARGS, "--no-kld", "--json", str(out)]) == 0
    assert all("texts" not in r for r in json.loads(out.read_text())["results"])
    capsys.readouterr()
    assert main(["compare", str(tiny_mamba2[1]), "--texts", "ood-drama,nowhere.txt", *ARGS[:-2]]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nowhere.txt" in err[0]
