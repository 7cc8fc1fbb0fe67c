"""The environment an lm-eval run gets, restored afterwards: a run never touches the user's home
cache, and proxy-only runs are offline.

If `HF_HOME` is not set, it points at a temporary folder for the duration of the run (the hub,
datasets and modules caches all live under it unless their own variables are set); proxy-only
runs are forced offline (`HF_HUB_OFFLINE=1`, `HF_DATASETS_OFFLINE=1`). Because `datasets` and
`huggingface_hub` read those variables once, at import, the module-level constants derived from
them are patched too (this module is the only place that patches third-party modules), and
everything (variables, constants, logging levels, progress bars, RNG states) is restored
afterwards.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import random
from pathlib import Path
from typing import Any

import torch

__all__ = ["eval_environment", "hf_constants", "seeded"]


def hf_constants(env: dict) -> dict[tuple[str, str], Any]:
    """The import-time constants of `datasets.config` and `huggingface_hub.constants` that the
    offline flags and cache folders set, recomputed from `env` the way those modules do."""
    truthy = {"1", "ON", "YES", "TRUE"}
    xdg = env.get("XDG_CACHE_HOME", os.path.join(os.path.expanduser("~"), ".cache"))
    home = os.path.expanduser(env.get("HF_HOME", os.path.join(xdg, "huggingface")))
    hub_offline = (env.get("HF_HUB_OFFLINE") or env.get("TRANSFORMERS_OFFLINE") or "").upper() in truthy
    ds_offline = env.get("HF_DATASETS_OFFLINE")
    ds_offline = hub_offline if ds_offline is None else ds_offline.upper() in truthy
    ds_cache = Path(env.get("HF_DATASETS_CACHE", os.path.join(home, "datasets")))
    downloads = Path(env.get("HF_DATASETS_DOWNLOADED_DATASETS_PATH", os.path.join(ds_cache, "downloads")))
    hub_cache = os.path.expanduser(env.get("HF_HUB_CACHE", env.get("HUGGINGFACE_HUB_CACHE", os.path.join(home, "hub"))))
    assets = os.path.expanduser(env.get("HF_ASSETS_CACHE", env.get("HUGGINGFACE_ASSETS_CACHE", os.path.join(home, "assets"))))
    return {
        ("datasets.config", "HF_HUB_OFFLINE"): ds_offline,
        ("datasets.config", "HF_DATASETS_OFFLINE"): ds_offline,
        ("datasets.config", "HF_CACHE_HOME"): home,
        ("datasets.config", "HF_DATASETS_CACHE"): ds_cache,
        ("datasets.config", "HF_MODULES_CACHE"): Path(env.get("HF_MODULES_CACHE", os.path.join(home, "modules"))),
        ("datasets.config", "DOWNLOADED_DATASETS_PATH"): downloads,
        ("datasets.config", "EXTRACTED_DATASETS_PATH"): Path(env.get("HF_DATASETS_EXTRACTED_DATASETS_PATH", os.path.join(downloads, "extracted"))),
        ("huggingface_hub.constants", "HF_HUB_OFFLINE"): hub_offline,
        ("huggingface_hub.constants", "HF_HOME"): home,
        ("huggingface_hub.constants", "hf_cache_home"): home,
        ("huggingface_hub.constants", "HUGGINGFACE_HUB_CACHE"): env.get("HUGGINGFACE_HUB_CACHE", os.path.join(home, "hub")),
        ("huggingface_hub.constants", "HF_HUB_CACHE"): hub_cache,
        ("huggingface_hub.constants", "HUGGINGFACE_ASSETS_CACHE"): env.get("HUGGINGFACE_ASSETS_CACHE", os.path.join(home, "assets")),
        ("huggingface_hub.constants", "HF_ASSETS_CACHE"): assets,
        ("huggingface_hub.constants", "HF_XET_CACHE"): env.get("HF_XET_CACHE", os.path.join(home, "xet")),
    }


@contextlib.contextmanager
def eval_environment(offline: bool, scratch: Path, quiet: bool = True):
    """Offline flags, a temporary HF_HOME when the user has none, no bootstrap process pool,
    quiet lm-eval logging; all restored on exit."""
    import importlib

    import datasets
    import huggingface_hub.constants  # noqa: F401  (both read the environment at import)

    changes = {"DISABLE_MULTIPROC": "1"}    # lm-eval's bootstrap stderr: no process pool
    if offline:
        changes.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    if not os.environ.get("HF_HOME"):
        changes["HF_HOME"] = str(scratch / "hf_home")
    saved_env = {k: os.environ.get(k) for k in changes}
    import lm_eval.api.task as lm_task                 # its per-document "building requests" bar
    saved_task_tqdm = lm_task.tqdm
    saved_consts = {}
    loggers = {name: logging.getLogger(name) for name in ("lm_eval", "datasets")}
    saved_levels = {name: lg.level for name, lg in loggers.items()}
    bars_were_off = datasets.utils.are_progress_bars_disabled()
    try:
        os.environ.update(changes)
        for (mod_name, attr), value in hf_constants(dict(os.environ)).items():
            mod = importlib.import_module(mod_name)
            if hasattr(mod, attr):
                saved_consts[(mod, attr)] = getattr(mod, attr)
                setattr(mod, attr, value)
        if quiet:
            for lg in loggers.values():
                lg.setLevel(logging.WARNING)
            datasets.utils.disable_progress_bars()
            lm_task.tqdm = functools.partial(saved_task_tqdm, disable=True)
        yield
    finally:
        lm_task.tqdm = saved_task_tqdm
        for (mod, attr), value in saved_consts.items():
            setattr(mod, attr, value)
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        for name, lg in loggers.items():
            lg.setLevel(saved_levels[name])
        if not bars_were_off:
            datasets.utils.enable_progress_bars()


@contextlib.contextmanager
def seeded(seed: int):
    """Seed python, numpy and torch like lm-eval's simple_evaluate; restore their states after."""
    import numpy as np

    states = (random.getstate(), np.random.get_state(), torch.get_rng_state())
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    try:
        yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.set_rng_state(states[2])
