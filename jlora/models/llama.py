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

Training speed and memory (`remat`, `return_hidden` with
`jlora.models.losses.chunked_cross_entropy`); LoRA r=16 on all seven
projections, bf16, scan_layers, cuDNN attention, one H100 (see
benchmarks/RESULTS.md):

  shape, batch         remat                     step (s)  peak GiB
  1.1B, 8 x 1024       "none"                    0.127     23.5
                       "matmuls"                 0.110      9.6
                       "full"                    0.126      3.7
  8B, 2 x 2048         "matmuls"                 0.292     28.1
                       "mlp"                     0.307     25.5
                       "attention+gate"          0.318     24.7
                       "full"                    0.357     17.8
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.ad_checkpoint import checkpoint_name

from jlora.models.config import ModelConfig, RopeConfig

REMAT_POLICIES = (
  "none", "full", "dots", "attention", "attention+gate", "mlp", "matmuls"
)
# Values tagged with `jax.ad_checkpoint.checkpoint_name` in every decoder layer,
# for `remat` given as names and for `offload`: each projection's output
# (bias included, LoRA update included under `jlora.wrap`), and the attention
# output before o_proj ("attention"). With a fused attention kernel (cuDNN)
# "attention" instead selects the kernel's own residuals, its output and
# softmax statistics, so that the output is not stored twice.
CHECKPOINT_NAMES = (
  "q_proj",
  "k_proj",
  "v_proj",
  "attention",
  "o_proj",
  "gate_proj",
  "up_proj",
  "down_proj",
)
_ATTENTION_SAVES = ("q_proj", "k_proj", "v_proj", "attention", "o_proj")
# What each named preset saves; everything else in the layer is recomputed in
# the backward pass. A layer's backward needs its projections' inputs (for the
# LoRA factors' gradients) and the attention and SwiGLU inputs, never a frozen
# projection's output as such, so saving these avoids recomputing matmuls:
#   "attention": q/k/v/o and attention; the MLP's gate and up are recomputed.
#   "attention+gate": also gate_proj; up_proj is recomputed.
#   "mlp": gate, up and o_proj (the residual stream after attention);
#     q/k/v and attention are recomputed, the cheapest matmuls per byte kept.
#   "matmuls": also up_proj; only elementwise work (norms, rope, SiLU) is
#     recomputed. down_proj's output is never needed by the backward pass.
_PRESET_SAVES = {
  "full": (),
  "attention": _ATTENTION_SAVES,
  "attention+gate": _ATTENTION_SAVES + ("gate_proj",),
  "mlp": ("o_proj", "gate_proj", "up_proj"),
  "matmuls": _ATTENTION_SAVES + ("gate_proj", "up_proj"),
}
# The forward primitives of cuDNN fused attention: their outputs (the attention
# output and its softmax statistics) are the backward kernel's residuals.
_ATTENTION_FWD_PRIMITIVES = frozenset(
  {"dot_product_attention_fwd_wrapper", "dot_product_attention_fwd"}
)
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


def _named_dense(
  config: ModelConfig, dtype, param_dtype, features: int, use_bias: bool, name
):
  """`_dense` whose output is tagged `checkpoint_name(y, name)` for remat."""
  layer = _dense(config, dtype, param_dtype, features, use_bias, name)
  return lambda x: checkpoint_name(layer(x), name)


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


def _attention(q, k, v, mask, impl: str, window: int | None = None):
  """mask (B, T, S) bool, or None for plain causal attention over T == S slots
  (no padding, no cache) with an optional static sliding `window`."""
  if impl == "xla":
    if mask is None:
      t, s = q.shape[1], k.shape[1]
      dist = jnp.arange(t)[:, None] - jnp.arange(s)[None, :]
      mask = dist >= 0
      if window is not None:
        mask = mask & (dist < window)
      mask = mask[None]
    return checkpoint_name(_attention_weights_xla(q, k, v, mask), "attention")
  # No name on the fused kernel's output: a remat policy that keeps
  # "attention" keeps the kernel's residuals (`_SaveNames`), and a name here
  # would make the output a second, separate residual (measured: 1 GiB more
  # at the 8B shape).
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
  implementation = None if impl == "auto" else impl
  if mask is None:
    # The causal structure given as a flag, not as a (T, S) mask: cuDNN's
    # flash kernel then skips the masked blocks instead of reading a mask.
    return jax.nn.dot_product_attention(
      q,
      k,
      v,
      is_causal=True,
      local_window_size=None if window is None else (window - 1, 0),
      implementation=implementation,
    )
  return jax.nn.dot_product_attention(
    q, k, v, mask=mask[:, None], implementation=implementation
  )


