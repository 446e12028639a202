"""jlora.models.llama and config against transformers' PyTorch models.

float32 unless stated; tiny random weights.
"""

from __future__ import annotations

import dataclasses

import flax.traverse_util as traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from helpers import TINY_HF  # noqa: E402

from jlora.models import (  # noqa: E402
  LlamaForCausalLM,
  ModelConfig,
  from_state_dict,
  init_cache,
)

TINY = dict(TINY_HF, max_position_embeddings=64)
LLAMA3_ROPE = {
  "rope_type": "llama3",
  "rope_theta": 10000.0,
  "factor": 8.0,
  "low_freq_factor": 1.0,
  "high_freq_factor": 4.0,
  "original_max_position_embeddings": 8,
}
# name -> (config class, model class, extra config fields)
FAMILIES = {
  "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
  "llama_bias": (
    "LlamaConfig",
    "LlamaForCausalLM",
    {"attention_bias": True, "mlp_bias": True},
  ),
  "llama_tied": (
    "LlamaConfig",
    "LlamaForCausalLM",
    {"tie_word_embeddings": True},
  ),
  "llama3_rope": (
    "LlamaConfig",
    "LlamaForCausalLM",
    {"rope_parameters": LLAMA3_ROPE},
  ),
  "llama_linear_rope": (
    "LlamaConfig",
    "LlamaForCausalLM",
    {
      "rope_parameters": {
        "rope_type": "linear",
        "rope_theta": 10000.0,
        "factor": 4.0,
      }
    },
  ),
  "llama_dynamic_rope": (
    "LlamaConfig",
    "LlamaForCausalLM",
    # max_position_embeddings below the test length, so the NTK base actually
    # grows.
    {
      "rope_parameters": {
        "rope_type": "dynamic",
        "rope_theta": 10000.0,
        "factor": 2.0,
      },
      "max_position_embeddings": 6,
    },
  ),
  "mistral_window": (
    "MistralConfig",
    "MistralForCausalLM",
    {"sliding_window": 4},
  ),
  "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
  "qwen2_window": (
    "Qwen2Config",
    "Qwen2ForCausalLM",
    {"use_sliding_window": True, "sliding_window": 3, "max_window_layers": 1},
  ),
  "qwen3_tied": (
    "Qwen3Config",
    "Qwen3ForCausalLM",
    {"head_dim": 32, "tie_word_embeddings": True},
  ),
  "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 16}),
}


def hf_model(family: str, seed: int = 0):
  """A random transformers model; every parameter (norms, biases) nontrivial."""
  config_cls, model_cls, extra = FAMILIES[family]
  config = getattr(transformers, config_cls)(**{**TINY, **extra})
  config._attn_implementation = "eager"
  torch.manual_seed(seed)
  model = getattr(transformers, model_cls)(config).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      base = 1.0 if "norm" in name else 0.0
      p.copy_(base + 0.1 * torch.randn_like(p))
  return model


def hf_logits(model, ids, mask=None):
  with torch.no_grad():
    kw = {} if mask is None else {"attention_mask": torch.tensor(mask)}
    return model(torch.tensor(ids), **kw).logits.float().numpy()


def ours(hf, **kw):
  model = LlamaForCausalLM(ModelConfig.from_hf(hf.config), **kw)
  return model, from_state_dict(model, hf.state_dict())


def ids_for(batch=2, length=12, seed=0):
  return np.random.RandomState(seed).randint(
    0, TINY["vocab_size"], (batch, length)
  )


SCANNED = [
  "llama",
  "llama3_rope",
  "mistral_window",
  "qwen2_window",
  "qwen3_tied",
]


