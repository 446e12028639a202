"""LoRAHub: learn how to combine adapters from a few examples, gradient-free.

`search` finds weights ``w`` of k adapters minimising

    loss_fn(combine_adapters(adapters, w), batch) + l1 * sum_i |w_i|

with CMA-ES (evosax's ``CMA_ES``): each generation samples `popsize`
candidate weight vectors, evaluates them together (``vmap``), and moves the
search distribution towards the better ones. No gradient of the model is
taken, so the search costs forward passes only and works with any loss,
differentiable or not. The whole search is one jitted `lax.scan`.

References:
  Huang et al., "LoraHub: Efficient Cross-Task Generalization via Dynamic
  LoRA Composition", 2024.
  Hansen, "The CMA Evolution Strategy: A Tutorial", 2016 (arXiv:1604.00772).
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp

from jlora.adapters import AdapterSet
from jlora.merging import combine_adapters

__all__ = ["search"]


def _evosax_cma_es():
  try:
    from evosax.algorithms import CMA_ES
  except ImportError as e:
    raise ImportError(
        "jlora.lorahub.search needs evosax>=0.3 (JAX evolution strategies):"
        " pip install 'evosax>=0.3'") from e
  return CMA_ES


def search(adapters: AdapterSet | Mapping[str, Any], names: Sequence[str],
           batch: Any, loss_fn: Callable[[Any, Any], jax.Array], *,
           steps: int = 40, key: jax.Array, l1: float = 0.05,
           popsize: int | None = None,
           init: float | Sequence[float] | Mapping[str, float] = 0.0,
           sigma: float = 0.5, bounds: tuple[float, float] = (-1.5, 1.5),
           method: str = "cat", **combine_kwargs
           ) -> tuple[dict[str, float], Any]:
  """Learns combination weights of adapters `names` with CMA-ES.

  Args:
    adapters: an `AdapterSet` (or ``{name: LoRA tree}``) holding the
      candidate adapters.
    names: the k adapters to combine.
    batch: a few examples of the new task, passed to `loss_fn` as is.
    loss_fn: ``loss_fn(lora_tree, batch) -> scalar``; gets the combined LoRA
      tree (run it with ``jlora.wrap(model.apply)`` or ``jlora.merge``).
      Must be traceable by JAX: it is evaluated under `jit` and `vmap` over
      the population.
    steps: CMA-ES generations; each evaluates `popsize` weight vectors at
      once (LoRAHub's 40 counts single evaluations).
    key: PRNG key; the same key gives the same weights.
    l1: weight of the L1 penalty ``sum_i |w_i|`` (LoRAHub's 0.05), keeping
      weights small and sparse.
    popsize: candidates per generation; default ``4 + floor(3 ln k)``
      (Hansen's default).
    init: initial mean of the search: a scalar, one value per adapter, or
      ``{name: value}`` (LoRAHub starts at 0).
    sigma: initial step size of CMA-ES.
    bounds: each candidate weight is clipped into ``[lo, hi]`` before it is
      evaluated (LoRAHub's [-1.5, 1.5]).
    method: how weights combine adapters, any `jlora.combine_adapters`
      method; default ``"cat"``, the exact weighted sum of the updates
      ``sum_i w_i delta_i``. (The LoRAHub paper sums ``a`` and ``b``
      separately, ``(sum_i w_i a_i)(sum_i w_i b_i)``; ``"linear"`` is PEFT's
      variant of that.)
    **combine_kwargs: passed to `jlora.combine_adapters` (e.g. ``density``).

  Returns:
    ``(weights, combined)``: the best weights found, ``{name: float}``, and
    ``combine_adapters(adapters, weights, method)``, a LoRA tree.

  Examples:
    >>> w, lp = jlora.lorahub.search(s, ["sql", "chat"], batch, loss,
    ...                              key=jax.random.key(0))
  """
  names = list(names)
  k = len(names)
  if k == 0:
    raise ValueError("search needs at least one adapter name")
  if len(set(names)) != k:
    raise ValueError(f"adapter names repeat: {names}")
  if steps < 1:
    raise ValueError(f"steps must be >= 1, got {steps}")
  lo, hi = bounds
  if not lo < hi:
    raise ValueError(f"bounds must be (lo, hi) with lo < hi, got {bounds}")
  popsize = popsize or 4 + int(3 * math.log(k))
  if popsize < 2:
    raise ValueError(f"popsize must be >= 2, got {popsize}")
  if isinstance(init, Mapping):
    init = [init.get(n, 0.0) for n in names]
  mean0 = jnp.broadcast_to(jnp.asarray(init, jnp.float32), (k,))
  options = tuple(sorted(combine_kwargs.items()))
  try:
    hash((loss_fn, options))
    make = _runner
  except TypeError:  # unhashable options (e.g. a DARE key): no caching
    make = _runner.__wrapped__
  run = make(tuple(names), method, loss_fn, steps, popsize, options)
  best = run(key, adapters, batch, mean0, jnp.float32(sigma), jnp.float32(l1),
             jnp.float32(lo), jnp.float32(hi))
  weights = {n: float(w) for n, w in zip(names, best)}
  return weights, combine_adapters(adapters, weights, method,
                                   **combine_kwargs)


@functools.lru_cache(maxsize=16)
def _runner(names: tuple[str, ...], method: str, loss_fn: Callable, steps: int,
            popsize: int, options: tuple) -> Callable:
  """The jitted search for one configuration, cached so repeated searches
  (other keys, batches, adapters of the same shapes) compile once."""
  k = len(names)
  strategy = _evosax_cma_es()(population_size=popsize, solution=jnp.zeros(k))
  combine_kwargs = dict(options)

  def objective(adapters, batch, l1, w):
    lp = combine_adapters(adapters, dict(zip(names, w)), method,
                          **combine_kwargs)
    return (jnp.asarray(loss_fn(lp, batch), jnp.float32) +
            l1 * jnp.sum(jnp.abs(w)))

  # The adapters and the batch are arguments, not closed-over constants, so
  # a large base is not baked into the compiled program.
  @jax.jit
  def run(key, adapters, batch, mean0, sigma, l1, lo, hi):
    params = strategy.default_params.replace(std_init=sigma)
    key, init_key = jax.random.split(key)
    state = strategy.init(init_key, mean0, params)

    def generation(state, key):
      ask_key, tell_key = jax.random.split(key)
      population, state = strategy.ask(ask_key, state, params)
      # Repair: candidates are clipped into the bounds and told as clipped.
      population = jnp.clip(population, lo, hi)
      fitness = jax.vmap(objective, (None, None, None, 0))(
          adapters, batch, l1, population)
      state, _ = strategy.tell(tell_key, population, fitness, state, params)
      return state, None

    state, _ = jax.lax.scan(generation, state, jax.random.split(key, steps))
    return state.best_solution

  return run
