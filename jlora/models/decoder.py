"""One Flax (linen) decoder for every supported family: `CausalLM`.

Llama 2/3, Mistral, Qwen2/2.5, Qwen3, Gemma 2, Gemma 3 (text) and Phi-3 are
the same pre-norm decoder; their differences are fields of `ModelConfig`
(activation, Gemma's (1 + w) norms and sandwich norms, embedding scale,
soft-capping, sliding windows per layer, rope per layer type, q/k norms, fused
projections), read by the modules below.

The parameter tree mirrors transformers' module names, so LoRA targets such as
"q_proj" select the same layers as in PEFT::

    model/embed_tokens/embedding                       (vocab, hidden)
    model/layers/<i>/self_attn/{q,k,v,o}_proj/kernel   (in, out)   [+ bias]
    model/layers/<i>/self_attn/qkv_proj/kernel         Phi-3, in place of q/k/v
    model/layers/<i>/self_attn/{q,k}_norm/scale        (head_dim,) Qwen3, Gemma 3
    model/layers/<i>/mlp/{gate,up,down}_proj/kernel    (in, out)
    model/layers/<i>/mlp/gate_up_proj/kernel           Phi-3, in place of gate/up
    model/layers/<i>/{input,post_attention}_layernorm/scale
    model/layers/<i>/{pre,post}_feedforward_layernorm/scale     Gemma 2/3
    model/norm/scale
    lm_head/kernel                                     (hidden, vocab), untied

With `scan_layers=True` the `<i>` level disappears and every leaf under
`model/layers` gains a leading layer axis:
`model/layers/self_attn/q_proj/kernel` has shape (L, in, out). Layers that
differ (sliding or global attention, local or global rope, a ring or a full KV
cache) read their kind from scanned per-layer integers.

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
from collections.abc import Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.ad_checkpoint import checkpoint_name

from jlora.models import _attention
from jlora.models._moe import SparseMoE, token_mask
from jlora.models._rope import apply_rope, cos_sin
from jlora.models.config import ModelConfig

REMAT_POLICIES = (
  "none", "full", "dots", "attention", "attention+gate", "mlp", "matmuls"
)
# Values tagged with `jax.ad_checkpoint.checkpoint_name` in every decoder layer,
# for `remat` given as names and for `offload`: each projection's output
# (bias included, LoRA update included under `jlora.wrap`; Phi-3's fused
# qkv_proj and gate_up_proj in place of their parts), and the attention output
# before o_proj ("attention"). With a fused attention kernel (cuDNN)
# "attention" instead selects the kernel's own residuals, its output and
# softmax statistics, so that the output is not stored twice. "decoder_input"
# is the layer's input, the residual stream (B, T, hidden), which every remat
# policy keeps; offloading it leaves the device only each layer's working
# set (long context).
CHECKPOINT_NAMES = (
  "decoder_input",
  "q_proj",
  "k_proj",
  "v_proj",
  "qkv_proj",
  "attention",
  "o_proj",
  "gate_proj",
  "up_proj",
  "gate_up_proj",
  "down_proj",
)
_ATTENTION_SAVES = ("q_proj", "k_proj", "v_proj", "qkv_proj", "attention",
                    "o_proj")
# What each named preset saves; everything else in the layer is recomputed in
# the backward pass. A layer's backward needs its projections' inputs (for the
# LoRA factors' gradients) and the attention and gated-MLP inputs, never a
# frozen projection's output as such, so saving these avoids recomputing
# matmuls:
#   "attention": q/k/v/o and attention; the MLP's gate and up are recomputed.
#   "attention+gate": also gate_proj (Phi-3's whole gate_up_proj); up_proj is
#     recomputed.
#   "mlp": gate, up and o_proj (the residual stream after attention);
#     q/k/v and attention are recomputed, the cheapest matmuls per byte kept.
#   "matmuls": also up_proj; only elementwise work (norms, rope, activation)
#     is recomputed. down_proj's output is never needed by the backward pass.
_PRESET_SAVES = {
  "full": (),
  "attention": _ATTENTION_SAVES,
  "attention+gate": _ATTENTION_SAVES + ("gate_proj", "gate_up_proj"),
  "mlp": ("o_proj", "gate_proj", "up_proj", "gate_up_proj"),
  "matmuls": _ATTENTION_SAVES + ("gate_proj", "up_proj", "gate_up_proj"),
}
# The forward primitives of cuDNN fused attention: their outputs (the attention
# output and its softmax statistics) are the backward kernel's residuals.
_ATTENTION_FWD_PRIMITIVES = frozenset(
  {"dot_product_attention_fwd_wrapper", "dot_product_attention_fwd"}
)
ATTENTION_IMPLS = _attention.IMPLS
_ACTIVATIONS = {
  "silu": jax.nn.silu,
  "gelu": functools.partial(jax.nn.gelu, approximate=False),
  "gelu_tanh": functools.partial(jax.nn.gelu, approximate=True),
}


# ----------------------------------------------------------------------------
# KV cache


class KVCache(NamedTuple):
  """Key/value cache for all layers, preallocated to a maximum length.

  Full-attention layers keep every slot; sliding-window layers, when their
  window is shorter than the cache, keep only the last `window` slots in a
  ring buffer (slot s at position s mod window).

  Attributes:
    k, v: (num_full_layers, batch, max_length, num_kv_heads, head_dim), keys
      after rope, of the layers that keep every slot, in layer order.
    index: int32 scalar, the number of slots already written (the next write
      position).
    ring_k, ring_v: (num_window_layers, batch, window, num_kv_heads,
      head_dim) ring buffers of the sliding-window layers, or None.
  """

  k: jax.Array
  v: jax.Array
  index: jax.Array
  ring_k: jax.Array | None = None
  ring_v: jax.Array | None = None


def _ring_window(config: ModelConfig, max_length: int) -> int | None:
  """The ring size when sliding layers need fewer slots than `max_length`."""
  windows = [w for w in config.sliding_windows if w is not None]
  if not windows or max(windows) >= max_length:
    return None
  return max(windows)


def init_cache(model: CausalLM, batch_size: int, max_length: int) -> KVCache:
  """An empty `KVCache` of `max_length` slots per sequence, in `model.dtype`.

  Sliding-window layers get ring buffers of their window instead of
  `max_length` slots when the window is shorter (Mistral, Gemma 2/3, Qwen2
  with sliding layers, Phi-3 with a window).

  Examples:
    >>> cache = init_cache(model, 2, 64)
    >>> logits, cache = model.apply({"params": params}, prompt, cache=cache)
  """
  c = model.config
  ring = _ring_window(c, max_length)
  rows = lambda n, s: jnp.zeros(  # noqa: E731
    (n, batch_size, s, c.num_kv_heads, c.head_dim), model.dtype
  )
  if ring is None:
    full = rows(c.num_layers, max_length)
    return KVCache(full, full, jnp.zeros((), jnp.int32))
  n_ring = sum(w is not None for w in c.sliding_windows)
  full = rows(c.num_layers - n_ring, max_length)
  ring_kv = rows(n_ring, ring)
  return KVCache(full, full, jnp.zeros((), jnp.int32), ring_kv, ring_kv)


# ----------------------------------------------------------------------------
# Per-layer kinds


class _LayerKind(NamedTuple):
  """What sets one layer apart: indices into the decoder's static tables.

  Python ints for unrolled layers (static choices), int32 arrays of shape
  (num_layers,) scanned into traced scalars for `scan_layers`.
  """

  window: Any  # index into _windows(config)
  rope: Any  # index into _ropes(config)
  ring: Any  # 1: ring-buffer cache, 0: full cache
  slot: Any  # the layer's index in its cache stack


def _windows(config: ModelConfig) -> tuple[int | None, ...]:
  """The distinct sliding windows, in order of first use."""
  return tuple(dict.fromkeys(config.sliding_windows))


def _ropes(config: ModelConfig):
  return (config.rope,) if config.local_rope is None else (
    config.rope, config.local_rope
  )


def _layer_kinds(config: ModelConfig, ring: bool) -> list[_LayerKind]:
  windows = _windows(config)
  kinds, counts = [], [0, 0]
  for i, w in enumerate(config.sliding_windows):
    in_ring = int(ring and w is not None)
    kinds.append(
      _LayerKind(
        windows.index(w),
        int(config.layer_rope(i) is not config.rope),
        in_ring,
        counts[in_ring],
      )
    )
    counts[in_ring] += 1
  return kinds


def _pick(table, index):
  """table[index] for a static or traced index."""
  if isinstance(index, (int, np.integer)):
    return table[int(index)]
  return jnp.asarray(table)[index]


class _Context(NamedTuple):
  """Per-call values every layer reads (broadcast over scanned layers)."""

  cos: jax.Array  # (ropes, B, T, rotary_dim)
  sin: jax.Array
  q_slots: jax.Array  # (T,) cache slots of this call's tokens
  kv_valid: jax.Array | None  # (B, S) real tokens; None: plain causal
  segment_ids: jax.Array | None  # (B, T) packed documents
  index: jax.Array  # first slot written by this call


# ----------------------------------------------------------------------------
# Layers


class RMSNorm(nn.Module):
  """y = (offset + scale) * x / sqrt(mean(x^2) + eps), the mean in float32.

  offset 0 matches transformers' LlamaRMSNorm (normalise in float32, cast to
  `dtype`, then scale; `scale` starts at 1); offset 1 matches Gemma's
  (multiply by 1 + scale in float32, then cast; `scale` starts at 0).
  """

  eps: float
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  offset: float = 0.0

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    init = nn.initializers.ones if self.offset == 0 else nn.initializers.zeros
    scale = self.param("scale", init, (x.shape[-1],), self.param_dtype)
    return _rms_norm(x, scale, self.eps, self.offset, self.dtype)


def _rms_norm_math(x, scale, eps, offset, dtype):
  x32 = x.astype(jnp.float32)
  var = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
  y = x32 * checkpoint_name(lax.rsqrt(var + eps), "rms_norm_rstd")
  if offset:
    return (y * (offset + scale.astype(jnp.float32))).astype(dtype)
  return scale.astype(dtype) * y.astype(dtype)


# The backward pass of the norm keeps its input x (in the model's dtype) and
# the per-token 1 / rms (float32, one value per row), and recomputes the
# float32 products: plain autodiff would keep float32 copies of x and of the
# normalised x, each twice a bf16 row, for every norm of the sequence.
_rms_norm = jax.checkpoint(
  _rms_norm_math,
  policy=jax.checkpoint_policies.save_only_these_names("rms_norm_rstd"),
  prevent_cse=False,
  static_argnums=(2, 3, 4),
)


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


class _Sub(nn.Module):
  """Fields shared by the modules inside a decoder layer."""

  config: ModelConfig
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def norm(self, name: str):
    c = self.config
    return RMSNorm(c.rms_norm_eps, self.dtype, self.param_dtype,
                   c.norm_offset, name=name)

  def dense(self, features: int, use_bias: bool, name: str):
    return _named_dense(self.config, self.dtype, self.param_dtype, features,
                        use_bias, name)


class Attention(_Sub):
  """Grouped-query self-attention: rope, optional q/k norms, soft-capping,
  sliding windows, KV cache (full or ring buffer)."""

  attention: str = "xla"

  @nn.compact
  def __call__(self, x, kind: _LayerKind, ctx: _Context, cache):
    c = self.config
    b, t, _ = x.shape
    n, kv, d = c.num_heads, c.num_kv_heads, c.head_dim
    if c.fused_qkv:
      qkv = self.dense((n + 2 * kv) * d, c.qkv_bias, "qkv_proj")(x)
      q, k, v = jnp.split(qkv, [n * d, (n + kv) * d], axis=-1)
    else:
      q = self.dense(n * d, c.qkv_bias, "q_proj")(x)
      k = self.dense(kv * d, c.qkv_bias, "k_proj")(x)
      v = self.dense(kv * d, c.qkv_bias, "v_proj")(x)
    q = q.reshape(b, t, n, d)
    k = k.reshape(b, t, kv, d)
    v = v.reshape(b, t, kv, d)
    if c.qk_norm:
      q = self.norm("q_norm")(q)
      k = self.norm("k_norm")(k)
    cos, sin = _pick(ctx.cos, kind.rope), _pick(ctx.sin, kind.rope)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    windows = _windows(c)
    window = _pick([_attention.window_value(w) for w in windows], kind.window)
    attend = functools.partial(
      _attention.attend,
      impl=self.attention,
      window=None,
      scale=c.attention_scale,
      softcap=c.attn_softcap,
    )
    if cache is None:
      if ctx.kv_valid is None:
        out = _attention.causal(
          q, k, v, impl=self.attention, windows=windows, kind=kind.window,
          scale=c.attention_scale, softcap=c.attn_softcap,
        )
      elif self.attention == "chunked":
        # Padding and packed documents as segment ids (0: sees nothing), so
        # that no (T, T) mask exists either.
        seg = 1 if ctx.segment_ids is None else ctx.segment_ids
        seg = jnp.where(ctx.kv_valid, seg, 0)
        out = _attention.chunked(q, k, v, window=window, segment_ids=seg,
                                 scale=c.attention_scale,
                                 softcap=c.attn_softcap)
      else:
        mask = _attention.slot_mask(
          ctx.q_slots, ctx.q_slots, window, ctx.kv_valid, ctx.segment_ids
        )
        out = attend(q, k, v, mask=mask)
    else:
      out, cache = _cached(attend, q, k, v, cache, kind, ctx, window)
    out = out.reshape(b, t, n * d)
    return self.dense(c.hidden_size, c.o_bias, "o_proj")(out), cache


def _cached(attend, q, k, v, cache, kind: _LayerKind, ctx: _Context, window):
  """Attention through this layer's cache; returns (out, updated cache).

  cache = (k, v, ring_k, ring_v) stacks (ring_* None without ring buffers).
  """
  k_all, ring_k = cache[0], cache[2]

  def full(q, k, v, cache):
    # Write this call's keys/values at slot `index` of this layer, then attend
    # over all slots.
    k_all, v_all, ring_k, ring_v = cache
    start = (kind.slot, 0, ctx.index, 0, 0)
    k_all = lax.dynamic_update_slice(k_all, k[None].astype(k_all.dtype), start)
    v_all = lax.dynamic_update_slice(v_all, v[None].astype(v_all.dtype), start)
    keys = lax.dynamic_index_in_dim(k_all, kind.slot, 0, keepdims=False)
    vals = lax.dynamic_index_in_dim(v_all, kind.slot, 0, keepdims=False)
    slots = jnp.arange(keys.shape[1])
    mask = _attention.slot_mask(ctx.q_slots, slots, window, ctx.kv_valid)
    out = attend(q, keys.astype(q.dtype), vals.astype(q.dtype), mask=mask)
    return out, (k_all, v_all, ring_k, ring_v)

  def ring(q, k, v, cache):
    # Attend over the ring's current contents plus this call's keys (all of
    # them, so a prompt longer than the window still sees its own window),
    # then keep the last `window` slots. Ring position r holds the latest
    # slot s < index with s = r (mod W), if any.
    k_all, v_all, ring_k, ring_v = cache
    rk = lax.dynamic_index_in_dim(ring_k, kind.slot, 0, keepdims=False)
    rv = lax.dynamic_index_in_dim(ring_v, kind.slot, 0, keepdims=False)
    size, t = rk.shape[1], k.shape[1]
    index = ctx.index
    held = index - 1 - jnp.mod(index - 1 - jnp.arange(size), size)
    slots = jnp.concatenate([held, ctx.q_slots])
    valid = (slots >= 0) & jnp.take(
      ctx.kv_valid, jnp.clip(slots, 0, ctx.kv_valid.shape[1] - 1), axis=1
    )
    mask = _attention.slot_mask(ctx.q_slots, slots, window, valid)
    keys = jnp.concatenate([rk.astype(q.dtype), k], axis=1)
    vals = jnp.concatenate([rv.astype(q.dtype), v], axis=1)
    out = attend(q, keys, vals, mask=mask)
    keep = min(t, size)
    where = (ctx.q_slots[t - keep:]) % size
    rk = rk.at[:, where].set(k[:, t - keep:].astype(rk.dtype))
    rv = rv.at[:, where].set(v[:, t - keep:].astype(rv.dtype))
    ring_k = lax.dynamic_update_index_in_dim(ring_k, rk, kind.slot, 0)
    ring_v = lax.dynamic_update_index_in_dim(ring_v, rv, kind.slot, 0)
    return out, (k_all, v_all, ring_k, ring_v)

  if ring_k is None:
    return full(q, k, v, cache)
  if k_all.shape[0] == 0:  # every layer slides: all in rings
    return ring(q, k, v, cache)
  if isinstance(kind.ring, (int, np.integer)):
    return (ring if kind.ring else full)(q, k, v, cache)
  return lax.cond(kind.ring == 1, ring, full, q, k, v, cache)


class MLP(_Sub):
  """Gated MLP: down_proj(act(gate_proj(x)) * up_proj(x)); SwiGLU with silu,
  GeGLU with gelu. Phi-3 computes gate and up as one gate_up_proj.

  With `chunk`, sequences longer than `chunk` tokens run `chunk` tokens at a
  time (`_over_token_chunks`): the (tokens, intermediate) activations, LoRA
  products included, exist for one chunk at a time, in the forward and the
  backward pass.
  """

  chunk: int | None = None

  def __call__(self, x):
    if (self.chunk is not None and x.shape[1] > self.chunk
        and not self.is_initializing()):
      return _over_token_chunks(MLP.gated, self, x, self.chunk)
    return self.gated(x)

  @nn.compact
  def gated(self, x):
    c = self.config
    inner = c.intermediate_size
    if c.fused_gate_up:
      gate_up = self.dense(2 * inner, c.mlp_bias, "gate_up_proj")(x)
      gate, up = jnp.split(gate_up, 2, axis=-1)
    else:
      gate = self.dense(inner, c.mlp_bias, "gate_proj")(x)
      up = self.dense(inner, c.mlp_bias, "up_proj")(x)
    act = _ACTIVATIONS[c.hidden_act]
    return self.dense(c.hidden_size, c.mlp_bias, "down_proj")(act(gate) * up)


def _over_token_chunks(fn, module, x, chunk: int):
  """fn(module, x) for a token-wise fn, `chunk` tokens of x (B, T, H) at a
  time: a scan over chunks whose body is rematerialised, so the backward
  pass keeps only each chunk's input (a slice of x) and recomputes the
  chunk's intermediates there. T need not divide by `chunk` (the last chunk
  is padded; padded rows are dropped).
  """
  b, t, _ = x.shape
  n = -(-t // chunk)
  if n * chunk != t:
    x = jnp.pad(x, ((0, 0), (0, n * chunk - t), (0, 0)))
  xs = jnp.moveaxis(x.reshape(b, n, chunk, x.shape[-1]), 1, 0)
  body = nn.remat(
    lambda mdl, carry, xc: (carry, fn(mdl, xc)),
    policy=jax.checkpoint_policies.nothing_saveable,
    prevent_cse=False,
  )
  scan = nn.scan(body, variable_broadcast="params",
                 split_rngs={"params": False}, length=n)
  _, ys = scan(module, None, xs)
  ys = jnp.moveaxis(ys, 0, 1).reshape(b, n * chunk, ys.shape[-1])
  return ys[:, :t]


def _name_layer_input(h, on_device: int):
  """Tags a layer's input "decoder_input" for remat policies and offload.

  With `on_device` > 0 (a partial offload) only the trailing features carry
  that name; the leading `on_device` ones are tagged "decoder_input_kept",
  which `_SaveNames` keeps on the device. The layer reads the two parts
  joined again, so the backward pass needs the parts, not the input.
  """
  if not on_device:
    return checkpoint_name(h, "decoder_input")
  kept = checkpoint_name(h[..., :on_device], "decoder_input_kept")
  moved = checkpoint_name(h[..., on_device:], "decoder_input")
  return jnp.concatenate([kept, moved], axis=-1)


class DecoderLayer(_Sub):
  """Pre-norm decoder block, in the (carry, xs) form `nn.scan` expects.

  carry = (hidden (B, T, H), cache stacks or None); xs = this layer's
  `_LayerKind` (traced under scan; `kind` holds it statically when unrolled);
  ctx = the call's `_Context`, shared by all layers.

  Sandwich norms (Gemma): h += post_attention_layernorm(attn(input_layernorm(
  h))); h += post_feedforward_layernorm(mlp(pre_feedforward_layernorm(h))).
  Otherwise h += attn(input_layernorm(h)); h += mlp(post_attention_layernorm(
  h)).
  """

  attention: str = "xla"
  kind: _LayerKind | None = None
  mlp_chunk: int | None = None
  # Leading features of the layer input kept on the device when the rest is
  # offloaded (CausalLM.offload_fraction < 1); 0: the input is one value.
  input_on_device: int = 0

  @nn.compact
  def __call__(self, carry, xs, ctx: _Context):
    c = self.config
    h, cache = carry
    h = _name_layer_input(h, self.input_on_device)
    kind = self.kind if self.kind is not None else xs
    attn_out, cache = Attention(
      c, self.dtype, self.param_dtype, self.attention, name="self_attn"
    )(self.norm("input_layernorm")(h), kind, ctx, cache)
    if c.num_experts:  # Mixture of experts: jlora/models/_moe.py
      mlp = functools.partial(
        SparseMoE(c, self.dtype, self.param_dtype, name="mlp"),
        valid=token_mask(ctx),
      )
    else:
      mlp = MLP(c, self.dtype, self.param_dtype, self.mlp_chunk, name="mlp")
    if c.sandwich_norms:
      h = h + self.norm("post_attention_layernorm")(attn_out)
      out = mlp(self.norm("pre_feedforward_layernorm")(h))
      h = h + self.norm("post_feedforward_layernorm")(out)
    else:
      h = h + attn_out
      h = h + mlp(self.norm("post_attention_layernorm")(h))
    return (h, cache), None


class _LayerStack(nn.Module):
  """Unrolled layers named "0", "1", ... like transformers' `layers` list;
  each layer's kind is a static attribute."""

  layer: Any
  config: ModelConfig

  @nn.compact
  def __call__(self, carry, xs, ctx):
    stacks = carry[1]
    ring = stacks is not None and stacks[2] is not None
    for i, kind in enumerate(_layer_kinds(self.config, ring)):
      carry, _ = self.layer(name=str(i), kind=kind)(carry, None, ctx)
    return carry, None


