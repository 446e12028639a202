"""How much device memory a LoRA training step takes: `plan_memory`.

A step (`jlora.wrap(model.apply)` with `return_hidden=True`,
`causal_lm_loss`, AdamW, `scan_layers=True`) holds, per device,

  persistent = frozen base + 2 x adapters (values, gradients) + AdamW state
  residuals  = L * B * T * s * (H + widths saved by remat), minus what is
               offloaded to host memory (`offload`, `offload_fraction`)
  rope       = 2 * B * T * head_dim * s per rope table (cos, sin)
  working    = B * T * s * 3H + max(attention, MLP) of the one layer whose
               backward pass runs (plus its dequantized weights for NF4):
                 attention = B * T * s * 5 (N + 2K) D, plus 4.5 float32
                   (N, T, T) scores for "xla" or 4 (N, blk, blk) blocks for
                   "chunked"; none for cuDNN, which keeps softmax stats only
                 MLP = m * B * min(T, mlp_chunk) * s * I

with L layers, T tokens, B rows, s bytes per activation (`dtype`), H hidden,
I intermediate, N query and K key/value heads of D features. The buffer
counts (3, 5, 4.5, 4, m) are what XLA's buffer assignment keeps: m = 8 on
GPU (from the measured 8B bf16 steps of issue 18: 0.5 GiB per 1k tokens at
remat="full", half of it the residual stream) and m = 15 on CPU, whose XLA
keeps float32 copies of the MLP's intermediates; tests/test_models_memory.py
checks the CPU estimate against `compiled.memory_analysis()` within 25%.
An estimate, not a promise: leave a margin (`headroom`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jlora.models import _chunked_attention
from jlora.models.config import ModelConfig

GiB = 2**30
TARGETS = "q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj"
# Buffers of the layer working set, in units of one (B, T, width) activation
# (see the module docstring).
_BASE_BUFFERS = 3  # the layer input, its normed copy, the stream's gradient
_ATTENTION_BUFFERS = 5  # q, k, v, their gradients, the attention output
_XLA_SCORE_BUFFERS = 4.5  # float32 (N, T, T): scores, probabilities, grads
_BLOCK_BUFFERS = 4  # float32 (N, blk, blk) per chunked block: z, p, dp, ds
_MLP_BUFFERS = {"gpu": 8, "cpu": 15}


class MemoryPlan(NamedTuple):
  """One setting's estimate.

  Attributes:
    setting: `CausalLM` fields (remat, offload, offload_fraction, mlp_chunk,
      attention): `dataclasses.replace(model, **plan.setting)`.
    device_bytes: estimated peak bytes per device.
    host_bytes: pinned host bytes of the offloaded residuals.
    parts: device bytes by part (persistent, residuals, rope, working).
    fits: device_bytes (and host_bytes) within the budget, or None without
      a budget.
  """

  setting: dict
  device_bytes: int
  host_bytes: int
  parts: dict
  fits: bool | None


def long_context_settings(attention: str = "cudnn",
                          mlp_chunk: int = 8192) -> tuple[dict, ...]:
  """The settings `plan_memory` compares, roughly fastest first (measure):
  remat presets that keep matmul outputs, then full remat, MLP tiling, half
  and then all of the residual stream in host memory."""
  base = dict(offload=(), offload_fraction=1.0, mlp_chunk=None,
              attention=attention)
  host = ("decoder_input",)
  return (
    dict(base, remat="matmuls"),
    dict(base, remat="attention"),
    dict(base, remat="full"),
    dict(base, remat="full", mlp_chunk=mlp_chunk),
    dict(base, remat="full", offload=host, offload_fraction=0.5,
         mlp_chunk=mlp_chunk),
    dict(base, remat="full", offload=host),
    dict(base, remat="full", offload=host, mlp_chunk=mlp_chunk),
  )


def plan_memory(config: ModelConfig, seq_len: int, *, batch: int = 1,
                device_bytes: float | None = None,
                host_bytes: float | None = None, dtype: Any = jnp.bfloat16,
                quantize: str | None = None, rank: int = 16,
                targets: str = TARGETS,
                settings: Sequence[dict] | None = None,
                backend: str = "gpu", headroom: float = 0.9,
                ) -> list[MemoryPlan]:
  """Estimated per-device bytes of one LoRA training step, per setting.

  Args:
    config: the model's `ModelConfig`.
    seq_len, batch: tokens per row and rows per device.
    device_bytes, host_bytes: the budgets (None: not checked); a plan fits
      when its estimate is under `headroom` times each. On GPUs the host
      budget is also XLA's pinned-memory limit: 64 GB unless
      XLA_PJRT_GPU_HOST_MEMORY_LIMIT_GB says more.
    dtype: the model's dtype and param_dtype.
    quantize: None or a `jlora.quantize` method ("nf4") for the base.
    rank, targets: the adapters (`jlora.apply`).
    settings: dicts of `CausalLM` fields; default `long_context_settings()`.
    backend: "gpu" or "cpu": whose XLA buffer counts to use.

  Returns:
    one `MemoryPlan` per setting, in order; the first that fits is the
    fastest that fits.

  Example:
    >>> plans = plan_memory(cfg, 131072, device_bytes=141e9, quantize="nf4")
    >>> best = next(p for p in plans if p.fits)
    >>> model = dataclasses.replace(model, **best.setting)
  """
  if backend not in _MLP_BUFFERS:
    raise ValueError(f"backend={backend!r}; use one of {tuple(_MLP_BUFFERS)}")
  if settings is None:
    settings = long_context_settings()
  fixed = _persistent(config, dtype, quantize, rank, targets)
  plans = []
  for setting in settings:
    parts, host = _activations(config, seq_len, batch, dtype, quantize,
                               dict(setting), backend)
    parts = dict(persistent=fixed, **parts)
    total = int(sum(parts.values()))
    fits = None
    if device_bytes is not None:
      fits = total <= headroom * device_bytes and (
        host_bytes is None or host <= headroom * host_bytes)
    plans.append(MemoryPlan(dict(setting), total, int(host), parts, fits))
  return plans


def _nbytes(tree) -> int:
  return int(sum(np.prod(x.shape) * np.dtype(x.dtype).itemsize
                 for x in jax.tree.leaves(tree)))


def _persistent(config, dtype, quantize, rank, targets) -> int:
  """Frozen base + adapters and their gradients + AdamW state, from the
  shapes alone (`jax.eval_shape`: nothing is allocated)."""
  import optax

  import jlora
  from jlora.models.decoder import CausalLM

  model = CausalLM(config, dtype, dtype, scan_layers=True)

  def make(key):
    params = model.init(key, jnp.zeros((1, 1), jnp.int32))["params"]
    if quantize:
      params = jlora.quantize(params, quantize, compute_dtype=dtype)
    lora = jlora.apply(params, rank=rank, key=key, targets=targets)
    trainable, frozen = jlora.partition(lora)
    return trainable, frozen, optax.adamw(1e-4).init(trainable)

  trainable, frozen, opt = jax.eval_shape(make, jax.random.key(0))
  return _nbytes(frozen) + 2 * _nbytes(trainable) + _nbytes(opt)


def _widths(c: ModelConfig) -> dict:
  """Features per token of each checkpoint name's value."""
  q, kv = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
  fused_qkv, fused_mlp = c.fused_qkv, c.fused_gate_up
  inter = c.intermediate_size
  return {
    "decoder_input": c.hidden_size,
    "q_proj": 0 if fused_qkv else q,
    "k_proj": 0 if fused_qkv else kv,
    "v_proj": 0 if fused_qkv else kv,
    "qkv_proj": q + 2 * kv if fused_qkv else 0,
    "attention": q,
    "o_proj": c.hidden_size,
    "gate_proj": 0 if fused_mlp else inter,
    "up_proj": 0 if fused_mlp else inter,
    "gate_up_proj": 2 * inter if fused_mlp else 0,
    "down_proj": c.hidden_size,
  }


