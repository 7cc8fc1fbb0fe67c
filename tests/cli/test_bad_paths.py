"""Bad paths of issue 11 §4, each ending as one line on stderr and exit 2 before any long work
(nothing loaded, nothing calibrated, nothing left behind), or handled correctly:
unwritable outputs, absurd config sizes, absurd run sizes, interrupted saves and their leftovers."""

from __future__ import annotations

import importlib
import json
import os
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from qmamba import api
from qmamba.cli import common, main
from qmamba.errors import QMambaError
from qmamba.models import budget, load as load_mod, save as save_mod
from qmamba.utils.io import atomic_write_json, check_output

ROOT = Path(__file__).resolve().parents[2]
FAST = ["--nsamples", "2", "--calib-seqlen", "16"]


def fails(argv, capsys, *needles, progress: bool = False) -> str:
    """Exit 2 and one line on stderr (with `progress`: the error is the last line, after the
    progress bars of the work that ran before the failure)."""
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err, err
    if progress:
        err = err.splitlines()[-1]
    assert len(err.splitlines()) == 1, err
    assert err.startswith(f"qmamba {argv[0]}: error: "), err
    for needle in needles:
        assert needle in err, (needle, err)
    return err


@pytest.fixture
def no_long_work(monkeypatch):
    """Any model load, calibration or benchmark fails the test: the error must come first."""
    def boom(*a, **k):
        raise AssertionError("long work started before the bad path was refused")

    monkeypatch.setattr(api, "load", boom)
    monkeypatch.setattr(common, "load", boom)
    monkeypatch.setattr(importlib.import_module("qmamba.quantize"), "calibration_ids", boom)
    monkeypatch.setattr(importlib.import_module("qmamba.eval.bench"), "copy_bandwidth", boom)


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in Path(folder).iterdir() if p.name.startswith("."))


# ----------------------------------------------------------------------------- 1. unwritable outputs
def _outputs(model: str, bad: str) -> list[list[str]]:
    """Every command line that writes `bad`."""
    return [["quantize", model, "--out", bad, *FAST],
            ["inspect", model, "--out", bad],
            ["eval", model, "--json", bad],
            ["compare", model, "--json", bad],
            ["compare", model, "--plot", bad],
            ["bench", model, "--json", bad],
            ["memory", model, "--json", bad]]


def test_output_below_a_file_refused_before_loading(capsys, tiny_copy, no_long_work):
    """A parent that is a regular file cannot be written by anyone, root included."""
    bad = str(tiny_copy / "config.json" / "sub" / "out")
    for argv in _outputs(str(tiny_copy), bad):
        fails(argv, capsys, "cannot write", "config.json is a file, not a folder")
    assert leftovers(tiny_copy) == []


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux /proc")
def test_output_in_proc_refused_before_loading(capsys, tiny_copy, no_long_work):
    """/proc takes no new files, even from root: the check really tries to create one."""
    for argv in _outputs(str(tiny_copy), "/proc/qmamba-test-output"):
        fails(argv, capsys, "cannot write", "cannot create files in /proc")
    assert not Path("/proc/qmamba-test-output").exists()


def test_output_permission_denied(capsys, tiny_copy, tmp_path, monkeypatch, no_long_work):
    """A folder the user may not write in (simulated: root ignores permission bits)."""
    import tempfile

    real = tempfile.mkstemp

    def denied(*a, dir=None, **k):
        if dir is not None and Path(dir) == tmp_path / "ro":
            raise PermissionError(13, "Permission denied")
        return real(*a, dir=dir, **k)

    (tmp_path / "ro").mkdir()
    monkeypatch.setattr(tempfile, "mkstemp", denied)
    for argv in _outputs(str(tiny_copy), str(tmp_path / "ro" / "new" / "out")):
        fails(argv, capsys, "cannot write", "Permission denied")
    assert list((tmp_path / "ro").iterdir()) == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores permission bits")
def test_output_in_read_only_folder(capsys, tiny_copy, tmp_path, no_long_work):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        fails(["quantize", str(tiny_copy), "--out", str(ro / "q"), *FAST], capsys, "Permission denied")
    finally:
        ro.chmod(0o700)


