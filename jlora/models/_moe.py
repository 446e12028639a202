"""Sparse Mixture-of-Experts feed-forward block (Mixtral, Qwen3-MoE).

Each token picks `k` of `E` experts (SwiGLU MLPs) from a linear router; the
block sorts the (token, expert) pairs by expert and runs every expert's
projections as one grouped GEMM, `jax.lax.ragged_dot`, over the sorted rows:

    probs      = softmax(x @ router)                      (N, E), float32
    w, ids     = top_k(probs, k)      (w / sum(w) when norm_topk_prob)
    rows       = x[order // k]        order = argsort(ids.ravel())
    gate, up   = split(ragged_dot(rows, gate_up_proj, sizes))   sizes (E,)
    y          = ragged_dot(act(gate) * up, down_proj, sizes)
    out[n]     = sum_j w[n, j] * y[pair (n, j)]

Parameters, named after transformers 5's modules (`mlp.gate`,
`mlp.experts.gate_up_proj`, `mlp.experts.down_proj`)::

    mlp/gate/weight                      (hidden, E)           the router
    mlp/experts/gate_up_proj/kernel      (E, hidden, 2 inner)  gate first
    mlp/experts/down_proj/kernel         (E, inner, hidden)

The expert kernels are stacked (E, in, out), layout "bio" ("bbio" under
`scan_layers`), so `jlora.apply` gives each expert its own adapter and
`jlora.wrap` keeps them factored under `ragged_dot` (see
`jlora._expert_rules`). The router's leaf is called `weight`, not `kernel`, so
`"all-linear"` (like PEFT's, which sees no `nn.Linear` there) leaves it frozen;
`jlora.partition(tree, full="mlp/gate/weight")` trains it fully.

Under `jax.set_mesh(mesh)` with batch axes ("data", "fsdp") that split the
tokens, the block runs in a `jax.shard_map` over them, so each device
routes, sorts and runs only its own tokens (`jlora.wrap` keeps adapted
experts factored inside it).

Each block records its routing statistics with
`self.sow("intermediates", "router_stats", ...)`; `load_balancing_loss` turns
them into transformers' auxiliary loss (Switch Transformer's, as
`load_balancing_loss_func` computes it).

On GPUs `ragged_dot`'s XLA lowering expands each group to dense (E times the
FLOPs and memory); on Hopper the experts run as grouped GEMM kernels instead
(`jlora._grouped_gemm`), and under `jlora.wrap` the adapted expert products
and their factors too (the fine-tuning guide's "Mixture-of-Experts models"
section).
"""

from __future__ import annotations

import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax
from jax.ad_checkpoint import checkpoint_name
from jax.sharding import PartitionSpec as P

from jlora import _grouped_gemm
from jlora.models.config import ModelConfig
from jlora.models.sharding import BATCH_AXES

_ACTIVATIONS = {
  "silu": jax.nn.silu,
  "gelu": functools.partial(jax.nn.gelu, approximate=False),
  "gelu_tanh": functools.partial(jax.nn.gelu, approximate=True),
}
STATS = "router_stats"


def route(logits: jax.Array, k: int, normalize: bool):
  """Top-k routing: (weights (N, k) float32, experts (N, k) int32, probs).

  probs = softmax(logits) in float32 (N, E); the k largest with their
  expert ids, renormalised to sum to 1 when `normalize` (which equals the
  softmax over the top-k logits: Mixtral; Qwen3-MoE's `norm_topk_prob`).

  Examples:
    >>> w, ids, probs = route(jnp.array([[2.0, 0.0, 1.0]]), 2, True)
    >>> ids
    Array([[0, 2]], dtype=int32)
  """
  probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
  weights, experts = lax.top_k(probs, k)
  if normalize:
    weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
  return weights, experts.astype(jnp.int32), probs


