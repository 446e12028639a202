"""AdaLoRA: adapters in SVD form whose rank budget is reallocated in training.

Each `LoRA` node's update is ``a @ diag(e) @ b`` (``a`` (*stacked, in, r)
plays Q^T, ``e`` the singular values Lambda, ``b`` (*stacked, r, out) P^T).
Training adds `regularizer` (near-orthogonal ``a`` and ``b``) to the loss;
after each optimizer step `update` scores every singular triplet and zeroes
``e`` for the least important ones until the total number of live triplets
follows a cubic schedule from the initial budget down to
``target_r * (number of adapted matrices)``.

Shapes stay static throughout (masked triplets are zeros in ``e``), so the
whole step can be jitted; `rank_pattern` reads off the final ranks.

Note: with `jlora.partition` as it stands, ``e`` falls in the frozen half.
Differentiate with respect to the whole tree (the base gets a zero gradient
under `jlora.wrap`) or a split that keeps ``e`` trainable, and give `update`
gradients that hold ``a``, ``b`` and ``e``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jlora.node import LoRA, is_lora


def _nodes(tree: Any) -> list[LoRA]:
  return [x for x in jax.tree.leaves(tree, is_leaf=is_lora) if is_lora(x)]


def _replace_nodes(tree: Any, new: list[LoRA]) -> Any:
  leaves, treedef = jax.tree.flatten(tree, is_leaf=is_lora)
  it = iter(new)
  return jax.tree.unflatten(
      treedef, [next(it) if is_lora(x) else x for x in leaves])


def prepare(tree: Any, key: jax.Array, std: float = 0.02) -> Any:
  """Puts every LoRA node of `tree` in AdaLoRA's SVD form.

  ``a, b ~ N(0, std^2)`` and ``e = 0`` of shape (*stacked, r), as PEFT's
  ``AdaLoraLayer.reset_lora_parameters``: the update starts at zero and the
  merged model equals the base. ``scale = alpha / r`` is fixed at the
  initial rank (PEFT's ``ranknum``), whatever is pruned later.

  Examples:
    >>> lp = jlora.variants.adalora.prepare(jlora.apply(params, 12, key=k1), k2)
  """
  nodes = _nodes(tree)
  if not nodes:
    raise ValueError("the tree holds no LoRA nodes; call jlora.apply first")
  new = []
  for node, (ka, kb) in zip(nodes, jax.random.split(key, (len(nodes), 2))):
    if node.a is None or node.b is None:
      raise ValueError(f"prepare needs whole LoRA nodes; '{node.path}' has no"
                       " adapter arrays")
    new.append(dataclasses.replace(
        node,
        a=std * jax.random.normal(ka, node.a.shape, node.a.dtype),
        b=std * jax.random.normal(kb, node.b.shape, node.b.dtype),
        e=jnp.zeros(node.a.shape[:-2] + node.a.shape[-1:], node.a.dtype)))
  return _replace_nodes(tree, new)


def regularizer(tree: Any) -> jax.Array:
  """Orthogonality penalty ``sum ||a^T a - I||_F^2 + ||b b^T - I||_F^2``.

  Summed over nodes and stacked indices (the paper's ``R(P, Q)`` with
  ``P = b^T``, ``Q = a^T``). Add ``gamma * regularizer(tree)`` to the loss
  (the paper and PEFT use gamma = 0.1 to 0.5). PEFT's variant takes the
  unsquared norm averaged over matrices; this one is the paper's.

  Examples:
    >>> loss = task_loss + 0.1 * jlora.variants.adalora.regularizer(tree)

  References:
    Zhang et al., "AdaLoRA: Adaptive Budget Allocation for
    Parameter-Efficient Fine-Tuning", ICLR 2023, eq. (4).
  """
  total = jnp.zeros((), jnp.float32)
  for node in _nodes(tree):
    a = node.a.astype(jnp.float32)
    b = node.b.astype(jnp.float32)
    eye = jnp.eye(node.rank, dtype=jnp.float32)
    gram_a = jnp.einsum("...ir,...is->...rs", a, a)
    gram_b = jnp.einsum("...ro,...so->...rs", b, b)
    total += jnp.sum(jnp.square(gram_a - eye)) + jnp.sum(
        jnp.square(gram_b - eye))
  return total


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class AdaLoRAState:
  """The rank allocator's state: a pytree, so it passes through `jit`.

  - ``ipt``: per node, ``{"a", "b", "e"}`` EMAs of the sensitivity
    ``|theta * grad|`` (``I-bar`` in the paper), shaped like the fields.
  - ``unc``: per node, EMAs of ``|I - I-bar|`` (the uncertainty ``U-bar``).
  - ``mask``: per node, bool (*stacked, r): triplets still live.
  - static: ``target_r``, ``total_step``, ``tinit``, ``tfinal``,
    ``delta_t``, ``beta1``, ``beta2``, ``init_budget``, ``target_budget``.
  """

  ipt: tuple
  unc: tuple
  mask: tuple
  target_r: int = dataclasses.field(metadata=dict(static=True), default=8)
  total_step: int = dataclasses.field(metadata=dict(static=True), default=0)
  tinit: int = dataclasses.field(metadata=dict(static=True), default=0)
  tfinal: int = dataclasses.field(metadata=dict(static=True), default=0)
  delta_t: int = dataclasses.field(metadata=dict(static=True), default=1)
  beta1: float = dataclasses.field(metadata=dict(static=True), default=0.85)
  beta2: float = dataclasses.field(metadata=dict(static=True), default=0.85)
  init_budget: int = dataclasses.field(metadata=dict(static=True), default=0)
  target_budget: int = dataclasses.field(metadata=dict(static=True),
                                         default=0)


class Budget(NamedTuple):
  budget: jax.Array     # int32: live triplets allowed at this step
  mask_now: jax.Array   # bool: whether this step reallocates


def _check_svd_form(node: LoRA, what: str) -> None:
  if node.a is None or node.b is None or node.e is None:
    raise ValueError(
        f"{what}: LoRA node '{node.path}' is not in AdaLoRA's SVD form (it"
        " needs a, b and e); call jlora.variants.adalora.prepare(tree, key)"
        " first, and pass gradients that include e (differentiate the whole"
        " tree, or a split that keeps e trainable)")


def init(tree: Any, *, target_r: int, total_step: int, tinit: int = 0,
         tfinal: int = 0, delta_t: int = 1, beta1: float = 0.85,
         beta2: float = 0.85) -> AdaLoRAState:
  """The allocator's initial state for `tree` (from `prepare`).

  The initial budget is the total rank ``sum(r * prod(stacked))`` over
  nodes; the target is ``target_r`` times the number of adapted matrices
  (each stacked index counts as one matrix), as PEFT's ``RankAllocator``.

  Args:
    tree: a LoRA tree in SVD form.
    target_r: the average rank per matrix at the end.
    total_step: the number of training steps.
    tinit: steps of warmup before pruning starts.
    tfinal: steps at the end with the final allocation frozen.
    delta_t: reallocate every `delta_t` steps.
    beta1, beta2: EMA factors of sensitivity and uncertainty.

  Examples:
    >>> state = jlora.variants.adalora.init(lp, target_r=4, total_step=1000,
    ...                                     tinit=100, tfinal=200)
  """
  nodes = _nodes(tree)
  for node in nodes:
    _check_svd_form(node, "adalora.init")
  if not tinit < total_step - tfinal:
    raise ValueError(
        f"the schedule leaves no budgeting phase: tinit={tinit} must be below"
        f" total_step - tfinal = {total_step - tfinal}; lower tinit or tfinal")
  init_budget = sum(int(node.e.size) for node in nodes)
  matrices = sum(math.prod(node.e.shape[:-1]) for node in nodes)
  target_budget = target_r * matrices
  if target_budget > init_budget:
    raise ValueError(
        f"target_r={target_r} gives a budget of {target_budget} triplets, more"
        f" than the {init_budget} the adapters start with; use a target_r"
        " below the initial rank")
  zeros = tuple({f: jnp.zeros(getattr(n, f).shape, jnp.float32)
                 for f in ("a", "b", "e")} for n in nodes)
  return AdaLoRAState(
      ipt=zeros, unc=zeros,
      mask=tuple(jnp.ones(n.e.shape, bool) for n in nodes),
      target_r=target_r, total_step=total_step, tinit=tinit, tfinal=tfinal,
      delta_t=delta_t, beta1=beta1, beta2=beta2, init_budget=init_budget,
      target_budget=target_budget)


@functools.lru_cache(maxsize=32)
def _budget_table(init_budget: int, target_budget: int, total: int,
                  tinit: int, tfinal: int) -> np.ndarray:
  """Budgets for steps 0..total, in float64 as PEFT computes them."""
  t = np.arange(total + 1, dtype=np.float64)
  coeff = 1.0 - (t - tinit) / (total - tfinal - tinit)
  cubic = np.floor((init_budget - target_budget) * coeff**3 + target_budget)
  table = np.where(t <= tinit, init_budget,
                   np.where(t > total - tfinal, target_budget, cubic))
  return table.astype(np.int32)


def budget(state: AdaLoRAState, step: Any) -> Budget:
  """The cubic budget schedule (AdaLoRA's eq. (9), PEFT's ``budget_schedule``).

  ``b(t) = b_init`` for ``t <= tinit``; ``b_target`` for
  ``t > total - tfinal``; in between::

      b(t) = floor(b_target + (b_init - b_target) * (1 - (t - tinit) /
                   (total - tfinal - tinit))^3)

  reallocating when ``t % delta_t == 0`` (and every step after
  ``total - tfinal``). The values are tabulated in float64 once per schedule,
  so a traced `step` gives exactly PEFT's integers.
  """
  t = jnp.asarray(step, jnp.int32)
  ti, tf, total = state.tinit, state.tfinal, state.total_step
  table = _budget_table(state.init_budget, state.target_budget, total, ti, tf)
  value = jnp.asarray(table)[jnp.clip(t, 0, total)]
  mask_now = jnp.where(t <= ti, False,
                       jnp.where(t > total - tf, True,
                                 t % state.delta_t == 0))
  return Budget(value, mask_now)


def triplet_scores(state: AdaLoRAState) -> tuple:
  """Per node (*stacked, r): ``s(e_i) + mean_j s(a_ji) + mean_j s(b_ij)``.

  ``s = I-bar * U-bar`` elementwise (AdaLoRA's eq. (7)-(8)).
  """
  scores = []
  for ipt, unc in zip(state.ipt, state.unc):
    s = {f: ipt[f] * unc[f] for f in ("a", "b", "e")}
    scores.append(s["e"] + jnp.mean(s["a"], axis=-2) + jnp.mean(s["b"], -1))
  return tuple(scores)


def _keep_top(scores: tuple, keep: jax.Array) -> tuple:
  """Masks keeping exactly `keep` triplets, the highest scores, over all."""
  flat = jnp.concatenate([s.reshape(-1) for s in scores])
  order = jnp.argsort(flat)  # ascending: the first n - keep are pruned
  rank = jnp.zeros(flat.shape, jnp.int32).at[order].set(
      jnp.arange(flat.size, dtype=jnp.int32))
  live = rank >= flat.size - keep
  out, start = [], 0
  for s in scores:
    out.append(live[start:start + s.size].reshape(s.shape))
    start += s.size
  return tuple(out)


def update(tree: Any, grads: Any, state: AdaLoRAState,
           step: Any) -> tuple[Any, AdaLoRAState]:
  """One allocator step: update importance, reallocate, mask ``e``.

  Call it after the optimizer step with that step's gradients (PEFT's
  ``update_and_allocate``). For ``t < total - tfinal`` the EMAs are
  updated::

      I = |theta * grad|
      I-bar <- beta1 I-bar + (1 - beta1) I
      U-bar <- beta2 U-bar + (1 - beta2) |I - I-bar|

  and, on reallocation steps (``t > tinit`` and ``t % delta_t == 0``), the
  triplets outside the ``budget(t)`` highest scores get ``e = 0``. At
  ``t = total - tfinal`` the final allocation (``target_r`` per matrix on
  average) is made and the EMAs are reset; from then on the final mask is
  applied every step. Exactly ``budget(t)`` triplets stay live: ties are
  broken by position rather than pruning all tied triplets.

  Args:
    tree: the whole LoRA tree after the optimizer step.
    grads: gradients shaped like `tree` (or its trainable half) holding
      ``a``, ``b`` and ``e``.
    state: from `init` or the previous `update`.
    step: the global step ``t`` (int or traced int).

  Returns:
    ``(tree, state)`` with masked ``e``.

  Examples:
    >>> grads = jax.grad(loss)(lp)
    >>> updates, opt_state = tx.update(grads, opt_state, lp)
    >>> lp = optax.apply_updates(lp, updates)
    >>> lp, ada = jlora.variants.adalora.update(lp, grads, ada, step)

  References:
    Zhang et al., "AdaLoRA: Adaptive Budget Allocation for
    Parameter-Efficient Fine-Tuning", ICLR 2023.
  """
  nodes, gnodes = _nodes(tree), _nodes(grads)
  if len(nodes) != len(state.mask) or len(gnodes) != len(nodes):
    raise ValueError(
        f"tree has {len(nodes)} LoRA nodes, grads {len(gnodes)} and the state"
        f" {len(state.mask)}; pass the tree the state was made for and its"
        " gradients")
  t = jnp.asarray(step, jnp.int32)
  end = state.total_step - state.tfinal
  learning = t < end
  b1, b2 = state.beta1, state.beta2

  ipt, unc = [], []
  for node, g, old_i, old_u in zip(nodes, gnodes, state.ipt, state.unc):
    _check_svd_form(node, "adalora.update")
    _check_svd_form(g, "adalora.update (gradients)")
    new_i, new_u = {}, {}
    for f in ("a", "b", "e"):
      sens = jnp.abs(getattr(node, f).astype(jnp.float32) *
                     getattr(g, f).astype(jnp.float32))
      ema = b1 * old_i[f] + (1.0 - b1) * sens
      dev = b2 * old_u[f] + (1.0 - b2) * jnp.abs(sens - ema)
      new_i[f] = jnp.where(learning, ema, old_i[f])
      new_u[f] = jnp.where(learning, dev, old_u[f])
    ipt.append(new_i)
    unc.append(new_u)
  state = dataclasses.replace(state, ipt=tuple(ipt), unc=tuple(unc))

  plan = budget(state, t)
  final = t == end
  reallocate = (plan.mask_now & learning) | final
  chosen = _keep_top(triplet_scores(state), plan.budget)
  mask = tuple(jnp.where(reallocate, c, m) for c, m in zip(chosen, state.mask))
  apply_mask = reallocate | (t > end)

  new_nodes = [dataclasses.replace(
      n, e=jnp.where(apply_mask & ~m, jnp.zeros_like(n.e), n.e))
               for n, m in zip(nodes, mask)]
  # PEFT resets the importance EMAs once the final allocation is made.
  reset = lambda trees: tuple(
      {f: jnp.where(final, 0.0, v) for f, v in d.items()} for d in trees)
  state = dataclasses.replace(state, mask=mask, ipt=reset(state.ipt),
                              unc=reset(state.unc))
  return _replace_nodes(tree, new_nodes), state


def rank_pattern(tree: Any, state: AdaLoRAState) -> dict[str, jax.Array]:
  """``{path: live ranks}``, an int array of shape (*stacked,) per node."""
  return {n.path: jnp.sum(m, axis=-1)
          for n, m in zip(_nodes(tree), state.mask)}


def live_count(state: AdaLoRAState) -> jax.Array:
  """The total number of live singular triplets."""
  return sum(jnp.sum(m) for m in state.mask)

