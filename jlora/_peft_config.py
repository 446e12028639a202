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

- ``target_parameters`` (3-D expert parameters, wrapped by ``ParamWrapper``)
  targets a parameter whose key (``<module>.<name>``) is listed or ends with
  ``"." + entry``; ``layers_to_transform`` and ``exclude_modules`` do not apply
  to it, ``rank_pattern`` / ``alpha_pattern`` match the parameter key. Several
  targeted parameters of one module are nested wrappers in the module's
  registration order, the last one outermost, so the adapter of the j-th of n
  is stored under ``<module>`` + ``.base_layer`` * (n - 1 - j). Its factors
  are ``lora_A`` [r * E, in], rows expert-major (e * r + k), and ``lora_B``
  [out, r * E], columns rank-major (k * E + e).

Module names are the transformers model's own, e.g.
``model.layers.0.self_attn.q_proj`` (no ``base_model.model.`` prefix).
"""

from __future__ import annotations

import collections
import json
import math
import os
import re
from typing import Any, Callable, Iterable

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
# The PEFT release whose file layout `jlora.peft.save` writes.
PEFT_VERSION = "0.21.2"
KEY_PREFIX = "base_model.model."
# The order in which transformers 5's MoE expert modules (Mixtral,
# Qwen2/3-MoE, DeepSeek, ...) register their 3-D parameters; PEFT nests the
# wrappers of several targeted parameters of one module in this order.
EXPERT_PARAMETER_ORDER = ("gate_up_proj", "gate_proj", "up_proj", "down_proj")


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
  try:
    with open(path) as f:
      config = json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise PeftFormatError(f"{path} is not valid JSON ({e})") from e
  if not isinstance(config, dict):
    raise PeftFormatError(
        f"{path} holds a JSON {type(config).__name__}; expected an object of"
        " LoraConfig fields")
  return config


# ------------------------------------------------------------ field types
#
# Every field `load` reads, with the type PEFT's LoraConfig declares. PEFT
# itself does not check them: "use_rslora": "false" is truthy there and
# turns rsLoRA on, "r": 2.0 fails deep in torch. jlora raises instead, naming
# the field. A field left out takes LoraConfig's default, as PEFT's
# `from_pretrained` does (r=8, lora_alpha=8).


def _int(v) -> bool:
  return isinstance(v, int) and not isinstance(v, bool)


def _real(v) -> bool:
  return (isinstance(v, (int, float)) and not isinstance(v, bool)
          and math.isfinite(v))


def _str_list(v) -> bool:
  return isinstance(v, list) and all(isinstance(x, str) for x in v)


def _regex(field: str, pattern: str, wrap: str = "{}") -> None:
  try:
    re.compile(wrap.format(pattern))
  except re.error as e:
    raise PeftFormatError(
        f"adapter_config.json has {field}={pattern!r}, not a valid regular"
        f" expression ({e})") from e


def _type_error(field: str, value: Any, expected: str) -> PeftFormatError:
  return PeftFormatError(
      f"adapter_config.json has {field}={value!r} ({type(value).__name__});"
      f" expected {expected}")


_TYPES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "r": (lambda v: _int(v) and v > 0, "a positive int"),
    "lora_alpha": (_real, "a finite number"),
    "use_rslora": (lambda v: isinstance(v, bool), "true or false"),
    "use_dora": (lambda v: isinstance(v, bool), "true or false"),
    "lora_dropout": (lambda v: _real(v) and 0 <= v < 1,
                     "a dropout rate in [0, 1)"),
    "target_modules": (lambda v: isinstance(v, str) or _str_list(v),
                       "a regex string or a list of module names"),
    "exclude_modules": (lambda v: v is None or isinstance(v, str)
                        or _str_list(v),
                        "null, a regex string or a list of module names"),
    "rank_pattern": (lambda v: v is None or isinstance(v, dict),
                     "an object {regex: rank}"),
    "alpha_pattern": (lambda v: v is None or isinstance(v, dict),
                      "an object {regex: alpha}"),
    "layers_to_transform": (
        lambda v: v is None or (_int(v) and v >= 0) or (
            isinstance(v, list) and all(_int(x) and x >= 0 for x in v)),
        "null, a layer index or a list of layer indices (ints >= 0)"),
    "layers_pattern": (lambda v: v is None or isinstance(v, str)
                       or _str_list(v),
                       "null, a string or a list of strings"),
    "target_parameters": (lambda v: v is None or _str_list(v),
                          "null or a list of parameter names"),
}
HONOURED = frozenset(_TYPES) | {"peft_type", "fan_in_fan_out"}
# Defaults of LoraConfig for the fields `load` reads.
_READ_DEFAULTS = {"peft_type": "LORA", "r": 8, "lora_alpha": 8,
                  "use_rslora": False, "use_dora": False, "lora_dropout": 0.0,
                  "exclude_modules": None, "rank_pattern": {},
                  "alpha_pattern": {}, "layers_to_transform": None,
                  "layers_pattern": None, "fan_in_fan_out": False,
                  "target_parameters": None}


def check(config: dict[str, Any]) -> dict[str, Any]:
  """The config with defaults filled in; PeftFormatError for a field jlora
  cannot honour or whose value has the wrong type (named in the message).

  The returned dict has every field `load` reads, ``None`` patterns as
  ``{}``.
  """
  config = dict(config)
  for name in missing(config):
    config[name] = _READ_DEFAULTS[name]
  if config["peft_type"] != "LORA":
    raise PeftFormatError(
        f"adapter_config.json has peft_type={config['peft_type']!r};"
        " jlora.peft.load reads LoRA adapters only (peft_type='LORA')")
  if config.get("target_modules") is None:
    if not config.get("target_parameters"):
      raise PeftFormatError(
          "adapter_config.json has target_modules=None (and no"
          " target_parameters); jlora needs the target module names the"
          " adapter was trained on")
    config["target_modules"] = []
  for name, (ok, expected) in _TYPES.items():
    if not ok(config[name]):
      raise _type_error(name, config[name], expected)
  if config["target_parameters"] and (config["use_dora"]
                                      or config["lora_dropout"]):
    field = "use_dora" if config["use_dora"] else "lora_dropout"
    raise PeftFormatError(
        f"adapter_config.json has target_parameters with {field}="
        f"{config[field]!r}; PEFT's ParamWrapper (expert parameters) refuses"
        " DoRA and dropout, so no PEFT model can hold this adapter")
  for name in ("rank_pattern", "alpha_pattern"):
    patterns = config[name] = config[name] or {}
    rank = name == "rank_pattern"
    for key, value in patterns.items():
      _regex(f"{name} key", key, r"(.*\.)?({})$")
      if not (_int(value) and value > 0 if rank else _real(value)):
        raise _type_error(f"{name}[{key!r}]", value, "a positive int" if rank
                          else "a finite number")
  targets = config["target_modules"]
  if isinstance(targets, str):
    _regex("target_modules", targets)
    for name in ("layers_to_transform", "layers_pattern"):
      if config[name] not in (None, []):
        # PEFT's LoraConfig raises the same way.
        raise PeftFormatError(
            f"adapter_config.json has {name}={config[name]!r} with a regex"
            f" target_modules={targets!r}; PEFT allows {name} only with a"
            " list of target modules")
  if isinstance(config["exclude_modules"], str):
    _regex("exclude_modules", config["exclude_modules"])
  if config["layers_pattern"] and config["layers_to_transform"] is None:
    raise PeftFormatError(
        f"adapter_config.json has layers_pattern={config['layers_pattern']!r}"
        " but no layers_to_transform; PEFT requires both")
  for p in ([config["layers_pattern"]] if isinstance(
      config["layers_pattern"], str) else config["layers_pattern"] or []):
    _regex("layers_pattern", p, r"(?:^|.*?\.){}\.(?P<idx>\d+)\.")
  if not isinstance(config["fan_in_fan_out"], bool):
    raise _type_error("fan_in_fan_out", config["fan_in_fan_out"],
                      "true or false")
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
  return config


def missing(config: dict[str, Any]) -> list[str]:
  """Fields `load` reads that the file leaves to LoraConfig's defaults."""
  return sorted(set(_READ_DEFAULTS) - set(config))


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


