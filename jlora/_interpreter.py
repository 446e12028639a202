"""Evaluates a jaxpr in which some inputs are `Factored` LoRA kernels.

Every equation whose inputs are plain arrays is bound as it is. Equations
that touch a `Factored` value have a rule: matrix products are computed
factored, layout-only ops (transpose, cast, reshape) keep the factored form,
and calls (`jit`, `checkpoint`, `scan`, `shard_map`) are re-entered so the
kernels stay factored inside them. Anything else sees the fused kernel.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Any, Callable, NamedTuple

import jax
from jax import lax
from jax.extend import core as jex_core
from jax.extend.core import primitives as prims

from jlora import _grouped_gemm
from jlora._factored import Factored, shared_input_products
from jlora._quant_array import is_quantized
from jlora.node import base_array

_Literal = jex_core.Literal
_DropVar = jex_core.DropVar


def _is_factored(x: Any) -> bool:
  return isinstance(x, Factored)


def _fused(x: Any) -> Any:
  return x.materialize() if _is_factored(x) else x


def bind(eqn, invals):
  """Binds `eqn`'s primitive to new inputs, as `jax.core.eval_jaxpr` does."""
  params = eqn.primitive.get_bind_params(eqn.params)
  subfuns = ()
  if isinstance(params, tuple):  # older JAX returns (subfuns, params)
    subfuns, params = params
  ctx = getattr(getattr(eqn, "ctx", None), "manager", None)
  with ctx if ctx is not None else contextlib.nullcontext():
    out = eqn.primitive.bind(*subfuns, *invals, **params)
  return out if eqn.primitive.multiple_results else [out]


# Unary ops that only re-lay a kernel out; `_SharedInputs` may run them
# ahead of their turn to find every kernel a shared input meets.
_LAYOUT_OPS = frozenset({"convert_element_type", "transpose", "reshape",
                         "copy", "copy_p", "sharding_constraint"})


class Frame(NamedTuple):
  """A rule's equation, its jaxpr's values so far, and the calling frame."""
  jaxpr: Any
  read: Callable[[Any], Any]
  eqn: Any
  parent: "Frame | None"  # the call (jit, checkpoint, scan) around `jaxpr`


# Set while a rule runs, for rules that look at how their inputs were made
# (a ragged_dot finding which example each sorted row comes from).
_FRAME: contextvars.ContextVar[Frame | None] = contextvars.ContextVar(
    "jlora_interpreter_frame", default=None)


def current_frame() -> Frame | None:
  return _FRAME.get()


def eval_jaxpr(jaxpr, consts, args, *, fuse_outputs: bool,
               share: bool = True) -> list[Any]:
  env: dict[Any, Any] = {}
  caller = _FRAME.get()

  def read(v):
    return v.val if isinstance(v, _Literal) else env[v]

  def write(v, value):
    if not isinstance(v, _DropVar):
      env[v] = value

  def run(eqn):
    invals = [read(v) for v in eqn.invars]
    if any(_is_factored(x) for x in invals):
      rule = _RULES.get(eqn.primitive.name, _fuse_rule)
      token = _FRAME.set(Frame(jaxpr, read, eqn, caller))
      try:
        outs = rule(eqn, invals, share)
      finally:
        _FRAME.reset(token)
    else:
      rule = _UNADAPTED_RULES.get(eqn.primitive.name)
      outs = rule(eqn, invals) if rule else None
      if outs is None:
        outs = bind(eqn, invals)
    for v, x in zip(eqn.outvars, outs):
      write(v, x)

  for v, x in zip(jaxpr.constvars, consts):
    write(v, x)
  for v, x in zip(jaxpr.invars, args):
    write(v, x)
  shared = _SharedInputs(jaxpr, env, run) if share else None
  for i, eqn in enumerate(jaxpr.eqns):
    if shared is None:
      run(eqn)
    elif i not in shared.done and not shared.run_group(i):
      run(eqn)
  outs = [read(v) for v in jaxpr.outvars]
  return [_fused(x) for x in outs] if fuse_outputs else outs


