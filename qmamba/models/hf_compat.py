"""Everything that differs between the transformers versions qmamba supports (4.57.x to the
newest 5.x), in one place.

What differs, and where it matters:
  * floats in config.json: 4.x writes bare `Infinity` (`time_step_limit: [0.0, Infinity]`), 5.x
    writes `{"__float__": "Infinity"}`, which 4.57 cannot read back. We read both (`json_float`)
    and write the 4.x form (`ModelConfig.to_hf`), which every supported version reads.
  * `tie_word_embeddings`: 4.x MambaConfig defaults it to true; 5.x no longer writes it for
    Mamba and keeps a head it saved separate. Where a 5.x config is silent, the weights say whether
    the head is tied (`tied_head`).
  * the Mamba2 gated RMSNorm: transformers before 5.23.0 normalised over all of d_inner whatever
    n_groups; mamba_ssm's `Mamba2` (RMSNormGated with group_size = d_ssm // ngroups) normalises each
    group of d_inner / n_groups channels on its own, and transformers does the same from 5.23.0
    (`Mamba2RMSNormGated(..., group_size=intermediate_size // n_groups)`). qmamba always computes
    mamba_ssm's function (`GROUPED_NORM_FIXED` is for the tests, which only trust the installed
    transformers as a second oracle where it computes that function).
  * cache classes (4.x MambaCache / Mamba2's cache_params, 5.x DynamicCache and `cache=`): qmamba
    has its own recurrent cache (`qmamba.models.cache`) and never builds or reads a transformers
    cache, so nothing here depends on them.
"""

from __future__ import annotations

from typing import Any, Optional

import torch

# first transformers whose Mamba2 normalises the gated RMSNorm per group, as mamba_ssm does
GROUPED_NORM_FIXED = (5, 23, 0)


def json_float(v: Any) -> float:
    """A float as transformers 4.x (bare Infinity / "Infinity") and 5.x ({"__float__": ...}) write it."""
    if isinstance(v, dict) and "__float__" in v:
        v = v["__float__"]
    return float(v)


def writer_version(raw: dict) -> tuple[int, ...]:
    """Version of the transformers that wrote a config.json ((0,) if unknown)."""
    return parse_version(str(raw.get("transformers_version", "0")))


def parse_version(text: str) -> tuple[int, ...]:
    """'5.23.0.dev0' -> (5, 23, 0), the release part of a PEP 440 version ((0,) if unparsable)."""
    from packaging.version import InvalidVersion, Version

    try:
        return Version(text).release
    except InvalidVersion:
        return (0,)


def tied_head(raw: dict, sd: dict, default: bool, head: str, embeddings: str) -> bool:
    """Whether lm_head is tied to the embeddings. The config's `tie_word_embeddings` wins; a 5.x
    config that is silent leaves it to the weights (a separate head saved that differs from the
    embeddings is untied); a silent 4.x or unknown config means `default` (4.x's default, true)."""
    if "tie_word_embeddings" in raw:
        return bool(raw["tie_word_embeddings"])
    if writer_version(raw)[0] >= 5 and head in sd and embeddings in sd:
        return bool(torch.equal(sd[head], sd[embeddings]))
    return default


def installed_version() -> Optional[tuple[int, ...]]:
    """The installed transformers' version, or None if it is not installed."""
    try:
        import transformers
    except ImportError:
        return None
    return parse_version(transformers.__version__)


def installed_norms_per_group() -> bool:
    """Whether the installed transformers' Mamba2 computes mamba_ssm's per-group gated norm."""
    v = installed_version()
    return v is not None and v >= GROUPED_NORM_FIXED
