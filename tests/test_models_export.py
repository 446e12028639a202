"""jlora.models.save_pretrained: merged checkpoints that transformers loads."""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jlora
from jlora import models

from helpers import randomize_b

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

FAMILIES = {
    "llama": {},
    "qwen2": dict(qkv_bias=True),
    "qwen3": dict(qk_norm=True, tie_word_embeddings=True),
    "mistral": dict(sliding_windows=(6, 6)),
}


def config(model_type, **kw):
  kw = {**FAMILIES[model_type], **kw}
  return models.ModelConfig(
      vocab_size=96, hidden_size=32, intermediate_size=64, num_layers=2,
      num_heads=4, num_kv_heads=2, model_type=model_type,
      max_position_embeddings=64,
      rope=models.RopeConfig(theta=5000.0,
                             original_max_position_embeddings=64), **kw)


def adapted(cfg, scan, key=0):
  model, params = models.from_config(cfg, jax.random.key(key),
                                     scan_layers=scan)
  lp = jlora.apply(params, rank=4, alpha=8.0, key=jax.random.key(key + 1))
  return model, randomize_b(lp, jax.random.key(key + 2), std=0.2)


def hf_logits(directory, ids):
  hf = transformers.AutoModelForCausalLM.from_pretrained(directory).eval()
  with torch.no_grad():
    return hf(torch.tensor(np.asarray(ids))).logits.float().numpy(), hf


@pytest.mark.parametrize("family,scan", [(f, False) for f in sorted(FAMILIES)]
                         + [("qwen2", True)])
def test_merged_export_matches_in_transformers(tmp_path, family, scan):
  cfg = config(family)
  model, lp = adapted(cfg, scan)
  ids = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size,
                                                      (2, 16)))
  models.save_pretrained(tmp_path, model, lp)
  got, hf = hf_logits(tmp_path, ids)
  apply = jax.jit(model.apply)
  merged = apply({"params": jlora.merge(lp)}, ids)
  factored = jax.jit(jlora.wrap(model.apply))({"params": lp}, ids)
  np.testing.assert_allclose(got, np.asarray(merged), atol=1e-4, rtol=0)
  np.testing.assert_allclose(got, np.asarray(factored), atol=1e-4, rtol=0)
  # The LoRA update is in the file: the bare base's logits differ.
  base = apply({"params": jax.tree.map(
      lambda x: x.w if isinstance(x, jlora.LoRA) else x, lp,
      is_leaf=lambda x: isinstance(x, jlora.LoRA))}, ids)
  assert np.abs(got - np.asarray(base)).max() > 1e-2
  assert models.ModelConfig.from_hf(hf.config) == cfg
  assert type(hf).__name__ == json.load(
      open(tmp_path / "config.json"))["architectures"][0]


def test_llama3_rope_and_dtype_round_trip(tmp_path):
  cfg = dataclasses.replace(config("llama"), rope=models.RopeConfig(
      theta=500000.0, rope_type="llama3", factor=8.0, low_freq_factor=1.0,
      high_freq_factor=4.0, original_max_position_embeddings=32))
  model, params = models.from_config(cfg, jax.random.key(0),
                                     param_dtype=jnp.bfloat16)
  models.save_pretrained(tmp_path, model, params)
  hf_cfg = transformers.AutoConfig.from_pretrained(tmp_path)
  assert models.ModelConfig.from_hf(hf_cfg) == cfg
  assert json.load(open(tmp_path / "config.json"))["dtype"] == "bfloat16"
  _, back = models.from_pretrained(tmp_path)
  for x, y in zip(jax.tree.leaves(params), jax.tree.leaves(back)):
    assert y.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.fast_tier  # the module's one test in the fast tier
def test_sharded_export_reads_back_exactly(tmp_path):
  cfg = config("llama")
  model, lp = adapted(cfg, scan=True)
  files = models.save_pretrained(tmp_path, model, lp, max_shard_size=20_000)
  assert len(files) > 2
  index = json.load(open(tmp_path / "model.safetensors.index.json"))
  assert sorted(set(index["weight_map"].values())) == sorted(
      os.path.basename(f) for f in files)
  _, back = models.from_pretrained(tmp_path, scan_layers=True)
  for x, y in zip(jax.tree.leaves(jlora.merge(lp)), jax.tree.leaves(back)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  # A later single-file save leaves no stale shard behind.
  models.save_pretrained(tmp_path, model, lp)
  assert sorted(f for f in os.listdir(tmp_path) if "safetensors" in f) == [
      "model.safetensors"]


def test_quantized_base_is_exported_dequantized(tmp_path):
  cfg = config("llama")
  model, params = models.from_config(cfg, jax.random.key(0))
  q = jlora.quantize(params, "nf4", block_size=32,
                     compute_dtype=jnp.float32)
  lp = randomize_b(jlora.apply(q, rank=4, key=jax.random.key(1)),
                   jax.random.key(2), std=0.2)
  models.save_pretrained(tmp_path, model, lp)
  ids = np.arange(12)[None] % cfg.vocab_size
  got, _ = hf_logits(tmp_path, ids)
  want = jax.jit(jlora.wrap(model.apply))({"params": lp}, jnp.asarray(ids))
  np.testing.assert_allclose(got, np.asarray(want), atol=1e-4, rtol=0)


def test_unexpressible_configs_are_refused():
  with pytest.raises(ValueError, match="per-layer windows"):
    models.to_hf_config(config("llama", sliding_windows=(8, None)))
  with pytest.raises(ValueError, match="attention_bias"):
    models.to_hf_config(config("llama", qkv_bias=True))
