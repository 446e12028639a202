"""Training strategies as device meshes: data parallel, FSDP, tensor parallel.

A strategy is a mesh with named axes, written as a spec string such as
``"data:2"``, ``"fsdp:8"`` or ``"data:2,fsdp:2,model:2"``:

- ``data``: the batch is split over it; parameters are replicated.
- ``fsdp``: the batch is split over it too, and every kernel is sharded
  along one of its (non-stacked) axes, so parameters, adapters and optimizer
  state take 1/n of the memory each. Inside a scan over layers XLA gathers
  one layer's kernels at a time.
- ``model``: tensor parallelism (Megatron): column-parallel kernels (q, k, v,
  gate, up projections and the head) are split along their output axis,
  row-parallel ones (o and down projections) along their input axis, the
  embedding along its vocabulary.

Adapters created by `jlora.apply` on such a base take their shardings from
the kernels (see `jlora.apply`), and the optimizer state from the adapters.
The same code runs on one process or on several (``jax.distributed``): meshes
span every process's devices, and `global_batch` assembles one global batch
from each process's own rows.

Examples:
  >>> mesh = jlora.models.sharding.make_mesh("fsdp:8")
  >>> model, params = jlora.models.from_pretrained(
  ...     path, shardings=jlora.models.sharding.param_rule(mesh))
  >>> batch = jlora.models.sharding.global_batch(local_rows, mesh)
"""

from __future__ import annotations

import math
import re
from typing import Any, Callable

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

AXES = ("data", "fsdp", "model")
# Axes the batch is split over, in mesh order.
BATCH_AXES = ("data", "fsdp")

# Megatron's split: these kernels' outputs are sharded, the rest's inputs.
_COLUMN = re.compile(
    r"(^|/)(q_proj|k_proj|v_proj|qkv_proj|gate_proj|up_proj|gate_up_proj"
    r"|lm_head)(/|$)")
_ROW = re.compile(r"(^|/)(o_proj|down_proj)(/|$)")
_EMBED = re.compile(r"(^|/)(embed_tokens|embedding|wte)(/|$)")


def parse_spec(spec: str) -> dict[str, int]:
  """``"data:2,fsdp:4"`` -> ``{"data": 2, "fsdp": 4}``, validated.

  Examples:
    >>> parse_spec("fsdp:8")
    {'fsdp': 8}
  """
  if not isinstance(spec, str) or not spec.strip():
    raise ValueError(
        f"a mesh spec is a string like 'data:2,fsdp:4', got {spec!r}")
  axes: dict[str, int] = {}
  for part in spec.split(","):
    name, sep, size = part.partition(":")
    name = name.strip()
    if not sep or not size.strip().isdigit() or int(size) < 1:
      raise ValueError(
          f"mesh spec {spec!r}: '{part}' is not 'axis:size' with a positive"
          " size, e.g. 'fsdp:8'")
    if name not in AXES:
      raise ValueError(
          f"mesh spec {spec!r}: unknown axis {name!r}; the axes are"
          f" {list(AXES)} (data parallel, FSDP, tensor parallel)")
    if name in axes:
      raise ValueError(f"mesh spec {spec!r} names axis {name!r} twice")
    axes[name] = int(size)
  return axes


def make_mesh(spec: str, devices: list | None = None) -> Mesh:
  """A mesh over all processes' devices from a spec such as ``"fsdp:8"``.

  Axes come in the order ``data, fsdp, model`` whatever the spec's order, so
  that ``model`` (the most communication) is innermost: on one host the
  devices of one ``model`` group are neighbours.
  """
  axes = parse_spec(spec)
  devices = list(jax.devices() if devices is None else devices)
  need = math.prod(axes.values())
  if need != len(devices):
    raise ValueError(
        f"mesh spec {spec!r} needs {need} devices but {len(devices)} are"
        f" given ({jax.process_count()} process(es) with"
        f" {jax.local_device_count()} device(s) each); make the sizes"
        f" multiply to {len(devices)}")
  names = tuple(a for a in AXES if a in axes)
  sizes = tuple(axes[a] for a in names)
  return Mesh(np.asarray(devices).reshape(sizes), names)


