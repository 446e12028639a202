"""Flax (linen) Llama-family causal LM: Llama 2/3, Mistral, Qwen2/2.5 and Qwen3.

The parameter tree mirrors transformers' module names, so LoRA targets such as
"q_proj" select the same layers as in PEFT::

    model/embed_tokens/embedding                       (vocab, hidden)
    model/layers/<i>/self_attn/{q,k,v,o}_proj/kernel   (in, out)   [+ bias]
    model/layers/<i>/self_attn/{q,k}_norm/scale        (head_dim,) Qwen3 only
    model/layers/<i>/mlp/{gate,up,down}_proj/kernel    (in, out)
    model/layers/<i>/{input,post_attention}_layernorm/scale
    model/norm/scale
    lm_head/kernel                                     (hidden, vocab), untied

With `scan_layers=True` the `<i>` level disappears and every leaf under
`model/layers` gains a leading layer axis:
`model/layers/self_attn/q_proj/kernel` has shape (L, in, out).

Every projection is a plain `nn.Dense`: kernels are used only by matmuls (after
a dtype cast when `dtype != param_dtype`), which is what `jlora.wrap` needs to
factor LoRA products.
"""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jlora.models.config import ModelConfig, RopeConfig

REMAT_POLICIES = ("none", "full", "dots")
ATTENTION_IMPLS = ("xla", "cudnn", "auto")
# "No window" in the per-layer window array: larger than any slot distance.
_NO_WINDOW = np.iinfo(np.int32).max


class KVCache(NamedTuple):
  """Key/value cache for all layers, preallocated to a maximum length.

  Attributes:
    k, v: (num_layers, batch, max_length, num_kv_heads, head_dim), keys after
      rope.
    index: int32 scalar, the number of slots already written (the next write
      position).
  """

  k: jax.Array
  v: jax.Array
  index: jax.Array


def init_cache(
  model: LlamaForCausalLM, batch_size: int, max_length: int
) -> KVCache:
  """An empty `KVCache` of `max_length` slots per sequence, in `model.dtype`.

  Example:
    >>> cache = init_cache(model, 2, 64)
    >>> logits, cache = model.apply({"params": params}, prompt, cache=cache)
  """
  c = model.config
  shape = (c.num_layers, batch_size, max_length, c.num_kv_heads, c.head_dim)
  zeros = jnp.zeros(shape, model.dtype)
  return KVCache(k=zeros, v=zeros, index=jnp.zeros((), jnp.int32))


# ----------------------------------------------------------------------------
# Rotary position embedding


def _inv_freq(rope: RopeConfig, head_dim: int) -> np.ndarray:
  """Inverse frequencies theta^(-2i/d), rescaled for "linear"/"llama3" (f32)."""
  inv = 1.0 / rope.theta ** (
    np.arange(0, head_dim, 2, dtype=np.float64) / head_dim
  )
  if rope.rope_type == "linear":
    inv = inv / rope.factor
  elif rope.rope_type == "llama3":
    # Llama 3.1: long wavelengths are divided by `factor`, short ones kept,
    # the band between interpolated smoothly (as Meta's reference does).
    old_len = rope.original_max_position_embeddings
    low_wavelen = old_len / rope.low_freq_factor
    high_wavelen = old_len / rope.high_freq_factor
    wavelen = 2 * math.pi / inv
    scaled = np.where(wavelen > low_wavelen, inv / rope.factor, inv)
    smooth = (old_len / wavelen - rope.low_freq_factor) / (
      rope.high_freq_factor - rope.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    inv = np.where(medium, smoothed, scaled)
  return inv.astype(np.float32)


def rope_cos_sin(
  config: ModelConfig, positions: jax.Array
) -> tuple[jax.Array, jax.Array]:
  """cos, sin (B, T, head_dim) f32 of the rotary angles of `positions` (B, T).

  "dynamic" (NTK) rope grows the base with the largest position of the call,

    theta' = theta * (factor * n / max_pos - (factor - 1)) ** (d / (d - 2)),
    n = max(positions) + 1,

  and equals default rope while n <= max_position_embeddings.
  """
  d = config.head_dim
  rope = config.rope
  if rope.rope_type == "dynamic":
    max_pos = config.max_position_embeddings
    n = jnp.maximum(jnp.max(positions) + 1, max_pos).astype(jnp.float32)
    base = rope.theta * ((rope.factor * n / max_pos) - (rope.factor - 1)) ** (
      d / (d - 2)
    )
    inv = 1.0 / base ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d)
  else:
    inv = jnp.asarray(_inv_freq(rope, d))
  angles = positions.astype(jnp.float32)[..., None] * inv
  angles = jnp.concatenate([angles, angles], axis=-1)
  return jnp.cos(angles), jnp.sin(angles)