# ----------------------------------------------------------------------------
# Rematerialisation


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
    if name in self.save or name == "decoder_input_kept":
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


_MLP_NAMES = ("gate_proj", "up_proj", "gate_up_proj", "down_proj")


def _check_long_context(opts) -> None:
  """Checks `mlp_chunk` and `offload_fraction` against the remat setting."""
  chunk = opts.mlp_chunk
  if chunk is not None:
    if not isinstance(chunk, (int, np.integer)) or chunk < 1:
      raise ValueError(
        f"mlp_chunk={chunk!r}; use a positive number of tokens (e.g. 8192) "
        "or None for the whole sequence at once"
      )
    if opts.remat == "dots":
      saved = ("every matmul output",)
    else:
      names = (_PRESET_SAVES.get(opts.remat, ()) if isinstance(opts.remat, str)
               else tuple(opts.remat))
      saved = tuple(n for n in (*names, *opts.offload) if n in _MLP_NAMES)
    if saved:
      raise ValueError(
        f"mlp_chunk={chunk} recomputes the MLP chunk by chunk in the backward "
        f"pass, but remat={opts.remat!r} / offload={tuple(opts.offload)!r} "
        f"keeps {list(saved)} for the whole sequence; use remat='full', "
        "'attention' or names without MLP projections with mlp_chunk"
      )
  fraction = opts.offload_fraction
  if not 0 < fraction <= 1:
    raise ValueError(
      f"offload_fraction={fraction!r}; use a share in (0, 1] of the layer "
      "input's features to keep in host memory"
    )
  if fraction < 1 and "decoder_input" not in opts.offload:
    raise ValueError(
      f"offload_fraction={fraction} applies to the offloaded layer input, "
      f"but offload={tuple(opts.offload)!r} does not name 'decoder_input'; add "
      "it (offload=('decoder_input',)) or leave offload_fraction at 1.0"
    )


