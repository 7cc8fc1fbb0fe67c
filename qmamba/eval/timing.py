"""Wall-clock timing and process memory, shared by `qmamba bench` (`qmamba.eval.bench`) and the
scripts in benchmarks/: one way to time a call (CUDA synchronised on both sides), to take the
median over repetitions after warm-up runs, and to read this process's resident memory."""

from __future__ import annotations

import resource
import statistics
import time
from typing import Any, Callable, Optional, Union

import torch

Device = Union[None, str, torch.device]


def sync(device: Device = None) -> None:
    """Wait for the device's queued work (a no-op on CPU)."""
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def timed(fn: Callable[[], Any], device: Device = None) -> tuple[Any, float]:
    """(fn(), seconds it took): the device is synchronised before and after the call."""
    sync(device)
    t = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - t


def median_seconds(fn: Callable[[], Any], reps: int, warmup: int = 1, device: Device = None) -> float:
    """The median of `reps` timed calls of `fn`, after `warmup` untimed ones."""
    if reps < 1:
        raise ValueError(f"reps must be >= 1, got {reps}")
    for _ in range(warmup):
        fn()
    return statistics.median(timed(fn, device)[1] for _ in range(reps))


def decode_step_seconds(model, prompt: torch.Tensor, steps: int) -> tuple[list[float], torch.Tensor, Any]:
    """Greedy decode after `prompt` (b, l): the seconds of each of `steps` token steps (the
    prefill not counted), their logits (steps, b, vocab) and the cache they left."""
    cache = model.allocate_cache(prompt.shape[0])
    tok = model(prompt, cache, logits_to_keep=1)[:, -1].argmax(-1)
    seconds, out = [], []
    for _ in range(steps):
        t = time.perf_counter()
        y = model.step(tok, cache)
        seconds.append(time.perf_counter() - t)
        out.append(y)
        tok = y.argmax(-1)
    return seconds, torch.stack(out), cache


def _proc_status_bytes(field: str) -> Optional[int]:
    """A memory field of /proc/self/status ("VmRSS", "VmHWM") in bytes; None where there is none."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def peak_rss() -> int:
    """Peak resident memory of this process in bytes (VmHWM; ru_maxrss would include the
    parent's, which Linux carries over a fork + exec)."""
    peak = _proc_status_bytes("VmHWM")
    return peak if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def rss() -> int:
    """Current resident memory of this process in bytes (0 where /proc is absent)."""
    return _proc_status_bytes("VmRSS") or 0