def _size(mesh: Mesh, axis: str) -> int:
  return dict(mesh.shape).get(axis, 1)


def kernel_spec(path: str, shape: tuple[int, ...], mesh: Mesh,
                stacked: int | None = None) -> P:
  """The `PartitionSpec` of one parameter under the mesh's strategy.

  Kernels (2+ axes) are read as ``(*stacked, in, out)``; an embedding as
  ``(*stacked, vocab, hidden)``. 1-axis params (norms, biases) and stacked
  axes are never split.
  """
  ndim = len(shape)
  if ndim < 2:
    return P()
  if stacked is None:
    stacked = ndim - 2
  spec: list[Any] = [None] * ndim
  tp = _size(mesh, "model")
  if tp > 1:
    if _EMBED.search(path):
      axis = stacked  # vocab
    elif _ROW.search(path):
      axis = stacked  # input
    elif _COLUMN.search(path):
      axis = ndim - 1  # output
    else:
      axis = None
    if axis is not None and shape[axis] % tp == 0:
      spec[axis] = "model"
  fsdp = _size(mesh, "fsdp")
  if fsdp > 1:
    # The largest free axis that divides: most memory saved per gather.
    free = [k for k in range(stacked, ndim)
            if spec[k] is None and shape[k] % fsdp == 0]
    if free:
      spec[max(free, key=lambda k: shape[k])] = "fsdp"
  return P(*spec)


def param_rule(mesh: Mesh, *, stacked: Callable[[str, tuple], int] | None
               = None) -> Callable[[str, tuple[int, ...]], NamedSharding]:
  """``(path, shape) -> NamedSharding`` for `from_pretrained(shardings=)`.

  `stacked` optionally says how many leading axes of a leaf are stacked
  layers (default: all but the last two of a 2+-axis leaf).

  Examples:
    >>> model, params = jlora.models.from_config(
    ...     cfg, key, scan_layers=True, shardings=param_rule(make_mesh("fsdp:8")))
  """
  def rule(path: str, shape: tuple[int, ...]) -> NamedSharding:
    k = None if stacked is None else stacked(path, tuple(shape))
    return NamedSharding(mesh, kernel_spec(path, tuple(shape), mesh, k))
  return rule


def batch_spec(mesh: Mesh, ndim: int = 2) -> P:
  """Rows split over the mesh's batch axes (``data`` and ``fsdp``)."""
  axes = tuple(a for a in BATCH_AXES if a in mesh.axis_names)
  lead = None if not axes else (axes[0] if len(axes) == 1 else axes)
  return P(lead, *([None] * (ndim - 1)))


def batch_size_per_process(global_batch_size: int, mesh: Mesh) -> int:
  """Rows each process feeds; raises unless the batch divides evenly."""
  shards = math.prod(_size(mesh, a) for a in BATCH_AXES)
  if global_batch_size % shards:
    raise ValueError(
        f"batch {global_batch_size} does not split over the mesh's batch"
        f" axes ({shards} shards: {dict(mesh.shape)}); use a multiple of"
        f" {shards}")
  procs = jax.process_count()
  if global_batch_size % procs:
    raise ValueError(
        f"batch {global_batch_size} does not split over {procs} processes")
  return global_batch_size // procs


def global_batch(local: Any, mesh: Mesh) -> Any:
  """One global array per leaf from each process's own rows.

  Each process passes its rows (``local`` leaves of shape (B / processes,
  ...)), in process order; on one process this is a plain `device_put`
  with the batch sharding.
  """
  def one(x):
    x = np.asarray(x)
    sharding = NamedSharding(mesh, batch_spec(mesh, x.ndim))
    return jax.make_array_from_process_local_data(sharding, x)
  return jax.tree.map(one, local)


def replicated(tree: Any, mesh: Mesh) -> Any:
  """Every leaf replicated on `mesh` (identical values on every process)."""
  sharding = NamedSharding(mesh, P())
  return jax.tree.map(
      lambda x: jax.make_array_from_callback(
          np.shape(x), sharding, lambda idx, x=np.asarray(x): x[idx]), tree)