def _input_on_device(opts) -> int:
  """Leading layer-input features kept on the device when only
  `offload_fraction` of the input goes to host memory (0: no split).

  The host share is rounded to whole 128-feature tiles on hidden sizes that
  have them, so both parts keep the GPU's preferred layout.
  """
  hidden = opts.config.hidden_size
  if "decoder_input" not in opts.offload or opts.offload_fraction >= 1:
    return 0
  unit = 128 if hidden % 128 == 0 and hidden >= 1024 else 1
  moved = int(round(hidden * opts.offload_fraction / unit)) * unit
  moved = min(max(moved, unit), hidden)
  return hidden - moved


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


# ----------------------------------------------------------------------------
# Packing


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


# ----------------------------------------------------------------------------
# The model


class _Options(nn.Module):
  """The fields of `CausalLM`, shared with its decoder (`model`)."""

  config: ModelConfig
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  scan_layers: bool = False
  remat: str | tuple[str, ...] = "none"
  attention: str = "xla"
  offload: tuple[str, ...] = ()
  mlp_chunk: int | None = None
  offload_fraction: float = 1.0

  def options(self) -> dict:
    return {f.name: getattr(self, f.name) for f in dataclasses.fields(_Options)
            if f.name not in ("parent", "name")}


class Decoder(_Options):
  """Embedding, decoder layers and final norm (transformers' `model`)."""

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
    args = (c, self.dtype, self.param_dtype, self.attention)
    kwargs = dict(mlp_chunk=self.mlp_chunk,
                  input_on_device=_input_on_device(self))
    if self.scan_layers:
      self.layers = nn.scan(
        layer_cls,
        # "intermediates": per-layer values sown (MoE routing statistics).
        variable_axes={"params": 0, "intermediates": 0},
        split_rngs={"params": True},
        in_axes=(0, nn.broadcast),
        length=c.num_layers,
      )(*args, **kwargs)
    else:
      self.layers = _LayerStack(functools.partial(layer_cls, *args, **kwargs),
                                c)
    self.norm = RMSNorm(c.rms_norm_eps, self.dtype, self.param_dtype,
                        c.norm_offset)

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
      _check_cache(c, cache)
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
    if attention_mask is None and cache is None:
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
    angles = [
      cos_sin(r, c.head_dim, c.max_position_embeddings, positions)
      for r in _ropes(c)
    ]
    # cos and sin in the activations' dtype: `apply_rope` rounds them to it
    # anyway, and every layer's backward pass keeps them.
    ctx = _Context(
      jnp.stack([a[0] for a in angles]).astype(self.dtype),
      jnp.stack([a[1] for a in angles]).astype(self.dtype),
      q_slots,
      kv_valid,
      segment_ids,
      index,
    )
    h = self.embed_tokens(input_ids)
    if c.embed_scale is not None:
      # transformers rounds the scale to the weights' dtype (bf16: sqrt(3584)
      # = 59.87 becomes 60.0).
      h = h * jnp.asarray(c.embed_scale, self.param_dtype).astype(h.dtype)
    ring = cache is not None and cache.ring_k is not None
    stacks = None if cache is None else (cache.k, cache.v, cache.ring_k,
                                         cache.ring_v)
    kinds = _layer_kinds(c, ring)
    xs = _LayerKind(*(jnp.asarray(f, jnp.int32) for f in zip(*kinds)))
    (h, stacks), _ = self.layers((h, stacks), xs, ctx)
    h = self.norm(h)
    if cache is not None:
      cache = KVCache(stacks[0], stacks[1], index + t, stacks[2], stacks[3])
    return h, cache

  def attend(self, h):
    """Logits against the input embedding (tied weights): h @ embedding.T."""
    return self.embed_tokens.attend(h)


