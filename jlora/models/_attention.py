"""Attention kernels and masks of the decoder: XLA, cuDNN, soft-capping.

Paths (`impl`):
  "xla"    explicit float32 scores and softmax; any mask, window and
           soft-cap; any backend.
  "cudnn"  cuDNN's fused kernel through `jax.nn.dot_product_attention`
           (bf16/fp16 on an NVIDIA GPU). Plain causal rows get `is_causal`
           and the window as `local_window_size` (the kernel skips masked
           blocks); padding, packed documents and caches send the mask, which
           JAX hands to cuDNN as an additive bias. cuDNN has no logit
           soft-capping: a soft-capped model (Gemma 2) raises at setup.
  "auto"   `jax.nn.dot_product_attention`'s own choice; soft-capped models
           take the "xla" path.
  "chunked" flash attention written in XLA (`_chunked_attention`): causal
           rows in blocks, memory linear in sequence length, any backend and
           dtype, windows, soft-capping, padding and packed documents (as
           segment ids, `chunked`); calls through a KV cache (decoding) take
           the "xla" path.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.ad_checkpoint import checkpoint_name

from jlora.models._chunked_attention import causal_attention

IMPLS = ("xla", "cudnn", "auto", "chunked")
# "No window" as a number: larger than any slot distance.
NO_WINDOW = int(np.iinfo(np.int32).max)


def window_value(window: int | None) -> int:
  return NO_WINDOW if window is None else int(window)


def slot_mask(q_slots, kv_slots, window, kv_valid, segment_ids=None):
  """(B, T, S) bool: which key slots each query may attend to.

  Query slot t sees key slot s when 0 <= t - s < window (causal, sliding;
  transformers masks by slot, not by rope position) and s holds a real token
  (`kv_valid` (B, S)); for packed rows (segment_ids (B, T), T == S) both must
  also belong to the same document (0 marks padding, which sees nothing).
  `window` may be traced (a scanned layer's).
  """
  dist = q_slots[:, None] - kv_slots[None, :]
  mask = ((dist >= 0) & (dist < window))[None] & kv_valid[:, None, :]
  if segment_ids is not None:
    mask = mask & (segment_ids[:, :, None] == segment_ids[:, None, :])
  return mask


def _xla(q, k, v, mask, scale, softcap):
  """q (B,T,N,D), k/v (B,S,K,D), mask (B|1,T,S) -> (B,T,N,D)."""
  b, t, n, d = q.shape
  kv_heads = k.shape[2]
  # Grouped-query: the n // kv_heads query heads of a group share one k/v head.
  q = q.reshape(b, t, kv_heads, n // kv_heads, d)
  scores = jnp.einsum(
    "btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32
  )
  scores = scores * scale
  if softcap is not None:
    scores = softcap * jnp.tanh(scores / softcap)
  # A finite minimum keeps fully masked rows (padding queries) NaN-free.
  scores = jnp.where(mask[:, None, None], scores, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
  out = jnp.einsum("bkgts,bskd->btkgd", probs, v)
  return out.reshape(b, t, n, d)


def attend(q, k, v, *, mask, impl, window, scale, softcap):
  """Softmax attention of q (B,T,N,D) over k/v (B,S,K,D).

  mask: (B, T, S) bool, or None for plain causal attention over T == S slots
  (no padding, packing or cache) with sliding `window` (static int or None).
  scale multiplies q . k; softcap (or None) caps the scaled scores at
  softcap * tanh(s / softcap).
  """
  if impl == "chunked" and mask is None:
    return chunked(q, k, v, window=window_value(window), scale=scale,
                   softcap=softcap)
  if impl in ("xla", "chunked") or softcap is not None:
    if mask is None:
      t, s = q.shape[1], k.shape[1]
      mask = slot_mask(
        jnp.arange(t), jnp.arange(s), window_value(window),
        jnp.ones((1, s), bool),
      )
    out = _xla(q, k, v, mask, scale, softcap)
    return checkpoint_name(out, "attention")
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
      scale=scale,
      is_causal=True,
      local_window_size=None if window is None else (window - 1, 0),
      implementation=implementation,
    )
  return jax.nn.dot_product_attention(
    q, k, v, mask=mask[:, None], scale=scale, implementation=implementation
  )


def chunked(q, k, v, *, window, scale, softcap, segment_ids=None):
  """The "chunked" path: `causal_attention` with its output named
  "attention" for remat policies. `window` an int or a traced int32;
  `segment_ids` (B, T) int or None (0: padding, sees nothing, outputs 0)."""
  out = causal_attention(q, k, v, scale=scale, window=window, softcap=softcap,
                         segment_ids=segment_ids)
  return checkpoint_name(out, "attention")


def causal(q, k, v, *, impl, windows, kind, scale, softcap):
  """Plain causal attention (no mask) for a layer whose window is
  `windows[kind]`: `kind` a Python int (unrolled layers) or a traced int32
  (scanned layers).

  The XLA path builds its (T, S) mask from the (possibly traced) window. The
  fused paths need the window statically, so a traced `kind` selects among
  one branch per distinct window (`lax.switch`; one runs).
  """
  if isinstance(kind, (int, np.integer)) or len(windows) == 1:
    window = windows[0 if len(windows) == 1 else int(kind)]
    return attend(q, k, v, mask=None, impl=impl, window=window, scale=scale,
                  softcap=softcap)
  if impl == "chunked":
    values = jnp.asarray([window_value(w) for w in windows], jnp.int32)
    return chunked(q, k, v, window=values[kind], scale=scale, softcap=softcap)
  if impl == "xla" or softcap is not None:
    t, s = q.shape[1], k.shape[1]
    values = jnp.asarray([window_value(w) for w in windows], jnp.int32)
    mask = slot_mask(jnp.arange(t), jnp.arange(s), values[kind],
                     jnp.ones((1, s), bool))
    return attend(q, k, v, mask=mask, impl=impl, window=None, scale=scale,
                  softcap=softcap)
  branches = [
    lambda q, k, v, w=w: attend(q, k, v, mask=None, impl=impl, window=w,
                                scale=scale, softcap=softcap)
    for w in windows
  ]
  return lax.switch(kind, branches, q, k, v)