class Attention(nn.Module):
  """Grouped-query self-attention: rope, optional Qwen3 q/k norms, KV cache."""

  config: ModelConfig
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  attention: str = "xla"

  @nn.compact
  def __call__(self, x, cos, sin, mask, cache, layer_idx, window=None):
    c = self.config
    b, t, _ = x.shape
    dense = functools.partial(_named_dense, c, self.dtype, self.param_dtype)
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
    out = _attention(q, k, v, mask, self.attention, window)
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
    dense = functools.partial(_named_dense, c, self.dtype, self.param_dtype)
    gate = dense(c.intermediate_size, c.mlp_bias, "gate_proj")(x)
    up = dense(c.intermediate_size, c.mlp_bias, "up_proj")(x)
    return dense(c.hidden_size, c.mlp_bias, "down_proj")(jax.nn.silu(gate) * up)


class DecoderLayer(nn.Module):
  """Pre-norm decoder block, in the (carry, xs) form `nn.scan` expects.

  carry = (hidden (B,T,H), KVCache or None); xs = (window, layer_idx) int32
  scalars; q_slots (T,), kv_valid (B,S) and segment_ids (B,T) or None are
  shared by all layers. kv_valid None means plain causal attention (no
  padding, no cache, no packing) with every layer's window equal to the
  config's first (static), so no mask is built.
  """

  config: ModelConfig
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  attention: str = "xla"

  @nn.compact
  def __call__(self, carry, xs, cos, sin, q_slots, kv_valid, segment_ids):
    c = self.config
    h, cache = carry
    window, layer_idx = xs
    static_window = None
    if kv_valid is None:
      mask, static_window = None, c.sliding_windows[0]
    else:
      mask = attention_mask(q_slots, kv_valid, window, segment_ids)
    norm = functools.partial(
      RMSNorm, c.rms_norm_eps, self.dtype, self.param_dtype
    )
    attn_out, cache = Attention(
      c, self.dtype, self.param_dtype, self.attention, name="self_attn"
    )(
      norm(name="input_layernorm")(h),
      cos,
      sin,
      mask,
      cache,
      layer_idx,
      static_window,
    )
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
  def __call__(self, carry, xs, cos, sin, q_slots, kv_valid, segment_ids):
    windows, idxs = xs
    for i in range(self.num_layers):
      carry, _ = self.layer(name=str(i))(
        carry, (windows[i], idxs[i]), cos, sin, q_slots, kv_valid, segment_ids
      )
    return carry, None


@dataclasses.dataclass(frozen=True)
class _SaveNames:
  """Remat policy: save (or offload to host) the values tagged with these
  names, and cuDNN attention's residuals when "attention" is among them.

  `jax.checkpoint_policies.save_and_offload_only_these_names` plus one rule:
  the cuDNN backward kernel needs the attention output and the softmax
  statistics, both outputs of the forward primitive; the fused path tags no
  name, and keeping that primitive's outputs keeps the backward pass from
  running the attention forward again without storing the output twice.
  """

  save: frozenset
  offload: frozenset = frozenset()

  def _decide(self, name: str):
    if name in self.save:
      return True
    if name in self.offload:
      return jax.ad_checkpoint.Offloadable(src="device", dst="pinned_host")
    return False

  def __call__(self, prim, *_, **params):
    if prim.name == "name":
      return self._decide(params["name"])
    if prim.name in _ATTENTION_FWD_PRIMITIVES:
      return self._decide("attention")
    return False


