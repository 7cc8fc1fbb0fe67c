"""Shared fixtures: a hub-free environment, and tiny random transformers checkpoints saved as
Hugging Face-format folders with the project's tokenizer.

The hub is switched off (HF_HUB_OFFLINE=1, HF_HOME in a temporary folder) when this file is
imported, before any test module imports huggingface_hub, whose constants are read at import.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

_HF_HOME = tempfile.mkdtemp(prefix="qmamba-tests-hf-")
os.environ["HF_HOME"] = _HF_HOME
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"
# eager quantized scan in tests (compiling costs seconds per layout); the compiled path has its
# own test against eager (tests/quant/test_state.py)
os.environ.setdefault("QMAMBA_COMPILE", "0")

import pytest  # noqa: E402
import torch  # noqa: E402

from qmamba.kernels import cpu_features, cpu_native  # noqa: E402
from qmamba.utils import paths  # noqa: E402

torch.set_num_threads(1)

TOKENIZER_DIR = paths.TOKENIZER_DIR
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
TOKENIZER_VOCAB = 8192


@pytest.fixture(autouse=True, scope="session")
def offline_hub():
    """No test reaches the network or the user's hub cache, even if huggingface_hub was
    imported before this file set the environment."""
    from huggingface_hub import constants

    mp = pytest.MonkeyPatch()
    mp.setattr(constants, "HF_HUB_OFFLINE", True)
    mp.setattr(constants, "HF_HOME", _HF_HOME)
    mp.setattr(constants, "HF_HUB_CACHE", os.path.join(_HF_HOME, "hub"))
    import transformers

    transformers.logging.set_verbosity_error()       # the "fast path is not available" notices
    yield
    mp.undo()
    shutil.rmtree(_HF_HOME, ignore_errors=True)


# ----------------------------------------------------------------------------- tiny models
def perturb(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Move a freshly initialised transformers Mamba away from its init (weights x3, jittered
    A_log, D, dt bias and norms) so that activations and logits are far from zero."""
    g = torch.Generator().manual_seed(seed)

    def noise(p):
        return torch.randn(p.shape, generator=g)

    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("A_log"):
                p.add_(0.3 * noise(p))
            elif name.endswith(".D"):
                p.add_(0.5 * noise(p))
            elif name.endswith(("dt_bias", "dt_proj.bias")):
                p.add_(0.5 * noise(p))
            elif "norm" in name:
                p.mul_(1 + 0.2 * noise(p))
            else:
                p.mul_(3.0)
    return model.eval()


def build_hf(kind: str, seed: int = 0, **overrides):
    """A perturbed random transformers model: kind mamba | falcon_mamba | mamba2."""
    import transformers

    torch.manual_seed(seed)
    if kind == "mamba2":
        cfg = dict(vocab_size=101, hidden_size=32, num_heads=4, head_dim=16, n_groups=1, state_size=16,
                   num_hidden_layers=2, expand=2, chunk_size=16, tie_word_embeddings=False)
        model = transformers.Mamba2ForCausalLM(transformers.Mamba2Config(**{**cfg, **overrides}))
    elif kind in ("mamba", "falcon_mamba"):
        # tied as in 4.x (5.x's MambaConfig has no default tie flag and would leave the head separate)
        cfg = dict(vocab_size=101, hidden_size=32, state_size=8, num_hidden_layers=2, expand=2,
                   tie_word_embeddings=True)
        if kind == "mamba":
            model = transformers.MambaForCausalLM(transformers.MambaConfig(**{**cfg, **overrides}))
        else:
            model = transformers.FalconMambaForCausalLM(transformers.FalconMambaConfig(**{**cfg, **overrides}))
    else:
        raise ValueError(kind)
    return perturb(model, seed)


def add_tokenizer(folder: Path) -> Path:
    for name in TOKENIZER_FILES:
        shutil.copyfile(TOKENIZER_DIR / name, Path(folder) / name)
    return Path(folder)


def save_hf(model, folder: Path, tokenizer: bool = True, **save_kwargs) -> Path:
    """save_pretrained (safetensors unless save_kwargs say otherwise) plus the project tokenizer."""
    model.save_pretrained(folder, **save_kwargs)
    return add_tokenizer(folder) if tokenizer else Path(folder)


