"""One architecture description for Mamba, Mamba2 and Falcon-Mamba, read from the config files
that transformers (4.x and 5.x) and mamba_ssm write, and written back in transformers' form; and
for the hybrids Nemotron-H (`nemotron_h`) and Granite-4.0-H (`granitemoehybrid`), whose Mamba2
layers use the Mamba2 fields and whose other layer types read `ModelConfig.hybrid`."""

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
    hybrid: dict = field(default_factory=dict)  # hybrids: the sizes of the attention / mlp / moe
                                                # layer types and the multipliers (HYBRID_KEYS)

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
        self.hybrid = {**HYBRID_DEFAULTS, **self.hybrid} if self.hybrid or any(
            t not in ARCHS for t in self.layer_types) else {}
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
        """config.json as transformers writes it for MambaForCausalLM / Mamba2ForCausalLM; a
        hybrid's source config.json as it was read (kept in `extra`)."""
        if self.model_type in HYBRID_MODEL_TYPES:
            return dict(self.extra)
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
    """ModelConfig from a transformers config.json (model_type mamba, mamba2, falcon_mamba,
    nemotron_h, granitemoehybrid)."""
    mt = cfg.get("model_type")
    if mt in HYBRID_MODEL_TYPES:
        return _from_hybrid(cfg)
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
        f"unknown model_type {mt!r} in config.json; supported: mamba, mamba2, falcon_mamba, "
        f"{', '.join(HYBRID_MODEL_TYPES)} "
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


# ------------------------------------------------------------------------------------ hybrids
HYBRID_MODEL_TYPES = ("nemotron_h", "granitemoehybrid")
# ModelConfig.hybrid: what the attention, mlp and moe layer types and the LM read
HYBRID_DEFAULTS = dict(
    n_heads=0, n_kv_heads=0, head_dim=0, attn_scale=0.0, attn_bias=False,
    rope_theta=None,                     # None: no position embedding (NoPE)
    mlp_inner=0, mlp_act="relu2", mlp_gated=False, mlp_bias=False,   # gated: act(gate) * up
    n_experts=0, top_k=0, expert_inner=0, expert_gated=False, shared_inner=0,
    router="softmax",                    # "softmax" (top-k logits, softmax) | "sigmoid" (DeepSeek-V3)
    n_group=1, topk_group=1, norm_topk_prob=True, routed_scaling=1.0,
    embedding_multiplier=1.0, residual_multiplier=1.0, logits_scaling=1.0,
)
# Nemotron-H's hybrid_override_pattern characters and layer names (old and new transformers)
_NEMOTRON_PATTERN = {"M": "mamba2", "*": "attention", "-": "mlp", "E": "moe"}
_SOURCE_TYPES = {"mamba": "mamba2", "linear_attention": "mamba2", "attention": "attention",
                 "full_attention": "attention", "mlp": "mlp", "moe": "moe"}


def _source_types(mt: str, names, allowed: tuple) -> list:
    if not isinstance(names, (list, tuple)) or not names:
        raise QMambaError(f"{mt} config.json: the layer types must be a non-empty list, got {names!r}")
    out = []
    for i, name in enumerate(names):
        t = _SOURCE_TYPES.get(name)
        if t not in allowed:
            raise QMambaError(f"{mt} config.json: unknown layer type {name!r} at layer {i}; "
                              f"known: {', '.join(k for k, v in _SOURCE_TYPES.items() if v in allowed)}")
        out.append(t)
    return out