def remat_policy(remat: str | Sequence[str], offload: Sequence[str] = ()):
  """The `jax.checkpoint` policy of a `remat` setting (None: save nothing).

  Args:
    remat: a preset of `REMAT_POLICIES` (other than "none"), or names from
      `CHECKPOINT_NAMES` to save.
    offload: names from `CHECKPOINT_NAMES` to keep in pinned host memory
      instead of recomputing them.
  """
  if remat == "dots" and not offload:
    # Save projection outputs (matmuls without batch dims, the LoRA factors'
    # products separately); recompute attention and elementwise.
    return jax.checkpoint_policies.dots_with_no_batch_dims_saveable
  saves = _PRESET_SAVES[remat] if isinstance(remat, str) else tuple(remat)
  if not saves and not offload:
    return None
  return _SaveNames(frozenset(saves), frozenset(offload))


def _check_remat(remat, offload) -> None:
  if isinstance(remat, str):
    if remat not in REMAT_POLICIES:
      raise ValueError(
        f"remat={remat!r}; choose one of {REMAT_POLICIES} or a tuple of "
        f"names from {CHECKPOINT_NAMES}"
      )
    names = ()
  else:
    names = tuple(remat)
  unknown = [n for n in (*names, *offload) if n not in CHECKPOINT_NAMES]
  if unknown:
    raise ValueError(
      f"unknown checkpoint names {unknown} in remat={remat!r} / "
      f"offload={offload!r}; the names are {CHECKPOINT_NAMES}"
    )
  if offload:
    if remat in ("none", "dots"):
      raise ValueError(
        f"offload={tuple(offload)!r} needs a named remat policy, not "
        f"remat={remat!r}; use e.g. remat='attention' (or 'full', or a tuple "
        "of names) with it"
      )
    saved = _PRESET_SAVES[remat] if isinstance(remat, str) else names
    both = sorted(set(saved) & set(offload))
    if both:
      raise ValueError(
        f"{both} are both saved (remat={remat!r}) and offloaded; name each "
        "value in one of the two"
      )


class LlamaModel(nn.Module):
  """Embedding, decoder layers and final norm (transformers' `model`)."""

  config: ModelConfig
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  scan_layers: bool = False
  remat: str | tuple[str, ...] = "none"
  attention: str = "xla"
  offload: tuple[str, ...] = ()

  def setup(self):
    c = self.config
    self.embed_tokens = nn.Embed(
      c.vocab_size,
      c.hidden_size,
      dtype=self.dtype,
      param_dtype=self.param_dtype,
      embedding_init=nn.initializers.normal(c.initializer_range),
    )
    layer_cls = _layer_cls(self.remat, self.offload, self.scan_layers)
    if self.scan_layers:
      self.layers = nn.scan(
        layer_cls,
        variable_axes={"params": 0},
        split_rngs={"params": True},
        in_axes=(0,) + (nn.broadcast,) * 5,
        length=c.num_layers,
      )(c, self.dtype, self.param_dtype, self.attention)
    else:
      layer = functools.partial(
        layer_cls, c, self.dtype, self.param_dtype, self.attention
      )
      self.layers = _LayerStack(layer, c.num_layers)
    self.norm = RMSNorm(c.rms_norm_eps, self.dtype, self.param_dtype)

  def __call__(
    self,
    input_ids,
    positions=None,
    attention_mask=None,
    cache=None,
    segment_ids=None,
  ):
    c = self.config
    b, t = input_ids.shape
    if cache is None:
      index = jnp.zeros((), jnp.int32)
      num_slots = t
    else:
      index = cache.index
      num_slots = cache.k.shape[2]
    if segment_ids is not None:
      segment_ids = _check_segments(segment_ids, (b, t), cache)
      if positions is None:
        positions = document_positions(segment_ids)
      seg_valid = segment_ids != 0
      attention_mask = (
        seg_valid
        if attention_mask is None
        else seg_valid & attention_mask.astype(bool)
      )
    if attention_mask is None and cache is None and _one_window(c):
      # Causal attention over this call's tokens alone: no mask to build, and
      # cuDNN gets is_causal=True.
      kv_valid = None
    elif attention_mask is None:
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
      carry, (windows, idxs), cos, sin, q_slots, kv_valid, segment_ids
    )
    h = self.norm(h)
    if cache is not None:
      cache = KVCache(layer_cache[0], layer_cache[1], index + t)
    return h, cache

  def attend(self, h):
    """Logits against the input embedding (tied weights): h @ embedding.T."""
    return self.embed_tokens.attend(h)


