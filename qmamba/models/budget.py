"""Will it fit? The bytes a model or a run needs, estimated from the config alone (nothing is
allocated), against the memory this process can still get. Used before the long or large work
starts, so that an absurd config.json or option ends as one line (`QMambaError`) instead of
minutes of building, gigabytes of RSS and a `std::bad_alloc` traceback.

The estimates are lower bounds (the bytes of the tensors that must exist, no working memory),
so a refusal means the run cannot fit; a run that passes may still be tight.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Optional

import torch

from ..errors import QMambaError

# RSS of one layer built on the meta device (Python module objects, no tensor data), measured:
# about 35 KB per Mamba2 layer with torch 2.x; 32 KB is the floor counted per layer
META_BYTES_PER_LAYER = 32 * 1024
# more layers than any real Mamba (64): building them on the meta device takes seconds (2-3 ms
# each), so such a config is compared with the size of its weight files first
MANY_LAYERS = 512
# the narrowest weight a qmamba checkpoint stores (W2 codes, packed): a lower bound per parameter
MIN_QUANT_BYTES_PER_PARAM = 2 / 8


def human(n: float) -> str:
    """Bytes as '1.5 GiB'."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(n) < 1024 or unit == "PiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} PiB"


def _read_int(path: str) -> Optional[int]:
    try:
        text = Path(path).read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def available_memory() -> Optional[int]:
    """Bytes this process can still allocate: /proc/meminfo's MemAvailable, lowered by the
    cgroup's limit (v2 memory.max - memory.current, v1 limit_in_bytes - usage_in_bytes) and by
    the address-space limit (ulimit -v) when set. None when nothing can be read (then nothing
    is refused)."""
    avail = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    avail = int(line.split()[1]) * 1024
                    break
    except (OSError, ValueError, IndexError):
        pass
    for limit_file, usage_file in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                   ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                                    "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        limit, usage = _read_int(limit_file), _read_int(usage_file)
        if limit is not None and usage is not None and limit < 1 << 60:
            left = max(limit - usage, 0)
            avail = left if avail is None else min(avail, left)
            break
    try:                               # ulimit -v: address space left to this process
        import resource

        soft, _ = resource.getrlimit(resource.RLIMIT_AS)
        if soft != resource.RLIM_INFINITY:
            with open("/proc/self/status") as f:
                vm = next((int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:")), 0)
            left = max(soft - vm, 0)
            avail = left if avail is None else min(avail, left)
    except (ImportError, OSError, ValueError):
        pass
    return avail


def check_bytes(need: int, what: str, device=None) -> None:
    """QMambaError when `need` bytes (for `what`, a phrase naming the sizes) exceed the memory
    available, on the host, and on the GPU when `device` is a CUDA device."""
    avail = available_memory()
    if avail is not None and need > avail:
        raise QMambaError(f"{what} needs at least {human(need)} of memory, more than the "
                          f"{human(avail)} available")
    dev = torch.device(device) if device is not None else None
    if dev is not None and dev.type == "cuda" and torch.cuda.is_available():
        try:
            free, _ = torch.cuda.mem_get_info(dev)
        except RuntimeError:
            return
        if need > free:
            raise QMambaError(f"{what} needs at least {human(need)} of GPU memory, more than the "
                              f"{human(free)} free on {dev}")


# ------------------------------------------------------------------------------------ a model
@dataclasses.dataclass
class ModelSize:
    parameters: int           # every parameter and buffer element, tied ones once
    state_per_sequence: int   # conv + SSM state elements of one sequence, all layers
    n_layer: int
    d_model: int
    vocab_size: int


def _count(cfg, layer_types: list) -> tuple[int, int]:
    from .lm import MambaLM

    with torch.device("meta"):
        model = MambaLM(dataclasses.replace(cfg, n_layer=len(layer_types), layer_types=list(layer_types)))
    params = sum(t.numel() for t in model.parameters()) + sum(t.numel() for t in model.buffers())
    state = sum(spec.numel for m in model.mixers() for spec in m.states())
    return params, state


def model_size(cfg) -> ModelSize:
    """Sizes of a `ModelConfig`, from one- and two-layer models of each of its layer types built
    on the meta device (cheap whatever the config says: no data, two layers a type)."""
    params = state = 0
    for t in dict.fromkeys(cfg.layer_types):
        p1, s1 = _count(cfg, [t])
        p2, s2 = _count(cfg, [t, t])
        k = cfg.layer_types.count(t)
        if not params:
            params = p1 - (p2 - p1)            # what no layer holds: embedding, final norm, head
        params += k * (p2 - p1)
        state += k * (s2 - s1)
    return ModelSize(parameters=params, state_per_sequence=state, n_layer=cfg.n_layer,
                     d_model=cfg.d_model, vocab_size=cfg.vocab_size)


def describe_size(cfg, size: ModelSize) -> str:
    """'1.2 B parameters (48 layers, d_model 2,048, vocabulary 50,280)'."""
    return (f"{size.parameters / 1e9:.3g} B parameters ({cfg.n_layer:,} layers, d_model {cfg.d_model:,}, "
            f"vocabulary {cfg.vocab_size:,})" if size.parameters >= 1e8 else
            f"{size.parameters / 1e6:.3g} M parameters ({cfg.n_layer:,} layers, d_model {cfg.d_model:,}, "
            f"vocabulary {cfg.vocab_size:,})")