def _apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """x * cos + rotate_half(x) * sin; x (B, T, heads, D), cos/sin (B, T, D)."""
  cos = cos[:, :, None, :].astype(x.dtype)
  sin = sin[:, :, None, :].astype(x.dtype)
  half = x.shape[-1] // 2
  rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
  return x * cos + rotated * sin


# ----------------------------------------------------------------------------
# Layers


class RMSNorm(nn.Module):
  """y = scale * x / sqrt(mean(x^2) + eps), the mean in float32 for any `dtype`.

  Matches transformers' LlamaRMSNorm: normalise in float32, cast to `dtype`,
  then scale.
  """

  eps: float
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    scale = self.param(
      "scale", nn.initializers.ones, (x.shape[-1],), self.param_dtype
    )
    x32 = x.astype(jnp.float32)
    var = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
    y = (x32 * lax.rsqrt(var + self.eps)).astype(self.dtype)
    return scale.astype(self.dtype) * y


def _dense(
  config: ModelConfig,
  dtype,
  param_dtype,
  features: int,
  use_bias: bool,
  name=None,
):
  return nn.Dense(
    features,
    use_bias=use_bias,
    dtype=dtype,
    param_dtype=param_dtype,
    kernel_init=nn.initializers.normal(config.initializer_range),
    name=name,
  )


