"""PEFT's `adapter_config.json` for LoRA: fields, checks and name matching.

Facts taken from peft 0.21 (`peft/tuners/lora/config.py`,
`peft/tuners/tuners_utils.py`, `peft/utils/other.py`):

- ``target_modules`` as a string is a regex that must match a module's whole
  name; as a list, a module is targeted when its name is in the list or ends
  with ``"." + entry``.
- ``rank_pattern`` / ``alpha_pattern`` keys are regexes tried in order; a key
  applies when ``(.*\\.)?(key)$`` matches the module name from its start.
- ``layers_to_transform`` (list targets only) keeps modules whose first
  numbered segment after ``layers_pattern`` (or after any segment) is listed.
- The file is written with ``json.dumps(config, indent=2, sort_keys=True)``.

Module names are the transformers model's own, e.g.
``model.layers.0.self_attn.q_proj`` (no ``base_model.model.`` prefix).
"""

from __future__ import annotations

import collections
import json
import os
import re
from typing import Any, Iterable

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
# The PEFT release whose file layout `jlora.peft.save` writes.
PEFT_VERSION = "0.21.2"
KEY_PREFIX = "base_model.model."


class PeftFormatError(ValueError):
  """An adapter or config that jlora and PEFT cannot exchange faithfully."""


# Every field of a LoRA `adapter_config.json` written by peft 0.21, with the
# value PEFT writes by default.
DEFAULTS: dict[str, Any] = {
    "alora_invocation_tokens": None, "alpha_pattern": {},
    "arrow_config": None, "auto_mapping": None,
    "base_model_name_or_path": None, "bias": "none", "corda_config": None,
    "ensure_weight_tying": False, "eva_config": None,
    "exclude_modules": None, "fan_in_fan_out": False, "inference_mode": True,
    "init_lora_weights": True, "kasa_config": None,
    "layer_replication": None, "layers_pattern": None,
    "layers_to_transform": None, "loftq_config": {}, "lora_alpha": 8,
    "lora_bias": False, "lora_dropout": 0.0, "lora_ga_config": None,
    "megatron_config": None, "megatron_core": "megatron.core",
    "modules_to_save": None, "monteclora_config": None, "peft_type": "LORA",
    "peft_version": PEFT_VERSION, "qalora_group_size": 16, "r": 8,
    "rank_pattern": {}, "revision": None, "target_modules": None,
    "target_parameters": None, "task_type": None,
    "trainable_token_indices": None, "use_bdlora": None, "use_dora": False,
    "use_qalora": False, "use_rslora": False, "velora_config": None,
}

# Fields `load` honours.
HONOURED = frozenset({
    "peft_type", "r", "lora_alpha", "target_modules", "exclude_modules",
    "lora_dropout", "use_rslora", "use_dora", "rank_pattern", "alpha_pattern",
    "layers_to_transform", "layers_pattern",
})
# Fields that do not change the adapter's maths once its weights exist
# (initialisation, bookkeeping, distributed layout).
IGNORED = frozenset({
    "task_type", "peft_version", "auto_mapping", "base_model_name_or_path",
    "revision", "inference_mode", "init_lora_weights", "loftq_config",
    "eva_config", "corda_config", "lora_ga_config", "megatron_config",
    "megatron_core", "qalora_group_size", "runtime_config",
    "ensure_weight_tying",
})
# Fields that change the forward pass or add weights jlora has no place
# for; `load` accepts only their default ("empty") value.
_UNSUPPORTED_HINTS = {
    "fan_in_fan_out": "Conv1D-style (in, out) torch weights (GPT-2)",
    "bias": "trained biases are not part of a jlora adapter",
    "modules_to_save": "fully trained modules; load them into the base"
                       " params yourself and pass the rest",
    "trainable_token_indices": "trainable token rows of the embedding",
    "lora_bias": "a bias on lora_B",
    "use_qalora": "QA-LoRA pooled inputs",
    "use_bdlora": "block-diagonal LoRA",
    "velora_config": "the VeLoRA variant",
    "monteclora_config": "the MonteCLoRA variant",
    "arrow_config": "Arrow routing",
    "kasa_config": "the KaSA variant",
    "alora_invocation_tokens": "activated LoRA (aLoRA)",
    "layer_replication": "replicated layers",
    "target_parameters": "adapters on raw nn.Parameters (MoE experts)",
}


def _is_empty(value: Any) -> bool:
  return value is None or value is False or value == {} or value == [] or (
      value == "")


def read(directory: str | os.PathLike) -> dict[str, Any]:
  path = os.path.join(os.fspath(directory), CONFIG_NAME)
  if not os.path.isfile(path):
    raise FileNotFoundError(
        f"{path} not found; jlora.peft.load needs a directory written by"
        " PeftModel.save_pretrained (adapter_config.json +"
        " adapter_model.safetensors)")
  with open(path) as f:
    return json.load(f)


