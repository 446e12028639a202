"""Mixtral and Qwen3-MoE in jlora.models, against transformers 5 and PEFT 0.21.

References: transformers' PyTorch models (logits in float32 to 1e-4, routers,
`load_balancing_loss_func` and its gradient), PEFT's `target_parameters`
adapters (logits both ways), float64 NumPy routing, the merged path
(`jlora.merge`) and single-adapter runs (mixed-adapter batches), and the
jaxpr of the gradient (no kernel-sized product).

Tiny configs: hidden 32, 4 experts, top-2, expert width 24, 2 layers; every
weight drawn with a realistic scale so that routing differs per token.
"""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

import jlora  # noqa: E402
import jlora.peft  # noqa: E402
from jlora.models import (  # noqa: E402
  CausalLM,
  CheckpointMismatchError,
  ModelConfig,
  from_config,
  from_pretrained,
  from_state_dict,
  load_balancing_loss,
)
from jlora.models._moe import route  # noqa: E402
from jlora.node import is_lora  # noqa: E402
from jlora.quant import QuantizedArray  # noqa: E402

from safetensors.numpy import save_file  # noqa: E402

from helpers import randomize_b, rel_err  # noqa: E402
from test_experts import assert_factored  # noqa: E402

TOL = 1e-4
E, K, H, F = 4, 2, 32, 24
TINY = dict(vocab_size=128, hidden_size=H, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=8,
            max_position_embeddings=64, bos_token_id=None, eos_token_id=None,
            pad_token_id=None, num_experts_per_tok=K)
FAMILIES = {
  "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM",
                dict(intermediate_size=48, moe_intermediate_size=F,
                     num_experts=E, norm_topk_prob=False)),
  "qwen3_moe_norm": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM",
                     dict(intermediate_size=48, moe_intermediate_size=F,
                          num_experts=E, norm_topk_prob=True)),
  # A window shorter than the sequence.
  "mixtral": ("MixtralConfig", "MixtralForCausalLM",
              dict(intermediate_size=F, num_local_experts=E,
                   sliding_window=5)),
}
IDS = np.random.RandomState(0).randint(0, 128, (2, 12))
MASK = np.ones((2, 12), np.int64)
MASK[1, :3] = 0  # left padding in the second row
EXPERTS = r"experts/(gate_up|down)_proj/kernel"


def hf_config(family, **over):
  config_cls, _, extra = FAMILIES[family]
  config = getattr(transformers, config_cls)(**{**TINY, **extra, **over})
  config._attn_implementation = "eager"
  return config


def hf_model(family, seed=0, std=0.15, **over):
  torch.manual_seed(seed)
  model = getattr(transformers, FAMILIES[family][1])(
    hf_config(family, **over)).eval()
  with torch.no_grad():
    for p in model.parameters():
      p.copy_(std * torch.randn_like(p))
  return model


def hf_logits(model, mask=None):
  kw = {} if mask is None else {"attention_mask": torch.tensor(mask)}
  with torch.no_grad():
    return model(torch.tensor(IDS), **kw).logits.float().numpy()


def ours(hf, **kw):
  model = CausalLM(ModelConfig.from_hf(hf.config), **kw)
  return model, from_state_dict(model, hf.state_dict())


def logits(model, tree, **kw):
  out = jax.jit(jlora.wrap(model.apply))({"params": tree}, jnp.asarray(IDS),
                                         **kw)
  return np.asarray(out)


@pytest.fixture(scope="module")
def models():
  return {f: hf_model(f) for f in FAMILIES}


@pytest.fixture(scope="module")
def saved(models, tmp_path_factory):
  """save_pretrained directories (one Linear per expert, the hub layout)."""
  out = {}
  for family in ("qwen3_moe", "mixtral"):
    path = tmp_path_factory.mktemp(family)
    models[family].save_pretrained(path)
    out[family] = str(path)
  return out


# -- logits parity -----------------------------------------------------------


@pytest.mark.parametrize("family, scan", [
  ("qwen3_moe", False), ("qwen3_moe", True), ("qwen3_moe_norm", False),
  ("mixtral", False), ("mixtral", True)])
