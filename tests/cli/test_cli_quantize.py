"""`qmamba quantize` end to end (in-process): the saved folder evaluates and generates, `--quant`
quantizes in memory with the same numbers, and every user mistake exits 2 with one line and
leaves nothing behind."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

import qmamba
from qmamba.cli import main
from qmamba.eval import perplexity, tokenize_text_file
from qmamba.utils import paths

TEXT = paths.VALIDATION_TEXT


@pytest.fixture(autouse=True)
def eager_fused_scan(monkeypatch):
    """The fused quantized scan eagerly: compiling it costs seconds per layout."""
    monkeypatch.setenv("QMAMBA_COMPILE", "0")


@pytest.fixture(scope="module")
def calib_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("calib") / "calib.txt"
    path.write_text(TEXT.read_text(encoding="utf-8")[:4000], encoding="utf-8")
    return path


def quant_argv(model, out, calib, *extra):
    return ["quantize", str(model), "--config", "w8a8h4", "--method", "rtn", "--calib", str(calib),
            "--nsamples", "4", "--calib-seqlen", "32", "--out", str(out), *extra]


@pytest.fixture(scope="module")
def quantized_dir(tiny_mamba2, calib_file, tmp_path_factory):
    """The tiny Mamba2 quantized by the CLI (W8A8H4, rtn)."""
    out = tmp_path_factory.mktemp("q") / "tiny-w8a8h4"
    with pytest.MonkeyPatch.context() as mp:         # module scope: the autouse fixture is not active yet
        mp.setenv("QMAMBA_COMPILE", "0")
        assert main(quant_argv(tiny_mamba2[1], out, calib_file)) == 0
    return out


def ppl_of(loaded, text: Path, seqlen: int = 32) -> float:
    """qmamba.eval's perplexity as `qmamba eval` computes it by default (batches of 8 windows)."""
    ids = tokenize_text_file(text, loaded.tokenizer)
    return perplexity(loaded.model, ids, seqlen=seqlen, batch_size=8, progress=False)["perplexity"]


def eval_json(argv, tmp_path, name="eval.json") -> dict:
    out = tmp_path / name
    assert main(argv + ["--json", str(out)]) == 0
    return json.loads(out.read_text())


