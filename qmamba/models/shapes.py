"""Configurations of real checkpoints, for memory reports and benchmarks with random weights
(the hub is not always reachable; shapes are what those measurements need). Values from the
checkpoints' config.json files (mamba_ssm vocabularies padded as mamba_ssm pads them)."""

from __future__ import annotations

from .config import ModelConfig

_M1 = dict(arch="mamba1", vocab_size=50280, d_state=16, d_conv=4, expand=2)
_M2 = dict(arch="mamba2", vocab_size=50288, d_state=128, d_conv=4, expand=2, headdim=64, ngroups=1,
           chunk_size=256)

SHAPES = {
    "mamba-130m": dict(_M1, d_model=768, n_layer=24),
    "mamba-370m": dict(_M1, d_model=1024, n_layer=48),
    "mamba-2.8b": dict(_M1, d_model=2560, n_layer=64),
    "mamba2-130m": dict(_M2, d_model=768, n_layer=24),
    "mamba2-370m": dict(_M2, d_model=1024, n_layer=48),
    "mamba2-2.7b": dict(_M2, d_model=2560, n_layer=64),
    # mistralai/Mamba-Codestral-7B-v0.1: 128 heads of 64, 8 groups, vocabulary 32768
    "codestral-mamba-7b": dict(_M2, vocab_size=32768, d_model=4096, n_layer=64, ngroups=8),
}


def shape_config(name: str) -> ModelConfig:
    return ModelConfig(**SHAPES[name])
