"""`qmamba bench`: a tiny end-to-end run and its bad inputs (exit 2, one line)."""

from __future__ import annotations

import json

import pytest

import qmamba
from qmamba.cli import main
from qmamba.eval.memory import memory_report


def test_bench_tiny_run(tiny_mamba2, tmp_path, capsys):
    out = tmp_path / "bench.json"
    rc = main(["bench", str(tiny_mamba2[1]), "--batch", "1", "--prompt-len", "8", "--gen-len", "3", "--reps", "1",
               "--threads", "1", "--variants", "fp32,quant,quant-sim", "--json", str(out)])
    assert rc == 0
    data = json.loads(out.read_text())
    rows = {r["variant"]: r for r in data["results"]}
    assert set(rows) == {"fp32", "quant", "quant-sim"}
    for r in rows.values():
        assert r["decode_seconds_per_token"] > 0 and r["prefill_seconds"] > 0
        assert r["peak_memory_bytes"] > 0 and r["weight_bytes"] > 0 and r["state_bytes"] > 0
    # the oracle for the float row: the bytes of the loaded model's tensors and of a batch-1 cache
    fp = qmamba.load(tiny_mamba2[1]).model
    assert rows["fp32"]["weight_bytes"] == memory_report(fp, (1,))["weights"]["total"]
    cache = fp.allocate_cache(1).nbytes()
    assert rows["fp32"]["state_bytes"] == cache["conv"] + cache["ssm"]
    assert rows["quant"]["weight_bytes"] < rows["fp32"]["weight_bytes"]
    assert rows["quant"]["state_bytes"] < rows["fp32"]["state_bytes"]
    assert rows["quant"]["int_backend"] and rows["quant-sim"]["int_backend"] is None
    assert data["copy_bandwidth_gb_s"] > 0
    assert "| 1 | quant-sim |" in capsys.readouterr().out


@pytest.mark.parametrize("args, message", [
    (["--batch", "0"], "--batch must be positive"),
    (["--batch", "a,b"], "--batch must be positive"),
    (["--prompt-len", "0"], "--prompt-len must be positive"),
    (["--gen-len", "-3"], "--gen-len must be positive"),
    (["--prompt-len", "10000000"], "limited to"),
    (["--device", "cuda"], "CUDA is not available"),
    (["--quant", "w9a8"], "W9 is not supported"),
    (["--variants", "fp8"], "unknown variant"),
])
def test_bench_bad_input(args, message, capsys):
    import torch

    if args[:2] == ["--device", "cuda"] and torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    assert main(["bench", "ref-mamba2", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0] and "Traceback" not in err[0]
