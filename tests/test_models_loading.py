"""jlora.models.loading: loads what transformers' save_pretrained writes."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from helpers import TINY_HF  # noqa: E402

from jax.sharding import Mesh, NamedSharding, PartitionSpec  # noqa: E402
from safetensors.numpy import load_file, save_file  # noqa: E402

from jlora.models import (  # noqa: E402
  CheckpointMismatchError,
  ModelConfig,
  from_config,
  from_pretrained,
  load_tokenizer,
)

TINY = TINY_HF
FAMILIES = {
  "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
  "llama3_tied": (
    "LlamaConfig",
    "LlamaForCausalLM",
    {
      "tie_word_embeddings": True,
      "max_position_embeddings": 64,
      "rope_parameters": {
        "rope_type": "llama3",
        "rope_theta": 500000.0,
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8,
      },
    },
  ),
  "mistral": ("MistralConfig", "MistralForCausalLM", {"sliding_window": 5}),
  "qwen2_tied": (
    "Qwen2Config",
    "Qwen2ForCausalLM",
    {"tie_word_embeddings": True},
  ),
  "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 32}),
}
IDS = np.random.RandomState(0).randint(0, 128, (2, 11))


def make_hf(family: str, seed: int = 0, dtype=None):
  config_cls, model_cls, extra = FAMILIES[family]
  config = getattr(transformers, config_cls)(**{**TINY, **extra})
  config._attn_implementation = "eager"
  torch.manual_seed(seed)
  model = getattr(transformers, model_cls)(config).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      p.copy_((1.0 if "norm" in name else 0.0) + 0.1 * torch.randn_like(p))
  return model.to(dtype) if dtype is not None else model


def hf_logits(model, ids=IDS):
  with torch.no_grad():
    return model(torch.tensor(ids)).logits.float().numpy()


def saved(tmp_path, family, **kw):
  hf = make_hf(family, dtype=kw.pop("dtype", None))
  hf.save_pretrained(tmp_path, **kw)
  return hf


def logits(model, params, ids=IDS):
  return np.asarray(jax.jit(model.apply)({"params": params}, jnp.asarray(ids)))


@pytest.mark.parametrize("family", list(FAMILIES))
def test_from_pretrained_matches_transformers(tmp_path, family):
  hf = saved(tmp_path, family)
  model, params = from_pretrained(tmp_path)
  assert model.config == ModelConfig.from_hf(hf.config)
  assert ("lm_head" in params) != model.config.tie_word_embeddings
  np.testing.assert_allclose(
    logits(model, params), hf_logits(hf), atol=1e-4, rtol=0
  )


@pytest.mark.parametrize("family", ["llama", "qwen2_tied"])
def test_scan_layers_matches_transformers(tmp_path, family):
  hf = saved(tmp_path, family)
  model, params = from_pretrained(tmp_path, scan_layers=True)
  assert params["model"]["layers"]["mlp"]["up_proj"]["kernel"].shape == (
    2,
    64,
    128,
  )
  np.testing.assert_allclose(
    logits(model, params), hf_logits(hf), atol=1e-4, rtol=0
  )


def test_sharded_checkpoint(tmp_path):
  hf = saved(tmp_path, "qwen3", max_shard_size="40KB")
  index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
  assert len(set(index["weight_map"].values())) > 2
  assert not (tmp_path / "model.safetensors").exists()
  model, params = from_pretrained(tmp_path, scan_layers=True)
  np.testing.assert_allclose(
    logits(model, params), hf_logits(hf), atol=1e-4, rtol=0
  )


def test_bf16_checkpoint(tmp_path):
  hf = saved(tmp_path, "llama", dtype=torch.bfloat16)
  header = json.loads(
    (lambda b: b[8 : 8 + int.from_bytes(b[:8], "little")])(
      (tmp_path / "model.safetensors").read_bytes()
    )
  )
  assert header["model.norm.weight"]["dtype"] == "BF16"
  # Default: the checkpoint's dtype for params and compute.
  model, params = from_pretrained(tmp_path)
  assert model.dtype == jnp.bfloat16
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(params))
  # The bf16 values widen exactly, so a float32 run must equal HF's float32 run
  # of the same weights.
  model32, params32 = from_pretrained(tmp_path, param_dtype=jnp.float32)
  # Fresh float32 buffers (rope inv_freq), bf16-rounded weights.
  hf32 = make_hf("llama")
  hf32.load_state_dict({k: v.float() for k, v in hf.state_dict().items()})
  expected = hf_logits(hf32)
  np.testing.assert_allclose(
    logits(model32, params32), expected, atol=1e-4, rtol=0
  )
  got16 = logits(model, params)
  assert 0 < np.abs(got16 - expected).max() < 0.1 * np.abs(expected).max()


def test_mesh_default_rule_shards_output_axis(tmp_path):
  hf = saved(tmp_path, "llama")
  devices = np.array(jax.devices())
  if devices.size < 2:
    pytest.skip(
      "needs several devices (tests/conftest.py simulates 8 CPU devices)"
    )
  mesh = Mesh(devices[:2], ("model",))
  model, params = from_pretrained(tmp_path, mesh=mesh, scan_layers=True)
  q = params["model"]["layers"]["self_attn"]["q_proj"]["kernel"]
  assert q.sharding == NamedSharding(mesh, PartitionSpec(None, None, "model"))
  assert q.addressable_shards[0].data.shape == (2, 64, 32)
  norm = params["model"]["norm"]["scale"]
  assert norm.sharding.spec == PartitionSpec()
  np.testing.assert_allclose(
    logits(model, params), hf_logits(hf), atol=1e-4, rtol=0
  )


def test_explicit_shardings_callable(tmp_path):
  saved(tmp_path, "llama")
  seen = []
  device = jax.devices()[-1]

  def rule(path, shape):
    seen.append((path, shape))
    return jax.sharding.SingleDeviceSharding(device)

  _, params = from_pretrained(tmp_path, shardings=rule)
  assert ("lm_head/kernel", (64, 128)) in seen
  assert all(x.devices() == {device} for x in jax.tree.leaves(params))


def test_shardings_mapping_must_cover_every_leaf(tmp_path):
  saved(tmp_path, "llama")
  single = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  with pytest.raises(KeyError, match="no entry for parameter 'model/"):
    from_pretrained(tmp_path, shardings={"lm_head": {"kernel": single}})


def test_from_config_random_init():
  config = transformers.Qwen2Config(**TINY)
  model, params = from_config(config, jax.random.key(0))
  # Qwen2 carries q/k/v biases, initialised to zero; kernels ~ N(0, 0.02^2).
  attn = params["model"]["layers"]["0"]["self_attn"]
  assert (
    float(jnp.abs(attn["k_proj"]["bias"]).max()) == 0.0
    and "bias" not in attn["o_proj"]
  )
  std = float(
    jnp.std(params["model"]["layers"]["1"]["mlp"]["up_proj"]["kernel"])
  )
  assert 0.015 < std < 0.025
  assert logits(model, params).shape == (2, 11, 128)
  model2, params2 = from_config(
    ModelConfig.from_hf(config), jax.random.key(0), scan_layers=True
  )
  assert params2["model"]["layers"]["self_attn"]["q_proj"]["kernel"].shape == (
    2,
    64,
    64,
  )


def test_load_tokenizer(tmp_path):
  from tokenizers import Tokenizer, models, pre_tokenizers

  vocab = {"[UNK]": 0, "hello": 1, "world": 2}
  tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  fast = transformers.PreTrainedTokenizerFast(
    tokenizer_object=tok, unk_token="[UNK]"
  )
  fast.save_pretrained(tmp_path)
  loaded = load_tokenizer(tmp_path)
  assert loaded("hello there world")["input_ids"] == [1, 0, 2]


def test_import_does_not_load_torch_or_transformers():
  code = (
    "import sys, jlora.models; "
    "bad = [m for m in ('torch', 'transformers') if m in sys.modules]; "
    "assert not bad, bad"
  )
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = {**os.environ, "PYTHONPATH": root, "JAX_PLATFORMS": "cpu"}
  subprocess.run([sys.executable, "-c", code], check=True, env=env, cwd=root)


# ----------------------------------------------------------------------------
# Errors


def test_missing_config(tmp_path):
  saved(tmp_path, "llama")
  (tmp_path / "config.json").unlink()
  with pytest.raises(
    FileNotFoundError, match="has no config.json.*save_pretrained"
  ):
    from_pretrained(tmp_path)


def test_missing_weights(tmp_path):
  saved(tmp_path, "llama")
  (tmp_path / "model.safetensors").unlink()
  with pytest.raises(
    FileNotFoundError,
    match="neither model.safetensors nor .*safe_serialization",
  ):
    from_pretrained(tmp_path)


def test_missing_shard(tmp_path):
  saved(tmp_path, "llama", max_shard_size="40KB")
  shard = sorted(tmp_path.glob("model-*.safetensors"))[-1]
  shard.unlink()
  with pytest.raises(FileNotFoundError, match=f"{shard.name} is listed in"):
    from_pretrained(tmp_path)


def test_not_a_directory(tmp_path):
  with pytest.raises(FileNotFoundError, match="is not a directory"):
    from_pretrained(tmp_path / "nope")


def _edit_weights(tmp_path, edit):
  path = tmp_path / "model.safetensors"
  tensors = load_file(path)
  edit(tensors)
  save_file(tensors, path, metadata={"format": "pt"})


def test_wrong_shape(tmp_path):
  saved(tmp_path, "llama")
  key = "model.layers.1.mlp.up_proj.weight"
  _edit_weights(tmp_path, lambda t: t.update({key: t[key][:100]}))
  with pytest.raises(
    CheckpointMismatchError,
    match=r"'model.layers.1.mlp.up_proj.weight' in .* has shape \(100, 64\), "
    r"expected \(128, 64\)",
  ):
    from_pretrained(tmp_path)


def test_wrong_shape_from_config(tmp_path):
  saved(tmp_path, "llama")
  cfg = json.loads((tmp_path / "config.json").read_text())
  cfg["intermediate_size"] = 96
  (tmp_path / "config.json").write_text(json.dumps(cfg))
  with pytest.raises(
    CheckpointMismatchError, match=r"mlp.* has shape .*128.*, expected .*96"
  ):
    from_pretrained(tmp_path, scan_layers=True)


def test_missing_keys(tmp_path):
  saved(tmp_path, "qwen2_tied")
  _edit_weights(
    tmp_path, lambda t: t.pop("model.layers.0.self_attn.k_proj.bias")
  )
  with pytest.raises(
    CheckpointMismatchError, match=r"lacks 1 tensor.*k_proj.bias"
  ):
    from_pretrained(tmp_path)


def test_unexpected_keys(tmp_path):
  saved(tmp_path, "llama")
  _edit_weights(
    tmp_path,
    lambda t: t.update(
      {
        "model.layers.2.mlp.up_proj.weight": t[
          "model.layers.1.mlp.up_proj.weight"
        ]
      }
    ),
  )
  with pytest.raises(
    CheckpointMismatchError,
    match=r"1 tensor\(s\) the config does not use.*layers.2",
  ):
    from_pretrained(tmp_path)


def test_ignores_legacy_rope_buffers(tmp_path):
  hf = saved(tmp_path, "llama")
  inv = np.zeros(8, np.float32)
  _edit_weights(
    tmp_path,
    lambda t: t.update({"model.layers.0.self_attn.rotary_emb.inv_freq": inv}),
  )
  model, params = from_pretrained(tmp_path)
  np.testing.assert_allclose(
    logits(model, params), hf_logits(hf), atol=1e-4, rtol=0
  )


def test_unsupported_architecture(tmp_path):
  transformers.GPT2Config(
    n_layer=1, n_embd=32, n_head=2, vocab_size=64
  ).save_pretrained(tmp_path)
  with pytest.raises(ValueError, match="model_type 'gpt2' is not supported"):
    from_pretrained(tmp_path)


@pytest.mark.parametrize("scan_layers", [False, True])
def test_quantize_on_load_equals_quantize_after_load(tmp_path, scan_layers):
  import jlora
  from jlora import quant

  saved(tmp_path, "llama")
  model, dense = from_pretrained(tmp_path, scan_layers=scan_layers)
  _, qparams = from_pretrained(tmp_path, scan_layers=scan_layers,
                               quantize="nf4")
  expected = quant.quantize(dense, "nf4")
  flat_q = jax.tree_util.tree_leaves_with_path(qparams)
  flat_e = jax.tree_util.tree_leaves_with_path(expected)
  assert [p for p, _ in flat_q] == [p for p, _ in flat_e]
  for (_, x), (_, y) in zip(flat_q, flat_e):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  # Linear kernels are quantized, the head and embeddings are not.
  layers = qparams["model"]["layers"]
  q_proj = (layers if scan_layers else layers["0"])["self_attn"]["q_proj"]
  assert quant.is_quantized(q_proj["kernel"])
  assert not quant.is_quantized(qparams["lm_head"]["kernel"])
  # QLoRA forward: adapters on the quantized base run through jlora.wrap and
  # equal the model on the dequantized base (b = 0 at init).
  lp = jlora.apply(qparams, rank=4, key=jax.random.key(0))
  out = jax.jit(jlora.wrap(model.apply))({"params": lp}, jnp.asarray(IDS))
  ref = logits(model, quant.dequantize(qparams, jnp.float32))
  assert np.abs(np.asarray(out, np.float32) - ref).max() < 5e-2 * np.abs(
    ref).max()