def test_logits_match_transformers(models, family, scan):
  hf = models[family]
  model, params = ours(hf, scan_layers=scan)  # transformers' fused experts
  np.testing.assert_allclose(np.asarray(model.apply(
    {"params": params}, jnp.asarray(IDS))), hf_logits(hf), atol=TOL, rtol=0)
  got = np.asarray(model.apply({"params": params}, jnp.asarray(IDS),
                               attention_mask=jnp.asarray(MASK)))
  want = hf_logits(hf, MASK)
  real = MASK.astype(bool)
  np.testing.assert_allclose(got[real], want[real], atol=TOL, rtol=0)


def test_parameters_are_stacked_experts_and_a_router(models):
  model, params = ours(models["qwen3_moe"], scan_layers=True)
  mlp = params["model"]["layers"]["mlp"]
  assert mlp["experts"]["gate_up_proj"]["kernel"].shape == (2, E, H, 2 * F)
  assert mlp["experts"]["down_proj"]["kernel"].shape == (2, E, F, H)
  assert mlp["gate"]["weight"].shape == (2, H, E)
  hf = models["qwen3_moe"].model.layers[1].mlp
  np.testing.assert_array_equal(  # gate rows first, as transformers stores
    mlp["experts"]["gate_up_proj"]["kernel"][1, 3],
    hf.experts.gate_up_proj[3].detach().numpy().T)


def _write_fused(hf, path):
  """A checkpoint with transformers 5's fused 3-D expert tensors."""
  hf.config.save_pretrained(path)
  save_file({k: v.detach().numpy() for k, v in hf.state_dict().items()},
            os.path.join(path, "model.safetensors"))


@pytest.mark.parametrize("family, layout", [
  ("qwen3_moe", "per_expert"), ("mixtral", "per_expert"),
  ("qwen3_moe", "fused"), ("mixtral", "fused"), ("qwen3_moe", "sharded")])
def test_from_pretrained_reads_each_expert_layout(models, saved, tmp_path,
                                                  family, layout):
  hf = models[family]
  if layout == "per_expert":  # save_pretrained: Mixtral's block_sparse_moe
    path = saved[family]
  elif layout == "fused":
    path = str(tmp_path)
    _write_fused(hf, path)
  else:
    path = str(tmp_path)
    hf.save_pretrained(path, max_shard_size="20KB")
    assert os.path.isfile(os.path.join(path, "model.safetensors.index.json"))
  model, params = from_pretrained(path, scan_layers=layout != "fused")
  np.testing.assert_allclose(logits(model, params), hf_logits(hf), atol=TOL,
                             rtol=0)


def test_from_config_builds_random_experts():
  model, params = from_config(hf_config("mixtral"), jax.random.key(0),
                              scan_layers=True)
  w = params["model"]["layers"]["mlp"]["experts"]["gate_up_proj"]["kernel"]
  assert w.shape == (2, E, H, 2 * F)
  assert abs(float(jnp.std(w)) - 0.02) < 0.003  # initializer_range
  assert model.apply({"params": params}, jnp.asarray(IDS)).shape == (2, 12,
                                                                     128)


def test_quantized_and_sharded_loading(saved):
  path = saved["qwen3_moe"]
  model, params = from_pretrained(path)
  want = logits(model, params)
  _, qparams = from_pretrained(path, quantize="nf4")
  gate_up = qparams["model"]["layers"]["0"]["mlp"]["experts"]["gate_up_proj"]
  assert isinstance(gate_up["kernel"], QuantizedArray)
  router = qparams["model"]["layers"]["0"]["mlp"]["gate"]["weight"]
  assert not isinstance(router, QuantizedArray)  # routers stay exact
  np.testing.assert_allclose(logits(model, qparams),
                             np.asarray(model.apply(
                               {"params": jlora.dequantize(qparams)},
                               jnp.asarray(IDS))), atol=1e-5, rtol=0)
  assert rel_err(logits(model, qparams), want) < 0.2  # NF4 error, not garbage
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:4]), ("model",))
  _, sparams = from_pretrained(path, mesh=mesh, scan_layers=True)
  w = sparams["model"]["layers"]["mlp"]["experts"]["gate_up_proj"]["kernel"]
  assert w.sharding.spec[-1] == "model"
  np.testing.assert_allclose(logits(model.clone(scan_layers=True), sparams),
                             want, atol=1e-5, rtol=0)