class _SharedInputs:
  """Runs LoRA products that read the same input with one ``x @ [a...]``.

  Matrix products in one jaxpr with the same input variable and the same
  dimension numbers (q/k/v, gate/up) form a group. When the first of a
  group is reached, the other members' kernels are brought up to date
  (running the layout ops that lead to them early), and every member whose
  kernel is factored with a compatible adapter is computed at once; the
  rest run in their turn.
  """

  def __init__(self, jaxpr, env, run):
    self.eqns, self.env, self.run = jaxpr.eqns, env, run
    self.done: set[int] = set()
    self.producer = {v: i for i, e in enumerate(self.eqns) for v in e.outvars}
    by_input: dict[Any, list[int]] = {}
    for i, e in enumerate(self.eqns):
      if e.primitive.name != "dot_general":
        continue
      for side in (0, 1):
        v = e.invars[side]
        if not isinstance(v, _Literal):
          key = (v, side, _params_key(e.params))
          by_input.setdefault(key, []).append(i)
    self.groups = {ids[0]: (key[1], ids) for key, ids in by_input.items()
                   if len(ids) > 1}

  def _value(self, v, depth: int = 4):
    """`v`'s value, running the layout ops that make it if need be."""
    if isinstance(v, _Literal):
      return v.val
    if v in self.env:
      return self.env[v]
    i = self.producer.get(v)
    if i is None or depth == 0 or i in self.done:
      return None
    eqn = self.eqns[i]
    if eqn.primitive.name not in _LAYOUT_OPS or len(eqn.invars) != 1:
      return None
    if self._value(eqn.invars[0], depth - 1) is None:
      return None
    self.run(eqn)
    self.done.add(i)
    return self.env[v]

  def run_group(self, first: int) -> bool:
    """Runs the group led by eqn `first` if it has >= 2 fusable members."""
    if first not in self.groups:
      return False
    x_side, members = self.groups[first]
    k_side = 1 - x_side
    x = self.env.get(self.eqns[first].invars[x_side])
    if x is None or _is_factored(x):
      return False
    params = self.eqns[first].params
    kernel_is_rhs = k_side == 1
    # Only the leader's kernel is certainly computed by now; the others are
    # brought up to date if layout ops alone lead to them.
    found: dict[Any, list] = {}
    for i in members:
      if i in self.done:
        continue
      kernel = self._value(self.eqns[i].invars[k_side])
      if not _is_factored(kernel):
        continue
      key = kernel.shares_input_product(x, kernel_is_rhs, params)
      if key is not None:
        found.setdefault(key, []).append((i, kernel))
    batch = max(found.values(), key=len, default=[])
    if len(batch) >= 2 and batch[0][0] != first:
      # The leader's kernel is not fusable (e.g. q plain, k and v adapted):
      # the next member leads, once it is reached.
      rest = [i for i in members if i > first and i not in self.done]
      if len(rest) > 1:
        self.groups[rest[0]] = (x_side, rest)
      return False
    if len(batch) < 2:
      return False
    kernels = [k for _, k in batch]
    ts = shared_input_products(kernels, x, kernel_is_rhs, params)
    for (i, kernel), t in zip(batch, ts):
      eqn = self.eqns[i]
      y = kernel.dot_general(x, kernel_is_rhs, eqn.params,
                             lambda *ops, eqn=eqn: bind(eqn, ops)[0], t=t)
      self.env[eqn.outvars[0]] = y
      self.done.add(i)
    return True


def _params_key(params) -> tuple:
  return tuple(sorted((k, repr(v)) for k, v in params.items()))


def _fuse_rule(eqn, invals, share=True):
  return bind(eqn, [_fused(x) for x in invals])


def _dot_general_rule(eqn, invals, share=True):
  lhs, rhs = invals
  if _is_factored(lhs) and _is_factored(rhs):
    return _fuse_rule(eqn, invals, share)
  kernel, x, kernel_is_rhs = (rhs, lhs, True) if _is_factored(rhs) else (
      lhs, rhs, False)
  return [kernel.dot_general(x, kernel_is_rhs, eqn.params,
                             lambda *ops: bind(eqn, ops)[0])]