def _attention_weights_xla(q, k, v, mask):
  """float32 softmax attention.

  q (B,T,N,D), k/v (B,S,K,D), mask (B,T,S) -> (B,T,N,D).
  """
  b, t, n, d = q.shape
  kv_heads = k.shape[2]
  # Grouped-query: the n // kv_heads query heads of a group share one k/v head.
  q = q.reshape(b, t, kv_heads, n // kv_heads, d)
  scores = jnp.einsum(
    "btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32
  )
  scores = scores * (d**-0.5)
  # A finite minimum keeps fully masked rows (padding queries) NaN-free.
  scores = jnp.where(mask[:, None, None], scores, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
  out = jnp.einsum("bkgts,bskd->btkgd", probs, v)
  return out.reshape(b, t, n, d)


def _attention(q, k, v, mask, impl: str):
  if impl == "xla":
    return _attention_weights_xla(q, k, v, mask)
  if impl == "cudnn":
    if jax.default_backend() != "gpu":
      raise RuntimeError(
        "attention='cudnn' needs an NVIDIA GPU, but the default JAX backend "
        f"is {jax.default_backend()!r}; use attention='xla' or 'auto'"
      )
    if q.dtype not in (jnp.bfloat16, jnp.float16):
      raise ValueError(
        f"attention='cudnn' computes in bfloat16/float16, got dtype {q.dtype}; "
        "build the model with dtype=jnp.bfloat16 or use attention='xla'"
      )
  return jax.nn.dot_product_attention(
    q, k, v, mask=mask[:, None], implementation=None if impl == "auto" else impl
  )


class Attention(nn.Module):
  """Grouped-query self-attention: rope, optional Qwen3 q/k norms, KV cache."""

  config: ModelConfig
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  attention: str = "xla"

  @nn.compact
  def __call__(self, x, cos, sin, mask, cache, layer_idx):
    c = self.config
    b, t, _ = x.shape
    dense = functools.partial(_dense, c, self.dtype, self.param_dtype)
    q = dense(c.num_heads * c.head_dim, c.qkv_bias, "q_proj")(x)
    k = dense(c.num_kv_heads * c.head_dim, c.qkv_bias, "k_proj")(x)
    v = dense(c.num_kv_heads * c.head_dim, c.qkv_bias, "v_proj")(x)
    q = q.reshape(b, t, c.num_heads, c.head_dim)
    k = k.reshape(b, t, c.num_kv_heads, c.head_dim)
    v = v.reshape(b, t, c.num_kv_heads, c.head_dim)
    if c.qk_norm:
      norm = functools.partial(
        RMSNorm, c.rms_norm_eps, self.dtype, self.param_dtype
      )
      q = norm(name="q_norm")(q)
      k = norm(name="k_norm")(k)
    q, k = _apply_rope(q, cos, sin), _apply_rope(k, cos, sin)
    if cache is not None:
      # Write this call's keys/values at slot `index` of this layer, then attend
      # over all slots.
      k_all, v_all, index = cache
      start = (layer_idx, 0, index, 0, 0)
      k_all = lax.dynamic_update_slice(
        k_all, k[None].astype(k_all.dtype), start
      )
      v_all = lax.dynamic_update_slice(
        v_all, v[None].astype(v_all.dtype), start
      )
      k = lax.dynamic_index_in_dim(k_all, layer_idx, 0, keepdims=False)
      v = lax.dynamic_index_in_dim(v_all, layer_idx, 0, keepdims=False)
      k, v = k.astype(q.dtype), v.astype(q.dtype)
      cache = (k_all, v_all, index)
    out = _attention(q, k, v, mask, self.attention)
    out = out.reshape(b, t, c.num_heads * c.head_dim)
    return dense(c.hidden_size, c.o_bias, "o_proj")(out), cache


class MLP(nn.Module):
  """SwiGLU: down_proj(silu(gate_proj(x)) * up_proj(x))."""

  config: ModelConfig
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    c = self.config
    dense = functools.partial(_dense, c, self.dtype, self.param_dtype)
    gate = dense(c.intermediate_size, c.mlp_bias, "gate_proj")(x)
    up = dense(c.intermediate_size, c.mlp_bias, "up_proj")(x)
    return dense(c.hidden_size, c.mlp_bias, "down_proj")(jax.nn.silu(gate) * up)


class DecoderLayer(nn.Module):
  """Pre-norm decoder block, in the (carry, xs) form `nn.scan` expects.

  carry = (hidden (B,T,H), KVCache or None); xs = (window, layer_idx) int32
  scalars; q_slots (T,) and kv_valid (B,S) are shared by all layers.
  """

  config: ModelConfig
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  attention: str = "xla"

  @nn.compact
  def __call__(self, carry, xs, cos, sin, q_slots, kv_valid):
    c = self.config
    h, cache = carry
    window, layer_idx = xs
    kv_slots = jnp.arange(kv_valid.shape[1])
    # (T, S); transformers masks by slot (cache position), not rope position.
    dist = q_slots[:, None] - kv_slots[None, :]
    mask = (dist >= 0) & (dist < window)
    mask = mask[None] & kv_valid[:, None, :]
    norm = functools.partial(
      RMSNorm, c.rms_norm_eps, self.dtype, self.param_dtype
    )
    attn_out, cache = Attention(
      c, self.dtype, self.param_dtype, self.attention, name="self_attn"
    )(norm(name="input_layernorm")(h), cos, sin, mask, cache, layer_idx)
    h = h + attn_out
    h = h + MLP(c, self.dtype, self.param_dtype, name="mlp")(
      norm(name="post_attention_layernorm")(h)
    )
    return (h, cache), None


class _LayerStack(nn.Module):
  """Unrolled layers named "0", "1", ... like transformers' `layers` list."""

  layer: Any
  num_layers: int

  @nn.compact
  def __call__(self, carry, xs, cos, sin, q_slots, kv_valid):
    windows, idxs = xs
    for i in range(self.num_layers):
      carry, _ = self.layer(name=str(i))(
        carry, (windows[i], idxs[i]), cos, sin, q_slots, kv_valid
      )
    return carry, None


def _remat_policy(remat: str):
  if remat == "dots":
    # Save projection outputs (matmuls without batch dims); recompute attention
    # and elementwise.
    return jax.checkpoint_policies.dots_with_no_batch_dims_saveable
  return None


class LlamaModel(nn.Module):
  """Embedding, decoder layers and final norm (transformers' `model`)."""

  config: ModelConfig
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  scan_layers: bool = False
  remat: str = "none"
  attention: str = "xla"

  def setup(self):
    c = self.config
    self.embed_tokens = nn.Embed(
      c.vocab_size,
      c.hidden_size,
      dtype=self.dtype,
      param_dtype=self.param_dtype,
      embedding_init=nn.initializers.normal(c.initializer_range),
    )
    layer_cls = _layer_cls(self.remat, self.scan_layers)
    if self.scan_layers:
      self.layers = nn.scan(
        layer_cls,
        variable_axes={"params": 0},
        split_rngs={"params": True},
        in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast),
        length=c.num_layers,
      )(c, self.dtype, self.param_dtype, self.attention)
    else:
      layer = functools.partial(
        layer_cls, c, self.dtype, self.param_dtype, self.attention
      )
      self.layers = _LayerStack(layer, c.num_layers)
    self.norm = RMSNorm(c.rms_norm_eps, self.dtype, self.param_dtype)

  def __call__(
    self, input_ids, positions=None, attention_mask=None, cache=None
  ):
    c = self.config
    b, t = input_ids.shape
    if cache is None:
      index = jnp.zeros((), jnp.int32)
      num_slots = t
    else:
      index = cache.index
      num_slots = cache.k.shape[2]
    if attention_mask is None:
      kv_valid = jnp.ones((b, num_slots), bool)
    else:
      if attention_mask.shape != (b, num_slots):
        where = (
          "the cache's max_length" if cache is not None else "the input length"
        )
        raise ValueError(
          f"attention_mask has shape {attention_mask.shape}, expected (batch, "
          f"{where}) = {(b, num_slots)}; with a cache the mask covers every "
          "cache slot"
        )
      kv_valid = attention_mask.astype(bool)
    q_slots = index + jnp.arange(t, dtype=jnp.int32)
    if positions is None:
      positions = jnp.broadcast_to(q_slots, (b, t))
    cos, sin = rope_cos_sin(c, positions)

    windows = jnp.asarray(
      [_NO_WINDOW if w is None else w for w in c.sliding_windows], jnp.int32
    )
    idxs = jnp.arange(c.num_layers, dtype=jnp.int32)
    h = self.embed_tokens(input_ids)
    carry = (h, None if cache is None else (cache.k, cache.v, index))
    (h, layer_cache), _ = self.layers(
      carry, (windows, idxs), cos, sin, q_slots, kv_valid
    )
    h = self.norm(h)
    if cache is not None:
      cache = KVCache(layer_cache[0], layer_cache[1], index + t)
    return h, cache

  def attend(self, h):
    """Logits against the input embedding (tied weights): h @ embedding.T."""
    return self.embed_tokens.attend(h)


def _layer_cls(remat: str, scan_layers: bool):
  if remat == "none":
    return DecoderLayer
  # Inside nn.scan the loop already keeps XLA from merging the recomputation
  # away, so prevent_cse is needed only for unrolled layers.
  return nn.remat(
    DecoderLayer, policy=_remat_policy(remat), prevent_cse=not scan_layers
  )


class LlamaForCausalLM(nn.Module):
  """Llama-family causal LM whose parameter tree mirrors transformers' names.

  Attributes:
    config: the architecture (`ModelConfig.from_hf(hf_config)`).
    dtype: computation dtype (activations, matmuls). RMSNorm statistics and the
      attention softmax are always float32, as in transformers.
    param_dtype: dtype of the parameters created by `init`.
    scan_layers: one `nn.scan` over layers (parameters stacked with a leading
      layer axis); faster compiles for deep models.
    remat: per-layer rematerialisation: "none", "full" (recompute everything) or
      "dots" (save projection outputs, recompute the rest).
    attention: "xla" (explicit float32 softmax; any backend), "cudnn" (fused
      cuDNN kernel; GPU, bf16/fp16 only) or "auto"
      (`jax.nn.dot_product_attention`'s own choice).

  Call arguments (`model.apply({"params": p}, input_ids, ...)`):
    input_ids: (B, T) int tokens.
    positions: (B, T) int rope positions; default `cache.index + arange(T)`.
    attention_mask: (B, S), 1 for real tokens; S = T without a cache, the
      cache's max_length with one. Causality and sliding windows apply to
      slots (cache positions), as in transformers.
    cache: a `KVCache` from `init_cache`; this call's keys/values are written
      at `cache.index` (the caller keeps index + T <= max_length).

  Returns:
    float32 logits (B, T, vocab), or `(logits, new_cache)` given a cache.

  Example:
    >>> model = LlamaForCausalLM(ModelConfig.from_hf(hf_config))
    >>> x = jnp.zeros((1, 8), jnp.int32)
    >>> params = model.init(jax.random.key(0), x)["params"]
    >>> logits = model.apply({"params": params}, tokens)
  """

  config: ModelConfig
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  scan_layers: bool = False
  remat: str = "none"
  attention: str = "xla"

  def setup(self):
    if self.remat not in REMAT_POLICIES:
      raise ValueError(f"remat={self.remat!r}; choose one of {REMAT_POLICIES}")
    if self.attention not in ATTENTION_IMPLS:
      raise ValueError(
        f"attention={self.attention!r}; choose one of {ATTENTION_IMPLS}"
      )
    c = self.config
    self.model = LlamaModel(
      c,
      self.dtype,
      self.param_dtype,
      self.scan_layers,
      self.remat,
      self.attention,
    )
    if not c.tie_word_embeddings:
      self.lm_head = _dense(
        c, self.dtype, self.param_dtype, c.vocab_size, False
      )

  def __call__(
    self, input_ids, positions=None, attention_mask=None, cache=None
  ):
    h, new_cache = self.model(input_ids, positions, attention_mask, cache)
    if self.config.tie_word_embeddings:
      logits = self.model.attend(h)
    else:
      logits = self.lm_head(h)
    logits = logits.astype(jnp.float32)
    return logits if cache is None else (logits, new_cache)