def attention_mask(q_slots, kv_valid, window, segment_ids=None):
  """(B, T, S) bool: which key slots each query may attend to.

  Query slot t sees key slot s when 0 <= t - s < window (causal, sliding;
  transformers masks by slot, not by rope position), s is a real token
  (`kv_valid` (B, S)), and, for packed rows, both belong to the same document:
  segment_ids (B, T) with T == S, 0 marking padding, which sees nothing.
  """
  kv_slots = jnp.arange(kv_valid.shape[1])
  dist = q_slots[:, None] - kv_slots[None, :]
  mask = ((dist >= 0) & (dist < window))[None] & kv_valid[:, None, :]
  if segment_ids is not None:
    mask = mask & (segment_ids[:, :, None] == segment_ids[:, None, :])
  return mask


def document_positions(segment_ids: jax.Array) -> jax.Array:
  """(B, T) int32 rope positions restarting at 0 where a document starts.

  A document is a run of equal `segment_ids` along a row; e.g. segment ids
  [1, 1, 1, 2, 2, 0] give positions [0, 1, 2, 0, 1, 0].
  """
  t = segment_ids.shape[1]
  slots = jnp.arange(t, dtype=jnp.int32)
  starts = jnp.concatenate(
    [
      jnp.ones_like(segment_ids[:, :1], bool),
      segment_ids[:, 1:] != segment_ids[:, :-1],
    ],
    axis=1,
  )
  first = lax.cummax(jnp.where(starts, slots, 0), axis=1)
  return slots - first


def _check_segments(segment_ids, shape, cache):
  if cache is not None:
    raise ValueError(
      "segment_ids (packed documents) cannot be combined with a KV cache; "
      "generate each document in its own row (attention_mask for padding)"
    )
  if tuple(segment_ids.shape) != tuple(shape):
    raise ValueError(
      f"segment_ids has shape {tuple(segment_ids.shape)}, expected the "
      f"input_ids' {tuple(shape)}: one document id per token (0 = padding)"
    )
  if not jnp.issubdtype(segment_ids.dtype, jnp.integer):
    raise TypeError(
      f"segment_ids must be integers (0 = padding, 1, 2, ... documents), got "
      f"dtype {segment_ids.dtype}"
    )
  return segment_ids.astype(jnp.int32)


def _one_window(config: ModelConfig) -> bool:
  """Every layer has the same sliding window (or none): static attention."""
  return len(set(config.sliding_windows)) == 1


