"""Gemma 2, Gemma 3 (text) and Phi-3 against transformers' PyTorch models.

float32, tiny random checkpoints, transformers' eager attention (the one that
applies Gemma 2's attention soft-cap). Each family runs a window shorter than
the test sequence; Gemma 2 runs with both soft-caps binding.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from helpers import TINY_HF  # noqa: E402

from jlora.models import (  # noqa: E402
  CausalLM,
  ModelConfig,
  causal_lm_loss,
  from_state_dict,
  generate,
  init_cache,
)

TINY = dict(TINY_HF, head_dim=16, max_position_embeddings=64,
            bos_token_id=None, eos_token_id=None, pad_token_id=None)
LONGROPE = {
  "rope_type": "longrope",
  "rope_theta": 10000.0,
  # rotary_dim / 2 = 8 divisors each, far from 1 so that the choice shows.
  "short_factor": [1.0, 1.5, 2.0, 1.0, 3.0, 1.2, 1.0, 2.5],
  "long_factor": [4.0, 2.0, 8.0, 16.0, 3.0, 6.0, 1.0, 12.0],
}
# name -> (config class, model class, extra config fields)
FAMILIES = {
  "gemma2": (
    "Gemma2Config",
    "Gemma2ForCausalLM",
    # Caps small enough to bind for these weights; sliding layer 0, global 1.
    dict(sliding_window=4, query_pre_attn_scalar=24,
         attn_logit_softcapping=1.5, final_logit_softcapping=3.0),
  ),
  "gemma3": (
    "Gemma3TextConfig",
    "Gemma3ForCausalLM",
    dict(
      num_hidden_layers=3,
      layer_types=["sliding_attention", "full_attention",
                   "sliding_attention"],
      sliding_window=4,
      query_pre_attn_scalar=16,
      final_logit_softcapping=4.0,
      rope_parameters={
        "sliding_attention": {"rope_type": "default", "rope_theta": 100.0},
        "full_attention": {"rope_type": "linear", "factor": 4.0,
                           "rope_theta": 1e6},
      },
    ),
  ),
  "phi3": (
    "Phi3Config",
    "Phi3ForCausalLM",
    dict(rope_parameters=LONGROPE, original_max_position_embeddings=8,
         sliding_window=5),
  ),
  "phi3_partial": (
    "Phi3Config",
    "Phi3ForCausalLM",
    dict(rope_parameters=dict(LONGROPE, short_factor=LONGROPE[
      "short_factor"][:4], long_factor=LONGROPE["long_factor"][:4],
      partial_rotary_factor=0.5), original_max_position_embeddings=8,
      tie_word_embeddings=True),
  ),
}


def hf_config(family: str, **over):
  config_cls, _, extra = FAMILIES[family]
  config = getattr(transformers, config_cls)(**{**TINY, **extra, **over})
  config._attn_implementation = "eager"
  return config


def hf_model(family: str, seed: int = 0, std: float = 0.15, **over):
  """A random transformers model; every parameter (norms too) nontrivial."""
  config = hf_config(family, **over)
  torch.manual_seed(seed)
  model = getattr(transformers, FAMILIES[family][1])(config).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      p.copy_(std * torch.randn_like(p))
  return model


def hf_logits(model, ids, mask=None):
  with torch.no_grad():
    kw = {} if mask is None else {"attention_mask": torch.tensor(mask)}
    return model(torch.tensor(ids), **kw).logits.float().numpy()


def ours(hf, **kw):
  model = CausalLM(ModelConfig.from_hf(hf.config), **kw)
  return model, from_state_dict(model, hf.state_dict())


def ids_for(batch=2, length=12, seed=0):
  return np.random.RandomState(seed).randint(0, 128, (batch, length))


@pytest.mark.parametrize(
  "family, scan_layers",
  [(f, False) for f in FAMILIES] + [("gemma2", True), ("gemma3", True),
                                    ("phi3", True)],
)
def test_logits_match_transformers(family, scan_layers):
  hf = hf_model(family)
  ids = ids_for()
  model, params = ours(hf, scan_layers=scan_layers)
  got = jax.jit(model.apply)({"params": params}, jnp.asarray(ids))
  np.testing.assert_allclose(np.asarray(got), hf_logits(hf, ids), atol=1e-4,
                             rtol=0)


def test_phi3_short_rope_below_original_length():
  """At 6 tokens (<= original_max_position_embeddings = 8) Phi-3 uses the
  short factors; at 12 the long ones (the test above)."""
  hf = hf_model("phi3")
  ids = ids_for(length=6)
  model, params = ours(hf)
  np.testing.assert_allclose(
    np.asarray(model.apply({"params": params}, jnp.asarray(ids))),
    hf_logits(hf, ids), atol=1e-4, rtol=0)


@pytest.mark.parametrize(
  "family, change",
  [
    ("gemma2", dict(attn_logit_softcapping=None)),
    ("gemma2", dict(final_logit_softcapping=None)),
    ("gemma2", dict(sliding_window=64)),
    ("gemma3", dict(sliding_window=64)),
    ("gemma3", dict(rope_parameters={
      "sliding_attention": {"rope_type": "default", "rope_theta": 1e6},
      "full_attention": {"rope_type": "linear", "factor": 4.0,
                         "rope_theta": 1e6}})),
    ("phi3", dict(sliding_window=None)),
    ("phi3", dict(rope_parameters={"rope_type": "default",
                                   "rope_theta": 10000.0})),
  ],
)
def test_each_feature_is_active(family, change):
  """The caps, windows and ropes of the configs above change the logits, so
  matching transformers with them is meaningful."""
  ids = ids_for()
  a = hf_logits(hf_model(family), ids)
  b = hf_logits(hf_model(family, **change), ids)
  assert np.abs(a - b).max() > 1e-2


def test_config_fields():
  g2 = ModelConfig.from_hf(hf_config("gemma2"))
  assert g2.sliding_windows == (4, None)
  assert (g2.attn_softcap, g2.final_softcap) == (1.5, 3.0)
  assert g2.norm_offset == 1.0 and g2.sandwich_norms
  assert g2.embed_scale == pytest.approx(8.0) and g2.hidden_act == "gelu_tanh"
  assert g2.tie_word_embeddings and g2.attention_scale == 24**-0.5
  g3 = ModelConfig.from_hf(hf_config("gemma3"))
  assert g3.sliding_windows == (4, None, 4) and g3.qk_norm
  assert g3.rope.theta == 1e6 and g3.rope.rope_type == "linear"
  assert g3.local_rope.theta == 100.0 and g3.attn_softcap is None
  assert g3.layer_rope(0) is g3.local_rope and g3.layer_rope(1) is g3.rope
  phi = ModelConfig.from_hf(hf_config("phi3"))
  assert phi.fused_qkv and phi.fused_gate_up and phi.sliding_windows == (5, 5)
  assert phi.rope.rope_type == "longrope" and phi.rope.factor == 8.0
  assert phi.rope.original_max_position_embeddings == 8
  hash(g3)


def test_config_rejects_what_it_cannot_run():
  with pytest.raises(NotImplementedError, match="use_bidirectional"):
    ModelConfig.from_hf(hf_config("gemma3", use_bidirectional_attention=True))
  multimodal = transformers.Gemma3Config()
  with pytest.raises(ValueError, match="'gemma3_text'"):
    ModelConfig.from_hf(multimodal)
  cfg = ModelConfig.from_hf(hf_config("gemma2"))
  x = jnp.zeros((1, 4), jnp.int32)
  with pytest.raises(ValueError, match="no logit soft-capping.*'xla'"):
    CausalLM(cfg, attention="cudnn").init(jax.random.key(0), x)
  with pytest.raises(ValueError, match="short_factor/long_factor have 3/3"):
    dataclasses.replace(
      ModelConfig.from_hf(hf_config("phi3")),
      rope=dataclasses.replace(
        ModelConfig.from_hf(hf_config("phi3")).rope,
        short_factor=(1.0,) * 3, long_factor=(1.0,) * 3))


def test_gemma2_auto_attention_takes_the_capped_path():
  hf = hf_model("gemma2")
  ids = ids_for()
  model, params = ours(hf, attention="auto", scan_layers=True)
  np.testing.assert_allclose(
    np.asarray(jax.jit(model.apply)({"params": params}, jnp.asarray(ids))),
    hf_logits(hf, ids), atol=1e-4, rtol=0)


@pytest.mark.parametrize("family", ["gemma2", "phi3"])
def test_left_padding_matches_transformers(family):
  hf = hf_model(family)
  ids = ids_for(length=10)
  mask = np.ones_like(ids)
  mask[0, :3] = 0
  model, params = ours(hf, scan_layers=True)
  got = np.asarray(model.apply({"params": params}, jnp.asarray(ids),
                               attention_mask=jnp.asarray(mask)))
  real = mask.astype(bool)
  np.testing.assert_allclose(got[real], hf_logits(hf, ids, mask)[real],
                             atol=1e-4)


@pytest.mark.parametrize("family", ["gemma2", "gemma3"])
def test_causal_lm_loss_applies_the_final_softcap(family):
  """hidden + causal_lm_loss equals the mean CE of the model's own (capped)
  logits, with the tied embedding as the head."""
  hf = hf_model(family)
  model, params = ours(hf)
  ids = jnp.asarray(ids_for(length=9))
  x, y = ids[:, :-1], ids[:, 1:]
  h = model.apply({"params": params}, x, return_hidden=True)
  got = causal_lm_loss(model.config, params, h, y, chunk_size=5)
  logp = jax.nn.log_softmax(model.apply({"params": params}, x))
  want = -jnp.mean(jnp.take_along_axis(logp, y[..., None], -1))
  np.testing.assert_allclose(got, want, rtol=1e-5)


@pytest.mark.parametrize("family, scan_layers", [
  ("gemma2", False), ("gemma2", True), ("gemma3", True), ("phi3", False)])
def test_greedy_generate_matches_transformers(family, scan_layers):
  """5 + 7 tokens exceed every window (4 or 5): the ring-buffer caches of the
  sliding layers must hold exactly the window."""
  hf = hf_model(family, std=0.4)
  model, params = ours(hf, scan_layers=scan_layers)
  prompts = np.random.RandomState(1).randint(0, 128, (2, 5))
  cache = init_cache(model, 2, 12)
  assert cache.ring_k is not None and cache.ring_k.shape[2] in (4, 5)
  got = generate(model, params, jnp.asarray(prompts), max_new_tokens=7)
  with torch.no_grad():
    want = hf.generate(torch.tensor(prompts), max_new_tokens=7,
                       do_sample=False).numpy()
  np.testing.assert_array_equal(np.asarray(got), want)


@pytest.mark.parametrize("scan_layers", [False, True])
def test_ring_cache_decoding_equals_full_forward(scan_layers):
  """Prefill longer than the window, then single tokens, through ring buffers
  (sliding layers) and a full cache (the global layer) together."""
  hf = hf_model("gemma3")
  ids = jnp.asarray(ids_for(length=11))
  model, params = ours(hf, scan_layers=scan_layers)
  apply = jax.jit(model.apply)
  full = apply({"params": params}, ids)
  cache = init_cache(model, 2, 14)
  assert cache.k.shape[0] == 1 and cache.ring_k.shape[:3] == (2, 2, 4)
  logits, cache = apply({"params": params}, ids[:, :6], cache=cache)
  steps = [logits]
  for t in range(6, 11):
    logits, cache = apply({"params": params}, ids[:, t:t + 1], cache=cache)
    steps.append(logits)
  np.testing.assert_allclose(np.concatenate(steps, axis=1), full, atol=2e-5)


def test_packed_documents_equal_documents_alone():
  """Packing on a family with windows, rope per layer type and soft-caps."""
  hf = hf_model("gemma2")
  model, params = ours(hf, scan_layers=True)
  ids = ids_for(batch=1, length=12)
  seg = np.array([[1] * 7 + [2] * 4 + [0]])
  packed = np.asarray(model.apply({"params": params}, jnp.asarray(ids),
                                  segment_ids=jnp.asarray(seg)))
  for sl in (slice(0, 7), slice(7, 11)):
    np.testing.assert_allclose(packed[0, sl],
                               hf_logits(hf, ids[:, sl])[0], atol=1e-4)


# ---------------------------------------------------------------- loading


@pytest.fixture(scope="module")
def saved_dirs(tmp_path_factory):
  """save_pretrained of each family, sharded into several safetensors."""
  dirs = {}
  for family in ("gemma2", "gemma3", "phi3"):
    hf = hf_model(family)
    path = tmp_path_factory.mktemp(family)
    hf.save_pretrained(path, max_shard_size="60KB")
    dirs[family] = (path, hf)
  return dirs


@pytest.mark.parametrize("family", ["gemma2", "gemma3", "phi3"])
def test_from_pretrained_sharded_scanned(saved_dirs, family):
  from jlora.models import from_pretrained

  path, hf = saved_dirs[family]
  assert len(list(path.glob("model-*.safetensors"))) > 2
  model, params = from_pretrained(path, scan_layers=True)
  assert model.config == ModelConfig.from_hf(hf.config)
  layers = params["model"]["layers"]
  if family == "phi3":
    # (L, hidden, (heads + 2 kv_heads) head_dim), (L, hidden, 2 inter)
    assert layers["self_attn"]["qkv_proj"]["kernel"].shape == (2, 64, 128)
    assert layers["mlp"]["gate_up_proj"]["kernel"].shape == (2, 64, 256)
  else:
    assert layers["pre_feedforward_layernorm"]["scale"].shape[1:] == (64,)
  ids = ids_for()
  np.testing.assert_allclose(
    np.asarray(jax.jit(model.apply)({"params": params}, jnp.asarray(ids))),
    hf_logits(hf, ids), atol=1e-4, rtol=0)


@pytest.mark.parametrize("family", ["gemma2", "gemma3", "phi3"])
def test_from_pretrained_quantized_on_a_mesh(saved_dirs, family):
  """quantize= and mesh= together: kernels quantized and sharded, the rest
  sharded by the default rule; logits as the dequantized model's."""
  from jax.sharding import Mesh, PartitionSpec

  import jlora
  from jlora import quant
  from jlora.models import from_pretrained

  path, _ = saved_dirs[family]
  devices = np.array(jax.devices())
  if devices.size < 2:
    pytest.skip("needs several devices (conftest.py simulates 8 CPU devices)")
  mesh = Mesh(devices[:2], ("model",))
  model, dense = from_pretrained(path, scan_layers=True)
  _, qparams = from_pretrained(path, scan_layers=True, quantize="int8",
                               mesh=mesh)
  layers = qparams["model"]["layers"]
  kernel = layers["mlp"]["down_proj"]["kernel"]
  assert quant.is_quantized(kernel)
  norm = layers["input_layernorm"]["scale"]
  assert norm.sharding.spec == PartitionSpec(None, "model")
  lp = jlora.apply(qparams, rank=4, key=jax.random.key(0))
  ids = jnp.asarray(ids_for())
  got = jax.jit(jlora.wrap(model.apply))({"params": lp}, ids)
  ref = model.apply({"params": quant.dequantize(qparams, jnp.float32)}, ids)
  np.testing.assert_allclose(np.asarray(got, np.float32), ref, atol=1e-4)
  base = model.apply({"params": dense}, ids)
  assert 0 < np.abs(np.asarray(ref) - np.asarray(base)).max() < 0.1


def test_from_config_gemma_norms_start_at_zero():
  """Gemma's (1 + w) norms initialise w = 0 (identity scale), as
  transformers does; a random model runs."""
  from jlora.models import from_config

  model, params = from_config(hf_config("gemma3"), jax.random.key(0),
                              scan_layers=True)
  layers = params["model"]["layers"]
  assert float(jnp.abs(layers["self_attn"]["q_norm"]["scale"]).max()) == 0.0
  assert float(jnp.abs(params["model"]["norm"]["scale"]).max()) == 0.0
  out = model.apply({"params": params}, jnp.asarray(ids_for()))
  assert out.shape == (2, 12, 128) and np.isfinite(np.asarray(out)).all()