# -- routing and the auxiliary loss ---------------------------------------------


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_routing_follows_each_family(models, family):
  router = models[family].model.layers[0].mlp.gate
  x = np.random.RandomState(1).normal(size=(20, H)).astype(np.float32)
  with torch.no_grad():
    _, hf_w, hf_ids = router(torch.tensor(x))
  logits_ = x.astype(np.float64) @ router.weight.detach().numpy().T.astype(
    np.float64)
  normalize = ModelConfig.from_hf(hf_config(family)).norm_topk_prob
  w, ids, _ = route(jnp.asarray(logits_, jnp.float32), K, normalize)
  np.testing.assert_array_equal(np.asarray(ids), hf_ids.numpy())
  np.testing.assert_allclose(np.asarray(w), hf_w.numpy(), rtol=1e-5,
                             atol=1e-6)
  # float64 NumPy: Mixtral's softmax over the top-k logits; Qwen3-MoE's
  # top-k of the softmax over all experts, renormalised when asked.
  top = np.take_along_axis(logits_, np.asarray(ids), axis=1)
  if family == "qwen3_moe":
    full = np.exp(logits_ - logits_.max(1, keepdims=True))
    full /= full.sum(1, keepdims=True)
    want = np.take_along_axis(full, np.asarray(ids), axis=1)
    assert np.all(want.sum(1) < 1 - 1e-3)  # not renormalised
  else:
    want = np.exp(top - top.max(1, keepdims=True))
    want /= want.sum(1, keepdims=True)
  np.testing.assert_allclose(np.asarray(w), want, rtol=1e-5)
  assert np.all(np.diff(top, axis=1) <= 0)  # the k largest, in order


@pytest.mark.parametrize("family, scan, masked", [
  ("qwen3_moe", False, False), ("qwen3_moe", True, True),
  ("mixtral", False, True), ("mixtral", True, False)])
def test_load_balancing_loss_matches_transformers(models, family, scan,
                                                  masked):
  hf = models[family]
  model, params = ours(hf, scan_layers=scan)
  mask = MASK if masked else None
  kw = {} if mask is None else {"attention_mask": jnp.asarray(mask)}

  def aux(p):
    _, state = model.apply({"params": p}, jnp.asarray(IDS),
                           mutable="intermediates", **kw)
    return load_balancing_loss(state)

  value, grads = jax.jit(jax.value_and_grad(aux))(params)
  hf.zero_grad()
  out = hf(torch.tensor(IDS), output_router_logits=True,
           **({} if mask is None else {"attention_mask": torch.tensor(mask)}))
  out.aux_loss.backward()
  np.testing.assert_allclose(float(value), out.aux_loss.item(), rtol=1e-5)
  layers = grads["model"]["layers"]
  for i in range(2):
    g = (layers["mlp"]["gate"]["weight"][i] if scan
         else layers[str(i)]["mlp"]["gate"]["weight"])
    want = hf.model.layers[i].mlp.gate.weight.grad.numpy().T
    np.testing.assert_allclose(np.asarray(g), want, rtol=1e-4,
                               atol=1e-5 * np.abs(want).max())
  hf.zero_grad()


def test_load_balancing_loss_needs_the_statistics(models):
  _, params = ours(models["mixtral"])
  with pytest.raises(ValueError, match="mutable='intermediates'"):
    load_balancing_loss({"params": params})


# -- adapters: router frozen, experts factored -------------------------------------