def _layer_cls(remat, offload, scan_layers: bool):
  if remat == "none":
    return DecoderLayer
  if not isinstance(remat, str):
    remat = tuple(remat)
  # Inside nn.scan the loop already keeps XLA from merging the recomputation
  # away, so prevent_cse is needed only for unrolled layers.
  return nn.remat(
    DecoderLayer,
    policy=remat_policy(remat, tuple(offload)),
    prevent_cse=not scan_layers,
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
    remat: per-layer rematerialisation (what the backward pass keeps from the
      forward pass, the rest it recomputes):
      "none": keep everything (most memory; under scan_layers slower than
        "matmuls", which stores fewer, larger residuals);
      "full": keep only each layer's input (least memory, one more forward);
      "dots": keep every matmul output (LoRA factor products separately);
      "attention": keep q/k/v/o projection and attention outputs, recompute
        the MLP's gate and up matmuls;
      "attention+gate": also keep gate_proj, recompute up_proj;
      "mlp": keep gate_proj, up_proj and o_proj outputs, recompute q/k/v
        and attention (at 8B: 1.20-1.21x compiled PEFT's speed at 0.60x its
        memory);
      "matmuls": keep every projection output that the backward pass needs
        (all but down_proj) and the attention output: no matmul is recomputed,
        only norms, rope and SiLU;
      or a tuple of names from `CHECKPOINT_NAMES` to keep.
      See `benchmarks/RESULTS.md` for their memory and speed at 1B and 8B.
    attention: "xla" (explicit float32 softmax; any backend), "cudnn" (fused
      cuDNN kernel; GPU, bf16/fp16 only) or "auto"
      (`jax.nn.dot_product_attention`'s own choice). Without padding mask,
      segment ids or cache (training on full-length rows), cuDNN and "auto"
      get `is_causal=True` instead of an explicit mask. Otherwise (padding,
      packed documents, decoding) they get the (B, 1, T, S) mask, which
      `jax.nn.dot_product_attention` hands to cuDNN as an additive bias: exact,
      but the kernel reads the bias instead of skipping masked blocks. (cuDNN's
      own packed layout, q/kv offsets, is not public API in jax 0.10/0.11.)
    offload: names from `CHECKPOINT_NAMES` to keep in pinned host memory
      instead of recomputing them (needs a named `remat`, not "none"/"dots";
      pays only where host transfers hide behind compute, which they did not
      at the 8B shape on an H100: 41% slower than keeping them on the GPU).

  Call arguments (`model.apply({"params": p}, input_ids, ...)`):
    input_ids: (B, T) int tokens.
    positions: (B, T) int rope positions; default `cache.index + arange(T)`.
    attention_mask: (B, S), 1 for real tokens; S = T without a cache, the
      cache's max_length with one. Causality and sliding windows apply to
      slots (cache positions), as in transformers.
    cache: a `KVCache` from `init_cache`; this call's keys/values are written
      at `cache.index` (the caller keeps index + T <= max_length).
    segment_ids: (B, T) int documents packed in each row: 0 = padding, 1, 2,
      ... one id per document, each document a contiguous run. A token
      attends only to earlier tokens of its own document (on every attention
      path: the mask goes to cuDNN as a bias, see `attention`); padding
      attends to nothing and its outputs are meaningless (mask them out of the
      loss). `positions` default to restarting at 0 per document
      (`document_positions`). Not with a cache.
    return_hidden: return the final hidden states (B, T, hidden) in `dtype`
      (after the final norm) instead of logits, for a loss that applies the
      head itself, such as `jlora.models.losses.chunked_cross_entropy`.

  Returns:
    float32 logits (B, T, vocab), or `(logits, new_cache)` given a cache
    (hidden states in place of logits with `return_hidden=True`).

  Example:
    >>> model = LlamaForCausalLM(ModelConfig.from_hf(hf_config))
    >>> x = jnp.zeros((1, 8), jnp.int32)
    >>> params = model.init(jax.random.key(0), x)["params"]
    >>> logits = model.apply({"params": params}, tokens)
    >>> h = model.apply({"params": params}, tokens, return_hidden=True)
  """

  config: ModelConfig
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  scan_layers: bool = False
  remat: str | tuple[str, ...] = "none"
  attention: str = "xla"
  offload: tuple[str, ...] = ()

  def setup(self):
    _check_remat(self.remat, self.offload)
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
      tuple(self.offload),
    )
    if not c.tie_word_embeddings:
      self.lm_head = _dense(
        c, self.dtype, self.param_dtype, c.vocab_size, False
      )

  def __call__(
    self,
    input_ids,
    positions=None,
    attention_mask=None,
    cache=None,
    return_hidden: bool = False,
    segment_ids=None,
  ):
    h, new_cache = self.model(
      input_ids, positions, attention_mask, cache, segment_ids
    )
    if return_hidden:
      if self.is_initializing():
        self.logits(h)  # create the head's parameters all the same
      out = h
    else:
      out = self.logits(h)
    return out if cache is None else (out, new_cache)

  def logits(self, h):
    """float32 logits (..., vocab) of final hidden states (..., hidden)."""
    if self.config.tie_word_embeddings:
      logits = self.model.attend(h)
    else:
      logits = self.lm_head(h)
    return logits.astype(jnp.float32)
