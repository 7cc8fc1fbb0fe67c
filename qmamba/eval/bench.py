"""Speed and memory of one model variant, measured in a process of its own (so that the peak
RSS is that variant's): prefill latency (time to first token), decode time per token, tokens/s,
peak memory, weight and state bytes, bytes read per decoded token and the bandwidth that implies.

Variants: "fp32", "bf16", "fp16" (float models), "quant" (the quantized model as it runs: int8
products and int8 weight reads, `qmamba.quant.intmm`) and "quant-sim" (the same model through
dequantized float weights, the path evaluations use; slower, for reference). A model is
a reference name or folder, or the shape of a real checkpoint (`qmamba.models.shapes`) with random
weights; a quantized variant of a shape is built on the meta device and filled with random codes,
so no float copy of the weights is ever allocated.
"""

from __future__ import annotations

import gc
import json
import statistics
import sys
import time

import torch

from ..models.shapes import SHAPES
from .timing import peak_rss, rss, timed

FLOAT_VARIANTS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@torch.no_grad()
def _randomize(model, seed: int = 0):
    """Random values for a shape-only model: float weights ~ N(0, 0.02), integer codes uniform,
    quantization scales small and positive, A_log/dt_bias/D as a trained model has them."""
    g = torch.Generator().manual_seed(seed)
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if t.is_meta:
            continue
        # in place: a temporary as large as the embedding would show in the peak memory
        if t.dtype == torch.uint8:                        # packed 4- or 2-bit codes: any byte
            t.random_(0, 256, generator=g)
        elif not t.is_floating_point():
            t.random_(-127, 128, generator=g)
        elif name.endswith(("scale", "s_n", "static_scale")):
            t.fill_(0.02)
        elif name.endswith("A_log"):
            t.uniform_(0, 2, generator=g)
        elif name.endswith(("D", "norm.weight", "norm_f.weight")):
            t.fill_(1.0)
        else:
            t.normal_(0, 0.02, generator=g)


def build(model_name: str, variant: str, quant: str, method: str, device: torch.device,
          folder: str | None = None):
    """The model to time, and a description of how it was built. `model_name` is a shape of
    `qmamba.models.shapes`, or else the model in `folder` (what `qmamba.api.resolve_model_path`
    made of the name)."""
    from ..methods import resolve_config
    from ..methods.checkpoint import build_structure, quantize_structure
    from ..models.shapes import shape_config

    quantized = variant.startswith("quant")
    dtype = FLOAT_VARIANTS.get(variant, torch.float32)
    if model_name in SHAPES:
        cfg = shape_config(model_name)
        if quantized:
            model = build_structure(cfg, resolve_config(quant, method, quantize_head=True), method)
        else:                                  # allocated in its dtype: no float32 copy first
            model = build_structure(cfg, dtype=dtype)
        model = model.to_empty(device="cpu")
        if model.config.tie_embeddings and isinstance(model.lm_head, torch.nn.Linear):
            model.lm_head.weight = model.backbone.embeddings.weight
        _randomize(model)
        source = f"{model_name} shapes, random weights"
    else:
        from ..methods.checkpoint import load_quantized
        from ..models.load import load_folder

        model = load_folder(folder, load_quantized=load_quantized)[0]
        if quantized and model.quant_state is None:
            quantize_structure(model, resolve_config(quant, method, quantize_head=True), method)
        source = model_name
    if quantized:
        from ..eval.memory import cast_float_weights
        from ..quant.execution import set_execution

        cast_float_weights(model, torch.float32)
        set_execution(model, "sim" if variant == "quant-sim" else "int")
    else:
        model = model.to(dtype)
    return model.to(device).eval(), source


def shape_folder(model_name: str, root):
    """A transformers-style folder (config.json + model.safetensors, no tokenizer) holding the
    float model of shape `model_name` with the random weights `build` gives it: what another
    runtime's converter can read. Made once under `root`; returns its path."""
    from pathlib import Path

    from ..models.save import save_model

    out = Path(root) / f"{model_name}-random-seed0"     # `_randomize`'s seed
    if not (out / "config.json").is_file():
        model, _ = build(model_name, "fp32", "", "", torch.device("cpu"))
        save_model(model, out, force=True)
    return out


@torch.no_grad()
def run_variant(model_name: str, variant: str, quant: str, method: str, batch: int, prompt_len: int,
                gen_len: int, reps: int, device_name: str, threads: int, folder: str | None = None) -> dict:
    from ..quant.intmm import backend as int_backend
    from .memory import weight_bytes

    torch.set_num_threads(threads)
    device = torch.device(device_name)
    runtime_rss = rss()             # the interpreter, torch and qmamba before any model exists
    t = time.time()
    model, source = build(model_name, variant, quant, method, device, folder)
    build_s = time.time() - t
    gc.collect()
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, vocab, (batch, prompt_len), generator=g).to(device)
    prefill, decode = [], []
    for rep in range(reps + 1):                       # rep 0 is the warm-up (and compiles)
        cache = model.allocate_cache(batch)
        logits, t_prefill = timed(lambda: model(prompt, cache, logits_to_keep=1)[:, -1], device)
        tok = logits.argmax(-1)
        steps = []
        for _ in range(gen_len):
            tok, t_step = timed(lambda: model.step(tok, cache).argmax(-1), device)
            steps.append(t_step)
        if rep:
            prefill.append(t_prefill)
            decode.append(statistics.median(steps))
    w = weight_bytes(model)["total"]
    s = cache.nbytes()
    state = sum(s.values())                      # conv + SSM (+ the KV of attention layers)
    per_tok = statistics.median(decode)
    # bytes a decode step must read: every weight except the embedding table (one row per
    # sequence), plus the whole state, read and written once
    emb = model.backbone.embeddings
    emb_bytes = sum(t.numel() * t.element_size() for t in emb.state_dict().values())
    tied = model.config.tie_embeddings
    read = (w - (0 if tied else emb_bytes)) + 2 * state
    out = {
        "model": model_name, "source": source, "variant": variant, "batch": batch,
        "prompt_len": prompt_len, "gen_len": gen_len, "reps": reps, "device": device_name,
        "threads": threads, "build_seconds": round(build_s, 2),
        "int_backend": int_backend(device_name) if variant == "quant" else None,
        "prefill_seconds": statistics.median(prefill), "decode_seconds_per_token": per_tok,
        "tokens_per_second": batch / per_tok, "weight_bytes": w, "state_bytes": state,
        "state_share": state / (w + state), "bytes_read_per_step": read,
        "bandwidth_gb_s": read / per_tok / 1e9,
    }
    if device.type == "cuda":
        out["peak_memory_bytes"] = torch.cuda.max_memory_allocated()
    else:
        out["peak_memory_bytes"] = peak_rss()
        out["runtime_rss_bytes"] = runtime_rss
    return out


def copy_bandwidth(device_name: str = "cpu", mib: int = 512, reps: int = 5) -> float:
    """Measured copy bandwidth in GB/s (bytes read + written per second): the physical limit."""
    device = torch.device(device_name)
    a = torch.empty(mib * 2 ** 20 // 4, dtype=torch.float32, device=device).fill_(1.0)
    b = torch.empty_like(a)
    best = min(timed(lambda: b.copy_(a), device)[1] for _ in range(reps))
    return 2 * a.numel() * 4 / best / 1e9


if __name__ == "__main__":        # child process: python -m qmamba.eval.bench '{json kwargs}'
    print(json.dumps(run_variant(**json.loads(sys.argv[1]))))