def check(config: dict[str, Any]) -> None:
  """Raises PeftFormatError for any field jlora cannot honour."""
  peft_type = config.get("peft_type", "LORA")
  if peft_type != "LORA":
    raise PeftFormatError(
        f"adapter_config.json has peft_type={peft_type!r}; jlora.peft.load"
        " reads LoRA adapters only (peft_type='LORA')")
  for name, value in config.items():
    if name in HONOURED or name in IGNORED:
      continue
    if name == "bias":
      if value != "none":
        raise PeftFormatError(
            f"adapter_config.json has bias={value!r}; jlora adapters train no"
            " biases, so only bias='none' can be loaded")
      continue
    if name in _UNSUPPORTED_HINTS:
      if not _is_empty(value):
        raise PeftFormatError(
            f"adapter_config.json has {name}={value!r} ("
            f"{_UNSUPPORTED_HINTS[name]}); jlora cannot honour it. Only"
            f" {name}={DEFAULTS.get(name)!r} can be loaded")
      continue
    if not _is_empty(value):
      raise PeftFormatError(
          f"adapter_config.json has unknown field {name}={value!r}; jlora"
          f" does not know whether it changes the adapter (written by PEFT"
          f" {config.get('peft_version', '?')}, jlora knows PEFT"
          f" {PEFT_VERSION}); remove it if it is a no-op")
  dropout = config.get("lora_dropout", 0.0) or 0.0
  if not 0.0 <= dropout < 1.0:
    raise PeftFormatError(
        f"adapter_config.json has lora_dropout={dropout!r}; expected a rate"
        " in [0, 1)")
  if config.get("target_modules") is None:
    raise PeftFormatError(
        "adapter_config.json has target_modules=None; jlora needs the"
        " target module names the adapter was trained on")


# ------------------------------------------------------------ PEFT matching


def _layer_index(config: dict[str, Any], name: str) -> int | None:
  pattern = config.get("layers_pattern")
  if not pattern:
    match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", name)
  else:
    match = None
    for p in [pattern] if isinstance(pattern, str) else pattern:
      match = re.match(rf"(?:^|.*?\.){p}\.(?P<idx>\d+)\.", name)
      if match:
        break
  return None if match is None else int(match.group("idx"))


def is_targeted(config: dict[str, Any], name: str) -> bool:
  """Whether PEFT would put an adapter on the module called `name`."""
  exclude = config.get("exclude_modules")
  if exclude:
    if isinstance(exclude, str):
      if re.fullmatch(exclude, name):
        return False
    elif name in exclude or any(name.endswith(f".{e}") for e in exclude):
      return False
  targets = config.get("target_modules")
  if isinstance(targets, str):
    return re.fullmatch(targets, name) is not None
  if name in targets:
    return True
  if not any(name.endswith(f".{t}") for t in targets):
    return False
  layers = config.get("layers_to_transform")
  if layers is None or layers == []:
    return True
  index = _layer_index(config, name)
  if index is None:
    return False
  return index == layers if isinstance(layers, int) else index in layers


def pattern_value(patterns: dict[str, Any] | None, name: str, default: Any):
  """PEFT's rank/alpha pattern lookup: the first key ending `name` wins."""
  for key, value in (patterns or {}).items():
    if re.match(rf"(.*\.)?({key})$", name):
      return value
  return default


# ----------------------------------------------------------------- writing


def _suffix(name: str) -> str:
  return name.rsplit(".", 1)[-1]


def target_modules(targeted: Iterable[str], linear: Iterable[str]) -> list:
  """Shortest list PEFT expands to exactly `targeted` among `linear`.

  A module-name suffix (``q_proj``) stands for all linear modules ending
  with it when every one of them is targeted; otherwise the targeted ones are
  listed by full name.
  """
  targeted = set(targeted)
  by_suffix = collections.defaultdict(set)
  for name in linear:
    by_suffix[_suffix(name)].add(name)
  out = set()
  for name in targeted:
    siblings = by_suffix[_suffix(name)]
    out.add(_suffix(name) if siblings <= targeted else name)
  return sorted(out)


def patterns(values: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
  """(default, pattern dict) reproducing the per-module `values` in PEFT.

  The default is the most common value; a suffix with one value across its
  modules gets a suffix key, a mixed suffix gets full module names.
  """
  counts = collections.Counter(values.values())
  default = max(counts, key=lambda v: (counts[v], v))
  by_suffix = collections.defaultdict(dict)
  for name, value in values.items():
    by_suffix[_suffix(name)][name] = value
  out = {}
  for suffix in sorted(by_suffix):
    group = by_suffix[suffix]
    distinct = set(group.values())
    if len(distinct) == 1:
      (value,) = distinct
      if value != default:
        out[suffix] = value
    else:
      out.update({n: v for n, v in sorted(group.items()) if v != default})
  return default, out


def number(value: float) -> int | float:
  """An alpha as PEFT writes it: an int when integral."""
  return int(value) if float(value).is_integer() else float(value)


def write(directory: str, config: dict[str, Any]) -> None:
  with open(os.path.join(directory, CONFIG_NAME), "w") as f:
    f.write(json.dumps(config, indent=2, sort_keys=True))
