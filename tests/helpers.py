"""Shared test helpers: float64 references and random non-zero adapters."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import optax

import jlora

from jlora.node import is_lora


# A tiny transformers config (pass to LlamaConfig and friends); the model
# tests extend it per family.
TINY_HF = dict(vocab_size=128, hidden_size=64, intermediate_size=128,
               num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2)


def randomize_b(tree, key, std=0.5):
  """Gives every adapter a non-zero `b` so the update is visible."""
  nodes = [x for x in jax.tree.leaves(tree, is_leaf=is_lora) if is_lora(x)]
  keys = iter(jax.random.split(key, max(len(nodes), 1)))
  return jax.tree.map(
      lambda n: dataclasses.replace(
          n, b=std * jax.random.normal(next(keys), n.b.shape, n.b.dtype))
      if is_lora(n) else n, tree, is_leaf=is_lora)


def np_fused(node) -> np.ndarray:
  """float64 NumPy ``w + scale * a @ b`` laid out like the kernel."""
  w = np.asarray(node.w, np.float64)
  a = np.asarray(node.a, np.float64)
  b = np.asarray(node.b, np.float64)
  if node.e is not None:
    b = np.asarray(node.e, np.float64)[..., :, None] * b
  ab = np.matmul(a, b) * node.scale  # (*stacked, in, out)
  roles = node.layout
  order = ([k for k, r in enumerate(roles) if r == "b"] +
           [k for k, r in enumerate(roles) if r == "i"] +
           [k for k, r in enumerate(roles) if r == "o"])
  ab = ab.reshape([w.shape[k] for k in order]).transpose(np.argsort(order))
  fused = w + ab
  if node.m is not None:
    axes = tuple(k for k, r in enumerate(roles) if r == "i")
    norm = np.sqrt((fused ** 2).sum(axis=axes, keepdims=True))
    m = np.asarray(node.m, np.float64)
    fused = fused * m.reshape(norm.shape) / norm
  return fused


def np_merge(tree):
  """float64 NumPy merge of a whole tree (plain leaves converted)."""
  return jax.tree.map(
      lambda x: np_fused(x) if is_lora(x) else np.asarray(x, np.float64),
      tree, is_leaf=is_lora)


def dot_outputs(jaxpr) -> list[tuple[int, ...]]:
  """Shapes of every dot_general output in a jaxpr, sub-jaxprs included."""
  shapes = []
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "dot_general":
      shapes.append(tuple(eqn.outvars[0].aval.shape))
    for sub in jax.extend.core.jaxprs_in_params(eqn.params):
      shapes += dot_outputs(sub)
  return shapes


def rel_err(x, ref) -> float:
  x = np.asarray(x, np.float64)
  ref = np.asarray(ref, np.float64)
  return float(np.linalg.norm(x - ref) / max(np.linalg.norm(ref), 1e-30))


def train_adapters(tree, loss_fn, steps, tx=None):
  """`steps` jitted optax steps on the adapters of a LoRA tree.

  `loss_fn(tree)` is the loss of a complete tree. Returns the trained tree
  and the per-step losses (before each update).
  """
  trainable, frozen = jlora.partition(tree)
  tx = optax.adam(1e-2) if tx is None else tx

  @jax.jit
  def step(t, s):
    loss, g = jax.value_and_grad(lambda t: loss_fn(jlora.combine(t, frozen)))(t)
    updates, s = tx.update(g, s, t)
    return optax.apply_updates(t, updates), s, loss

  state, losses = tx.init(trainable), []
  for _ in range(steps):
    trainable, state, loss = step(trainable, state)
    losses.append(float(loss))
  return jlora.combine(trainable, frozen), np.array(losses)
