"""`save_pretrained`: a (merged) model as a transformers checkpoint directory.

The inverse of `from_pretrained`'s name mapping:

  `a/b/kernel` (in, out)         -> `a.b.weight` (out, in), transposed
  `a/b/bias`                     -> `a.b.bias`
  `a/scale`                      -> `a.weight`
  `model/embed_tokens/embedding` -> `model.embed_tokens.weight`
  scanned `model/layers/<rest>` (L, ...) -> `model.layers.<i>.<rest>` per layer

written as safetensors (sharded past `max_shard_size`, with
model.safetensors.index.json, as transformers does) next to a config.json
built from the `ModelConfig`, so `AutoModelForCausalLM.from_pretrained(dir)`
and vLLM load it. LoRA nodes are merged and quantized kernels dequantized
first.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes  # noqa: F401  (bfloat16 for NumPy and safetensors)
import numpy as np

from jlora.models.config import ModelConfig
from jlora.node import is_lora

_ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                  "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}


def save_pretrained(directory: str | os.PathLike, model: Any, params: Any, *,
                    dtype: Any = None, tokenizer: Any = None,
                    max_shard_size: int = 5 * 2**30) -> list[str]:
  """Writes `params` (a LoRA tree is merged) as a transformers checkpoint.

  Args:
    directory: created if missing; an existing config.json and weight files
      of the same names are replaced.
    model: the `LlamaForCausalLM` (or its `ModelConfig`) the params belong to.
    params: the model's params: plain, a LoRA tree (`jlora.apply` output or
      `jlora.combine(trainable, frozen)`: merged with `jlora.merge`), or with
      quantized kernels (dequantized). Scanned or unscanned layers.
    dtype: the tensors' dtype on disk (e.g. jnp.bfloat16); default the
      model's `param_dtype` (each parameter's own dtype given a
      `ModelConfig`). Kernels are merged in at least float32 and rounded
      once.
    tokenizer: optionally saved alongside (`tokenizer.save_pretrained`), so
      the directory serves on its own.
    max_shard_size: bytes per safetensors file before a new shard starts.

  Returns:
    the weight files written.

  Raises:
    ValueError: a parameter path with no transformers name, or a config
      transformers' config class cannot express (e.g. sliding windows on
      Llama).

  Example:
    >>> lp = jlora.combine(trainable, frozen)
    >>> jlora.models.save_pretrained("merged", model, lp, tokenizer=tok)
    >>> AutoModelForCausalLM.from_pretrained("merged")   # PyTorch side
  """
  from safetensors.numpy import save_file

  from jlora.quant import dequantize

  config = model if isinstance(model, ModelConfig) else model.config
  directory = os.fspath(directory)
  os.makedirs(directory, exist_ok=True)
  hf_config = to_hf_config(config)
  target = dtype if dtype is not None else getattr(model, "param_dtype", None)

  def prepare(leaf):
    """One parameter as written: a quantized base dequantized to the values
    the model computes with, cast to the target dtype *before* merging (a
    float32 export of a bf16-dequantized base keeps the update unrounded),
    then merged. One leaf at a time: device memory holds one fused kernel."""
    leaf = dequantize(leaf)
    if target is not None:
      cast = lambda x: x.astype(target) if jnp.issubdtype(
          x.dtype, jnp.floating) else x
      leaf = dataclasses.replace(leaf, w=cast(leaf.w)) if is_lora(
          leaf) else cast(leaf)
    return leaf.materialize() if is_lora(leaf) else leaf

  flat = {path: functools.partial(prepare, leaf)
          for path, leaf in _flatten(params).items()}

  shards: list[dict[str, np.ndarray]] = [{}]
  size = 0
  for name, tensor in _hf_tensors(flat, config):
    tensor = np.ascontiguousarray(tensor)
    hf_config.setdefault("dtype", tensor.dtype.name)
    if shards[-1] and size + tensor.nbytes > max_shard_size:
      shards.append({})
      size = 0
    shards[-1][name] = tensor
    size += tensor.nbytes
  # Remove weight files of an earlier save so that no stale shard is loaded.
  for f in os.listdir(directory):
    if f.startswith("model") and (f.endswith(".safetensors")
                                  or f == "model.safetensors.index.json"):
      os.remove(os.path.join(directory, f))
  files, weight_map, total = [], {}, 0
  for k, shard in enumerate(shards):
    name = ("model.safetensors" if len(shards) == 1 else
            f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors")
    save_file(shard, os.path.join(directory, name), metadata={"format": "pt"})
    files.append(os.path.join(directory, name))
    weight_map.update({t: name for t in shard})
    total += sum(x.nbytes for x in shard.values())
  if len(shards) > 1:
    with open(os.path.join(directory, "model.safetensors.index.json"),
              "w") as f:
      json.dump({"metadata": {"total_size": total},
                 "weight_map": dict(sorted(weight_map.items()))}, f, indent=2)
  with open(os.path.join(directory, "config.json"), "w") as f:
    json.dump(hf_config, f, indent=2, sort_keys=True)
  if tokenizer is not None:
    tokenizer.save_pretrained(directory)
  return files


def to_hf_config(config: ModelConfig) -> dict[str, Any]:
  """transformers' config.json for a `ModelConfig` (its `from_hf` inverse).

  Example:
    >>> AutoConfig.for_model(**to_hf_config(model.config))
  """
  c = config
  if c.model_type not in _ARCHITECTURES:
    raise ValueError(f"model_type {c.model_type!r} cannot be exported; known:"
                     f" {sorted(_ARCHITECTURES)}")
  rope = {"rope_type": c.rope.rope_type, "rope_theta": c.rope.theta}
  if c.rope.rope_type != "default":
    rope["factor"] = c.rope.factor
  if c.rope.rope_type == "llama3":
    rope.update(low_freq_factor=c.rope.low_freq_factor,
                high_freq_factor=c.rope.high_freq_factor,
                original_max_position_embeddings=(
                    c.rope.original_max_position_embeddings))
  out = {
      "architectures": [_ARCHITECTURES[c.model_type]],
      "model_type": c.model_type,
      "vocab_size": c.vocab_size,
      "hidden_size": c.hidden_size,
      "intermediate_size": c.intermediate_size,
      "num_hidden_layers": c.num_layers,
      "num_attention_heads": c.num_heads,
      "num_key_value_heads": c.num_kv_heads,
      "head_dim": c.head_dim,
      "hidden_act": "silu",
      "rms_norm_eps": c.rms_norm_eps,
      "max_position_embeddings": c.max_position_embeddings,
      "rope_parameters": rope,
      "rope_theta": c.rope.theta,
      "tie_word_embeddings": c.tie_word_embeddings,
      "initializer_range": c.initializer_range,
  }
  if c.model_type == "qwen2":
    if (c.qkv_bias, c.o_bias) != (True, False):
      raise ValueError("Qwen2 has q/k/v biases and no o_proj bias; this"
                       f" config has qkv_bias={c.qkv_bias}, o_bias={c.o_bias}")
  elif c.qkv_bias != c.o_bias:
    raise ValueError(f"{c.model_type} has one attention_bias for q/k/v and o;"
                     f" this config has qkv_bias={c.qkv_bias},"
                     f" o_bias={c.o_bias}")
  else:
    out["attention_bias"] = c.qkv_bias
  if c.model_type == "llama":
    out["mlp_bias"] = c.mlp_bias
  elif c.mlp_bias:
    raise ValueError(f"{c.model_type} has no MLP bias; this config has"
                     " mlp_bias=True")
  if c.qk_norm != (c.model_type == "qwen3"):
    raise ValueError(f"qk_norm={c.qk_norm} does not fit {c.model_type}")
  out.update(_windows(c))
  return out


def _windows(c: ModelConfig) -> dict[str, Any]:
  windows = c.sliding_windows
  sizes = {w for w in windows if w is not None}
  if not sizes:
    if c.model_type == "mistral":
      return {"sliding_window": None}
    if c.model_type in ("qwen2", "qwen3"):
      return {"use_sliding_window": False, "sliding_window": None,
              "layer_types": ["full_attention"] * c.num_layers}
    return {}
  if c.model_type == "llama" or len(sizes) > 1 or (
      c.model_type == "mistral" and None in windows):
    raise ValueError(f"{c.model_type} cannot express the per-layer windows"
                     f" {windows} in its transformers config")
  (size,) = sizes
  if c.model_type == "mistral":
    return {"sliding_window": size}
  return {"use_sliding_window": True, "sliding_window": size,
          "max_window_layers": c.num_layers,
          "layer_types": ["full_attention" if w is None else
                          "sliding_attention" for w in windows]}


def _flatten(params: Any) -> dict[str, Any]:
  import flax.traverse_util as traverse_util

  if isinstance(params, dict) and set(params) == {"params"}:
    params = params["params"]
  return traverse_util.flatten_dict(params, sep="/")  # LoRA nodes are leaves


def _hf_tensors(flat: dict[str, Any], config: ModelConfig
                ) -> Iterator[tuple[str, np.ndarray]]:
  """(transformers name, host array) per tensor; `flat` maps paths to
  functions giving the parameter."""
  for path, leaf in flat.items():
    parts = path.split("/")
    kind = parts[-1]
    if kind not in ("kernel", "bias", "scale", "embedding"):
      raise ValueError(f"parameter {path!r} has no transformers name (the"
                       " last part must be kernel, bias, scale or embedding)")
    suffix = "bias" if kind == "bias" else "weight"
    stacked = (parts[:2] == ["model", "layers"] and len(parts) > 2
               and not parts[2].isdigit())
    x = np.asarray(jax.device_get(leaf()))
    if stacked:
      if x.shape[0] != config.num_layers:
        raise ValueError(f"{path!r} stacks {x.shape[0]} layers, the config"
                         f" has {config.num_layers}")
      rest = ".".join(parts[2:-1])
      for i in range(config.num_layers):
        yield f"model.layers.{i}.{rest}.{suffix}", _to_hf(x[i], kind)
    else:
      yield ".".join(parts[:-1] + [suffix]), _to_hf(x, kind)


def _to_hf(x: np.ndarray, kind: str) -> np.ndarray:
  return x.T if kind == "kernel" else x