def _transpose_rule(eqn, invals, share=True):
  return [invals[0].transpose(eqn.params["permutation"])]


def _convert_rule(eqn, invals, share=True):
  dtype = eqn.params["new_dtype"]
  if not jax.numpy.issubdtype(dtype, jax.numpy.inexact):
    return _fuse_rule(eqn, invals, share)
  return [invals[0].astype(dtype)]


def _reshape_rule(eqn, invals, share=True):
  if eqn.params.get("dimensions") is None:
    out = invals[0].reshape(eqn.params["new_sizes"])
    if out is not None:
      return [out]
  return _fuse_rule(eqn, invals, share)


def _kernel_passthrough_rule(eqn, invals, share=True):
  """Ops that leave values unchanged (copies, sharding hints) act on w."""
  if len(invals) != 1:
    return _fuse_rule(eqn, invals, share)
  kernel = invals[0]
  w = kernel.w
  if is_quantized(w):
    if eqn.primitive.name in ("copy", "copy_p"):
      return [kernel]
    # A sharding hint names the dense kernel's axes: dequantize for this use.
    w = base_array(w)
  return [kernel.replace(w=bind(eqn, [w])[0])]


def _jit_rule(eqn, invals, share=True):
  jaxpr, consts = _closed(eqn.params["jaxpr"])
  return eval_jaxpr(jaxpr, consts, invals, fuse_outputs=False, share=share)


def _remat_rule(eqn, invals, share=True):
  jaxpr, consts = _closed(eqn.params["jaxpr"])

  # Kernels the body returns (`nnx.remat` returns the module's state) leave
  # it factored: fusing them there would form every update matrix.
  def body(*args):
    return eval_jaxpr(jaxpr, consts, args, fuse_outputs=False, share=share)

  return jax.checkpoint(body, prevent_cse=eqn.params["prevent_cse"],
                        policy=eqn.params["policy"])(*invals)


def _scan_layout(params) -> tuple[int, int]:
  """(number of consts, number of carries) of a scan equation.

  JAX <= 0.10 names them; JAX 0.11 packs (consts, carry, xs) as a flat
  tree in `ft_in`, whose parts' lengths count their leaves.
  """
  if "num_consts" in params:
    return params["num_consts"], params["num_carry"]
  consts, carry, _ = params["ft_in"].unpack()
  return len(consts), len(carry)


def _closed(jaxpr):
  """(jaxpr, consts) of a ClosedJaxpr or an open Jaxpr."""
  if hasattr(jaxpr, "consts"):
    return jaxpr.jaxpr, jaxpr.consts
  return jaxpr, ()


def _scan_rule(eqn, invals, share=True):
  p = eqn.params
  n_consts, n_carry = _scan_layout(p)
  consts = invals[:n_consts]
  init = [_fused(x) for x in invals[n_consts:n_consts + n_carry]]
  # A kernel stacked along the scanned axis stays factored, sliced per step.
  xs = [x if not _is_factored(x) or x.roles[0] == "b" else x.materialize()
        for x in invals[n_consts + n_carry:]]
  templates = [x if _is_factored(x) else None for x in xs]
  xs_flat = [x.scanned() if _is_factored(x) else x for x in xs]
  jaxpr, jaxpr_consts = _closed(p["jaxpr"])

  def body(carry, x_slices):
    x_vals = [t.slice_leading(*x) if t is not None else x
              for t, x in zip(templates, x_slices)]
    outs = eval_jaxpr(jaxpr, jaxpr_consts, [*consts, *carry, *x_vals],
                      fuse_outputs=True, share=share)
    return outs[:n_carry], outs[n_carry:]

  carry, ys = lax.scan(body, init, xs_flat, length=p["length"],
                       reverse=p["reverse"], unroll=p.get("unroll", 1))
  return [*carry, *ys]


def _spec_is_whole(spec, manual: frozenset) -> bool:
  """Whether a shard_map input spec gives each device the whole value (no
  entry names a manual axis)."""
  for entry in spec or ():
    names = entry if isinstance(entry, tuple) else (entry,)
    if any(n in manual for n in names if n is not None):
      return False
  return True