def is_parameter_targeted(config: dict[str, Any], key: str) -> bool:
  """Whether PEFT wraps the parameter `key` (``<module>.<name>``)."""
  targets = config.get("target_parameters") or []
  return key in targets or any(key.endswith(f".{t}") for t in targets)


def wrapper_names(keys: Iterable[str]) -> dict[str, str]:
  """PEFT module name of each targeted parameter key's ``ParamWrapper``.

  Parameters of one module nest in `EXPERT_PARAMETER_ORDER`; the last is
  the outermost wrapper (the module's own name), each earlier one a
  ``.base_layer`` further in.

  >>> wrapper_names(["m.experts.gate_up_proj", "m.experts.down_proj"])
  {'m.experts.gate_up_proj': 'm.experts.base_layer', 'm.experts.down_proj': 'm.experts'}
  """
  by_module = collections.defaultdict(list)
  for key in keys:
    module, _, name = key.rpartition(".")
    by_module[module].append(name)
  out = {}
  for module, names in by_module.items():
    unknown = [n for n in names if n not in EXPERT_PARAMETER_ORDER]
    if len(names) > 1 and unknown:
      raise PeftFormatError(
          f"parameters {sorted(names)} of module '{module}' are all adapted,"
          f" but PEFT nests their wrappers in the module's registration order,"
          f" known only for {EXPERT_PARAMETER_ORDER}; {unknown} is not among"
          " them. Adapt one parameter per module, or save the adapters"
          " separately")
    names = sorted(names, key=EXPERT_PARAMETER_ORDER.index)
    for j, name in enumerate(names):
      out[f"{module}.{name}"] = module + ".base_layer" * (len(names) - 1 - j)
  return out


def pattern_value(patterns: dict[str, Any] | None, name: str, default: Any):
  """PEFT's rank/alpha pattern lookup: the first key ending `name` wins."""
  for key, value in (patterns or {}).items():
    if re.match(rf"(.*\.)?({key})$", name):
      return value
  return default


# ----------------------------------------------------------------- writing


def _suffix(name: str, segments: int = 1) -> str:
  return ".".join(name.split(".")[-segments:])


def target_modules(targeted: Iterable[str], linear: Iterable[str],
                   segments: int = 1) -> list:
  """Shortest list PEFT expands to exactly `targeted` among `linear`.

  A name suffix of `segments` dotted parts (``q_proj``; with 2,
  ``experts.gate_up_proj`` for `target_parameters`) stands for all names
  ending with it when every one of them is targeted; otherwise the targeted
  ones are listed in full.
  """
  targeted = set(targeted)
  by_suffix = collections.defaultdict(set)
  for name in linear:
    by_suffix[_suffix(name, segments)].add(name)
  out = set()
  for name in targeted:
    siblings = by_suffix[_suffix(name, segments)]
    out.add(_suffix(name, segments) if siblings <= targeted else name)
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