def _nemotron_types(cfg: dict) -> list:
    n = cfg.get("num_hidden_layers")
    names = cfg.get("layers_block_type") or cfg.get("layer_types")
    if names is None:
        pattern = cfg.get("hybrid_override_pattern")
        if not isinstance(pattern, str) or not pattern:
            raise QMambaError("nemotron_h config.json has neither layers_block_type nor hybrid_override_pattern")
        bad = sorted(set(pattern) - set(_NEMOTRON_PATTERN))
        if bad:
            raise QMambaError(f"nemotron_h config.json: hybrid_override_pattern {pattern!r} has unknown "
                              f"layer character(s) {''.join(bad)!r}; known: M (mamba), * (attention), - (mlp), E (moe)")
        if n is not None and len(pattern) != int(n):
            raise QMambaError(f"nemotron_h config.json: hybrid_override_pattern has {len(pattern)} layers "
                              f"but num_hidden_layers is {n}")
        return [_NEMOTRON_PATTERN[c] for c in pattern]
    types = _source_types("nemotron_h", names, ("mamba2", "attention", "mlp", "moe"))
    if "layers_block_type" not in cfg and n is not None and len(types) != int(n):
        raise QMambaError(f"nemotron_h config.json: {len(types)} layer types but num_hidden_layers is {n}")
    return types


def _rope_theta(cfg: dict) -> float:
    rp = cfg.get("rope_parameters") or {}
    scaling = cfg.get("rope_scaling") or {}
    kind = rp.get("rope_type", scaling.get("rope_type", scaling.get("type", "default")))
    if kind != "default":
        raise QMambaError(f"granitemoehybrid config.json: RoPE type {kind!r} is not supported (only default)")
    return float(rp.get("rope_theta", cfg.get("rope_theta", 10000.0)))


