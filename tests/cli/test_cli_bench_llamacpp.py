"""`qmamba bench --against llama.cpp`: its argument errors (one line, exit 2, before any long
work), the JSON it writes (llama.cpp's side stubbed, qmamba's side measured), and a real run
when llama.cpp is built on this machine."""

from __future__ import annotations

import importlib
import json
import statistics
from pathlib import Path

import pytest

from qmamba.cli import bench_llamacpp, main
from qmamba.errors import QMambaError
from qmamba.eval import llamacpp, llamacpp_setup


@pytest.fixture
def no_long_work(monkeypatch):
    """A model folder, GGUF, llama-bench run, qmamba benchmark or llama.cpp build fails the test."""
    def boom(*a, **k):
        raise AssertionError("long work started before the bad input was refused")

    bench = importlib.import_module("qmamba.eval.bench")
    for mod, name in ((bench, "shape_folder"), (bench, "copy_bandwidth"), (bench, "run_variant"),
                      (llamacpp, "make_ggufs"), (llamacpp, "run_bench"), (llamacpp, "folder_key"),
                      (bench_llamacpp, "model_folder"), (bench_llamacpp, "_qmamba_round"),
                      (llamacpp_setup, "setup")):
        monkeypatch.setattr(mod, name, boom)


@pytest.fixture
def no_llama_cpp(monkeypatch, tmp_path):
    monkeypatch.setenv("QMAMBA_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.delenv("QMAMBA_LLAMA_BENCH", raising=False)


def _one_line_error(capsys, needle: str) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0] and "Traceback" not in err[0], err
    return err[0]


def test_absent_llama_cpp_is_one_line_with_the_setup_command(capsys, no_long_work, no_llama_cpp):
    assert main(["bench", "mamba2-130m", "--against", "llama.cpp"]) == 2
    _one_line_error(capsys, "qmamba bench --against llama.cpp --llama-cpp-build")
    assert main(["bench", "mamba2-130m", "--against", "llama.cpp", "--llama-bench", "/nonexistent/llama-bench"]) == 2
    _one_line_error(capsys, "llama-bench not found at /nonexistent/llama-bench")


@pytest.mark.parametrize("args, message", [
    (["--against", "llama.cpp", "--batch", "1,16"], "measures batch 1"),
    (["--against", "llama.cpp", "--threads", "0"], "--threads must be positive"),
    (["--against", "llama.cpp", "--rounds", "0"], "--rounds must be positive"),
    (["--against", "llama.cpp", "--gen-len", "0"], "--gen-len must be positive"),
    (["--against", "llama.cpp", "--llama-types", "f32,q3"], "unknown type(s) q3"),
    (["--against", "llama.cpp", "--variants", "bf16"], "choose from fp32, quant"),
    (["--against", "llama.cpp", "--quant", "w9a8"], "W9 is not supported"),
    (["--against", "llama.cpp", "--device", "cuda"], "runs on the CPU"),
    (["--llama-cpp-build"], "goes with --against llama.cpp"),
    (["--threads", "1,2"], "--threads takes one value"),
])
def test_bad_arguments(args, message, capsys, no_long_work, no_llama_cpp):
    assert main(["bench", "mamba2-130m", *args]) == 2
    _one_line_error(capsys, message)


def test_hybrid_shape_and_quantized_folder_refused(tmp_path):
    with pytest.raises(QMambaError, match="hybrid shape"):
        bench_llamacpp.model_folder("granite-4.0-h-tiny")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mamba2", "quantization_config": {}}))
    with pytest.raises(QMambaError, match="quantized qmamba folder"):
        bench_llamacpp.model_folder(str(tmp_path))


def test_converter_view_leaves_the_tokenizer_out(tiny_mamba2, tmp_path):
    folder = tiny_mamba2[1]
    view = bench_llamacpp.converter_view(folder, tmp_path)
    names = {p.name for p in view.iterdir()}
    assert "tokenizer.json" in {p.name for p in folder.iterdir()} and "tokenizer.json" not in names
    assert {"config.json", "model.safetensors"} <= names
    assert (view / "model.safetensors").resolve() == (folder / "model.safetensors").resolve()
    no_tok = tmp_path / "bare"
    no_tok.mkdir()
    (no_tok / "config.json").write_text("{}")
    assert bench_llamacpp.converter_view(no_tok, tmp_path / "other") == no_tok