def _activations(c, t, b, dtype, quantize, setting, backend):
  """(device parts, host bytes) of the activations of one setting."""
  from jlora.models.decoder import _PRESET_SAVES

  s = np.dtype(dtype).itemsize
  remat = setting.get("remat", "full")
  offload = tuple(setting.get("offload", ()))
  fraction = setting.get("offload_fraction", 1.0)
  chunk = setting.get("mlp_chunk")
  attention = setting.get("attention", "cudnn")
  if remat in ("none", "dots"):
    raise ValueError(
      f"remat={remat!r}: the planner models named remat policies; use "
      "'full', 'attention', 'matmuls', ... or a tuple of names"
    )
  saved = _PRESET_SAVES[remat] if isinstance(remat, str) else tuple(remat)
  widths = _widths(c)
  device = host = 0.0
  for name in dict.fromkeys(("decoder_input", *saved, *offload)):
    per_layer = c.num_layers * b * t * widths[name] * s
    if name in offload:
      moved = fraction if name == "decoder_input" else 1.0
      host += per_layer * moved
      device += per_layer * (1 - moved)
    else:
      device += per_layer
  n_ropes = 1 if c.local_rope is None else 2
  rope = 2 * n_ropes * b * t * c.head_dim * s
  heads, kv, d = c.num_heads, c.num_kv_heads, c.head_dim
  attn = _ATTENTION_BUFFERS * b * t * (heads + 2 * kv) * d * s
  if attention == "xla" or (attention == "auto" and backend == "cpu"):
    attn += _XLA_SCORE_BUFFERS * b * heads * t * t * 4
  elif attention == "chunked":
    blk = min(_chunked_attention.DEFAULT_BLOCK, t)
    attn += _BLOCK_BUFFERS * b * heads * blk * blk * 4
  tokens = t if chunk is None else min(t, chunk)
  inter = c.intermediate_size if not c.num_experts else (
    c.num_experts_per_tok * (c.moe_intermediate_size or c.intermediate_size))
  mlp = _MLP_BUFFERS[backend] * b * tokens * inter * s
  working = _BASE_BUFFERS * b * t * c.hidden_size * s + max(attn, mlp)
  if quantize:
    # The layer's kernels dequantized to `dtype` while it runs.
    w = widths
    per_layer = c.hidden_size * (w["q_proj"] + w["k_proj"] + w["v_proj"]
                                 + w["qkv_proj"] + w["attention"]) + (
      3 * c.hidden_size * inter)
    working += per_layer * s
  parts = dict(residuals=int(device), rope=int(rope), working=int(working))
  return parts, host


def format_plans(plans: Sequence[MemoryPlan]) -> str:
  """A table of plans: setting, device GiB, host GiB, fits."""
  rows = [("remat      offload            frac  mlp_chunk  attention  device "
           "GiB  host GiB  fits")]
  for p in plans:
    st = p.setting
    rows.append(
      f"{st.get('remat')!s:10s} {'+'.join(st.get('offload', ())) or '-':18s}"
      f" {st.get('offload_fraction', 1.0):4.2f}  {st.get('mlp_chunk')!s:9s}"
      f"  {st.get('attention', ''):9s}  {p.device_bytes / GiB:10.1f}"
      f"  {p.host_bytes / GiB:8.1f}  {p.fits}")
  return "\n".join(rows)


__all__ = ["MemoryPlan", "format_plans", "long_context_settings",
           "plan_memory"]