def _from_hybrid(cfg: dict) -> ModelConfig:
    mt = cfg["model_type"]
    extra = {k: v for k, v in cfg.items() if k != "quantization_config"}
    try:
        d_model = int(cfg["hidden_size"])
        if mt == "nemotron_h":
            types = _nemotron_types(cfg)
            if cfg.get("moe_latent_size") is not None:
                raise QMambaError("nemotron_h configs with a MoE latent projection (moe_latent_size) are not supported")
            if cfg.get("mlp_hidden_act", "relu2") != "relu2" or cfg.get("mamba_hidden_act", "silu") != "silu":
                raise QMambaError("nemotron_h: only mlp_hidden_act relu2 and mamba_hidden_act silu are supported")
            heads, headdim = int(cfg.get("mamba_num_heads", 128)), int(cfg.get("mamba_head_dim", 64))
            n_heads = int(cfg.get("num_attention_heads", 32))
            head_dim = int(cfg.get("head_dim") or cfg.get("attention_head_dim") or d_model // n_heads)
            limit = cfg.get("time_step_limit", cfg.get("mamba_dt_limit", (0.0, float("inf"))))
            hybrid = dict(
                n_heads=n_heads, n_kv_heads=int(cfg.get("num_key_value_heads") or n_heads), head_dim=head_dim,
                attn_scale=head_dim ** -0.5, attn_bias=bool(cfg.get("attention_bias", False)), rope_theta=None,
                mlp_inner=int(cfg.get("intermediate_size", 0)), mlp_act="relu2", mlp_gated=False,
                mlp_bias=bool(cfg.get("mlp_bias", False)),
                n_experts=int(cfg.get("n_routed_experts", 0)), top_k=int(cfg.get("num_experts_per_tok", 0)),
                expert_inner=int(cfg.get("moe_intermediate_size", 0)), expert_gated=False,
                shared_inner=int(cfg.get("moe_shared_expert_intermediate_size", 0)), router="sigmoid",
                n_group=int(cfg.get("n_group", 1)), topk_group=int(cfg.get("topk_group", 1)),
                norm_topk_prob=bool(cfg.get("norm_topk_prob", True)),
                routed_scaling=float(cfg.get("routed_scaling_factor", 1.0)),
            )
            eps = _float(cfg.get("layer_norm_epsilon", 1e-5))
            return ModelConfig(
                arch="mamba2", vocab_size=int(cfg["vocab_size"]), d_model=d_model, n_layer=len(types),
                d_state=int(cfg.get("ssm_state_size", 128)), d_conv=int(cfg.get("conv_kernel", cfg.get("mamba_d_conv", 4))),
                d_inner=heads * headdim, headdim=headdim, ngroups=int(cfg.get("n_groups", cfg.get("mamba_n_groups", 8))),
                chunk_size=int(cfg.get("chunk_size", cfg.get("mamba_chunk_size", 128))),
                dt_limit=tuple(_float(v) for v in limit),
                conv_bias=bool(cfg.get("use_conv_bias", cfg.get("mamba_conv_bias", True))),
                bias=bool(cfg.get("use_bias", False)), norm_eps=eps,
                residual_in_fp32=bool(cfg.get("residual_in_fp32", False)),
                tie_embeddings=bool(cfg.get("tie_word_embeddings", False)), model_type=mt, extra=extra,
                layer_types=types, hybrid=hybrid)
        # granitemoehybrid: every layer is a mixer block and a feed-forward block (qmamba: two blocks)
        n = int(cfg["num_hidden_layers"])
        names = cfg.get("layer_types") or cfg.get("layers_block_type") or ["mamba"] * n
        mixers = _source_types(mt, names, ("mamba2", "attention"))
        if len(mixers) != n:
            raise QMambaError(f"granitemoehybrid config.json: {len(mixers)} layer types but num_hidden_layers is {n}")
        if cfg.get("hidden_act", "silu") != "silu":
            raise QMambaError("granitemoehybrid: only hidden_act silu is supported")
        pe = cfg.get("position_embedding_type")
        if pe not in (None, "rope", "nope"):
            raise QMambaError(f"granitemoehybrid: position_embedding_type {pe!r} is not supported (rope or none)")
        experts = int(cfg.get("num_local_experts") or 0)
        n_heads = int(cfg.get("num_attention_heads", 32))
        ffn = "moe" if experts > 0 else "mlp"
        d_inner = int(cfg.get("mamba_expand", 2) * d_model)
        mheads = int(cfg.get("mamba_n_heads", 128))
        headdim = cfg.get("mamba_d_head", "auto")
        headdim = d_inner // mheads if headdim in (None, "auto") else int(headdim)
        if headdim * mheads != d_inner:
            raise QMambaError(f"granitemoehybrid config.json: mamba_n_heads*mamba_d_head = {headdim * mheads} "
                              f"but mamba_expand*hidden_size = {d_inner}")
        shared = int(cfg.get("shared_intermediate_size", 1024))
        limit = cfg.get("time_step_limit") or (0.0, float("inf"))
        hybrid = dict(
            n_heads=n_heads, n_kv_heads=int(cfg.get("num_key_value_heads") or n_heads),
            head_dim=d_model // n_heads, attn_scale=float(cfg.get("attention_multiplier", 1.0)),
            attn_bias=bool(cfg.get("attention_bias", False)),
            rope_theta=_rope_theta(cfg) if pe == "rope" else None,
            mlp_inner=shared, mlp_act="silu", mlp_gated=True, mlp_bias=False,
            n_experts=experts, top_k=int(cfg.get("num_experts_per_tok") or 0),
            expert_inner=int(cfg.get("intermediate_size", 0)), expert_gated=True, shared_inner=shared,
            router="softmax",
            embedding_multiplier=float(cfg.get("embedding_multiplier", 1.0)),
            residual_multiplier=float(cfg.get("residual_multiplier", 1.0)),
            logits_scaling=float(cfg.get("logits_scaling", 1.0)),
        )
        eps = _float(cfg.get("rms_norm_eps", 1e-6))
        return ModelConfig(
            arch="mamba2", vocab_size=int(cfg["vocab_size"]), d_model=d_model, n_layer=2 * n,
            d_state=int(cfg.get("mamba_d_state", 256)), d_conv=int(cfg.get("mamba_d_conv", 4)),
            d_inner=d_inner, headdim=headdim, ngroups=int(cfg.get("mamba_n_groups", 1)),
            chunk_size=int(cfg.get("mamba_chunk_size", 256)), dt_limit=tuple(_float(v) for v in limit),
            conv_bias=bool(cfg.get("mamba_conv_bias", True)), bias=bool(cfg.get("mamba_proj_bias", False)),
            norm_eps=eps, residual_in_fp32=False, tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            model_type=mt, extra=extra, layer_types=[t for m in mixers for t in (m, ffn)], hybrid=hybrid)
    except (KeyError, TypeError, ValueError) as e:
        raise QMambaError(f"config.json ({mt}) is missing or has a bad value: {e}") from None