# ------------------------------------------------------------------------------- the happy path
def test_quantize_writes_a_loadable_folder(quantized_dir, tiny_mamba2, calib_file, capsys):
    names = sorted(p.name for p in quantized_dir.iterdir())
    assert names == ["config.json", "model.safetensors", "model.safetensors.index.json",
                     "qmamba-extension.safetensors", "special_tokens_map.json", "tokenizer.json",
                     "tokenizer_config.json"]
    qc = json.loads((quantized_dir / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors"                  # what transformers and vLLM read
    q = qc["qmamba"]                                                    # qmamba's extension
    assert (q["config"], q["method"], q["state_quant"], q["state_scale"]) == ("W8A8H4", "rtn", "tensor", "static")
    assert q["quant_method"] == "qmamba" and q["qmamba_version"] == qmamba.__version__
    loaded = qmamba.load(quantized_dir)
    assert loaded.model.quant_config.name == "W8A8H4" and loaded.tokenizer is not None
    assert not list(quantized_dir.parent.glob(".*"))                    # no temp folder left
    # the oracle: the Python API with the same options computes the same logits (bit-exact reload)
    ref = qmamba.load(tiny_mamba2[1])
    qmamba.quantize(ref, "w8a8h4", calib=calib_file, method="rtn", nsamples=4, seqlen=32, progress=False)
    ids = tokenize_text_file(calib_file, ref.tokenizer)[:64].reshape(2, 32)
    with torch.no_grad():
        assert torch.equal(loaded.model(ids), ref.model(ids))


def test_quantize_prints_a_summary(tiny_mamba1, calib_file, tmp_path, capsys):
    out = tmp_path / "q1"
    assert main(quant_argv(tiny_mamba1[1], out, calib_file, "--state-quant", "dsq", "--state-scale",
                           "dynamic", "--w-group-size", "16")) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    summary = json.loads(lines[-1])
    assert summary == {"config": "W8A8H4", "method": "rtn", "state_quant": "dsq", "state_scale": "dynamic",
                       "format_version": 2}
    assert f"saved to {out}" in lines[-2]
    assert qmamba.load(out).model.quant_config.w_group_size == 16


def test_eval_and_generate_the_quantized_folder(quantized_dir, tiny_mamba2, calib_file, tmp_path, capsys):
    r = eval_json(["eval", str(quantized_dir), "--ppl", str(calib_file), "--seqlen", "32"], tmp_path)
    assert r["quantization"]["config"] == "W8A8H4" and r["quantization"]["method"] == "rtn"
    assert r["seqlen"] == 32
    # the oracle: qmamba.eval.perplexity on the loaded folder, the CLI's batches of 8 windows
    assert r["perplexity"] == ppl_of(qmamba.load(quantized_dir), calib_file)
    # quantizing in memory with the same options gives the same numbers (seeded calibration,
    # bit-exact reload)
    mem = eval_json(["eval", str(tiny_mamba2[1]), "--ppl", str(calib_file), "--seqlen", "32", "--quant", "w8a8h4",
                     "--method", "rtn", "--calib", str(calib_file), "--nsamples", "4", "--calib-seqlen", "32"],
                    tmp_path, "mem.json")
    assert mem["perplexity"] == r["perplexity"] and mem["tokens"] == r["tokens"]
    fp = eval_json(["eval", str(tiny_mamba2[1]), "--ppl", str(calib_file), "--seqlen", "32"], tmp_path, "fp.json")
    assert "quantization" not in fp and fp["perplexity"] == ppl_of(qmamba.load(tiny_mamba2[1]), calib_file)
    assert abs(math.log(r["perplexity"] / fp["perplexity"])) > 1e-4       # quantization did something
    assert abs(math.log(r["perplexity"] / fp["perplexity"])) < 0.5     # W8A8H4 stays near the float model
    capsys.readouterr()
    argv = ["generate", str(quantized_dir), "--prompt", "Sir Walter Elliot", "--max-new-tokens", "5"]
    assert main(argv) == 0
    first = capsys.readouterr().out
    assert first.startswith("Sir Walter Elliot") and len(first.strip()) > len("Sir Walter Elliot")
    assert main(argv) == 0 and capsys.readouterr().out == first          # greedy: reproducible
    assert main(argv + ["--exec", "sim"]) == 0                            # dequantized weights
    assert capsys.readouterr().out.startswith("Sir Walter Elliot")


def test_eval_quantizes_in_memory_with_dsq(tiny_mamba2, calib_file, tmp_path):
    """--quant without --calib: the shipped validation text calibrates."""
    r = eval_json(["eval", str(tiny_mamba2[1]), "--ppl", str(calib_file), "--seqlen", "32", "--quant", "w8a8h4",
                   "--method", "dsq", "--nsamples", "4", "--calib-seqlen", "32"], tmp_path)
    q = r["quantization"]
    assert (q["config"], q["method"], q["state_quant"], q["state_scale"]) == ("W8A8H4", "dsq", "dsq", "dynamic")
    # the oracle: the Python API with the same options (seed 0, the shipped validation text)
    loaded = qmamba.load(tiny_mamba2[1])
    qmamba.quantize(loaded, "w8a8h4", method="dsq", nsamples=4, seqlen=32, progress=False)
    assert r["perplexity"] == ppl_of(loaded, calib_file)


def test_force_replaces_an_existing_out(tiny_mamba2, calib_file, tmp_path):
    out = tmp_path / "q"
    out.mkdir()
    (out / "old.txt").write_text("x")
    assert main(quant_argv(tiny_mamba2[1], out, calib_file, "--force")) == 0
    assert not (out / "old.txt").exists() and (out / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q"]


# ------------------------------------------------------------------------------- user mistakes
def fails(argv, capsys, *needles) -> str:
    """Exit 2 with a one-line error that names the problem."""
    assert main(argv) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith(f"qmamba {argv[0]}: error: "), err
    for needle in needles:
        assert needle in err, (needle, err)
    return err


def only(folder: Path, *names: str) -> None:
    """Nothing but `names` in the folder: no output, no temporary folder."""
    assert sorted(p.name for p in folder.iterdir()) == sorted(names)


@pytest.fixture
def text(tmp_path):
    def write(content: bytes, name: str = "calib.txt") -> Path:
        path = tmp_path / name
        path.write_bytes(content)
        return path
    return write


def test_bad_config_string(tiny_mamba2, calib_file, tmp_path, capsys):
    argv = quant_argv(tiny_mamba2[1], tmp_path / "q", calib_file)
    argv[argv.index("w8a8h4")] = "w9a8"
    fails(argv, capsys, "W9 is not supported", "w8a8h4")
    argv[argv.index("w9a8")] = "w8x8"
    fails(argv, capsys, "bad quantization config 'w8x8'")
    only(tmp_path)


@pytest.mark.parametrize("content, needle", [
    (b"A short text.", "fewer than one sequence of 32"),
    (b"", "fewer than one sequence of 32"),
    (b"caf\xe9 \xff", "not UTF-8"),
])
def test_bad_calibration_text(tiny_mamba2, text, tmp_path, capsys, content, needle):
    calib = text(content)
    fails(quant_argv(tiny_mamba2[1], tmp_path / "q", calib), capsys, str(calib), needle)
    only(tmp_path, "calib.txt")


def test_missing_calibration_file(tiny_mamba2, tmp_path, capsys):
    fails(quant_argv(tiny_mamba2[1], tmp_path / "q", tmp_path / "none.txt"), capsys, "does not exist")
    only(tmp_path)


@pytest.mark.parametrize("flag, value, needle", [
    ("--nsamples", "0", "--nsamples"), ("--calib-seqlen", "1", "--calib-seqlen"),
    ("--w-group-size", "-1", "group sizes must be positive"),
])
def test_bad_sizes(tiny_mamba2, calib_file, tmp_path, capsys, flag, value, needle):
    argv = quant_argv(tiny_mamba2[1], tmp_path / "q", calib_file)
    if flag in argv:
        argv[argv.index(flag) + 1] = value
    else:
        argv += [flag, value]
    fails(argv, capsys, needle)
    only(tmp_path)


def test_quantizing_a_quantized_folder(quantized_dir, calib_file, tmp_path, capsys):
    fails(quant_argv(quantized_dir, tmp_path / "q", calib_file), capsys, "already quantized")
    only(tmp_path)
    fails(["eval", str(quantized_dir), "--quant", "h4", "--ppl", str(calib_file), "--seqlen", "32"], capsys,
          "already quantized")
    fails(["memory", str(quantized_dir), "--quant", "h4"], capsys, "already quantized")


def test_existing_out_without_force(tiny_mamba2, calib_file, tmp_path, capsys):
    out = tmp_path / "q"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    fails(quant_argv(tiny_mamba2[1], out, calib_file), capsys, "already exists", "--force")
    only(out, "keep.txt")
    only(tmp_path, "q")
    out2 = tmp_path / "file"
    out2.write_text("x")
    fails(quant_argv(tiny_mamba2[1], out2, calib_file, "--force"), capsys, "is a file")
    assert out2.read_text() == "x"


def test_unknown_method(tiny_mamba2, calib_file, tmp_path, capsys):
    argv = quant_argv(tiny_mamba2[1], tmp_path / "q", calib_file)
    argv[argv.index("rtn")] = "gptq"
    with pytest.raises(SystemExit) as info:                            # argparse: usage + one error line
        main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("qmamba quantize: error: argument --method: invalid choice: 'gptq'")
    assert "Traceback" not in "\n".join(err)
    only(tmp_path)


@pytest.fixture(scope="module")
def d_state_12(hf_factory, save_hf_folder, tmp_path_factory, tokenizer_vocab):
    """A Mamba1 folder whose d_state (12) the default state group size (8) does not divide."""
    model = hf_factory("mamba", seed=4, vocab_size=tokenizer_vocab, hidden_size=32, num_hidden_layers=1,
                       state_size=12)
    return save_hf_folder(model, tmp_path_factory.mktemp("d12"))


def test_state_group_not_dividing_d_state(d_state_12, calib_file, tmp_path, capsys):
    fails(quant_argv(d_state_12, tmp_path / "q", calib_file, "--state-quant", "group"), capsys,
          "state group size 8 does not divide d_state 12")
    only(tmp_path)
    # the same model quantizes with a state quantizer that fits
    assert main(quant_argv(d_state_12, tmp_path / "q", calib_file, "--state-quant", "channel")) == 0


# ------------------------------------------------------------------------------- ESR flags
def esr_argv(model, out, calib, *extra):
    argv = quant_argv(model, out, calib, "--esr-epochs", "1", "--esr-nsamples", "2", "--esr-seqlen", "16", *extra)
    argv[argv.index("rtn")] = "qmamba"
    return argv


def test_qmamba_is_the_default_method(tiny_mamba2, calib_file, tmp_path, capsys):
    argv = esr_argv(tiny_mamba2[1], tmp_path / "q", calib_file)
    del argv[argv.index("--method"):argv.index("--method") + 2]
    assert main(argv) == 0
    qc = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]["qmamba"]
    assert qc["method"] == "qmamba" and qc["state_quant"] == "dsq"


def test_esr_flags_reach_the_reconstruction(tiny_mamba2, calib_file, tmp_path, capsys):
    """--esr-resume keeps one record per finished block, trained with the flags given."""
    resume = tmp_path / "esr"
    assert main(esr_argv(tiny_mamba2[1], tmp_path / "q", calib_file, "--esr-sim", "exact",
                         "--esr-resume", str(resume))) == 0
    saved = sorted(p.name for p in resume.iterdir())
    assert saved, "no ESR block saved"
    # the second run resumes from the saved blocks and gives the same checkpoint
    assert main(esr_argv(tiny_mamba2[1], tmp_path / "q2", calib_file, "--esr-sim", "exact",
                         "--esr-resume", str(resume))) == 0
    a = (tmp_path / "q" / "model.safetensors").read_bytes()
    assert a == (tmp_path / "q2" / "model.safetensors").read_bytes()


@pytest.mark.parametrize("extra, needle", [
    (["--method", "dsq"], "--esr-epochs, --esr-nsamples, --esr-seqlen only apply to --method qmamba (ESR), not dsq"),
    (["--esr-epochs", "0"], "ESR epochs must be positive"),
])
def test_bad_esr_flags(tiny_mamba2, calib_file, tmp_path, capsys, extra, needle):
    argv = esr_argv(tiny_mamba2[1], tmp_path / "q", calib_file)
    if "--method" in extra:
        argv[argv.index("--method") + 1] = "dsq"
        extra = extra[2:]
    fails(argv + extra, capsys, needle)
    only(tmp_path)


def test_bad_esr_sim(tiny_mamba2, calib_file, tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        main(esr_argv(tiny_mamba2[1], tmp_path / "q", calib_file, "--esr-sim", "magic"))
    assert info.value.code == 2
    assert "invalid choice: 'magic'" in capsys.readouterr().err