def test_default_targets_adapt_experts_and_leave_the_router_frozen(models):
  model, params = ours(models["qwen3_moe"], scan_layers=True)
  lp = randomize_b(jlora.apply(params, rank=2, key=jax.random.key(0)),
                   jax.random.key(1), std=0.3)
  mlp = lp["model"]["layers"]["mlp"]
  assert mlp["experts"]["gate_up_proj"]["kernel"].layout == "bbio"
  assert mlp["experts"]["gate_up_proj"]["kernel"].a.shape == (2, E, H, 2)
  assert not is_lora(mlp["gate"]["weight"])
  trainable, frozen = jlora.partition(lp)
  assert trainable["model"]["layers"]["mlp"]["gate"]["weight"] is None

  # full= trains the router too; its gradient (cross-entropy + aux loss)
  # through the wrapped model equals that through the merged model.
  trainable, frozen = jlora.partition(lp, full="mlp/gate/weight")
  assert trainable["model"]["layers"]["mlp"]["gate"]["weight"] is not None
  labels = jnp.asarray(np.roll(IDS, -1, axis=1))

  def loss(t, apply):
    out, state = apply({"params": jlora.combine(t, frozen)},
                       jnp.asarray(IDS), mutable="intermediates")
    ce = -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(out),
                                       labels[..., None], -1))
    return ce + 0.5 * load_balancing_loss(state)

  grad = jax.jit(jax.grad(loss), static_argnums=1)
  g = grad(trainable, jlora.wrap(model.apply))
  want = grad(trainable, lambda v, *a, **kw: model.apply(
    {"params": jlora.merge(v["params"])}, *a, **kw))
  router = g["model"]["layers"]["mlp"]["gate"]["weight"]
  assert float(jnp.abs(router).max()) > 0
  for x, y in zip(jax.tree.leaves(g), jax.tree.leaves(want)):
    np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("scan", [False, True])
def test_no_kernel_sized_product_in_the_gradient(models, scan):
  # Sizes: no activation or factor of this call has the size of a kernel,
  # of one expert, or of one layer's experts (768, 1536, 3072, 6144, 12288;
  # rank 5 gives factors of 480 to 1920 elements).
  model, params = ours(models["mixtral"], scan_layers=scan)
  lp = randomize_b(jlora.apply(params, rank=5, targets=EXPERTS,
                               key=jax.random.key(0)), jax.random.key(1))

  def fn(p, ids):
    return model.apply({"params": p}, ids)

  assert_factored(fn, lp, IDS[:, :5])


# -- mixed-adapter batches ------------------------------------------------------


def _adapter(params, seed, targets):
  lp = jlora.apply(params, rank=2, alpha=4.0, targets=targets,
                   key=jax.random.key(seed))
  return randomize_b(lp, jax.random.key(seed + 1), std=0.3)


@pytest.mark.parametrize("scan, remat", [(False, "none"), (True, "mlp")])
def test_mixed_adapter_batch_through_the_model(models, scan, remat):
  model, params = ours(models["qwen3_moe"], scan_layers=scan, remat=remat)
  s = jlora.AdapterSet(params, {}, None)
  s = jlora.add_adapter(s, "all", _adapter(params, 0, None))
  s = jlora.add_adapter(s, "experts", _adapter(params, 10, EXPERTS))
  stacked = jlora.stack_adapters(s)
  forward = jax.jit(jlora.wrap(model.apply))
  single = jax.jit(model.apply)
  for ids in ([1, -1], [0, 1]):
    got = np.asarray(forward({"params": stacked}, jnp.asarray(IDS),
                             adapter_ids=np.array(ids, np.int32)))
    for row, i in enumerate(ids):
      tree = jlora.merge(jlora.select(s, s.names[i] if i >= 0 else None))
      want = single({"params": tree}, jnp.asarray(IDS[row:row + 1]))
      np.testing.assert_allclose(got[row:row + 1], want, atol=1e-5, rtol=0)