def _llama_side(monkeypatch, tmp_path, calls):
    """llama.cpp's side without llama.cpp: no tools, no GGUF, figures that differ in every round
    (so that a median over rounds is told from a mean or from one round)."""
    tools = llamacpp.Tools(*(tmp_path / n for n in ("llama-bench", "llama-quantize", "c.py", "python")))
    tools.converter.write_text("# convert_hf_to_gguf.py\n")
    monkeypatch.setattr(llamacpp, "gguf_dir", lambda key: tmp_path / "gguf" / key)
    monkeypatch.setattr(llamacpp, "find_tools", lambda path=None, env=None: tools)
    monkeypatch.setattr(llamacpp, "version_info", lambda tools: {"tools": tools.describe()})
    paths = {t: tmp_path / f"model-{t}.gguf" for t in ("f32", "q8_0", "q4_0")}
    for p in paths.values():
        p.write_bytes(b"GGUF")
    monkeypatch.setattr(llamacpp, "make_ggufs", lambda folder, types, tools, key: (
        {t: paths[t] for t in types}, [(["convert", str(folder)], False)]))

    def run_bench(tools, ggufs, prompt_len, gen_len, threads, reps):
        calls.append(("llama.cpp", threads))
        k = calls.count(("llama.cpp", threads))              # this thread count's k-th run
        res = {t: {"prefill": 1000.0 * k + i, "decode": [30.0, 10.0, 11.0][k - 1] * threads + i,
                   "model_size": 1000 * (i + 1), "rows": [{"k": k}]} for i, t in enumerate(ggufs)}
        return llamacpp.bench_command(tools, list(ggufs.values()), prompt_len, gen_len, threads, reps), res

    monkeypatch.setattr(llamacpp, "run_bench", run_bench)
    real_round, measured = bench_llamacpp._qmamba_round, {}

    def qmamba_round(args, folder, variant, threads):
        """The first round of each variant is measured (the child process for real); later ones
        are that result with other speeds (a child process per round would take minutes here)."""
        calls.append(("qmamba", threads))
        if variant not in measured:
            measured[variant] = real_round(args, folder, variant, threads)
            return measured[variant]
        r, cmd = measured[variant]
        k = calls.count(("qmamba", threads))
        return dict(r, tokens_per_second=r["tokens_per_second"] * k, prefill_seconds=r["prefill_seconds"] / k), cmd

    monkeypatch.setattr(bench_llamacpp, "_qmamba_round", qmamba_round)


