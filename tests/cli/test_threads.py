"""Every command that runs a model uses every core it may run on unless --threads says otherwise."""

from __future__ import annotations

import os

import pytest
import torch

from qmamba.cli import main
from qmamba.cli import memory as cli_memory


@pytest.mark.parametrize("argv, want", [([], len(os.sched_getaffinity(0))), (["--threads", "1"], 1)])
def test_commands_use_all_cores_or_threads(tiny_mamba2, monkeypatch, argv, want):
    seen = []
    monkeypatch.setattr(cli_memory, "run", lambda args: seen.append(torch.get_num_threads()) or 0)
    before = torch.get_num_threads()
    assert main(["memory", str(tiny_mamba2[1]), *argv]) == 0
    assert seen == [want]
    assert torch.get_num_threads() == before                   # put back for the caller


def test_bad_thread_count(tiny_mamba2, capsys):
    assert main(["eval", str(tiny_mamba2[1]), "--threads", "0"]) == 2
    assert capsys.readouterr().err.strip() == "qmamba eval: error: --threads must be positive, got 0"