@pytest.mark.parametrize(
  "family, scan_layers",
  [(f, False) for f in FAMILIES] + [(f, True) for f in SCANNED],
)
def test_logits_match_transformers(family, scan_layers):
  hf = hf_model(family)
  ids = ids_for()
  model, params = ours(hf, scan_layers=scan_layers)
  expected = hf_logits(hf, ids)
  got = jax.jit(model.apply)({"params": params}, jnp.asarray(ids))
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(got), expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize(
  "family, reference",
  [
    ("llama3_rope", "llama"),
    ("llama_linear_rope", "llama"),
    ("llama_dynamic_rope", "llama"),
    ("mistral_window", "llama"),
    ("qwen2_window", "qwen2"),
  ],
)
def test_variant_changes_logits(family, reference):
  """Rope scaling and windows show at length 12: matching HF is meaningful."""
  ids = ids_for()
  a = hf_logits(hf_model(family), ids)
  b = hf_logits(hf_model(reference), ids)
  assert np.abs(a - b).max() > 1e-2


def test_logits_unjitted_match():
  hf = hf_model("qwen2")
  ids = ids_for(batch=1, length=5)
  model, params = ours(hf)
  np.testing.assert_allclose(
    np.asarray(model.apply({"params": params}, jnp.asarray(ids))),
    hf_logits(hf, ids),
    atol=1e-4,
  )


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_padding_mask_matches_transformers(padding_side):
  hf = hf_model("mistral_window")
  ids = ids_for(length=10)
  mask = np.ones_like(ids)
  if padding_side == "left":
    mask[0, :3] = 0
  else:
    mask[0, -4:] = 0
  model, params = ours(hf)
  apply = jax.jit(model.apply)
  got = np.asarray(
    apply(
      {"params": params}, jnp.asarray(ids), attention_mask=jnp.asarray(mask)
    )
  )
  expected = hf_logits(hf, ids, mask)
  real = mask.astype(bool)
  assert np.isfinite(got).all()
  np.testing.assert_allclose(got[real], expected[real], atol=1e-4)
  # The mask matters: padded row 0 differs from the unmasked forward on its real
  # tokens.
  unmasked = np.asarray(apply({"params": params}, jnp.asarray(ids)))
  if padding_side == "left":
    assert np.abs(unmasked[0][real[0]] - got[0][real[0]]).max() > 1e-3


def test_param_tree_mirrors_transformers_names():
  cases = {
    "llama": (False, False, False, True),
    "qwen2": (True, False, False, True),
    "qwen3_tied": (False, False, True, False),
  }
  layer = {
    "input_layernorm/scale",
    "post_attention_layernorm/scale",
    "mlp/gate_proj/kernel",
    "mlp/up_proj/kernel",
    "mlp/down_proj/kernel",
    "self_attn/q_proj/kernel",
    "self_attn/k_proj/kernel",
    "self_attn/v_proj/kernel",
    "self_attn/o_proj/kernel",
  }
  for family, (qkv_bias, o_bias, qk_norm, lm_head) in cases.items():
    hf = hf_model(family)
    model, params = ours(hf)
    paths = set(traverse_util.flatten_dict(params, sep="/"))
    want = set(layer)
    if qkv_bias:
      want |= {f"self_attn/{p}_proj/bias" for p in "qkv"}
    if o_bias:
      want.add("self_attn/o_proj/bias")
    if qk_norm:
      want |= {"self_attn/q_norm/scale", "self_attn/k_norm/scale"}
    want = {f"model/layers/{i}/{p}" for i in range(2) for p in want}
    want |= {"model/embed_tokens/embedding", "model/norm/scale"}
    if lm_head:
      want.add("lm_head/kernel")
    assert paths == want, family
    # HF stores Linear weights as (out, in); ours are (in, out).
    q = params["model"]["layers"]["0"]["self_attn"]["q_proj"]["kernel"]
    w = hf.state_dict()["model.layers.0.self_attn.q_proj.weight"].numpy()
    np.testing.assert_array_equal(np.asarray(q), w.T)


def test_scanned_params_are_stacked():
  hf = hf_model("qwen3")
  _, params = ours(hf, scan_layers=True)
  layers = params["model"]["layers"]
  assert layers["self_attn"]["q_proj"]["kernel"].shape == (2, 64, 4 * 16)
  assert layers["self_attn"]["k_proj"]["kernel"].shape == (2, 64, 2 * 16)
  assert layers["self_attn"]["q_norm"]["scale"].shape == (2, 16)
  assert layers["mlp"]["down_proj"]["kernel"].shape == (2, 128, 64)
  w1 = hf.state_dict()["model.layers.1.mlp.down_proj.weight"].numpy()
  np.testing.assert_array_equal(
    np.asarray(layers["mlp"]["down_proj"]["kernel"][1]), w1.T
  )


