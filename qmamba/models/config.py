"""One architecture description for Mamba, Mamba2 and Falcon-Mamba, read from the config files
that transformers (4.x and 5.x) and mamba_ssm write, and written back in transformers' form."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Optional

from ..errors import QMambaError
from .hf_compat import json_float as _float

ARCHS = ("mamba1", "mamba2")


@dataclass
class ModelConfig:
    arch: str                          # "mamba1" | "mamba2"
    vocab_size: int
    d_model: int
    n_layer: int
    d_state: int = 16
    d_conv: int = 4
    expand: int = 2
    d_inner: int = 0                   # derived: expand * d_model unless given
    # Mamba1
    dt_rank: int = 0                   # derived: ceil(d_model / 16) unless given
    mixer_rms_eps: Optional[float] = None   # Falcon-Mamba: weight-less RMS norm of B, C and dt
    # Mamba2
    headdim: int = 64
    ngroups: int = 1
    chunk_size: int = 256
    dt_limit: tuple = (0.0, float("inf"))
    norm_group_size: int = 0           # gated RMSNorm group (channels); 0 = d_inner / ngroups (mamba_ssm)
    gated_norm_eps: Optional[float] = None  # gated RMSNorm eps; None = norm_eps (transformers);
                                            # mamba_ssm's Mamba2 always uses 1e-5
    # both
    conv_bias: bool = True
    bias: bool = False
    norm_eps: float = 1e-5
    residual_in_fp32: bool = True
    tie_embeddings: bool = True
    model_type: str = ""               # the source's model_type, written back on save
    extra: dict = field(default_factory=dict)   # keys of the source config we carry along
    layer_types: list = field(default_factory=list)  # one layer type per block (qmamba.models.
                                                     # layer_types); derived: every block `arch`

    def __post_init__(self):
        if self.arch not in ARCHS:
            raise QMambaError(f"unknown architecture {self.arch!r}; expected one of {', '.join(ARCHS)}")
        if not self.d_inner:
            self.d_inner = int(self.expand * self.d_model)
        if self.arch == "mamba1" and not self.dt_rank:
            self.dt_rank = math.ceil(self.d_model / 16)
        if self.arch == "mamba2":
            if self.d_inner % self.headdim:
                raise QMambaError(f"d_inner {self.d_inner} is not a multiple of head_dim {self.headdim}")
            if self.nheads % self.ngroups:
                raise QMambaError(f"num_heads {self.nheads} is not a multiple of n_groups {self.ngroups}")
            if not self.norm_group_size:
                self.norm_group_size = self.default_norm_group_size
            if self.norm_group_size <= 0 or self.d_inner % self.norm_group_size:
                raise QMambaError(f"gated norm group size {self.norm_group_size} does not divide "
                                  f"d_inner {self.d_inner}")
            if self.gated_norm_eps is None:
                self.gated_norm_eps = self.norm_eps
        self.dt_limit = tuple(float(v) for v in self.dt_limit)
        if not self.layer_types:
            self.layer_types = [self.arch] * int(self.n_layer)
        self.layer_types = [str(t) for t in self.layer_types]
        if len(self.layer_types) != int(self.n_layer):
            raise QMambaError(f"{len(self.layer_types)} layer types for {self.n_layer} layers")
        if not self.model_type:
            self.model_type = "mamba" if self.arch == "mamba1" else "mamba2"
        for name in ("vocab_size", "d_model", "n_layer", "d_state", "d_conv", "d_inner"):
            if int(getattr(self, name)) <= 0:
                raise QMambaError(f"config value {name} must be positive, got {getattr(self, name)}")

    @property
    def nheads(self) -> int:
        return self.d_inner // self.headdim

    @property
    def default_norm_group_size(self) -> int:
        """mamba_ssm's Mamba2 (and transformers >= 5.23) normalises each of the n_groups groups
        of d_inner / n_groups channels on its own (RMSNormGated(group_size=d_ssm // ngroups))."""
        return self.d_inner // self.ngroups

    @property
    def conv_dim(self) -> int:
        """Channels of the depthwise conv: x for Mamba1; x, B and C for Mamba2."""
        if self.arch == "mamba1":
            return self.d_inner
        return self.d_inner + 2 * self.ngroups * self.d_state

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["dt_limit"] = [_json_float(v) for v in self.dt_limit]
        return d

    # ---------------------------------------------------------------- transformers format
    def to_hf(self) -> dict:
        """config.json as transformers writes it for MambaForCausalLM / Mamba2ForCausalLM."""
        common = dict(
            vocab_size=self.vocab_size, hidden_size=self.d_model, num_hidden_layers=self.n_layer,
            state_size=self.d_state, conv_kernel=self.d_conv, expand=self.expand,
            use_conv_bias=self.conv_bias, use_bias=self.bias, layer_norm_epsilon=self.norm_eps,
            residual_in_fp32=self.residual_in_fp32, tie_word_embeddings=self.tie_embeddings,
        )
        if self.arch == "mamba1":
            falcon = self.mixer_rms_eps is not None
            common.update(
                model_type="falcon_mamba" if falcon else "mamba",
                architectures=["FalconMambaForCausalLM" if falcon else "MambaForCausalLM"],
                intermediate_size=self.d_inner, time_step_rank=self.dt_rank,
            )
            if falcon:
                common["mixer_rms_eps"] = self.mixer_rms_eps
        else:
            common.update(
                model_type="mamba2", architectures=["Mamba2ForCausalLM"], num_heads=self.nheads,
                head_dim=self.headdim, n_groups=self.ngroups, chunk_size=self.chunk_size,
                time_step_limit=list(self.dt_limit), rms_norm=True,  # bare Infinity, as 4.x writes
            )
            if self.norm_group_size != self.default_norm_group_size:     # an explicit override only
                common["qmamba_norm_group_size"] = self.norm_group_size
            if self.gated_norm_eps != self.norm_eps:                          # mamba_ssm sources only
                common["qmamba_gated_norm_eps"] = self.gated_norm_eps
        return {**self.extra, **common}


def _json_float(v: float):
    return v if math.isfinite(v) else ("Infinity" if v > 0 else "-Infinity")


_CARRY = ("bos_token_id", "eos_token_id", "pad_token_id")


def from_hf_dict(cfg: dict) -> ModelConfig:
    """ModelConfig from a transformers config.json (model_type mamba, mamba2, falcon_mamba)."""
    mt = cfg.get("model_type")
    try:
        extra = {k: cfg[k] for k in _CARRY if k in cfg}
        common = dict(
            vocab_size=int(cfg["vocab_size"]), d_model=int(cfg["hidden_size"]),
            n_layer=int(cfg["num_hidden_layers"]), d_state=int(cfg.get("state_size", 16)),
            d_conv=int(cfg.get("conv_kernel", 4)), expand=cfg.get("expand", 2),
            conv_bias=bool(cfg.get("use_conv_bias", True)), bias=bool(cfg.get("use_bias", False)),
            norm_eps=_float(cfg.get("layer_norm_epsilon", 1e-5)),
            residual_in_fp32=bool(cfg.get("residual_in_fp32", True)),
            tie_embeddings=bool(cfg.get("tie_word_embeddings", True)), model_type=mt, extra=extra,
        )
        if mt in ("mamba", "falcon_mamba"):
            return ModelConfig(
                arch="mamba1", d_inner=int(cfg.get("intermediate_size", 0)),
                dt_rank=int(cfg["time_step_rank"]) if cfg.get("time_step_rank", "auto") != "auto" else 0,
                mixer_rms_eps=_float(cfg.get("mixer_rms_eps", 1e-6)) if mt == "falcon_mamba" else None,
                **common,
            )
        if mt == "mamba2":
            if not cfg.get("rms_norm", True):
                raise QMambaError("mamba2 config with rms_norm=false is not supported")
            heads, headdim = int(cfg["num_heads"]), int(cfg.get("head_dim", 64))
            d_inner = int(common["expand"] * common["d_model"])
            if heads * headdim != d_inner:
                raise QMambaError(
                    f"mamba2 config: num_heads*head_dim = {heads * headdim} but expand*hidden_size = {d_inner}")
            limit = cfg.get("time_step_limit", (0.0, float("inf")))
            return ModelConfig(
                arch="mamba2", headdim=headdim, ngroups=int(cfg.get("n_groups", 1)),
                chunk_size=int(cfg.get("chunk_size", 256)), dt_limit=tuple(_float(v) for v in limit),
                # per group, as mamba_ssm (and transformers >= 5.23; older ones normalised over all
                # of d_inner: a wrong function for n_groups > 1, see hf_compat) unless overridden
                norm_group_size=int(cfg.get("qmamba_norm_group_size", 0)),
                gated_norm_eps=_float(cfg["qmamba_gated_norm_eps"]) if "qmamba_gated_norm_eps" in cfg else None,
                **common,
            )
    except (KeyError, TypeError, ValueError) as e:
        raise QMambaError(f"config.json ({mt}) is missing or has a bad value: {e}") from None
    raise QMambaError(
        f"unknown model_type {mt!r} in config.json; supported: mamba, mamba2, falcon_mamba "
        "(or a mamba_ssm config with d_model/n_layer/ssm_cfg)")


def from_mamba_ssm_dict(cfg: dict) -> ModelConfig:
    """ModelConfig from a state-spaces/mamba_ssm config.json (MambaConfig of mixer_seq_simple)."""
    try:
        ssm = dict(cfg.get("ssm_cfg") or {})
        layer = ssm.pop("layer", "Mamba1")
        if cfg.get("d_intermediate", 0):
            raise QMambaError("mamba_ssm configs with an MLP (d_intermediate > 0) are not supported")
        if cfg.get("attn_layer_idx"):
            raise QMambaError("hybrid mamba_ssm configs with attention layers are not supported")
        vocab = int(cfg["vocab_size"])
        mult = int(cfg.get("pad_vocab_size_multiple", 8))
        if vocab % mult:
            vocab += mult - vocab % mult
        common = dict(
            vocab_size=vocab, d_model=int(cfg["d_model"]), n_layer=int(cfg["n_layer"]),
            d_conv=int(ssm.get("d_conv", 4)), expand=ssm.get("expand", 2),
            conv_bias=bool(ssm.get("conv_bias", True)), bias=bool(ssm.get("bias", False)),
            norm_eps=float(cfg.get("norm_epsilon", 1e-5)),
            residual_in_fp32=bool(cfg.get("residual_in_fp32", True)),
            tie_embeddings=bool(cfg.get("tie_embeddings", True)),
        )
        if not cfg.get("rms_norm", True):
            raise QMambaError("mamba_ssm configs with LayerNorm (rms_norm=false) are not supported")
        if layer == "Mamba1":
            dt_rank = ssm.get("dt_rank", "auto")
            return ModelConfig(arch="mamba1", d_state=int(ssm.get("d_state", 16)),
                               dt_rank=0 if dt_rank == "auto" else int(dt_rank), **common)
        if layer == "Mamba2":
            if ssm.get("d_ssm") not in (None, 0) or ssm.get("D_has_hdim", False):
                raise QMambaError("Mamba2 options d_ssm and D_has_hdim are not supported")
            if not ssm.get("rmsnorm", True) or ssm.get("norm_before_gate", False):
                raise QMambaError("Mamba2 without its gated RMSNorm (norm after gate) is not supported")
            ngroups = int(ssm.get("ngroups", 1))
            d_inner = int(common["expand"] * common["d_model"])
            return ModelConfig(
                arch="mamba2", d_state=int(ssm.get("d_state", 128)), headdim=int(ssm.get("headdim", 64)),
                ngroups=ngroups, chunk_size=int(ssm.get("chunk_size", 256)),
                dt_limit=tuple(float(v) for v in ssm.get("dt_limit", (0.0, float("inf")))),
                # mamba_ssm normalises each group on its own (RMSNormGated group_size = d_ssm / ngroups)
                norm_group_size=d_inner // ngroups,
                gated_norm_eps=1e-5,            # Mamba2 builds RMSNormGated(eps=1e-5), whatever norm_epsilon
                **common,
            )
        raise QMambaError(f"unknown mamba_ssm layer {layer!r}; supported: Mamba1, Mamba2")
    except (KeyError, TypeError, ValueError) as e:
        raise QMambaError(f"mamba_ssm config.json is missing or has a bad value: {e}") from None
