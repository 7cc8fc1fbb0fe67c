"""qmamba.eval.tasks (run_tasks through real lm-eval, offline, with the environment restored;
task names; the proxy task YAMLs) and qmamba.eval.lm_eval_env, on a tiny random Mamba2."""

import importlib
import json
import math
import os
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("lm_eval")

from lm_eval.api.instance import Instance  # noqa: E402

from qmamba.errors import QMambaError  # noqa: E402
from qmamba.eval.lm_eval_adapter import QMambaLM  # noqa: E402
from qmamba.eval.tasks import PROXY_TASKS, run_tasks, write_task_yamls  # noqa: E402
from qmamba.utils.paths import TASKS_DIR  # noqa: E402

pytestmark = pytest.mark.usefixtures("offline_hub", "one_thread")

TOL = 1e-5      # per summed log-probability term (see test_lm_eval_adapter.py)


def _req(kind, *args):
    return Instance(request_type=kind, doc={}, arguments=tuple(args), idx=0)


def _tree(path: Path):
    return sorted(str(p) for p in path.rglob("*")) if path.exists() else None


def test_run_tasks_offline_through_lm_eval(model, tok, monkeypatch):
    import datasets.config
    import huggingface_hub.constants
    import lm_eval.evaluator  # noqa: F401  (first imports may set variables of their own)
    import lm_eval.tasks  # noqa: F401

    monkeypatch.delenv("HF_HOME", raising=False)
    monkeypatch.delenv("HF_DATASETS_CACHE", raising=False)
    for name in ("threadpoolctl", "sklearn"):     # lm-eval's metrics import them, and their import
        try:                                       # sets KMP_DUPLICATE_LIB_OK: not ours to restore
            importlib.import_module(name)
        except ImportError:
            pass
    home = Path(datasets.config.HF_CACHE_HOME)                 # where a run would otherwise write
    before = _tree(home)
    env = dict(os.environ)
    consts = (datasets.config.HF_DATASETS_CACHE, datasets.config.HF_MODULES_CACHE,
              huggingface_hub.constants.HF_HUB_CACHE, huggingface_hub.constants.HF_HUB_OFFLINE)

    res = run_tasks(model, tok, ["cloze_proxy", "nextsent_proxy"], limit=8, batch_size=8)

    assert set(res) == {"cloze_proxy", "nextsent_proxy"}
    assert set(res["cloze_proxy"]) == {"acc", "acc_stderr", "perplexity", "perplexity_stderr", "n"}
    assert set(res["nextsent_proxy"]) == {"acc", "acc_stderr", "acc_norm", "acc_norm_stderr", "n"}
    for task, metrics in res.items():
        assert metrics["n"] == 8
        for key in ("acc", "acc_norm"):
            if key in metrics:
                assert isinstance(metrics[key], float) and 0.0 <= metrics[key] <= 1.0
    assert res["cloze_proxy"]["perplexity"] > 1.0
    # lm-eval's metrics agree with scoring the same items through the model directly
    lm = QMambaLM(model, tok)
    docs = [json.loads(line) for line in (TASKS_DIR / "cloze_proxy.jsonl").read_text().splitlines()[:8]]
    pairs = [(d["text"].rsplit(" ", 1)[0], " " + d["text"].rsplit(" ", 1)[1]) for d in docs]
    scored = lm.loglikelihood([_req("loglikelihood", c, x) for c, x in pairs])
    # exp(-mean ll): relative error = error of the mean ll, at most TOL per term of the longest
    # (the continuation's tokens: the contexts have no trailing space, so HFLM's split is this one)
    terms = max(len(tok.encode(c + x)) - len(tok.encode(c)) for c, x in pairs)
    assert res["cloze_proxy"]["perplexity"] == pytest.approx(math.exp(-np.mean([ll for ll, _ in scored])),
                                                             rel=TOL * terms)
    assert res["cloze_proxy"]["acc"] == pytest.approx(np.mean([g for _, g in scored]))
    docs = [json.loads(line) for line in (TASKS_DIR / "nextsent_proxy.jsonl").read_text().splitlines()[:8]]
    acc = []
    for d in docs:
        lls = [ll for ll, _ in lm.loglikelihood([_req("loglikelihood", d["ctx"], " " + e) for e in d["endings"]])]
        acc.append(int(np.argmax(lls)) == d["label"])
    assert res["nextsent_proxy"]["acc"] == pytest.approx(np.mean(acc))
    # nothing written to the home cache, environment and library constants restored
    assert _tree(home) == before
    assert dict(os.environ) == env
    assert consts == (datasets.config.HF_DATASETS_CACHE, datasets.config.HF_MODULES_CACHE,
                      huggingface_hub.constants.HF_HUB_CACHE, huggingface_hub.constants.HF_HUB_OFFLINE)


def test_unknown_task_is_a_user_error(model, tok):
    with pytest.raises(QMambaError, match="available.*cloze_proxy"):
        run_tasks(model, tok, ["no_such_task"])


def test_real_task_offline_points_at_the_proxies(model, tok):
    with pytest.raises(QMambaError, match="cloze_proxy") as err:
        run_tasks(model, tok, ["lambada_openai"], limit=2)
    assert "nextsent_proxy" in str(err.value) and "lambada_openai" in str(err.value)


def test_task_yamls_get_absolute_data_paths(tmp_path):
    import yaml

    for path in write_task_yamls(tmp_path):
        cfg = yaml.safe_load(path.read_text())
        data = Path(cfg["dataset_kwargs"]["data_files"]["test"])
        assert data.is_absolute() and data.is_file() and cfg["task"] in PROXY_TASKS