def test_kernels_only_feed_matmuls():
  """jlora.wrap factors dot_generals; a kernel must reach nothing else."""
  hf = hf_model("qwen3")
  model, params = ours(hf)
  flat = traverse_util.flatten_dict(params, sep="/")
  names = list(flat)
  jaxpr = jax.make_jaxpr(
    lambda leaves, x: model.apply(
      {
        "params": traverse_util.unflatten_dict(
          dict(zip(names, leaves)), sep="/"
        )
      },
      x,
    )
  )(list(flat.values()), jnp.zeros((1, 4), jnp.int32)).jaxpr
  consumers = {}

  def subjaxprs(params):
    for value in params.values():
      for x in value if isinstance(value, (tuple, list)) else [value]:
        if hasattr(x, "eqns"):
          yield x
        elif hasattr(x, "jaxpr") and hasattr(x.jaxpr, "eqns"):
          yield x.jaxpr

  def visit(jaxpr, env):
    for eqn in jaxpr.eqns:
      for v in eqn.invars:
        if not hasattr(v, "val") and v in env:  # skip literals
          consumers.setdefault(env[v], set()).add(eqn.primitive.name)
      for sub in subjaxprs(eqn.params):
        inner = {
          s: env[v]
          for s, v in zip(sub.invars, eqn.invars)
          if not hasattr(v, "val") and v in env
        }
        visit(sub, inner)

  visit(jaxpr, {v: n for v, n in zip(jaxpr.invars, names)})
  kernels = [n for n in names if n.endswith("kernel")]
  assert len(kernels) == 2 * 7 + 1  # 7 projections per layer + lm_head
  for n in kernels:
    assert consumers[n] == {"dot_general"}, (n, consumers[n])


@pytest.mark.parametrize(
  "scan_layers, remat", [(False, "full"), (True, "dots")]
)
def test_remat_same_logits_and_grads(scan_layers, remat):
  hf = hf_model("qwen2")
  ids = jnp.asarray(ids_for(length=8))
  base, params = ours(hf, scan_layers=scan_layers)
  rematted = dataclasses.replace(base, remat=remat)

  def loss_and_grad(model):
    def f(p):
      logits = model.apply({"params": p}, ids)
      return jnp.mean(jax.nn.logsumexp(logits, -1) - logits[..., 0])

    return jax.jit(jax.value_and_grad(f))(params)

  (l0, g0), (l1, g1) = loss_and_grad(base), loss_and_grad(rematted)
  np.testing.assert_allclose(l1, l0, rtol=1e-6)
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5), g1, g0
  )
  # The policy is applied: the forward holds a checkpoint (remat) region.
  jaxpr = str(
    jax.make_jaxpr(lambda p: rematted.apply({"params": p}, ids))(params)
  )
  assert "checkpoint" in jaxpr or "remat" in jaxpr


def test_kv_cache_decoding_equals_full_forward():
  hf = hf_model("mistral_window")
  ids = jnp.asarray(ids_for(length=10))
  model, params = ours(hf, scan_layers=True)
  apply = jax.jit(model.apply)
  full = apply({"params": params}, ids)
  cache = init_cache(model, 2, 12)
  logits, cache = apply({"params": params}, ids[:, :6], cache=cache)
  steps = [logits]
  for t in range(6, 10):
    logits, cache = apply({"params": params}, ids[:, t : t + 1], cache=cache)
    steps.append(logits)
  assert int(cache.index) == 10
  np.testing.assert_allclose(np.concatenate(steps, axis=1), full, atol=1e-5)


