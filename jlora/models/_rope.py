"""Rotary position embeddings: frequencies per rope type, cos/sin, rotation.

Rope types follow transformers' `modeling_rope_utils`: "default", "linear",
"dynamic" (NTK), "llama3" and "longrope" (Phi-3's su/LongRoPE scaling).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from jlora.models.config import RopeConfig


def rotary_dim(rope: RopeConfig, head_dim: int) -> int:
  """Leading dims of each head that rope rotates (partial rotary factor)."""
  return int(head_dim * rope.partial_rotary_factor)


def _inv_freq(rope: RopeConfig, dim: int) -> np.ndarray:
  """Inverse frequencies theta^(-2i/d), rescaled for "linear"/"llama3" (f32)."""
  inv = 1.0 / rope.theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
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


def longrope_attention_factor(rope: RopeConfig) -> float:
  """LongRoPE's cos/sin multiplier: given, or sqrt(1 + ln s / ln L0) for
  s = `factor` > 1 (L0 = original_max_position_embeddings)."""
  if rope.attention_factor is not None:
    return rope.attention_factor
  if rope.factor <= 1.0:
    return 1.0
  old = rope.original_max_position_embeddings
  return math.sqrt(1 + math.log(rope.factor) / math.log(old))


def cos_sin(
  rope: RopeConfig, head_dim: int, max_pos: int, positions: jax.Array
) -> tuple[jax.Array, jax.Array]:
  """cos, sin (B, T, rotary_dim) f32 of the rotary angles of `positions`.

  "dynamic" (NTK) rope grows the base with the largest position of the call,

    theta' = theta * (factor * n / max_pos - (factor - 1)) ** (d / (d - 2)),
    n = max(positions) + 1,

  and equals default rope while n <= max_position_embeddings. "longrope"
  divides each frequency by `long_factor` when n exceeds
  original_max_position_embeddings and by `short_factor` otherwise, and scales
  cos and sin by `longrope_attention_factor`; both as transformers does, per
  call.
  """
  d = rotary_dim(rope, head_dim)
  exponents = jnp.arange(0, d, 2, dtype=jnp.float32) / d
  scale = 1.0
  if rope.rope_type == "dynamic":
    n = jnp.maximum(jnp.max(positions) + 1, max_pos).astype(jnp.float32)
    base = rope.theta * ((rope.factor * n / max_pos) - (rope.factor - 1)) ** (
      d / (d - 2)
    )
    inv = 1.0 / base**exponents
  elif rope.rope_type == "longrope":
    n = jnp.max(positions) + 1
    ext = jnp.where(
      n > rope.original_max_position_embeddings,
      jnp.asarray(rope.long_factor, jnp.float32),
      jnp.asarray(rope.short_factor, jnp.float32),
    )
    inv = 1.0 / (ext * np.float32(rope.theta) ** exponents)
    scale = longrope_attention_factor(rope)
  else:
    inv = jnp.asarray(_inv_freq(rope, d))
  angles = positions.astype(jnp.float32)[..., None] * inv
  angles = jnp.concatenate([angles, angles], axis=-1)
  return jnp.cos(angles) * scale, jnp.sin(angles) * scale


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """x * cos + rotate_half(x) * sin on the leading cos.shape[-1] dims of each
  head (the rest pass through); x (B, T, heads, D), cos/sin (B, T, d)."""
  d = cos.shape[-1]
  cos = cos[:, :, None, :].astype(x.dtype)
  sin = sin[:, :, None, :].astype(x.dtype)
  rot, rest = x[..., :d], x[..., d:]
  half = d // 2
  rotated = jnp.concatenate([-rot[..., half:], rot[..., :half]], axis=-1)
  out = rot * cos + rotated * sin
  return out if rest.shape[-1] == 0 else jnp.concatenate([out, rest], -1)