@pytest.fixture(scope="session")
def hf_factory():
    """build_hf, for tests that need their own model."""
    return build_hf


@pytest.fixture(scope="session")
def save_hf_folder():
    """save_hf(model, folder, tokenizer=True, **save_kwargs) -> folder."""
    return save_hf


def save_bin(model, folder: Path) -> Path:
    """save_pretrained with the weights as pytorch_model.bin, whichever transformers is installed
    (5.x always writes safetensors)."""
    model.save_pretrained(folder)
    for f in Path(folder).glob("model*.safetensors*"):
        f.unlink()
    torch.save(model.state_dict(), Path(folder) / "pytorch_model.bin")
    return Path(folder)


@pytest.fixture(scope="session")
def save_bin_folder():
    """save_bin(model, folder) -> folder."""
    return save_bin


def capture_scan(mixer, run) -> list:
    """The native scan inputs (x, dt, B, C) of every `mixer.scan` call made while `run()` runs
    (under no_grad); the mixer's own scan still computes the result."""
    captured, real = [], mixer.scan

    def record(x, dt, B, C, state):
        captured.append((x, dt, B, C))
        return real(x, dt, B, C, state)

    mixer.scan = record
    try:
        with torch.no_grad():
            run()
    finally:
        del mixer.scan
    return captured


@pytest.fixture(scope="session")
def scan_inputs():
    """capture_scan(mixer, run) -> [(x, dt, B, C), ...]."""
    return capture_scan


@pytest.fixture(scope="session")
def tokenizer_dir() -> Path:
    return TOKENIZER_DIR


@pytest.fixture(scope="session")
def tokenizer_vocab() -> int:
    return TOKENIZER_VOCAB


@pytest.fixture(scope="session")
def tiny_mamba2(tmp_path_factory):
    """(transformers model, folder): Mamba2 with the project tokenizer (vocab 8192), untied."""
    model = build_hf("mamba2", seed=1, vocab_size=TOKENIZER_VOCAB, hidden_size=32, num_hidden_layers=1)
    return model, save_hf(model, tmp_path_factory.mktemp("tiny_mamba2"))


@pytest.fixture(scope="session")
def tiny_mamba1(tmp_path_factory):
    """(transformers model, folder): Mamba1 with the project tokenizer (vocab 8192), tied."""
    model = build_hf("mamba", seed=2, vocab_size=TOKENIZER_VOCAB, hidden_size=32, num_hidden_layers=1)
    return model, save_hf(model, tmp_path_factory.mktemp("tiny_mamba1"))


@pytest.fixture
def tiny_copy(tiny_mamba2, tmp_path):
    """A private copy of the tiny Mamba2 folder that a test may damage."""
    return Path(shutil.copytree(tiny_mamba2[1], tmp_path / "model"))


# ----------------------------------------------------------------------------- parity report
_PARITY: list[dict] = []


@pytest.fixture(scope="session")
def parity_log() -> list[dict]:
    """Records {config, source, path, max_abs, max_rel, scale}, printed at the end of the run."""
    return _PARITY


def pytest_terminal_summary(terminalreporter):
    if not _PARITY:
        return
    tr = terminalreporter
    tr.section("logit parity: float32 logits against the float64 mamba_ssm oracle (tests/oracle)")
    tr.write_line(f"{'config':<16}{'source':<14}{'path':<17}{'max |diff|':>12}{'max rel':>12}{'max |logit|':>13}")
    for r in _PARITY:
        tr.write_line(f"{r['config']:<16}{r['source']:<14}{r['path']:<17}{r['max_abs']:>12.3e}"
                      f"{r['max_rel']:>12.3e}{r['scale']:>13.2f}")


@pytest.fixture(params=cpu_features.ISAS)
def native_build(request):
    """The C kernels of one build (skips where this CPU lacks it or it does not build)."""
    native = cpu_native.native(request.param)
    if native is None:
        pytest.skip(f"no {request.param} C kernel here: {cpu_native.error(request.param)}")
    return native