def test_attention_auto_matches_xla_and_cudnn_needs_gpu():
  hf = hf_model("llama")
  ids = jnp.asarray(ids_for())
  xla, params = ours(hf)
  auto = dataclasses.replace(xla, attention="auto")
  np.testing.assert_allclose(
    jax.jit(auto.apply)({"params": params}, ids),
    hf_logits(hf, np.asarray(ids)),
    atol=1e-4,
  )
  if jax.default_backend() != "gpu":
    cudnn = dataclasses.replace(xla, attention="cudnn", dtype=jnp.bfloat16)
    with pytest.raises(
      RuntimeError, match="attention='cudnn' needs an NVIDIA GPU"
    ):
      cudnn.apply({"params": params}, ids)


def test_bad_options_raise():
  cfg = ModelConfig.from_hf(hf_model("llama").config)
  x = jnp.zeros((1, 2), jnp.int32)
  with pytest.raises(ValueError, match="remat='some'"):
    LlamaForCausalLM(cfg, remat="some").init(jax.random.key(0), x)
  with pytest.raises(ValueError, match="attention='flash'"):
    LlamaForCausalLM(cfg, attention="flash").init(jax.random.key(0), x)


def test_bf16_matches_transformers_bf16():
  hf = hf_model("qwen3")
  ids = ids_for()
  model, params = ours(hf, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
  assert params["model"]["norm"]["scale"].dtype == jnp.bfloat16
  expected32 = hf_logits(hf, ids)
  expected16 = hf_logits(hf.to(torch.bfloat16), ids)
  got = np.asarray(jax.jit(model.apply)({"params": params}, jnp.asarray(ids)))
  # bf16 rounding differs between the two programs; both should sit equally
  # close to float32.
  err_ours = np.abs(got - expected32).max()
  err_hf = np.abs(expected16 - expected32).max()
  assert err_ours < 2 * err_hf + 1e-2, (err_ours, err_hf)
  assert err_ours > 0  # really computed in bf16


def test_rmsnorm_bf16_matches_transformers():
  from transformers.models.llama.modeling_llama import LlamaRMSNorm

  from jlora.models.llama import RMSNorm

  x = np.random.RandomState(0).randn(3, 64).astype(np.float32) * 300
  w = 1 + 0.1 * np.random.RandomState(1).randn(64).astype(np.float32)
  ref = LlamaRMSNorm(64, eps=1e-6).to(torch.bfloat16)
  with torch.no_grad():
    ref.weight.copy_(torch.tensor(w))
    expected = ref(torch.tensor(x).to(torch.bfloat16)).float().numpy()
  norm = RMSNorm(1e-6, jnp.bfloat16, jnp.bfloat16)
  got = norm.apply(
    {"params": {"scale": jnp.asarray(w, jnp.bfloat16)}},
    jnp.asarray(x, jnp.bfloat16),
  )
  assert got.dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(got, np.float32), expected)


def test_config_from_hf_fields():
  cfg = ModelConfig.from_hf(hf_model("qwen2_window").config)
  assert (cfg.qkv_bias, cfg.o_bias, cfg.qk_norm) == (True, False, False)
  assert cfg.sliding_windows == (None, 3)
  cfg = ModelConfig.from_hf(hf_model("llama3_rope").config)
  assert (
    cfg.rope.rope_type == "llama3"
    and cfg.rope.original_max_position_embeddings == 8
  )
  cfg = ModelConfig.from_hf(hf_model("qwen3_tied").config)
  assert cfg.head_dim == 32 and cfg.tie_word_embeddings and cfg.qk_norm
  hash(cfg)  # usable as a static jit argument


def test_config_rejects_unsupported():
  with pytest.raises(
    ValueError, match="model_type 'gpt2' is not supported.*llama, mistral"
  ):
    ModelConfig.from_hf(transformers.GPT2Config())
  yarn = transformers.LlamaConfig(
    **TINY,
    rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0},
  )
  with pytest.raises(
    NotImplementedError, match=r"rope_parameters\['rope_type'\] = 'yarn'"
  ):
    ModelConfig.from_hf(yarn)
  relu = transformers.LlamaConfig(**TINY, hidden_act="relu")
  with pytest.raises(NotImplementedError, match="hidden_act = 'relu'"):
    ModelConfig.from_hf(relu)
