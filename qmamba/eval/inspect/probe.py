"""The calibration run of `qmamba inspect`: one pass of the float model over the calibration
sequences, with a probe on every analysed layer that records the activation maxima at each
quantization point and the maxima (and a reservoir sample) of the SSM states of the exact
per-token recurrence."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch
from torch import Tensor

from ...errors import QMambaError
from ...models.layer_spec import get_path, state_spec
from ...models.scan.reference import selective_scan_ref

SAMPLE_POSITIONS = 8          # states kept per sequence for the SQNR (evenly spaced tokens)
SAMPLE_BUDGET = 1 << 21       # ... and at most this many floats of them per layer (reservoir)
LABELS = {  # quantization point -> what it is, for titles
    "in_proj": "in_proj input", "conv": "conv input (quant_conv)", "x": "scan x (quant_x)",
    "dt_proj": "dt_proj input", "dt": "scan dt (quant_dt)", "B": "scan B (quant_B)",
    "C": "scan C (quant_C)", "z": "gate z (quant_z)", "out_proj": "out_proj input",
}


@dataclass
class LayerRecord:
    """What the calibration run collected for one layer."""
    index: int
    d: int
    n: int
    headdim: int                                   # Mamba2 head dim; 1 for Mamba1
    amax: Tensor                                   # (d, n) max over tokens of |h|
    act: dict[str, Tensor] = field(default_factory=dict)   # point -> (channels,) max |a|
    samples: list[Tensor] = field(default_factory=list)     # (d, n) states for the SQNR
    seen: int = 0                                  # candidate sample states offered
    sqnr: dict[str, float] = field(default_factory=dict)

    @property
    def heads(self) -> int:
        return self.d // self.headdim


def act_points(mixer) -> list[tuple[str, torch.nn.Module]]:
    """(name, module) of every quantization point the mixer declares; a point's activation is
    its module's input: the input of each group of linears that gets its own input quantizer
    (named after the group's first linear), and each activation quantization point (named
    without its "quant_" prefix)."""
    pts = [(g.linears[0], get_path(mixer, g.linears[0])) for g in mixer.linear_groups() if not g.input_quantized]
    return pts + [(p.removeprefix("quant_"), getattr(mixer, p)) for p in mixer.QUANT_POINTS]


class Probe:
    """Collects one layer's statistics: activation maxima (forward pre-hooks on the quantization
    points) and the SSM states of the exact per-token recurrence.

    The states come through the hook the mixer offers on its scan: a mixer with a state
    quantizer (`mixer.state_quant`) hands its scan to that object's `scan(mixer, x, dt, B, C,
    state)`. The probe stands there and runs the exact per-token recurrence
    (`selective_scan_ref` of the mixer's `per_channel` inputs), recording the state after every
    token; the layers after it get that recurrence's output."""

    def __init__(self, rec: LayerRecord, mixer, cap: int, seed: int):
        self.rec, self.mixer, self.cap = rec, mixer, cap
        self.gen = torch.Generator().manual_seed(seed * 1_000_003 + rec.index)
        self.handles = []
        self.keep: set[int] = set()
        self.t = 0

    def install(self):
        for name, mod in act_points(self.mixer):
            self.handles.append(mod.register_forward_pre_hook(self._act_hook(name)))
        self.mixer.state_quant = self

    def remove(self):
        for h in self.handles:
            h.remove()
        self.handles = []
        if self.mixer.state_quant is self:
            self.mixer.state_quant = None

    def _act_hook(self, name: str):
        def hook(module, args):
            a = args[0].detach().float().abs().flatten(0, -2).amax(0)      # (channels,)
            prev = self.rec.act.get(name)
            self.rec.act[name] = a if prev is None else torch.maximum(prev, a)
        return hook

    def scan(self, mixer, x, dt, B, C, state) -> Tensor:
        """The mixer's scan of a batch of whole sequences: y (b, l, d) of the exact recurrence."""
        if state is not None:
            raise RuntimeError("inspect runs whole sequences without a cache")
        length = x.shape[1]
        k = min(SAMPLE_POSITIONS, length)
        self.keep = {round((j + 1) * length / k) for j in range(k)}        # 1-based token steps
        self.t = 0
        with torch.no_grad():
            y, _ = selective_scan_ref(*mixer.per_channel(x, dt, B, C), None, self._record)
        return y

    def _record(self, h: Tensor) -> Tensor:
        """The state (b, d, n) after one token: recorded, returned unchanged."""
        rec = self.rec
        torch.maximum(rec.amax, h.abs().amax(0), out=rec.amax)
        self.t += 1
        if self.t in self.keep:                 # reservoir over (sequence, position) candidates
            for i in range(h.shape[0]):
                rec.seen += 1
                if len(rec.samples) < self.cap:
                    rec.samples.append(h[i].detach().clone())
                else:
                    j = int(torch.randint(0, rec.seen, (1,), generator=self.gen))
                    if j < self.cap:
                        rec.samples[j] = h[i].detach().clone()
        return h


@torch.no_grad()
def collect(model, ids: Tensor, layers: Optional[Sequence[int]] = None, batch_size: int = 8,
            seed: int = 0, progress: bool = False) -> list[LayerRecord]:
    """Run `ids` (N, L) through the float model up to the last analysed layer and return one
    LayerRecord per analysed layer, with its sampled states (for `statistics.add_sqnr`)."""
    from tqdm.auto import tqdm

    if model.quant_state is not None or any(
            m.state_quant is not None for m in model.mixers()):
        raise QMambaError("inspect analyses float models; this model is already quantized")
    n_layer = len(model.layers)
    with_ssm = [i for i, m in enumerate(model.mixers()) if state_spec(m, "ssm") is not None]
    layers = with_ssm if layers is None else sorted(layers)
    if not layers or layers[0] < 0 or layers[-1] >= n_layer:
        raise QMambaError(f"layers to inspect must be indices in 0..{n_layer - 1}, got {layers}")
    other = [i for i in layers if i not in with_ssm]
    if other:                  # attention, MLP and MoE layers of hybrids keep no SSM state
        raise QMambaError(f"layer(s) {', '.join(map(str, other))} have no SSM state to inspect "
                          f"(layer type {model.layers[other[0]].layer_type}); Mamba layers: "
                          f"{', '.join(map(str, with_ssm))}")
    device = next(model.parameters()).device
    probes = []
    for i in layers:
        mixer = model.layers[i].mixer
        ssm = state_spec(mixer, "ssm")
        d, n = ssm.shape
        rec = LayerRecord(i, d, n, ssm.headdim, torch.zeros(d, n, device=device))
        cap = max(4, min(256, SAMPLE_BUDGET // (d * n)))
        probes.append(Probe(rec, mixer, cap, seed))
    was_training = model.training
    model.eval()
    try:
        for p in probes:
            p.install()
        # progress: a bar on a terminal only (tqdm's disable=None)
        for s in tqdm(range(0, len(ids), batch_size), desc="inspect", unit="batch",
                      disable=None if progress else True, leave=False):
            hidden = model.embed(ids[s:s + batch_size].to(device))
            for layer in model.layers[:layers[-1] + 1]:
                hidden = layer(hidden)
    finally:
        for p in probes:
            p.remove()
        model.train(was_training)
    records = []
    for p in probes:
        rec = p.rec
        samples = torch.stack(rec.samples)
        if not torch.isfinite(samples).all() or not torch.isfinite(rec.amax).all():
            raise QMambaError(f"non-finite SSM state (NaN or inf) in layer {rec.index}; check the model")
        rec.amax, rec.act = rec.amax.cpu(), {k: v.cpu() for k, v in rec.act.items()}
        records.append(rec)
    return records
