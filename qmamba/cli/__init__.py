"""`qmamba` command line: one sub-command per user verb, each in its own module of this package.

A module registers itself in COMMANDS below with `add_parser(subparsers)`; the parser it adds
sets `func` to the function that runs it. User mistakes raise `QMambaError` and end as one
line on stderr with exit status 2 (argparse's own errors also exit 2); `--debug` shows the
traceback instead.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import os
import sys

from ..errors import QMambaError
from ..kernels import cpu_features

# verb modules, in the order of `qmamba --help`
COMMANDS = ["compare", "quantize", "eval", "generate", "memory", "inspect", "bench"]


def build_parser() -> argparse.ArgumentParser:
    from .._version import __version__

    parser = argparse.ArgumentParser(
        prog="qmamba", description="Post-training quantization of Mamba and Mamba2 language models.")
    parser.add_argument("--version", action="version", version=f"qmamba {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMANDS:
        importlib.import_module(f"{__name__}.{name.replace('-', '_')}").add_parser(sub)
    return parser


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    restore = _exit_on_sigterm()
    try:
        cpu_features.ceiling()          # a bad QMAMBA_CPU_ISA: one line now, not after the work
        with _threads(args):
            return int(args.func(args) or 0)
    except QMambaError as e:
        if args.debug:
            raise
        print(f"qmamba {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Terminated:
        print("terminated", file=sys.stderr)
        return 143
    finally:
        restore()


@contextlib.contextmanager
def _threads(args):
    """The command's PyTorch work on every core this process may run on, or on --threads N;
    bench sets the threads of its own worker processes. The previous count is restored."""
    import torch

    before = torch.get_num_threads()
    try:
        if hasattr(args, "threads") and args.command != "bench":
            n = args.threads
            if n is None:
                n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
            elif n < 1:
                raise QMambaError(f"--threads must be positive, got {n}")
            torch.set_num_threads(n)
        yield
    finally:
        torch.set_num_threads(before)


class Terminated(BaseException):
    """SIGTERM, raised in the main thread so that half-written outputs are removed on the way out."""


def _exit_on_sigterm():
    """Turn SIGTERM into `Terminated` while a command runs (a plain SIGTERM would skip every
    `finally` and leave temporary folders behind); returns the function that restores the handler."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return lambda: None

    def handler(signum, frame):
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, handler)
    return lambda: signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