def _per_device_keys(rng, manual: frozenset):
  """Dropout keys folded with the device's index along the manual axes, so
  devices holding different rows draw different masks."""
  index = lax.axis_index(tuple(sorted(manual)))
  flat = rng.reshape(-1)
  folded = jax.vmap(lambda k: jax.random.fold_in(k, index))(flat)
  return folded.reshape(rng.shape)


def _pvary_rule(eqn, invals, share=True):
  """`pvary` (inside a `shard_map`: a value made device-varying before it
  meets a varying one) marks every array of a factored kernel."""
  one = lambda v: bind(eqn, [v])[0]
  return [jax.tree.map(one, x) if _is_factored(x) else one(x)
          for x in invals]


def _shard_map_rule(eqn, invals, share=True):
  """Re-enters a `shard_map` body with its LoRA kernels kept factored.

  A kernel that each device receives whole (its spec names no manual axis:
  experts gathered for a per-device MoE routing) passes its base and
  factors in whole; a kernel split over a manual axis is fused, since a
  block of it is a block of the fused sum.
  """
  p = eqn.params
  manual = frozenset(p["newly_manual_axes"])
  jaxpr, consts = _closed(p["jaxpr"])
  flat, specs, plan = [], [], []
  for x, spec in zip(invals, p["in_specs"]):
    if _is_factored(x) and _spec_is_whole(spec, manual):
      if x.group_scales:
        raise NotImplementedError(
            f"'{x.path}' runs a different adapter per example, and its"
            " kernel enters a shard_map (a Mixture-of-Experts block routing"
            " each device's own tokens under jax.set_mesh); run one adapter"
            " at a time (jlora.select), or trace the step without"
            " jax.set_mesh")
      leaves, tree = jax.tree.flatten(x)
      plan.append((tree, len(leaves)))
      flat += leaves
      specs += [jax.sharding.PartitionSpec()] * len(leaves)
    else:
      plan.append(None)
      flat.append(_fused(x))
      specs.append(spec)

  def body(*args):
    vals, i = [], 0
    for item in plan:
      if item is None:
        vals.append(args[i])
        i += 1
        continue
      tree, n = item
      node = jax.tree.unflatten(tree, args[i:i + n])
      i += n
      if node.rng is not None and manual:
        node = node.replace(rng=_per_device_keys(node.rng, manual))
      vals.append(node)
    return tuple(eval_jaxpr(jaxpr, consts, vals, fuse_outputs=True,
                            share=share))

  out = jax.shard_map(body, mesh=p["mesh"], in_specs=tuple(specs),
                      out_specs=tuple(p["out_specs"]), axis_names=manual,
                      check_vma=p["check_vma"])(*flat)
  return list(out)


# Equations with no adapted input that still run differently under wrap
# (a rule returns None to bind the equation as it is): plain ragged_dots of
# unadapted experts as grouped GEMMs.
_UNADAPTED_RULES: dict[str, Callable] = {
    "ragged_dot_general": _grouped_gemm.bind_ragged_dot,
}

_RULES: dict[str, Callable] = {
    "dot_general": _dot_general_rule,
    "transpose": _transpose_rule,
    "convert_element_type": _convert_rule,
    "reshape": _reshape_rule,
    "copy": _kernel_passthrough_rule,
    "copy_p": _kernel_passthrough_rule,
    "sharding_constraint": _kernel_passthrough_rule,
    prims.jit_p.name: _jit_rule,
    "pjit": _jit_rule,
    prims.remat_p.name: _remat_rule,
    prims.scan_p.name: _scan_rule,
    "shard_map": _shard_map_rule,
    "pvary": _pvary_rule,
}

# Expert selection from stacked kernels (slice, squeeze, dynamic_slice,
# gather, ragged_dot): see jlora/_expert_rules.py.
from jlora import _expert_rules  # noqa: E402  (its rules call `bind` above)

_RULES.update(_expert_rules.RULES)
