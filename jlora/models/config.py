"""`ModelConfig`: a Llama-family architecture, read from a transformers config.

Only plain Python values live here, so a `ModelConfig` is hashable (a valid
static argument to `jax.jit`) and `import jlora.models` never imports
transformers or torch.
"""

from __future__ import annotations

import dataclasses
from typing import Any

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
SUPPORTED_ROPE_TYPES = ("default", "linear", "dynamic", "llama3")
_SILU_NAMES = ("silu", "swish")


@dataclasses.dataclass(frozen=True)
class RopeConfig:
  """Rotary position embedding parameters (transformers' `rope_parameters`).

  Attributes:
    theta: base wavelength (`rope_theta`).
    rope_type: "default", "linear", "dynamic" (NTK) or "llama3".
    factor: scaling factor for "linear", "dynamic" and "llama3".
    low_freq_factor, high_freq_factor, original_max_position_embeddings:
      "llama3" only.
  """

  theta: float = 10000.0
  rope_type: str = "default"
  factor: float = 1.0
  low_freq_factor: float = 1.0
  high_freq_factor: float = 4.0
  original_max_position_embeddings: int | None = None


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """A Llama-family decoder (Llama 2/3, Mistral, Qwen2/2.5, Qwen3).

  Attributes:
    model_type: transformers' `model_type` ("llama", "mistral", "qwen2",
      "qwen3").
    vocab_size, hidden_size, intermediate_size: embedding rows, residual width,
      MLP width.
    num_layers, num_heads, num_kv_heads, head_dim: decoder depth and attention
      shape; grouped-query attention when `num_kv_heads < num_heads`.
    rms_norm_eps: epsilon of every RMSNorm.
    max_position_embeddings: context length the model was trained for (used by
      "dynamic" rope).
    rope: rotary embedding parameters.
    tie_word_embeddings: logits use the input embedding (no `lm_head`
      parameter).
    qkv_bias, o_bias, mlp_bias: whether q/k/v, o and the MLP projections carry a
      bias.
    qk_norm: RMSNorm over each head of q and k before rope (Qwen3).
    sliding_windows: per layer, the attention window (a query at slot t sees
      slots t - w < s <= t) or None for full causal attention.
    initializer_range: standard deviation of the random initialisation
      (`from_config`).

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
    if self.num_heads % self.num_kv_heads:
      raise ValueError(
        f"num_heads = {self.num_heads} is not a multiple of num_kv_heads = "
        f"{self.num_kv_heads}; grouped-query attention needs whole groups"
      )

  @classmethod
  def from_hf(cls, hf_config: Any) -> ModelConfig:
    """A `ModelConfig` from a Llama/Mistral/Qwen2/Qwen3 transformers config.

    Reads rope settings from `rope_parameters` (transformers >= 5) or from
    `rope_theta` and `rope_scaling` (older versions).

    Raises:
      ValueError: `model_type` is not one of `SUPPORTED_MODEL_TYPES`.
      NotImplementedError: a field the implementation does not cover (rope type,
        activation, per-layer attention type, partial rotary factor), named in
        the message.

    Example:
      >>> from transformers import LlamaConfig
      >>> hf = LlamaConfig(hidden_size=64, num_attention_heads=4)
      >>> ModelConfig.from_hf(hf).head_dim
      16
    """
    model_type = getattr(hf_config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
      raise ValueError(
        f"model_type {model_type!r} is not supported by jlora.models; "
        f"supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
      )
    act = getattr(hf_config, "hidden_act", "silu")
    if act not in _SILU_NAMES:
      raise NotImplementedError(
        f"config.hidden_act = {act!r} is not implemented; jlora.models "
        "supports 'silu'"
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

    return cls(
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
      rope=_rope_from_hf(hf_config, max_pos),
      tie_word_embeddings=bool(
        getattr(hf_config, "tie_word_embeddings", False)
      ),
      qkv_bias=qkv_bias,
      o_bias=o_bias,
      mlp_bias=bool(getattr(hf_config, "mlp_bias", False)),
      qk_norm=model_type == "qwen3",
      sliding_windows=_windows_from_hf(hf_config, model_type),
      initializer_range=float(getattr(hf_config, "initializer_range", 0.02)),
    )


def _rope_from_hf(hf_config: Any, max_pos: int) -> RopeConfig:
  params = getattr(hf_config, "rope_parameters", None)
  if params is None:  # transformers < 5: rope_theta + optional rope_scaling
    params = dict(getattr(hf_config, "rope_scaling", None) or {})
    params.setdefault("rope_theta", getattr(hf_config, "rope_theta", 10000.0))
  if any(isinstance(v, dict) for v in params.values()):
    raise NotImplementedError(
      "config.rope_parameters is nested per layer type; jlora.models "
      "supports one rope setting shared by all layers"
    )
  rope_type = params.get("rope_type", params.get("type", "default"))
  if rope_type not in SUPPORTED_ROPE_TYPES:
    raise NotImplementedError(
      f"config.rope_parameters['rope_type'] = {rope_type!r} (rope_scaling) "
      f"is not implemented; supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
    )
  partial = params.get(
    "partial_rotary_factor", getattr(hf_config, "partial_rotary_factor", None)
  )
  if partial not in (None, 1.0):
    raise NotImplementedError(
      f"config.partial_rotary_factor = {partial} is not implemented; only "
      "1.0 is supported"
    )
  theta = params.get("rope_theta", getattr(hf_config, "rope_theta", 10000.0))
  return RopeConfig(
    theta=float(theta),
    rope_type=rope_type,
    factor=float(params.get("factor", 1.0)),
    low_freq_factor=float(params.get("low_freq_factor", 1.0)),
    high_freq_factor=float(params.get("high_freq_factor", 4.0)),
    original_max_position_embeddings=params.get(
      "original_max_position_embeddings", max_pos
    ),
  )


def _windows_from_hf(hf_config: Any, model_type: str) -> tuple[int | None, ...]:
  n = hf_config.num_hidden_layers
  window = getattr(hf_config, "sliding_window", None)
  if model_type == "llama" or window is None:
    return (None,) * n
  if model_type == "mistral":
    return (int(window),) * n
  # Qwen2/Qwen3: per-layer attention types; older transformers derive them from
  # use_sliding_window and max_window_layers.
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
