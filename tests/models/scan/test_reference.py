"""`qmamba.models.scan.reference`: the token step and the sequential scan agree with each other
and with the recurrence written out by hand; `per_channel` broadcasts groups to channels."""

from __future__ import annotations

import torch

from qmamba.models.scan.reference import per_channel, selective_scan_ref, ssm_step

from .scan_checks import assert_close


def test_per_channel_repeats_each_group_over_its_channels():
    t = torch.arange(2 * 3 * 4, dtype=torch.float32).view(2, 3, 4)         # (b, g, n)
    out = per_channel(t, 6)                                                 # (b, d, n), d / g = 2
    assert out.shape == (2, 6, 4)
    assert torch.equal(out, t.repeat_interleave(2, dim=1))


def test_sequential_scan_is_the_token_step_repeated_and_the_written_out_recurrence():
    g = torch.Generator().manual_seed(0)
    b, length, d, n, groups = 2, 5, 4, 3, 2
    x, dt = torch.randn(b, length, d, generator=g), torch.rand(b, length, d, generator=g) * 0.5
    A = -torch.rand(d, n, generator=g)
    B, C = torch.randn(b, length, groups, n, generator=g), torch.randn(b, length, groups, n, generator=g)
    D, h0 = torch.randn(d, generator=g), torch.randn(b, d, n, generator=g)
    halved = []
    y, h = selective_scan_ref(x, dt, A, B, C, D, h0, state_fn=lambda s: halved.append(s) or s / 2)
    assert y.shape == (b, length, d) and h.shape == (b, d, n) and len(halved) == length

    state, hand = h0, h0
    for t in range(length):
        y_t, state = ssm_step(state, x[:, t], dt[:, t], A, B[:, t], C[:, t], D, lambda s: s / 2)
        assert torch.equal(y_t, y[:, t])
        Bd, Cd = B[:, t].repeat_interleave(d // groups, 1), C[:, t].repeat_interleave(d // groups, 1)
        hand = (torch.exp(dt[:, t, :, None] * A) * hand + (dt[:, t] * x[:, t])[..., None] * Bd) / 2
        assert_close(y_t, (hand * Cd).sum(-1) + D * x[:, t], name=f"y_{t}")
    assert torch.equal(state, h)
