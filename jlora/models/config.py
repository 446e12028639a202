"""`ModelConfig`: one decoder architecture, read from a transformers config.

Every supported family (Llama 2/3, Mistral, Qwen2/2.5, Qwen3, Gemma 2, Gemma 3
text, Phi-3, and the Mixture-of-Experts Mixtral and Qwen3-MoE) is the same
pre-norm decoder; what differs between them is a field here (activation, norm
style, sandwich norms, soft-capping, windows, rope per layer type, fused
projections, experts), so one set of modules runs them all.

Only plain Python values live here, so a `ModelConfig` is hashable (a valid
static argument to `jax.jit`) and `import jlora.models` never imports
transformers or torch.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

SUPPORTED_MODEL_TYPES = (
  "llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "phi3",
  "mixtral", "qwen3_moe",
)
# Mixture-of-Experts families (a `SparseMoE` block in place of the MLP).
MOE_MODEL_TYPES = ("mixtral", "qwen3_moe")
SUPPORTED_ROPE_TYPES = ("default", "linear", "dynamic", "llama3", "longrope")
ACTIVATIONS = ("silu", "gelu", "gelu_tanh")
# transformers' activation names -> ours.
_HF_ACTIVATIONS = {
  "silu": "silu",
  "swish": "silu",
  "gelu": "gelu",
  "gelu_pytorch_tanh": "gelu_tanh",
  "gelu_tanh": "gelu_tanh",
  "gelu_new": "gelu_tanh",
}


@dataclasses.dataclass(frozen=True)
class RopeConfig:
  """Rotary position embedding parameters (transformers' `rope_parameters`).

  Attributes:
    theta: base wavelength (`rope_theta`).
    rope_type: "default", "linear", "dynamic" (NTK), "llama3" or "longrope"
      (Phi-3's su/LongRoPE).
    factor: scaling factor for "linear", "dynamic" and "llama3"; for
      "longrope" the context extension (max_position_embeddings /
      original_max_position_embeddings unless given) that sets the default
      `attention_factor`.
    low_freq_factor, high_freq_factor: "llama3" only.
    original_max_position_embeddings: "llama3" and "longrope": the
      pretraining context length.
    short_factor, long_factor: "longrope": per-frequency divisors
      (rotary_dim / 2 each), long ones once a call's positions exceed
      original_max_position_embeddings.
    attention_factor: "longrope": multiplier of cos and sin; default
      sqrt(1 + ln(factor) / ln(original_max_position_embeddings)).
    partial_rotary_factor: fraction of each head's dims that rope rotates
      (the leading ones); 1.0 rotates all.
  """

  theta: float = 10000.0
  rope_type: str = "default"
  factor: float = 1.0
  low_freq_factor: float = 1.0
  high_freq_factor: float = 4.0
  original_max_position_embeddings: int | None = None
  short_factor: tuple[float, ...] | None = None
  long_factor: tuple[float, ...] | None = None
  attention_factor: float | None = None
  partial_rotary_factor: float = 1.0

  def __post_init__(self):
    if self.rope_type not in SUPPORTED_ROPE_TYPES:
      raise ValueError(
        f"RopeConfig.rope_type = {self.rope_type!r}; supported: "
        f"{', '.join(SUPPORTED_ROPE_TYPES)}"
      )
    for name in ("short_factor", "long_factor"):
      value = getattr(self, name)
      if value is not None:
        object.__setattr__(self, name, tuple(float(x) for x in value))
    if self.rope_type == "longrope" and (
      self.short_factor is None
      or self.long_factor is None
      or self.original_max_position_embeddings is None
    ):
      raise ValueError(
        "rope_type 'longrope' needs short_factor, long_factor and "
        "original_max_position_embeddings"
      )


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """A pre-norm decoder: Llama 2/3, Mistral, Qwen2/2.5, Qwen3, Gemma 2, Gemma
  3 (text), Phi-3, each a setting of these fields (`ModelConfig.from_hf`).

  Attributes:
    model_type: transformers' `model_type`.
    vocab_size, hidden_size, intermediate_size: embedding rows, residual width,
      MLP width.
    num_layers, num_heads, num_kv_heads, head_dim: decoder depth and attention
      shape; grouped-query attention when `num_kv_heads < num_heads`.
    rms_norm_eps: epsilon of every RMSNorm.
    max_position_embeddings: context length the model was trained for (used by
      "dynamic" rope).
    rope: rotary embedding of full-attention layers (of all layers unless
      `local_rope` is set).
    local_rope: rotary embedding of sliding-window layers when it differs
      (Gemma 3: base 10k locally, 1M globally).
    tie_word_embeddings: logits use the input embedding (no `lm_head`
      parameter).
    qkv_bias, o_bias, mlp_bias: whether q/k/v, o and the MLP projections carry a
      bias.
    qk_norm: RMSNorm over each head of q and k before rope (Qwen3, Gemma 3).
    sliding_windows: per layer, the attention window (a query at slot t sees
      slots t - w < s <= t) or None for full causal attention.
    initializer_range: standard deviation of the random initialisation
      (`from_config`).
    hidden_act: the gated MLP's activation: "silu" (SwiGLU), "gelu" or
      "gelu_tanh" (GeGLU with tanh-approximate GELU, Gemma).
    norm_offset: RMSNorm scales by (norm_offset + w). 0.0: Llama's norm
      (normalise in float32, cast, times w); 1.0: Gemma's (times 1 + w in
      float32, then cast; w initialised to 0).
    sandwich_norms: Gemma 2/3 layers: the attention and MLP outputs are
      normalised too (`post_attention_layernorm`, `post_feedforward_layernorm`)
      and the MLP input norm is `pre_feedforward_layernorm`.
    embed_scale: input embeddings are multiplied by this (Gemma: sqrt(hidden),
      rounded to the parameter dtype as transformers does); None: 1.
    query_pre_attn_scalar: attention scores are scaled by this ** -0.5
      instead of head_dim ** -0.5 (Gemma).
    attn_softcap: attention scores become c * tanh(s / c) before masking
      (Gemma 2's attn_logit_softcapping); None: off.
    final_softcap: logits become c * tanh(z / c) (final_logit_softcapping).
    fused_qkv: one `qkv_proj` kernel (hidden, (heads + 2 kv_heads) head_dim)
      in place of q/k/v_proj (Phi-3).
    fused_gate_up: one `gate_up_proj` kernel (hidden, 2 intermediate), gate
      first, in place of gate/up_proj (Phi-3).
    num_experts: experts per layer; > 0 replaces every layer's MLP by a sparse
      Mixture-of-Experts block (`jlora.models._moe.SparseMoE`: Mixtral,
      Qwen3-MoE).
    num_experts_per_tok: experts each token is routed to (top-k).
    moe_intermediate_size: one expert's MLP width; default
      `intermediate_size` (Mixtral's convention).
    norm_topk_prob: the top-k routing weights are renormalised to sum to 1
      (Mixtral: always, the softmax over the top-k logits; Qwen3-MoE: its
      config's flag).
    router_aux_loss_coef: transformers' weight of the load-balancing loss
      (`jlora.models.load_balancing_loss`) in the training loss; informative,
      the model never adds it itself.

  Example:
    >>> cfg = ModelConfig(vocab_size=128, hidden_size=64,
    ...                   intermediate_size=128, num_layers=2, num_heads=4,
    ...                   num_kv_heads=2)
    >>> cfg.head_dim
    16
  """

  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int | None = None
  model_type: str = "llama"
  rms_norm_eps: float = 1e-6
  max_position_embeddings: int = 2048
  rope: RopeConfig = RopeConfig()
  tie_word_embeddings: bool = False
  qkv_bias: bool = False
  o_bias: bool = False
  mlp_bias: bool = False
  qk_norm: bool = False
  sliding_windows: tuple[int | None, ...] | None = None
  initializer_range: float = 0.02
  hidden_act: str = "silu"
  norm_offset: float = 0.0
  sandwich_norms: bool = False
  embed_scale: float | None = None
  query_pre_attn_scalar: float | None = None
  attn_softcap: float | None = None
  final_softcap: float | None = None
  local_rope: RopeConfig | None = None
  fused_qkv: bool = False
  fused_gate_up: bool = False
  num_experts: int = 0
  num_experts_per_tok: int = 0
  moe_intermediate_size: int | None = None
  norm_topk_prob: bool = True
  router_aux_loss_coef: float = 0.0

  def __post_init__(self):
    # Frozen dataclass: fill derived defaults through object.__setattr__.
    if self.head_dim is None:
      object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)
    if self.sliding_windows is None:
      object.__setattr__(self, "sliding_windows", (None,) * self.num_layers)
    object.__setattr__(self, "sliding_windows", tuple(self.sliding_windows))
    if len(self.sliding_windows) != self.num_layers:
      raise ValueError(
        f"sliding_windows has {len(self.sliding_windows)} entries but "
        f"num_layers = {self.num_layers}; give one window (or None) per layer"
      )
    if any(w is not None and w < 1 for w in self.sliding_windows):
      raise ValueError(
        f"sliding_windows = {self.sliding_windows}: a window must be >= 1 "
        "(or None for full attention)"
      )
    if self.num_heads % self.num_kv_heads:
      raise ValueError(
        f"num_heads = {self.num_heads} is not a multiple of num_kv_heads = "
        f"{self.num_kv_heads}; grouped-query attention needs whole groups"
      )
    if self.num_experts:
      _check_experts(self)
    if self.hidden_act not in ACTIVATIONS:
      raise ValueError(
        f"hidden_act = {self.hidden_act!r}; choose one of {ACTIVATIONS}"
      )
    if (
      self.local_rope is not None
      and self.local_rope.partial_rotary_factor
      != self.rope.partial_rotary_factor
    ):
      raise ValueError(
        "local_rope and rope rotate different fractions of each head "
        f"({self.local_rope.partial_rotary_factor} vs "
        f"{self.rope.partial_rotary_factor}); give both the same "
        "partial_rotary_factor"
      )
    for rope in (self.rope, self.local_rope):
      if rope is None or rope.rope_type != "longrope":
        continue
      half = int(self.head_dim * rope.partial_rotary_factor) // 2
      if len(rope.short_factor) != half or len(rope.long_factor) != half:
        raise ValueError(
          f"longrope short_factor/long_factor have {len(rope.short_factor)}/"
          f"{len(rope.long_factor)} entries; rotary_dim / 2 = {half} needed"
        )

  @property
  def attention_scale(self) -> float:
    """The factor of q . k in the attention scores."""
    if self.query_pre_attn_scalar is not None:
      return float(self.query_pre_attn_scalar) ** -0.5
    return self.head_dim**-0.5

  def layer_rope(self, layer: int) -> RopeConfig:
    """The rope of layer `layer` (`local_rope` on sliding-window layers)."""
    if self.local_rope is not None and self.sliding_windows[layer] is not None:
      return self.local_rope
    return self.rope

  @classmethod
  def from_hf(cls, hf_config: Any) -> ModelConfig:
    """A `ModelConfig` from a transformers config of a supported family.

    Reads rope settings from `rope_parameters` (transformers >= 5, nested per
    layer type for Gemma 3) or from `rope_theta` and `rope_scaling` (older
    versions).

    Raises:
      ValueError: `model_type` is not one of `SUPPORTED_MODEL_TYPES`.
      NotImplementedError: a field the implementation does not cover (rope type,
        activation, per-layer attention type, bidirectional attention), named
        in the message.

    Example:
      >>> from transformers import LlamaConfig
      >>> hf = LlamaConfig(hidden_size=64, num_attention_heads=4)
      >>> ModelConfig.from_hf(hf).head_dim
      16
    """
    model_type = getattr(hf_config, "model_type", None)
    if model_type == "gemma3":
      raise ValueError(
        "model_type 'gemma3' is the multimodal Gemma 3 "
        "(Gemma3ForConditionalGeneration); jlora.models supports its text "
        "model, model_type 'gemma3_text' (Gemma3ForCausalLM, e.g. "
        "google/gemma-3-1b-pt)"
      )
    if model_type not in SUPPORTED_MODEL_TYPES:
      raise ValueError(
        f"model_type {model_type!r} is not supported by jlora.models; "
        f"supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
      )
    num_heads = hf_config.num_attention_heads
    num_kv_heads = getattr(hf_config, "num_key_value_heads", None) or num_heads
    head_dim = (
      getattr(hf_config, "head_dim", None) or hf_config.hidden_size // num_heads
    )
    max_pos = getattr(hf_config, "max_position_embeddings", 2048)
    if model_type == "qwen2":
      # Qwen2 hard-codes q/k/v biases; its config has no attention_bias.
      qkv_bias, o_bias = True, False
    else:
      qkv_bias = o_bias = bool(getattr(hf_config, "attention_bias", False))
    windows = _windows_from_hf(hf_config, model_type)
    rope, local_rope = _ropes_from_hf(hf_config, max_pos)
    common = dict(
      vocab_size=hf_config.vocab_size,
      hidden_size=hf_config.hidden_size,
      intermediate_size=hf_config.intermediate_size,
      num_layers=hf_config.num_hidden_layers,
      num_heads=num_heads,
      num_kv_heads=num_kv_heads,
      head_dim=head_dim,
      model_type=model_type,
      rms_norm_eps=float(hf_config.rms_norm_eps),
      max_position_embeddings=max_pos,
      rope=rope,
      local_rope=local_rope,
      tie_word_embeddings=bool(
        getattr(hf_config, "tie_word_embeddings", False)
      ),
      qkv_bias=qkv_bias,
      o_bias=o_bias,
      mlp_bias=bool(getattr(hf_config, "mlp_bias", False)),
      qk_norm=model_type in ("qwen3", "gemma3_text", "qwen3_moe"),
      sliding_windows=windows,
      initializer_range=float(getattr(hf_config, "initializer_range", 0.02)),
      hidden_act=_activation_from_hf(hf_config),
    )
    if model_type in ("gemma2", "gemma3_text"):
      if getattr(hf_config, "use_bidirectional_attention", False):
        raise NotImplementedError(
          "config.use_bidirectional_attention = True is not implemented; "
          "jlora.models runs causal attention only"
        )
      common.update(
        norm_offset=1.0,
        sandwich_norms=True,
        embed_scale=math.sqrt(hf_config.hidden_size),
        query_pre_attn_scalar=float(hf_config.query_pre_attn_scalar),
        final_softcap=_softcap(hf_config, "final_logit_softcapping"),
        # transformers' Gemma 3 attention never applies
        # attn_logit_softcapping (Gemma 3 drops it for the q/k norms); a
        # config that sets it runs the same uncapped attention here.
        attn_softcap=(
          _softcap(hf_config, "attn_logit_softcapping")
          if model_type == "gemma2"
          else None
        ),
      )
    if model_type == "phi3":
      common.update(fused_qkv=True, fused_gate_up=True)
    if model_type in MOE_MODEL_TYPES:
      common.update(_experts_from_hf(hf_config, model_type))
    return cls(**common)


def _check_experts(config: ModelConfig) -> None:
  e, k = config.num_experts, config.num_experts_per_tok
  if not 1 <= k <= e:
    raise ValueError(
      f"num_experts_per_tok = {k} with num_experts = {e}; each token needs "
      "between 1 and num_experts experts"
    )
  if config.moe_intermediate_size is None:
    object.__setattr__(
      config, "moe_intermediate_size", config.intermediate_size
    )


def _experts_from_hf(hf_config: Any, model_type: str) -> dict:
  """The MoE fields of a Mixtral or Qwen3-MoE config (transformers 5)."""
  n = hf_config.num_hidden_layers
  if model_type == "qwen3_moe":
    dense = sorted(getattr(hf_config, "mlp_only_layers", None) or [])
    step = getattr(hf_config, "decoder_sparse_step", 1)
    if dense or step != 1:
      sparse = [i for i in range(n)
                if i not in dense and (i + 1) % step == 0]
      raise NotImplementedError(
        f"config.mlp_only_layers = {dense} / decoder_sparse_step = {step} "
        f"make only layers {sparse} of {n} sparse; jlora.models runs every "
        "layer as a Mixture-of-Experts block (mlp_only_layers = [], "
        "decoder_sparse_step = 1, as in Qwen3-30B-A3B and Qwen3-235B-A22B)"
      )
    experts = hf_config.num_experts
    width = hf_config.moe_intermediate_size
    norm = bool(hf_config.norm_topk_prob)
  else:
    jitter = float(getattr(hf_config, "router_jitter_noise", 0.0) or 0.0)
    if jitter:
      raise NotImplementedError(
        f"config.router_jitter_noise = {jitter} (multiplicative noise on the "
        "router input while training) is not implemented; set it to 0.0"
      )
    experts = hf_config.num_local_experts
    width = hf_config.intermediate_size
    norm = True  # softmax over the top-k logits
  return dict(
    num_experts=int(experts),
    num_experts_per_tok=int(hf_config.num_experts_per_tok),
    moe_intermediate_size=int(width),
    norm_topk_prob=norm,
    router_aux_loss_coef=float(getattr(hf_config, "router_aux_loss_coef", 0.0)),
  )


def _softcap(hf_config: Any, name: str) -> float | None:
  value = getattr(hf_config, name, None)
  return None if value is None else float(value)


def _activation_from_hf(hf_config: Any) -> str:
  # Gemma names it hidden_activation (hidden_act in older Gemma configs).
  name = getattr(hf_config, "hidden_activation", None)
  field = "hidden_activation"
  if name is None:
    name, field = getattr(hf_config, "hidden_act", "silu"), "hidden_act"
  if name not in _HF_ACTIVATIONS:
    raise NotImplementedError(
      f"config.{field} = {name!r} is not implemented; jlora.models supports "
      f"{', '.join(sorted(_HF_ACTIVATIONS))}"
    )
  return _HF_ACTIVATIONS[name]


def _ropes_from_hf(
  hf_config: Any, max_pos: int
) -> tuple[RopeConfig, RopeConfig | None]:
  """(rope of full-attention layers, rope of sliding layers or None)."""
  params = getattr(hf_config, "rope_parameters", None)
  if params is None:  # transformers < 5: rope_theta + optional rope_scaling
    params = dict(getattr(hf_config, "rope_scaling", None) or {})
    params.setdefault("rope_theta", getattr(hf_config, "rope_theta", 10000.0))
  nested = {k: v for k, v in params.items() if isinstance(v, dict)}
  if not nested:
    return _rope_from_params(params, hf_config, max_pos), None
  unknown = sorted(set(nested) - {"full_attention", "sliding_attention"})
  if unknown or "full_attention" not in nested:
    raise NotImplementedError(
      f"config.rope_parameters is nested by {sorted(nested)}; jlora.models "
      "supports 'full_attention' and 'sliding_attention'"
    )
  full = _rope_from_params(nested["full_attention"], hf_config, max_pos)
  local = nested.get("sliding_attention")
  local = None if local is None else _rope_from_params(local, hf_config, max_pos)
  return full, (None if local == full else local)


def _rope_from_params(params: dict, hf_config: Any, max_pos: int) -> RopeConfig:
  rope_type = params.get("rope_type", params.get("type", "default"))
  if rope_type in ("su", "yarn") and hf_config.model_type == "phi3":
    rope_type = "longrope"  # Phi-3's older names for the same scaling
  if rope_type not in SUPPORTED_ROPE_TYPES:
    raise NotImplementedError(
      f"config.rope_parameters['rope_type'] = {rope_type!r} (rope_scaling) "
      f"is not implemented; supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
    )
  partial = params.get(
    "partial_rotary_factor", getattr(hf_config, "partial_rotary_factor", None)
  )
  theta = params.get("rope_theta", getattr(hf_config, "rope_theta", 10000.0))
  original = params.get(
    "original_max_position_embeddings",
    getattr(hf_config, "original_max_position_embeddings", max_pos),
  )
  factor = params.get("factor")
  if rope_type == "longrope" and factor is None:
    factor = max_pos / original
  attention_factor = params.get("attention_factor")
  return RopeConfig(
    theta=float(theta),
    rope_type=rope_type,
    factor=float(1.0 if factor is None else factor),
    low_freq_factor=float(params.get("low_freq_factor", 1.0)),
    high_freq_factor=float(params.get("high_freq_factor", 4.0)),
    original_max_position_embeddings=original,
    short_factor=params.get("short_factor"),
    long_factor=params.get("long_factor"),
    attention_factor=(
      None if attention_factor is None else float(attention_factor)
    ),
    partial_rotary_factor=float(1.0 if partial is None else partial),
  )


def _windows_from_hf(hf_config: Any, model_type: str) -> tuple[int | None, ...]:
  n = hf_config.num_hidden_layers
  window = getattr(hf_config, "sliding_window", None)
  if model_type == "llama" or window is None:
    return (None,) * n
  if model_type == "qwen3_moe" and not getattr(
    hf_config, "use_sliding_window", False
  ):
    return (None,) * n
  if model_type in ("mistral", "phi3", "mixtral", "qwen3_moe"):
    return (int(window),) * n
  # Qwen2/Qwen3/Gemma: per-layer attention types; older transformers derive
  # Qwen's from use_sliding_window and max_window_layers.
  layer_types = getattr(hf_config, "layer_types", None)
  if layer_types is None:
    if not getattr(hf_config, "use_sliding_window", False):
      return (None,) * n
    first = getattr(hf_config, "max_window_layers", n)
    layer_types = [
      "sliding_attention" if i >= first else "full_attention" for i in range(n)
    ]
  unknown = sorted(set(layer_types) - {"full_attention", "sliding_attention"})
  if unknown:
    raise NotImplementedError(
      f"config.layer_types contains {unknown}; jlora.models supports "
      "'full_attention' and 'sliding_attention'"
    )
  return tuple(
    int(window) if t == "sliding_attention" else None for t in layer_types
  )
