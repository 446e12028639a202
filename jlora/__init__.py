"""jlora: LoRA fine-tuning as a pure pytree transform over Flax params.

>>> lp = jlora.apply(params, rank=8, targets="q_proj|v_proj", key=key)
>>> trainable, frozen = jlora.partition(lp)
>>> logits = jlora.wrap(model.apply)({"params": jlora.combine(trainable, frozen)}, x)
"""

import importlib

from jlora import quant, variants
from jlora.adapters import (AdapterSet, add_adapter, load_adapter_set,
                            remove_adapter, save_adapter_set, select,
                            set_active, stack_adapters, unstack_adapters)
from jlora.adapters import wrap as wrap_adapter
from jlora._factored import LayoutError
from jlora.inject import apply
from jlora.layouts import Layouts, infer_layout
from jlora.merge import merge
from jlora.merging import combine_adapters
from jlora.node import LoRA, MultiLoRA
from jlora.partition import combine, mask, optimizer, partition
from jlora.quant import Fp8Array, QuantizedArray, dequantize, quantize
from jlora.summary import Count, count, summary
from jlora.variants import labels, loraplus_optimizer, relora, truncate
from jlora.wrap import wrap

__version__ = "0.1.0"

# Subpackages with heavier imports (orbax, safetensors, transformers) load on
# first use, so `import jlora` stays light and never imports torch.
_LAZY_MODULES = ("models", "peft", "checkpoint", "lorahub")
_LAZY_NAMES = {
    "save_adapter": "checkpoint", "load_adapter": "checkpoint",
    "save_merged": "checkpoint", "load_merged": "checkpoint",
    "read_metadata": "checkpoint", "CheckpointManager": "checkpoint",
    "AdapterMismatchError": "checkpoint",
    "CheckpointMismatchError": "checkpoint",
    "CheckpointCorruptError": "checkpoint",
    "NotACheckpointError": "checkpoint", "CheckpointBusyError": "checkpoint",
}


def __getattr__(name):
  if name in _LAZY_MODULES:
    return importlib.import_module(f"jlora.{name}")
  if name in _LAZY_NAMES:
    return getattr(importlib.import_module(f"jlora.{_LAZY_NAMES[name]}"), name)
  raise AttributeError(f"module 'jlora' has no attribute {name!r}")


__all__ = [
    "AdapterSet", "add_adapter", "combine_adapters", "load_adapter_set",
    "remove_adapter", "save_adapter_set", "select", "set_active",
    "stack_adapters", "unstack_adapters", "MultiLoRA",
    "wrap_adapter", "Fp8Array", "QuantizedArray", "dequantize", "quant",
    "quantize", "AdapterMismatchError", "CheckpointBusyError",
    "CheckpointCorruptError", "CheckpointManager", "NotACheckpointError",
    "CheckpointMismatchError", "Count", "LayoutError", "Layouts", "LoRA",
    "apply", "infer_layout",
    "combine", "count", "labels", "load_adapter", "load_merged",
    "loraplus_optimizer", "mask", "merge", "optimizer", "partition",
    "read_metadata", "relora", "save_adapter", "save_merged", "summary",
    "truncate", "variants", "wrap",
]
