"""from_config / from_pretrained with quantize=: made and quantized per layer.

The QLoRA path for models too large to exist dense (70B on one GPU): memory
must peak near the quantized model plus one dense layer. Checked here by
counting the bytes of live JAX arrays whenever the quantize hook runs (the
moment a dense layer exists), on a model whose dense weights are several
times that.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

import jlora
from jlora import quant
from jlora.models import ModelConfig, from_config
from jlora.models.sharding import make_mesh, param_rule

KEY = jax.random.key(0)
# Eight layers with small embeddings: the dense layers dominate, so "dense
# model" and "quantized model + one dense layer" are far apart.
CFG = ModelConfig(vocab_size=64, hidden_size=128, intermediate_size=512,
                  num_layers=8, num_heads=4, num_kv_heads=2)
SMALL = ModelConfig(vocab_size=64, hidden_size=64, intermediate_size=256,
                    num_layers=3, num_heads=4, num_kv_heads=2, qkv_bias=True,
                    initializer_range=0.05)


def identity(path, x):
  return x


def flat(tree):
  return traverse_util.flatten_dict(tree, sep="/")


def nbytes(tree) -> int:
  return sum(x.nbytes for x in jax.tree.leaves(tree))


def assert_trees_equal(a, b):
  la, lb = (jax.tree_util.tree_leaves_with_path(t) for t in (a, b))
  assert [p for p, _ in la] == [p for p, _ in lb]
  for (path, x), (_, y) in zip(la, lb):
    assert x.dtype == y.dtype, path
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=str(
        path))


@pytest.mark.parametrize("scan_layers,method", [(True, "nf4"),
                                                (False, "int8")])
def test_per_layer_quantized_init_equals_quantizing_the_same_model(
    scan_layers, method):
  cfg = SMALL
  _, dense = from_config(cfg, KEY, quantize=identity, scan_layers=scan_layers,
                         param_dtype=jnp.bfloat16, dtype=jnp.bfloat16)
  model, qparams = from_config(cfg, KEY, quantize=method,
                               scan_layers=scan_layers,
                               param_dtype=jnp.bfloat16, dtype=jnp.bfloat16)
  assert_trees_equal(qparams, quant.quantize(dense, method))
  up = qparams["model"]["layers"]
  up = (up if scan_layers else up["2"])["mlp"]["up_proj"]["kernel"]
  assert quant.is_quantized(up) and up.stacked == int(scan_layers)
  assert not quant.is_quantized(qparams["lm_head"]["kernel"])
  if scan_layers:
    # QLoRA forward on it equals the model on its dequantized base (b = 0).
    ids = jnp.arange(12).reshape(2, 6) % cfg.vocab_size
    lp = jlora.apply(qparams, rank=4, key=KEY)
    out = jax.jit(jlora.wrap(model.apply))({"params": lp}, ids)
    ref = model.apply({"params": quant.dequantize(qparams)}, ids)
    np.testing.assert_allclose(np.asarray(out, np.float32),
                               np.asarray(ref, np.float32), atol=2e-2, rtol=0)


def test_per_layer_init_is_a_proper_random_model():
  """Same tree as model.init, the initializers' statistics, distinct layers,
  and the same values with or without scan_layers."""
  cfg = SMALL
  model, scanned = from_config(cfg, KEY, quantize=identity, scan_layers=True)
  shapes = jax.eval_shape(model.init, KEY, jnp.zeros((1, 1), jnp.int32))
  assert jax.tree.map(lambda x: (x.shape, x.dtype), shapes["params"]) == (
      jax.tree.map(lambda x: (x.shape, x.dtype), scanned))
  _, unrolled = from_config(cfg, KEY, quantize=identity, scan_layers=False)
  for path, x in flat(scanned).items():
    if not path.startswith("model/layers/"):
      np.testing.assert_array_equal(x, flat(unrolled)[path])
      continue
    rest = path[len("model/layers/"):]
    for i in range(cfg.num_layers):
      np.testing.assert_array_equal(x[i], flat(unrolled)[
          f"model/layers/{i}/{rest}"])
  layers = scanned["model"]["layers"]
  for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
    w = np.asarray(layers["self_attn"][name]["kernel"], np.float64)
    assert abs(w.std() / 0.05 - 1) < 0.05 and abs(w.mean()) < 0.005
    # Each layer draws its own values.
    assert not np.allclose(w[0], w[1])
  assert float(jnp.abs(layers["self_attn"]["q_proj"]["bias"]).max()) == 0.0
  assert float(jnp.min(layers["input_layernorm"]["scale"])) == 1.0
  assert float(jnp.max(layers["input_layernorm"]["scale"])) == 1.0
  emb = np.asarray(scanned["model"]["embed_tokens"]["embedding"], np.float64)
  assert abs(emb.std() / 0.05 - 1) < 0.05


class LiveBytes:
  """A quantize hook recording the bytes of all live arrays at each call."""

  def __init__(self, method="nf4"):
    self.inner = quant.quantizer(method)
    self.base = sum(x.nbytes for x in jax.live_arrays())
    self.peak = 0

  def __call__(self, path, x):
    live = sum(a.nbytes for a in jax.live_arrays()) - self.base
    self.peak = max(self.peak, live)
    return self.inner(path, x)


def test_quantized_from_config_never_holds_the_dense_model():
  dtype = jnp.float32
  shapes = jax.eval_shape(
      lambda k: from_config(CFG, k, param_dtype=dtype, scan_layers=True)[1],
      KEY)
  dense_model = sum(math.prod(s.shape) * 4 for s in jax.tree.leaves(shapes))
  layer = sum(math.prod(s.shape) * 4 for s in jax.tree.leaves(
      shapes["model"]["layers"])) // CFG.num_layers
  hook = LiveBytes()
  _, qparams = from_config(CFG, KEY, quantize=hook, scan_layers=True,
                           param_dtype=dtype)
  quantized = nbytes(qparams)
  # The dense layer being quantized, the quantized stacks (allocated whole at
  # the first layer) and the embedding and head; never the dense model.
  assert hook.peak <= quantized + layer + 1024, (hook.peak, quantized, layer)
  assert hook.peak < 0.4 * dense_model, (hook.peak, dense_model)
  assert quantized < 0.25 * dense_model


def test_quantize_on_load_reads_stacked_kernels_layer_by_layer(tmp_path):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  hf_cfg = transformers.LlamaConfig(
      vocab_size=64, hidden_size=128, intermediate_size=512,
      num_hidden_layers=8, num_attention_heads=4, num_key_value_heads=2)
  torch.manual_seed(0)
  transformers.LlamaForCausalLM(hf_cfg).save_pretrained(tmp_path)
  from jlora.models import from_pretrained

  _, dense = from_pretrained(tmp_path, scan_layers=True)
  dense_model = nbytes(dense)
  largest = max(x.nbytes for x in jax.tree.leaves(dense))
  del dense
  hook = LiveBytes()
  _, qparams = from_pretrained(tmp_path, scan_layers=True, quantize=hook)
  quantized = nbytes(qparams)
  one_slice = largest // hf_cfg.num_hidden_layers
  assert hook.peak <= quantized + one_slice + 1024, (hook.peak, quantized)
  assert hook.peak < 0.3 * dense_model


def test_sharded_quantized_init_matches_unsharded():
  mesh = make_mesh("fsdp:8")
  _, ref = from_config(CFG, KEY, quantize="nf4", scan_layers=True)
  _, sharded = from_config(CFG, KEY, quantize="nf4", scan_layers=True,
                           shardings=param_rule(mesh))
  # The same values; float32 scales to rounding (sharded reductions sum in
  # another order).
  for (path, x), (_, y) in zip(jax.tree_util.tree_leaves_with_path(sharded),
                               jax.tree_util.tree_leaves_with_path(ref)):
    assert x.dtype == y.dtype and x.shape == y.shape, path
    if jnp.issubdtype(x.dtype, jnp.floating):
      np.testing.assert_allclose(np.asarray(x, np.float32),
                                 np.asarray(y, np.float32), rtol=1e-6)
    else:
      np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  codes = sharded["model"]["layers"]["mlp"]["up_proj"]["kernel"].codes
  # up_proj (L, 128, 512): FSDP shards its largest free axis, the output;
  # the packed codes (L, 128, 256) keep that axis sharded, not the layers.
  assert codes.sharding.spec == jax.sharding.PartitionSpec(None, None,
                                                           "fsdp")
  assert len(codes.sharding.device_set) == 8


def test_hook_must_keep_the_layer_axis():
  def squeeze(path, x):
    return x[0] if path.endswith("up_proj/kernel") else x

  with pytest.raises(ValueError, match=r"'model/layers/mlp/up_proj/kernel'.*"
                     r"keep that leading axis"):
    from_config(CFG, KEY, quantize=squeeze, scan_layers=True)
  with pytest.raises(TypeError, match="quantize=4"):
    from_config(CFG, KEY, quantize=4)
