"""jlora: LoRA fine-tuning as a pure pytree transform over Flax params.

>>> lp = jlora.apply(params, rank=8, targets="q_proj|v_proj", key=key)
>>> trainable, frozen = jlora.partition(lp)
>>> logits = jlora.wrap(model.apply)({"params": jlora.combine(trainable, frozen)}, x)
"""

import importlib

from jlora._factored import LayoutError
from jlora.inject import apply
from jlora.merge import merge
from jlora.node import LoRA
from jlora.partition import combine, mask, optimizer, partition
from jlora.summary import Count, count, summary
from jlora.wrap import wrap

__version__ = "0.1.0"

# Subpackages that import heavier dependencies load on first use.
_LAZY = ("models", "peft")


def __getattr__(name):
  if name in _LAZY:
    return importlib.import_module(f"jlora.{name}")
  raise AttributeError(f"module 'jlora' has no attribute {name!r}")


__all__ = [
    "Count", "LayoutError", "LoRA", "apply", "combine", "count", "mask",
    "merge", "optimizer", "partition", "summary", "wrap",
]