def _check_cache(config: ModelConfig, cache: KVCache) -> None:
  ring = _ring_window(config, cache.k.shape[2])
  got = None if cache.ring_k is None else cache.ring_k.shape[2]
  if got != ring:
    raise ValueError(
      f"the cache's ring buffers hold {got} slots but this model's sliding "
      f"windows need {ring} at max_length {cache.k.shape[2]}; build the cache "
      "with jlora.models.init_cache(model, batch, max_length)"
    )


class CausalLM(_Options):
  """A decoder-only causal LM (any supported family) whose parameter tree
  mirrors transformers' names.

  Attributes:
    config: the architecture (`ModelConfig.from_hf(hf_config)`).
    dtype: computation dtype (activations, matmuls). RMSNorm statistics and the
      attention softmax are always float32, as in transformers.
    param_dtype: dtype of the parameters created by `init`.
    scan_layers: one `nn.scan` over layers (parameters stacked with a leading
      layer axis); faster compiles for deep models. Layers that differ
      (sliding or global, local or global rope) read their kind from scanned
      integers.
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
        only norms, rope and the activation;
      or a tuple of names from `CHECKPOINT_NAMES` to keep. Phi-3's fused
      qkv_proj and gate_up_proj are kept wherever their parts would be.
      See `benchmarks/RESULTS.md` for their memory and speed at 1B and 8B.
    attention: "xla" (explicit float32 softmax; any backend), "cudnn" (fused
      cuDNN kernel; GPU, bf16/fp16 only) or "auto"
      (`jax.nn.dot_product_attention`'s own choice). Without padding mask,
      segment ids or cache (training on full-length rows), cuDNN and "auto"
      get `is_causal=True` and the layer's window instead of an explicit mask
      (scanned layers with different windows select one kernel per window
      with `lax.switch`). Otherwise (padding, packed documents, decoding)
      they get the (B, 1, T, S) mask, which `jax.nn.dot_product_attention`
      hands to cuDNN as an additive bias: exact, but the kernel reads the
      bias instead of skipping masked blocks. (cuDNN's own packed layout,
      q/kv offsets, is not public API in jax 0.10/0.11.) cuDNN has no
      attention soft-capping: Gemma 2 (attn_softcap) raises with "cudnn" and
      takes the XLA path with "auto". "chunked": flash attention written in
      XLA (`jlora.models._chunked_attention`), blocks of queries against
      blocks of keys with an online softmax and a recomputing backward pass:
      memory linear in sequence length on any backend and dtype, with
      windows, soft-capping, padding and packed documents (no (T, T) mask
      either); decoding through a KV cache takes the "xla" path.
    offload: names from `CHECKPOINT_NAMES` to keep in pinned host memory
      instead of recomputing them (needs a named `remat`, not "none"/"dots";
      pays only where host transfers hide behind compute, which they did not
      at the 8B shape on an H100: 41% slower than keeping them on the GPU).
      offload=("decoder_input",) with remat="full" moves the residual
      stream, the one value a full-remat step keeps per token and layer, to
      the host: the long-context setting (`plan_memory` estimates it). On
      GPUs, XLA pins at most 64 GB of host memory unless
      XLA_PJRT_GPU_HOST_MEMORY_LIMIT_GB is set higher before JAX starts.
    mlp_chunk: run the MLP (its LoRA products included) `mlp_chunk` tokens
      at a time, forward and backward, so its (T, intermediate) activations
      exist for one chunk only; None: the whole sequence at once. Needs a
      remat that keeps no MLP projection ("full", "attention", or names).
    offload_fraction: with offload=("decoder_input", ...), the share of the
      layer input's features that goes to host memory (rounded to 128
      features); the rest stays on the device, for when the host link cannot
      hide the whole copy. 1.0: all of it.

  Call arguments (`model.apply({"params": p}, input_ids, ...)`):
    input_ids: (B, T) int tokens.
    positions: (B, T) int rope positions; default `cache.index + arange(T)`
      (with `segment_ids`: restarting at 0 per document).
    attention_mask: (B, S), 1 for real tokens; S = T without a cache, the
      cache's max_length with one. Causality and sliding windows apply to
      slots (cache positions), as in transformers.
    cache: a `KVCache` from `init_cache`; this call's keys/values are written
      at `cache.index` (the caller keeps index + T <= max_length).
    return_hidden: return the final hidden states (B, T, hidden) in `dtype`
      (after the final norm) instead of logits, for a loss that applies the
      head itself: `jlora.models.losses.causal_lm_loss` (which applies the
      final soft-cap too) or `chunked_cross_entropy`.
    segment_ids: (B, T) int documents packed in each row: 0 = padding, 1, 2,
      ... one id per document, each document a contiguous run. A token
      attends only to earlier tokens of its own document (on every attention
      path: the mask goes to cuDNN as a bias, see `attention`); padding
      attends to nothing and its outputs are meaningless (mask them out of the
      loss). `positions` default to restarting at 0 per document
      (`document_positions`). Not with a cache.

  Returns:
    float32 logits (B, T, vocab) (soft-capped when `config.final_softcap`),
    or `(logits, new_cache)` given a cache (hidden states in place of logits
    with `return_hidden=True`).

  Examples:
    >>> model = CausalLM(ModelConfig.from_hf(hf_config))
    >>> x = jnp.zeros((1, 8), jnp.int32)
    >>> params = model.init(jax.random.key(0), x)["params"]
    >>> logits = model.apply({"params": params}, tokens)
  """

  def setup(self):
    _check_remat(self.remat, self.offload)
    _check_long_context(self)
    c = self.config
    if self.attention not in ATTENTION_IMPLS:
      raise ValueError(
        f"attention={self.attention!r}; choose one of {ATTENTION_IMPLS}"
      )
    if self.attention == "cudnn" and c.attn_softcap is not None:
      raise ValueError(
        f"attention='cudnn' has no logit soft-capping, which this model "
        f"({c.model_type}: attn_softcap={c.attn_softcap}) needs; use "
        "attention='xla' (or 'auto', which takes the XLA path for it)"
      )
    self.model = Decoder(**{**self.options(), "offload": tuple(self.offload)})
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
    """float32 logits (..., vocab) of final hidden states (..., hidden),
    soft-capped (c * tanh(z / c)) when `config.final_softcap` is set."""
    if self.config.tie_word_embeddings:
      logits = self.model.attend(h)
    else:
      logits = self.lm_head(h)
    logits = logits.astype(jnp.float32)
    cap = self.config.final_softcap
    return logits if cap is None else cap * jnp.tanh(logits / cap)


# The name under which the Llama-only version of this module was published.
LlamaForCausalLM = CausalLM