def test_output_checks_leave_nothing_and_accept_good_paths(tmp_path):
    assert check_output(tmp_path / "a" / "b" / "c.json", "--json") == tmp_path / "a" / "b" / "c.json"
    assert check_output(tmp_path / "new", "--out", folder=True) == tmp_path / "new"
    assert list(tmp_path.iterdir()) == []                       # no probe, no parent created
    (tmp_path / "f.json").write_text("{}")
    check_output(tmp_path / "f.json", "--json")                 # an existing file is replaced
    with pytest.raises(QMambaError, match="is a folder"):
        check_output(tmp_path, "--json")
    with pytest.raises(QMambaError, match="already exists"):
        check_output(tmp_path, "--out", folder=True)
    with pytest.raises(QMambaError, match="is a file, not a folder"):
        check_output(tmp_path / "f.json", "--out", folder=True, force=True)


def test_esr_resume_that_is_a_file(capsys, tiny_copy, no_long_work):
    fails(["quantize", str(tiny_copy), "--out", str(tiny_copy.parent / "q"), *FAST,
           "--esr-resume", str(tiny_copy / "config.json")], capsys, "--esr-resume", "is a file")


def test_quantize_write_fails_at_save_time(capsys, tiny_copy, tmp_path, monkeypatch):
    """The up-front check passed, then the disk filled up while saving: one line, exit 2, and the
    temporary folder is gone."""
    def full(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(save_mod, "save_file", full)        # the checkpoint writer goes through it
    out = tmp_path / "outdir" / "q"
    fails(["quantize", str(tiny_copy), "--out", str(out), *FAST], capsys, "cannot write", "No space left",
          progress=True)
    assert not out.exists() and leftovers(out.parent) == []


def test_quantize_parent_turns_into_a_file_before_save(capsys, tiny_copy, tmp_path, monkeypatch):
    """The output's parent became a file after the check (real write error, root included)."""
    from qmamba.cli import quantize as cli_quantize

    parent = tmp_path / "later"
    real_load = common.load

    def load_then_break(*a, **k):
        loaded = real_load(*a, **k)
        parent.write_text("now a file")
        return loaded

    monkeypatch.setattr(common, "load", load_then_break)
    fails(["quantize", str(tiny_copy), "--out", str(parent / "q"), *FAST], capsys, "cannot write",
          "later is a file, not a folder", progress=True)
    assert parent.read_text() == "now a file"
    assert cli_quantize.check_output is check_output


def test_json_write_error_is_one_line(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(QMambaError, match="cannot write"):
        atomic_write_json(tmp_path / "file" / "r.json", {})


# ----------------------------------------------------------------------------- 2. absurd config sizes
def _set_config(folder: Path, **changes) -> None:
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(changes)
    (folder / "config.json").write_text(json.dumps(cfg))


def test_absurd_layer_count_refused_before_building(capsys, tiny_copy, monkeypatch):
    def boom(*a, **k):
        raise AssertionError("model built before the size check")

    monkeypatch.setattr(load_mod, "build_model", boom)
    _set_config(tiny_copy, num_hidden_layers=1_000_000)
    t = time.time()
    err = fails(["eval", str(tiny_copy)], capsys, "1,000,000 layers", "B parameters", "needs at least",
                "available")
    assert "float32" in err
    assert time.time() - t < 60


def test_model_larger_than_memory_names_size_and_dtype(tiny_copy, monkeypatch):
    monkeypatch.setattr(budget, "available_memory", lambda: 1 << 20)           # 1 MiB left
    with pytest.raises(QMambaError, match=r"M parameters .*bfloat16, needs at least 1\.\d MiB"):
        api.load(tiny_copy, dtype="bfloat16")
    monkeypatch.setattr(budget, "available_memory", lambda: None)              # unknown: no refusal
    assert api.load(tiny_copy).model.config.n_layer == 1


def test_config_far_larger_than_its_weights(capsys, tiny_copy, monkeypatch):
    monkeypatch.setattr(budget, "available_memory", lambda: 1 << 50)
    _set_config(tiny_copy, num_hidden_layers=50_000)
    fails(["eval", str(tiny_copy)], capsys, "50,000 layers", "the config does not belong to these weights")


def test_tiny_and_reference_configs_pass(tiny_mamba1, tiny_mamba2):
    for folder in (tiny_mamba1[1], tiny_mamba2[1], api.REFERENCE_DIR / "ref-mamba2"):
        raw = load_mod.read_config(folder)
        load_mod.check_model_fits(folder, raw, torch.float32)
    size = budget.model_size(load_mod.model_config(load_mod.read_config(tiny_mamba2[1]), "hf"))
    assert size.parameters == sum(p.numel() for p in api.load(tiny_mamba2[1]).model.parameters())


def test_available_memory_reads_this_machine():
    avail = budget.available_memory()
    assert avail is None or 0 < avail < 1 << 60


# ----------------------------------------------------------------------------- 3. absurd run sizes
def test_esr_nsamples_beyond_calibration(capsys, tiny_copy, tmp_path, no_long_work):
    fails(["quantize", str(tiny_copy), "--out", str(tmp_path / "q"), "--esr-nsamples", "100000000"], capsys,
          "--esr-nsamples 100,000,000 is more than the --nsamples 128")
    fails(["quantize", str(tiny_copy), "--out", str(tmp_path / "q"), "--esr-seqlen", "100000000"], capsys,
          "--esr-seqlen 100,000,000 is longer than the --calib-seqlen 512")
    assert not (tmp_path / "q").exists()


def test_calibration_larger_than_memory(capsys, tiny_copy, tmp_path, no_long_work):
    for argv in (["quantize", str(tiny_copy), "--out", str(tmp_path / "q"), "--nsamples", "100000000"],
                 ["eval", str(tiny_copy), "--quant", "w8a8", "--nsamples", "100000000"],
                 ["compare", str(tiny_copy), "--nsamples", "100000000"],
                 ["inspect", str(tiny_copy), "--out", str(tmp_path / "i"), "--nsamples", "100000000"]):
        fails(argv, capsys, "100,000,000 x", "calibration tokens needs at least", "GiB of memory")


def test_esr_activations_larger_than_memory(capsys, tiny_copy, tmp_path, monkeypatch):
    def boom(*a, **k):
        raise AssertionError("calibration started")

    monkeypatch.setattr(importlib.import_module("qmamba.quantize"), "calibration_ids", boom)
    # model ~2 MiB and calibration ids ~150 KiB fit; ESR's 4 x 64 x 256 x 32 float32 (8 MiB) do not
    monkeypatch.setattr(budget, "available_memory", lambda: 5 << 20)
    for extra in ([], ["--low-memory"]):                      # block by block, ESR keeps the same sets
        fails(["quantize", str(tiny_copy), "--out", str(tmp_path / "q"), "--nsamples", "64", "--calib-seqlen", "256",
               *extra], capsys, "ESR on 64 sequences x 256 tokens x d_model 32", "needs at least 8.0 MiB")


def test_generate_absurd_length(capsys, tiny_copy, no_long_work):
    fails(["generate", str(tiny_copy), "--prompt", "x", "--max-new-tokens", "10000000000"], capsys,
          "--max-new-tokens 10,000,000,000 is more than")


def test_memory_absurd_batch(capsys, tiny_copy):
    fails(["memory", str(tiny_copy), "--batch", "1,100000000000"], capsys,
          "--batch 100,000,000,000", "state", "needs at least")


def test_bench_absurd_batch(capsys, tiny_copy, no_long_work):
    fails(["bench", str(tiny_copy), "--batch", "100000000"], capsys, "--batch 100,000,000", "needs at least")
    fails(["bench", "mamba2-130m", "--batch", "100000000"], capsys, "--batch 100,000,000", "d_model 768")


def test_eval_window_larger_than_memory(capsys, tiny_copy, monkeypatch):
    monkeypatch.setattr(budget, "available_memory", lambda: 64 << 20)
    fails(["eval", str(tiny_copy), "--seqlen", "100000", "--batch-size", "100000"], capsys,
          "--seqlen 100,000", "logits", "needs at least")


@pytest.mark.parametrize("argv, needle", [
    (["eval", "--batch-size", "0"], "--batch-size must be positive"),
    (["eval", "--max-tokens", "1"], "--max-tokens must be at least 2"),
])
def test_eval_bad_sizes(capsys, argv, needle, no_long_work):
    fails(argv, capsys, needle)


# ----------------------------------------------------------------------------- other user mistakes
@pytest.mark.parametrize("argv, needle", [
    (["generate", "{m}", "--prompt", "x", "--temperature", "nan"], "--temperature must be a finite number"),
    (["generate", "{m}", "--prompt", "x", "--temperature", "inf"], "--temperature must be a finite number"),
    (["quantize", "{m}", "--out", "{t}/q", "--esr-lr", "nan"], "--esr-lr must be a positive number, got nan"),
    (["quantize", "{m}", "--out", "{t}/q", "--esr-lr", "-1"], "--esr-lr must be a positive number, got -1"),
])
def test_nonsense_numbers(capsys, tiny_copy, tmp_path, no_long_work, argv, needle):
    fails([a.format(m=tiny_copy, t=tmp_path) for a in argv], capsys, needle)
    assert not (tmp_path / "q").exists()


def test_esr_resume_into_a_model_folder_or_the_output(capsys, tiny_copy, tmp_path, no_long_work):
    """ESR would write block*.pt and progress.json into the user's model folder, or into --out
    (then replaced by the save, after all the work)."""
    before = sorted(p.name for p in tiny_copy.iterdir())
    fails(["quantize", str(tiny_copy), "--out", str(tmp_path / "q"), "--esr-resume", str(tiny_copy)], capsys,
          "neither empty nor an ESR resume folder")
    assert sorted(p.name for p in tiny_copy.iterdir()) == before
    fails(["quantize", str(tiny_copy), "--out", str(tmp_path / "q"), "--esr-resume", str(tmp_path / "q" / "r")],
          capsys, "must be outside --out")
    assert not (tmp_path / "q").exists()


def test_eval_text_checked_before_loading(capsys, tiny_copy, tmp_path, no_long_work):
    fails(["eval", str(tiny_copy), "--ppl", str(tmp_path)], capsys, "is a folder, not a file")
    fails(["eval", str(tiny_copy), "--ppl", str(tmp_path / "none.txt")], capsys, "does not exist")


def test_inspect_quantized_refused_before_calibration(capsys, tiny_copy, tmp_path, monkeypatch):
    import qmamba.quant.calibrate as calibrate
    from qmamba.quantize import quantize
    from qmamba.quant.checkpoint import save_quantized

    loaded = api.load(tiny_copy)
    quantize(loaded, "w8a8", method="rtn", nsamples=2, seqlen=16, progress=False)
    save_quantized(loaded.model, tmp_path / "q", tokenizer_dir=tiny_copy)

    def boom(*a, **k):
        raise AssertionError("calibration started")

    monkeypatch.setattr(calibrate, "calibration_ids", boom)
    fails(["inspect", str(tmp_path / "q"), "--out", str(tmp_path / "i")], capsys, "already quantized")
    assert not (tmp_path / "i").exists()


# ----------------------------------------------------------------------------- 4. interrupted saves
def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def _host() -> str:
    return save_mod._host()


def test_stale_temp_folders_cleaned_only_ours(tiny_mamba2, tmp_path):
    model = api.load(tiny_mamba2[1]).model
    out = tmp_path / "m"
    dead, host = _dead_pid(), _host()
    stale = tmp_path / f".m.tmp-{host}-{dead}-0123abcd"
    live = tmp_path / f".m.tmp-{host}-{os.getpid()}-0123abcd"          # a save in progress
    other_host = tmp_path / f".m.tmp-elsewhere-{dead}-0123abcd"          # maybe alive there
    legacy = tmp_path / ".m.tmp-k2j3h4l5"                                 # not our pattern
    other_out = tmp_path / f".n.tmp-{host}-{dead}-0123abcd"               # another output's
    for p in (stale, live, other_host, legacy, other_out):
        p.mkdir()
        (p / "model.safetensors").write_bytes(b"half")
    save_mod.save_model(model, out)
    assert not stale.exists()
    assert live.exists() and other_host.exists() and legacy.exists() and other_out.exists()
    assert (out / "model.safetensors").is_file()


def test_replaced_folder_restored_after_crash(tiny_mamba2, tmp_path):
    """Killed between the two renames of a --force save: the previous output is put back."""
    model = api.load(tiny_mamba2[1]).model
    old = tmp_path / f".m.old-{_host()}-{_dead_pid()}-0123abcd"
    old.mkdir()
    (old / "config.json").write_text("{}")
    with pytest.raises(QMambaError, match="already exists"):
        save_mod.save_model(model, tmp_path / "m")
    assert (tmp_path / "m" / "config.json").read_text() == "{}" and not old.exists()


SLOW_SAVE = """
import sys, time
from qmamba import api
from qmamba.models import save
def slow(*a, **k):
    print("saving", flush=True)
    time.sleep(120)
save.save_file = slow
if sys.argv[1] == "api":
    save.save_model(api.load(sys.argv[2]).model, sys.argv[3])
else:
    from qmamba.cli import main
    sys.exit(main(["quantize", sys.argv[2], "--out", sys.argv[3], "--nsamples", "2", "--calib-seqlen", "16",
                   "--method", "rtn"]))
"""


def _start_slow_save(kind: str, model: Path, out: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-c", SLOW_SAVE, kind, str(model), str(out)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    assert line.strip() == "saving", (line, proc.stderr.read() if proc.poll() is not None else "")
    return proc


def test_sigkill_mid_save_then_next_save_cleans(tiny_mamba2, tmp_path):
    out = tmp_path / "m"
    proc = _start_slow_save("api", tiny_mamba2[1], out)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    left = leftovers(tmp_path)
    assert len(left) == 1 and left[0].startswith(f".m.tmp-{_host()}-{proc.pid}-"), left
    save_mod.save_model(api.load(tiny_mamba2[1]).model, out)
    assert leftovers(tmp_path) == [] and (out / "config.json").is_file()


def test_sigterm_mid_save_removes_temp_folder(tiny_mamba2, tmp_path):
    out = tmp_path / "q"
    proc = _start_slow_save("cli", tiny_mamba2[1], out)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 143
    assert proc.stderr.read().strip().splitlines()[-1] == "terminated"
    assert leftovers(tmp_path) == [] and not out.exists()


@pytest.mark.parametrize("mask", [0o022, 0o027])
def test_outputs_follow_umask(tiny_mamba2, tmp_path, mask):
    model = api.load(tiny_mamba2[1]).model
    old = os.umask(mask)
    try:
        out = save_mod.save_model(model, tmp_path / "m", tokenizer_dir=tiny_mamba2[1])
        js = atomic_write_json(tmp_path / "r.json", {"a": 1})
    finally:
        os.umask(old)
    assert stat.S_IMODE(out.stat().st_mode) == 0o777 & ~mask
    for f in [*out.iterdir(), js]:
        assert stat.S_IMODE(f.stat().st_mode) == 0o666 & ~mask, f


def test_hostname_is_safe_in_names(monkeypatch):
    monkeypatch.setattr(socket, "gethostname", lambda: "a/b-c.d")
    assert "/" not in save_mod._host()


def test_compare_plot_into_new_folder_and_no_temp_left(tmp_path, monkeypatch):
    """check_output accepts missing parent folders, so the plot writer must create them; a
    failing write leaves no hidden temporary file."""
    from qmamba.cli import compare

    results = [{"memory": {"total": 1 << 20}, "perplexity": 10.0, "label": "fp", "config": "FP32"}]
    compare.plot(results, tmp_path / "new" / "p.png", "title")
    assert (tmp_path / "new" / "p.png").stat().st_size > 0
    import matplotlib.figure

    def full(self, fname, **k):
        Path(fname).write_bytes(b"half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", full)
    with pytest.raises(OSError):
        compare.plot(results, tmp_path / "new" / "q.png", "title")
    assert sorted(p.name for p in (tmp_path / "new").iterdir()) == ["p.png"]