def test_mixed_batch_gradients_reach_each_adapter(models):
  model, params = ours(models["mixtral"], scan_layers=True)
  s = jlora.AdapterSet(params, {}, None)
  for k in range(2):
    s = jlora.add_adapter(s, f"a{k}", _adapter(params, 20 * k, EXPERTS))
  trainable, frozen = jlora.partition(jlora.stack_adapters(s))
  forward = jlora.wrap(model.apply)

  def loss(t, f, ids, **kw):
    out = forward({"params": jlora.combine(t, f)}, jnp.asarray(ids), **kw)
    return jnp.sum(jnp.sin(out))

  g = jax.jit(jax.grad(lambda t: loss(t, frozen, IDS, adapter_ids=np.array(
    [1, 0], np.int32))))(trainable)
  for i, row in ((1, 0), (0, 1)):
    t1, f1 = jlora.partition(jlora.select(s, f"a{i}"))
    want = jax.jit(jax.grad(lambda t: loss(t, f1, IDS[row:row + 1])))(t1)
    node = g["model"]["layers"]["mlp"]["experts"]["down_proj"]["kernel"]
    ref = want["model"]["layers"]["mlp"]["experts"]["down_proj"]["kernel"]
    np.testing.assert_allclose(node.b[i], ref.b, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(node.a[i], ref.a, rtol=1e-4, atol=1e-6)


# -- PEFT's target_parameters, both ways -----------------------------------------


def torch_model(path):
  return transformers.AutoModelForCausalLM.from_pretrained(
    path, attn_implementation="eager").eval()


@pytest.mark.parametrize("family, scan", [("qwen3_moe", True),
                                          ("mixtral", False)])
def test_jlora_expert_adapter_runs_in_peft(saved, tmp_path, family, scan):
  model, params = from_pretrained(saved[family], scan_layers=scan)
  lp = _adapter(params, 0, ["q_proj", "v_proj", EXPERTS])
  jlora.peft.save(lp, tmp_path, base_model_name_or_path=saved[family])
  config = json.load(open(tmp_path / "adapter_config.json"))
  assert config["target_modules"] == ["q_proj", "v_proj"]
  assert config["target_parameters"] == ["experts.down_proj",
                                         "experts.gate_up_proj"]
  peft_model = peft.PeftModel.from_pretrained(torch_model(saved[family]),
                                              tmp_path).eval()
  expected = hf_logits(peft_model)
  assert np.abs(expected - hf_logits(torch_model(saved[family]))).max() > 1e-2
  np.testing.assert_allclose(logits(model, lp), expected, atol=TOL, rtol=0)


@pytest.mark.parametrize("family, scan", [("qwen3_moe", False),
                                          ("mixtral", True)])
def test_peft_expert_adapter_runs_in_jlora(saved, tmp_path, family, scan):
  config = peft.LoraConfig(
    r=3, lora_alpha=5, target_modules=["k_proj", "o_proj"],
    target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
    rank_pattern={"down_proj": 2}, alpha_pattern={"gate_up_proj": 7})
  peft_model = peft.get_peft_model(torch_model(saved[family]), config).eval()
  gen = torch.Generator().manual_seed(0)
  with torch.no_grad():
    for name, p in peft_model.named_parameters():
      if "lora_" in name:
        p.add_(0.3 * torch.randn(p.shape, generator=gen))
  peft_model.save_pretrained(tmp_path)
  model, params = from_pretrained(saved[family], scan_layers=scan)
  lp = jlora.peft.load(tmp_path, params)
  layer = lp["model"]["layers"] if scan else lp["model"]["layers"]["0"]
  down = layer["mlp"]["experts"]["down_proj"]["kernel"]
  assert down.rank == 2 and down.a.shape[-3:] == (E, F, 2)
  expected = hf_logits(peft_model)
  np.testing.assert_allclose(logits(model, lp), expected, atol=TOL, rtol=0)
  assert np.abs(expected - logits(model, params)).max() > 1e-2


def test_peft_round_trip_is_exact(saved, tmp_path):
  _, params = from_pretrained(saved["mixtral"], scan_layers=True)
  lp = _adapter(params, 3, None)
  jlora.peft.save(lp, tmp_path)
  back = jlora.peft.load(tmp_path, params)
  for x, y in zip(jax.tree.leaves(lp), jax.tree.leaves(back)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_peft_refuses_what_param_wrappers_cannot_hold(saved, tmp_path):
  _, params = from_pretrained(saved["qwen3_moe"])
  lp = jlora.apply(params, rank=2, targets=EXPERTS, key=jax.random.key(0),
                   dropout=0.1)
  with pytest.raises(jlora.peft.PeftFormatError,
                     match=r"experts/down_proj/kernel.*dropout=0.1"):
    jlora.peft.save(lp, tmp_path / "a")
  lp = jlora.apply(params, rank=2, targets=EXPERTS, key=jax.random.key(0),
                   dora=True)
  with pytest.raises(jlora.peft.PeftFormatError,
                     match=r"experts/down_proj/kernel.*DoRA"):
    jlora.peft.save(lp, tmp_path / "b")
  # An adapter whose target_parameters name no expert kernel.
  jlora.peft.save(_adapter(params, 0, ["q_proj", EXPERTS]), tmp_path / "c")
  config_path = tmp_path / "c" / "adapter_config.json"
  config = json.load(open(config_path))
  config["target_parameters"] = ["mlp.experts.w9"]
  json.dump(config, open(config_path, "w"))
  with pytest.raises(jlora.peft.PeftFormatError,
                     match=r"target_parameters=\['mlp.experts.w9'\] matches no"):
    jlora.peft.load(tmp_path / "c", params)


# -- errors ----------------------------------------------------------------------


def test_unreadable_expert_layout_names_the_layer_and_the_layouts(models,
                                                                  tmp_path):
  hf = models["qwen3_moe"]
  hf.config.save_pretrained(tmp_path)
  tensors = {k: v.detach().numpy() for k, v in hf.state_dict().items()}
  # Gate and up as separate 3-D tensors: a layout no transformers model uses.
  for i in range(2):
    p = f"model.layers.{i}.mlp.experts"
    gate_up = tensors.pop(f"{p}.gate_up_proj")
    tensors[f"{p}.gate_proj"] = gate_up[:, :F]
    tensors[f"{p}.up_proj"] = gate_up[:, F:]
  save_file(tensors, str(tmp_path / "model.safetensors"))
  with pytest.raises(CheckpointMismatchError,
                     match=r"cannot read the experts of 'model.layers.0'.*"
                     r"experts.gate_proj.*fused 3-D.*one Linear per expert.*"
                     r"Re-save"):
    from_pretrained(tmp_path)


def test_missing_expert_is_named(saved, tmp_path):
  import shutil
  from safetensors.numpy import load_file
  shutil.copytree(saved["mixtral"], tmp_path / "m")
  path = str(tmp_path / "m" / "model.safetensors")
  tensors = load_file(path)
  del tensors["model.layers.1.block_sparse_moe.experts.3.w3.weight"]
  save_file(tensors, path)
  with pytest.raises(CheckpointMismatchError,
                     match=r"'model.layers.1'.*Mixtral's Linear per expert.*"
                     r"lacks \['model.layers.1.block_sparse_moe.experts.3.w3"):
    from_pretrained(tmp_path / "m", scan_layers=True)


@pytest.mark.parametrize("family, over, match", [
  ("qwen3_moe", dict(mlp_only_layers=[1]), r"mlp_only_layers = \[1\]"),
  ("qwen3_moe", dict(decoder_sparse_step=2), r"decoder_sparse_step = 2"),
  ("mixtral", dict(router_jitter_noise=0.1), r"router_jitter_noise = 0.1"),
])
def test_unsupported_configs_raise(family, over, match):
  with pytest.raises(NotImplementedError, match=match):
    ModelConfig.from_hf(hf_config(family, **over))


def test_config_checks_top_k():
  with pytest.raises(ValueError, match=r"num_experts_per_tok = 5 with "
                     r"num_experts = 4"):
    ModelConfig(vocab_size=8, hidden_size=8, intermediate_size=8,
                num_layers=1, num_heads=2, num_kv_heads=2, num_experts=4,
                num_experts_per_tok=5)
