"""What `qmamba bench` and `qmamba bench --against llama.cpp` share: the defaults that depend on
--against, and the child process that measures one qmamba variant."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from ..errors import QMambaError
from .common import positive_ints


def child_command(kwargs: dict) -> list[str]:
    return [sys.executable, "-m", "qmamba.eval.bench", json.dumps(kwargs)]


def fill_defaults(args) -> None:
    """Fill the options whose default depends on --against."""
    against = args.against is not None
    if args.batch is None:
        args.batch = "1" if against else "1,16"
    if args.prompt_len is None:
        args.prompt_len = 128 if against else 512
    if args.gen_len is None:
        args.gen_len = 64 if against else 128
    cores = os.cpu_count() or 1
    if args.threads is None:
        args.threads = ",".join(str(t) for t in dict.fromkeys((1, cores))) if against else str(cores)
    threads = positive_ints(str(args.threads), "--threads")
    if not against and len(threads) > 1:
        raise QMambaError("--threads takes one value (a list only with --against llama.cpp)")
    args.thread_list, args.threads = threads, threads[0]


def run_child(kwargs: dict) -> dict:
    """One variant measured in a process of its own (`python -m qmamba.eval.bench KWARGS`)."""
    env = dict(os.environ, OMP_NUM_THREADS=str(kwargs["threads"]))
    r = subprocess.run(child_command(kwargs),
                       capture_output=True, text=True, env=env)
    if r.returncode != 0:
        last = (r.stderr.strip().splitlines() or ["(no output)"])[-1]
        if r.returncode < 0:
            last = f"killed by signal {-r.returncode}" + (" (out of memory?)" if r.returncode == -9 else "")
        raise QMambaError(f"benchmark of {kwargs['variant']} failed: {last}")
    return json.loads(r.stdout.strip().splitlines()[-1])