def token_mask(ctx) -> jax.Array | None:
  """(B, T) bool, the call's real tokens (None: all), from the decoder's
  per-call context: the attention mask (or packed documents) at this call's
  cache slots."""
  if ctx.kv_valid is None:
    return None
  return jnp.take(ctx.kv_valid, ctx.q_slots, axis=1)


class _Param(nn.Module):
  """One parameter, `leaf`, in a module of its own (for transformers'
  names)."""

  shape: tuple[int, ...]
  dtype: Any
  stddev: float
  leaf: str = "kernel"

  @nn.compact
  def __call__(self):
    init = nn.initializers.normal(self.stddev)
    return self.param(self.leaf, init, self.shape, self.dtype)


def _forward(tokens, router, gate_up, down, *, k, normalize, act, dtype):
  """(out (N, hidden) float32, experts (N, k), probs (N, E)) of the block
  for tokens (N, hidden): route, sort the (token, expert) pairs by expert,
  two grouped GEMMs, and combine with the routing weights."""
  n = tokens.shape[0]
  weights, experts, probs = route(tokens @ router.astype(dtype), k, normalize)
  flat = experts.reshape(-1)  # (N * k,) pair p = token p // k
  order = jnp.argsort(flat, stable=True)
  sizes = jnp.bincount(flat, length=gate_up.shape[0]).astype(jnp.int32)
  # A gather of the token rows: jlora.wrap follows it to tell each sorted
  # row's example (mixed-adapter batches).
  rows = tokens[order // k]
  y = _grouped_gemm.ragged_dot(rows, gate_up.astype(dtype), sizes)
  gate, up = jnp.split(checkpoint_name(y, "gate_up_proj"), 2, axis=-1)
  y = _grouped_gemm.ragged_dot(act(gate) * up, down.astype(dtype), sizes)
  y = checkpoint_name(y, "down_proj")
  y = jnp.zeros_like(y).at[order].set(y, unique_indices=True)
  y = y.reshape(n, k, -1).astype(jnp.float32)
  return jnp.einsum("nkh,nk->nh", y, weights), experts, probs


def batch_axes(rows: int) -> tuple[str, ...]:
  """Axes of JAX's current mesh (`jax.set_mesh`) that split `rows` tokens:
  its batch axes ("data", "fsdp") of size > 1 that are not already manual,
  if they divide `rows` evenly; () otherwise (no mesh set)."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return ()
  axes = tuple(a for a in BATCH_AXES if a in mesh.axis_names
               and mesh.shape[a] > 1 and a not in mesh.manual_axes)
  if not axes or rows % math.prod(mesh.shape[a] for a in axes):
    return ()
  return axes


class Experts(nn.Module):
  """The E stacked SwiGLU/GeGLU expert kernels, in transformers' names:
  returns (gate_up_proj (E, hidden, 2 inner), down_proj (E, inner,
  hidden))."""

  config: ModelConfig
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self) -> tuple[jax.Array, jax.Array]:
    c = self.config
    e, h, f = c.num_experts, c.hidden_size, c.moe_intermediate_size
    std = c.initializer_range
    gate_up = _Param((e, h, 2 * f), self.param_dtype, std,
                     name="gate_up_proj")()
    down = _Param((e, f, h), self.param_dtype, std, name="down_proj")()
    return gate_up, down


class SparseMoE(nn.Module):
  """Top-k routed Mixture-of-Experts in place of a decoder layer's MLP.

  Call: `block(x, valid=None)` with x (B, T, hidden) and `valid` (B, T) bool
  (the real tokens, for the routing statistics only; None: all). Returns
  (B, T, hidden) in `dtype`. The (token, expert) pairs are sorted by expert
  and each projection runs as one grouped GEMM (`lax.ragged_dot`; Hopper's
  grouped GEMM kernels, see `jlora._grouped_gemm`), outputs tagged
  "gate_up_proj" and "down_proj" for remat policies. Expert outputs are
  combined in float32 with the routing weights.

  Under a mesh set with `jax.set_mesh` whose batch axes ("data", "fsdp")
  split the tokens, each device routes, sorts and runs only its own tokens
  (a `jax.shard_map` over those axes; the kernels are gathered whole on each
  device). Without one, one sort spans every token: on a batch-sharded mesh
  XLA then gathers the routing to every device, and each device runs the
  experts for the whole batch.
  """

  config: ModelConfig
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, valid: jax.Array | None = None):
    c = self.config
    b, t, h = x.shape
    router = _Param((h, c.num_experts), self.param_dtype,
                    c.initializer_range, leaf="weight", name="gate")()
    gate_up, down = Experts(c, self.param_dtype, name="experts")()
    forward = functools.partial(
        _forward, k=c.num_experts_per_tok, normalize=c.norm_topk_prob,
        act=_ACTIVATIONS[c.hidden_act], dtype=self.dtype)
    axes = batch_axes(b * t)
    if axes:
      rows = P(axes)
      forward = jax.shard_map(
          forward, in_specs=(rows, P(), P(), P()), out_specs=(rows,) * 3,
          axis_names=frozenset(axes), check_vma=False)
    out, experts, probs = forward(x.reshape(b * t, h), router, gate_up, down)
    self._record(experts, probs, valid)
    return out.astype(self.dtype).reshape(b, t, h)

  def _record(self, experts, probs, valid):
    """Sows this layer's routing statistics (see `load_balancing_loss`)."""
    if not self.is_mutable_collection("intermediates"):
      return
    e = self.config.num_experts
    k = experts.shape[-1]
    mask = (jnp.ones(experts.shape[:1], jnp.float32) if valid is None
            else valid.reshape(-1).astype(jnp.float32))
    counts = jnp.zeros((e,), jnp.float32).at[experts.reshape(-1)].add(
      jnp.repeat(mask, k))
    self.sow("intermediates", STATS, {
      "counts": counts,  # top-k assignments per expert (real tokens)
      "probs": jnp.sum(probs * mask[:, None], axis=0),
      "tokens": jnp.sum(mask),
    })


def load_balancing_loss(variables: Any) -> jax.Array:
  """transformers' MoE auxiliary loss from the routing statistics of a call.

      loss = E * sum_e f_e * P_e

  with f_e the fraction of top-k assignments that went to expert e and P_e
  the mean router probability of e, both over every MoE layer and every real
  token (padding excluded, as transformers' `load_balancing_loss_func` does
  with an attention mask). Differentiable in the router (through P); scale it
  by `config.router_aux_loss_coef` to add it to a training loss.

  Args:
    variables: what `model.apply(..., mutable="intermediates")` returns as
      its second value (or its "intermediates" entry), from an unrolled or a
      scanned model.

  Raises:
    ValueError: no routing statistics (a dense model, or `mutable` not
      given).

  Examples:
    >>> logits, state = model.apply({"params": p}, ids, mutable="intermediates")
    >>> aux = jlora.models.load_balancing_loss(state)
    >>> loss = ce + model.config.router_aux_loss_coef * aux
  """
  found = {"counts": [], "probs": [], "tokens": []}
  for path, leaf in jax.tree_util.tree_flatten_with_path(variables)[0]:
    keys = [getattr(p, "key", None) for p in path]
    if STATS in keys and keys[-1] in found:
      found[keys[-1]].append(leaf)
  if not found["counts"]:
    raise ValueError(
      "no routing statistics found: call a Mixture-of-Experts model as "
      "model.apply(variables, ids, mutable='intermediates') and pass the "
      "returned state"
    )
  e = found["counts"][0].shape[-1]
  counts = sum(jnp.reshape(c, (-1, e)).sum(0) for c in found["counts"])
  probs = sum(jnp.reshape(p, (-1, e)).sum(0) for p in found["probs"])
  tokens = sum(jnp.sum(n) for n in found["tokens"])
  return e * jnp.sum((counts / tokens) * (probs / tokens))
