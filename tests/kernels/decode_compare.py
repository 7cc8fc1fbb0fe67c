"""What the decode-step tests compare: the logits and the cache tensors after every step."""

from __future__ import annotations

import torch

WHAT = ("conv state", "state codes", "state scales")


def snapshot(cache) -> list[torch.Tensor]:
    """Copies of every layer's conv state, state codes and state scales."""
    return [t.clone() for layer in cache for t in (layer.conv, layer.ssm.codes, layer.ssm.scales)]


def assert_same_decode(got_logits, got_states, want_logits, want_states) -> None:
    """Equal bit for bit after every step; and the state moved (not untouched zeros)."""
    for t, (a, b) in enumerate(zip(got_logits, want_logits)):
        assert torch.equal(a, b), f"step {t}: logits differ by {(a - b).abs().max().item():.3e}"
    for t, (sa, sb) in enumerate(zip(got_states, want_states)):
        for i, (a, b) in enumerate(zip(sa, sb)):
            assert a.dtype == b.dtype and torch.equal(a, b), f"step {t}, layer {i // 3}: {WHAT[i % 3]} differ"
    assert any(not torch.equal(a, b) for a, b in zip(got_states[0], got_states[-1]))
