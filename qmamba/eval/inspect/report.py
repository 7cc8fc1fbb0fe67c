"""`qmamba inspect`'s report: the checks of its arguments, and `inspect_model`, which runs the
probe, computes the statistics and writes the plots, stats.json and summary.md into the output
folder atomically."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Optional, Sequence

from ...errors import QMambaError
from ...models.save import atomic_folder
from ...quant.calibrate import DEFAULT_CALIB_TEXT, calibration_ids
from ...utils.io import atomic_write_json, atomic_write_text, umask
from . import plots
from .probe import SAMPLE_POSITIONS, collect
from .statistics import QUANTIZERS, add_sqnr, layer_stats, quantizer_name
from .summary import summary_markdown

log = logging.getLogger("qmamba")


# ------------------------------------------------------------------------------ arguments
def parse_layers(spec: Optional[str], n_layer: Optional[int] = None) -> Optional[list[int]]:
    """"all" (or None) -> None; "0,3,5" -> [0, 3, 5] (sorted, unique, checked against n_layer)."""
    if spec is None or spec.strip().lower() == "all":
        return None
    try:
        out = [int(s) for s in spec.split(",")]
    except ValueError:
        out = []
    if not out or any(i < 0 for i in out):
        raise QMambaError(f"--layers must be 'all' or layer indices separated by commas (e.g. 0,3,5), got {spec!r}")
    if len(set(out)) != len(out):
        raise QMambaError(f"--layers lists a layer twice: {spec!r}")
    if n_layer is not None and max(out) >= n_layer:
        raise QMambaError(f"--layers {spec}: the model has {n_layer} layer{'s' if n_layer != 1 else ''} "
                          f"(indices 0..{n_layer - 1})")
    return sorted(out)


def check_bits(bits: int) -> int:
    if not 2 <= bits <= 8:
        raise QMambaError(f"--bits must be between 2 and 8, got {bits}")
    return bits


# ------------------------------------------------------------------------------ the whole report
def _title(name: str) -> str:
    return Path(name).name or name


def _readable(folder: Path):
    """The permissions of a plain mkdir / open (temporary folders and files are private)."""
    mask = umask()
    folder.chmod(0o777 & ~mask)
    for f in folder.iterdir():
        f.chmod(0o666 & ~mask)


def inspect_model(loaded, out, *, calib=None, nsamples: int = 16, seqlen: int = 512, bits: int = 4,
                  layers: Optional[Sequence[int]] = None, force: bool = False, seed: int = 0,
                  batch_size: int = 8, progress: bool = False) -> dict:
    """Calibrate, analyse and write the report folder `out` atomically; returns stats.json's dict."""
    out = Path(out)
    check_bits(bits)
    if out.exists() and not force:
        raise QMambaError(f"output folder {out} already exists (pass --force to replace it)")
    if out.exists() and not out.is_dir():
        raise QMambaError(f"--out {out} is a file, not a folder")
    if batch_size < 1:
        raise QMambaError(f"--batch-size must be >= 1, got {batch_size}")
    model = loaded.model
    cfg = model.config
    if layers is not None:
        layers = parse_layers(",".join(str(i) for i in layers), cfg.n_layer)
    t0 = time.time()
    ids = calibration_ids(loaded.tokenizer, calib, nsamples=nsamples, seqlen=seqlen, seed=seed)
    log.info("inspect: %d sequences x %d tokens through %s", nsamples, seqlen, loaded.name)
    records = collect(model, ids, layers, batch_size=batch_size, seed=seed, progress=progress)
    add_sqnr(records, bits)
    m0 = model.layers[records[0].index].mixer          # the first Mamba layer (hybrids mix others in)
    name = _title(loaded.name)
    stats = {
        "model": {"name": loaded.name, "path": str(loaded.path), "arch": cfg.arch,
                  "parameters": model.num_parameters(), "n_layer": cfg.n_layer,
                  "channels": m0.ssm_state_shape()[0], "state_size": m0.ssm_state_shape()[1],
                  **({"heads": m0.nheads, "headdim": m0.headdim, "ngroups": m0.ngroups} if cfg.arch == "mamba2" else {}),
                  "dtype": str(next(model.parameters()).dtype).replace("torch.", "")},
        "data": {"text": str(calib) if calib is not None else f"the shipped validation text ({DEFAULT_CALIB_TEXT.name})",
                 "nsamples": nsamples, "seqlen": seqlen, "tokens": nsamples * seqlen, "seed": seed},
        "bits": bits,
        "quantizers": [quantizer_name(k, m) for k, m in QUANTIZERS],
        "sqnr_definition": "10 log10(sum h^2 / sum (h - Q(h))^2) over FP states sampled during calibration, "
                           "one quantize-dequantize with scales calibrated on the same states (maxima over "
                           "every token)",
        "state_samples_per_sequence": SAMPLE_POSITIONS,
        "files": [],
        "layers": [layer_stats(r) for r in records],
    }
    tmp, commit, abort = atomic_folder(out, force)
    try:
        files = []

        def add(fname: str) -> Path:
            files.append(fname)
            return tmp / fname

        plots.plot_overview(records, add("state_overview.png"), name)
        plots.plot_sqnr(records, add("state_sqnr.png"), name, bits)
        width = max(2, len(str(cfg.n_layer - 1)))
        for r in records:
            plots.plot_state_heatmap(r, add(f"state_heatmap_layer{r.index:0{width}d}.png"), name, nsamples * seqlen)
        for r in records:
            plots.plot_activations(r, add(f"activations_layer{r.index:0{width}d}.png"), name,
                             model.layers[r.index].layer_type, getattr(m0, "ngroups", 1))
        stats["files"] = files
        stats["seconds"] = round(time.time() - t0, 2)
        atomic_write_json(tmp / "stats.json", stats)
        atomic_write_text(tmp / "summary.md", summary_markdown(stats))
        _readable(tmp)
        commit()
    except BaseException:
        abort()
        raise
    return stats