def test_json_keeps_both_sides(tiny_mamba2, tmp_path, monkeypatch, capsys):
    calls = []
    _llama_side(monkeypatch, tmp_path, calls)
    out = tmp_path / "against.json"
    rc = main(["bench", str(tiny_mamba2[1]), "--against", "llama.cpp", "--llama-types", "f32,q4_0",
               "--threads", "1,2", "--rounds", "3", "--reps", "1", "--prompt-len", "8", "--gen-len", "3",
               "--json", str(out)])
    assert rc == 0
    data = json.loads(out.read_text())
    assert data["schema"] == bench_llamacpp.SCHEMA and data["batch"] == 1 and data["threads"] == [1, 2]
    for k in ("load_average_before", "load_average_after"):
        assert len(data["machine"][k]) == 3
    assert data["llama_cpp"]["types"] == ["f32", "q4_0"] and len(data["llama_cpp"]["commands"]) == 3 * 2
    assert all("-p 8 -n 3" in c for c in data["llama_cpp"]["commands"])
    assert len(data["qmamba"]["commands"]) == 3 * 2 * 2 and data["qmamba"]["state_bytes"]["quant"] > 0
    assert "--against llama.cpp" in data["command"] and "--threads 1,2" in data["command"]
    # alternating rounds: rounds 1 and 3 run llama.cpp first for each thread count, round 2 qmamba
    first, second = ["llama.cpp", "qmamba", "qmamba"] * 2, ["qmamba", "qmamba", "llama.cpp"] * 2
    assert [s for s, _ in calls] == first + second + first
    assert [t for _, t in calls] == [1, 1, 1, 2, 2, 2] * 3
    results = data["results"]
    assert len(results) == 3 * 2 * (2 + 2)               # rounds x threads x (GGUF types + qmamba variants)
    keys = {(s["threads"], s["side"], s["variant"]) for s in data["summary"]}
    assert keys == {(t, side, v) for t in (1, 2) for side, v in
                    [("llama.cpp", "F32"), ("llama.cpp", "Q4_0"), ("qmamba", "fp32"), ("qmamba", "w8a8h4")]}
    for s in data["summary"]:
        mine = [r for r in results if (r["threads"], r["side"], r["variant"]) == (s["threads"], s["side"], s["variant"])]
        assert s["rounds"] == 3 and s["decode_tokens_per_second_rounds"] == [r["decode_tokens_per_second"] for r in mine]
        assert s["decode_tokens_per_second"] == statistics.median(r["decode_tokens_per_second"] for r in mine)
        assert s["prefill_tokens_per_second"] == statistics.median(r["prefill_tokens_per_second"] for r in mine)
    f32 = next(s for s in data["summary"] if s["side"] == "llama.cpp" and s["variant"] == "F32" and s["threads"] == 2)
    assert f32["decode_tokens_per_second_rounds"] == [60.0, 20.0, 22.0] and f32["decode_tokens_per_second"] == 22.0
    assert f32["weight_bytes"] == 1000
    fp = next(s for s in data["summary"] if s["side"] == "qmamba" and s["variant"] == "fp32" and s["threads"] == 1)
    assert fp["decode_vs_qmamba_fp32"] == 1.0
    qm = next(r for r in results if r["side"] == "qmamba" and r["variant"] == "fp32")
    assert qm["prefill_tokens_per_second"] == 8 / qm["raw"]["prefill_seconds"]
    assert qm["decode_tokens_per_second"] == qm["raw"]["tokens_per_second"] > 0
    assert "| 2 | llama.cpp | Q4_0 |" in data["markdown"] and data["markdown"] in capsys.readouterr().out


def _real_tools():
    try:
        return llamacpp.find_tools()
    except QMambaError:
        return None


@pytest.mark.skipif(_real_tools() is None, reason="llama.cpp is not built here (qmamba bench --against "
                                                  "llama.cpp --llama-cpp-build)")
def test_real_llama_cpp_on_a_tiny_model(tiny_mamba2, tmp_path, monkeypatch):
    """The whole path on this machine's llama.cpp: convert, quantize, llama-bench, qmamba (GGUFs
    in a fresh cache, so that the converter runs every time)."""
    monkeypatch.setattr(llamacpp, "gguf_dir", lambda key: tmp_path / "gguf" / key)
    out = tmp_path / "real.json"
    rc = main(["bench", str(tiny_mamba2[1]), "--against", "llama.cpp", "--llama-types", "f32,q8_0",
               "--threads", "1", "--rounds", "1", "--reps", "1", "--prompt-len", "8", "--gen-len", "4",
               "--json", str(out)])
    assert rc == 0
    data = json.loads(out.read_text())
    ll = {s["variant"]: s for s in data["summary"] if s["side"] == "llama.cpp"}
    assert set(ll) == {"F32", "Q8_0"}
    assert all(s["decode_tokens_per_second"] > 0 and s["prefill_tokens_per_second"] > 0 for s in ll.values())
    assert ll["Q8_0"]["weight_bytes"] < ll["F32"]["weight_bytes"]
    for t in ("f32", "q8_0"):
        g = Path(data["llama_cpp"]["gguf"][t]["path"])
        assert g.read_bytes()[:4] == b"GGUF"
