"""PEFT adapters on Gemma 2, Gemma 3 and Phi-3, both ways, against PEFT 0.21.

The module names are each family's own (Phi-3's fused qkv_proj and
gate_up_proj carry one adapter each, as in PEFT); logits to 1e-4 in float32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

import jlora  # noqa: E402
import jlora.peft  # noqa: E402
from jlora.models import from_pretrained  # noqa: E402

from safetensors.numpy import load_file  # noqa: E402

from helpers import randomize_b  # noqa: E402
from test_models_families import hf_model, ids_for  # noqa: E402

IDS = ids_for()
TOL = 1e-4
# family -> every linear module name in a layer
MODULES = {
  "gemma2": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
             "down_proj"),
  "gemma3": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
             "down_proj"),
  "phi3": ("qkv_proj", "o_proj", "gate_up_proj", "down_proj"),
}


@pytest.fixture(scope="module")
def base_dirs(tmp_path_factory):
  dirs = {}
  for family in MODULES:
    path = tmp_path_factory.mktemp(family)
    hf_model(family).save_pretrained(path)
    dirs[family] = str(path)
  return dirs


def torch_model(path):
  return transformers.AutoModelForCausalLM.from_pretrained(
    path, attn_implementation="eager").eval()


def torch_logits(model):
  with torch.no_grad():
    return model(torch.tensor(IDS)).logits.float().numpy()


def jlora_logits(model, tree):
  out = jax.jit(jlora.wrap(model.apply))({"params": tree}, jnp.asarray(IDS))
  return np.asarray(out)


@pytest.mark.parametrize("family, scan", [
  ("gemma2", True), ("gemma3", False), ("phi3", True), ("phi3", False)])
def test_jlora_adapter_runs_in_peft(base_dirs, tmp_path, family, scan):
  model, params = from_pretrained(base_dirs[family], scan_layers=scan)
  lp = jlora.apply(params, rank=4, alpha=8.0, key=jax.random.key(0),
                   targets="|".join(MODULES[family]))
  lp = randomize_b(lp, jax.random.key(1), std=0.3)
  jlora.peft.save(lp, tmp_path, base_model_name_or_path=base_dirs[family])
  keys = load_file(str(tmp_path / "adapter_model.safetensors"))
  adapted = {k.split(".lora_A")[0].rsplit(".", 1)[-1] for k in keys
             if ".lora_A" in k}
  assert adapted == set(MODULES[family])  # the family's own module names
  peft_model = peft.PeftModel.from_pretrained(
    torch_model(base_dirs[family]), tmp_path).eval()
  expected = torch_logits(peft_model)
  assert np.abs(expected - torch_logits(torch_model(base_dirs[family]))
                ).max() > 1e-2  # the adapter changes the model
  np.testing.assert_allclose(jlora_logits(model, lp), expected, atol=TOL,
                             rtol=0)


@pytest.mark.parametrize("family, scan", [
  ("gemma2", False), ("gemma3", True), ("phi3", True)])
def test_peft_adapter_runs_in_jlora(base_dirs, tmp_path, family, scan):
  config = peft.LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8,
                           target_modules=list(MODULES[family]))
  peft_model = peft.get_peft_model(torch_model(base_dirs[family]),
                                   config).eval()
  gen = torch.Generator().manual_seed(0)
  with torch.no_grad():
    for name, p in peft_model.named_parameters():
      if "lora_" in name:
        p.add_(0.3 * torch.randn(p.shape, generator=gen))
  peft_model.save_pretrained(tmp_path)
  model, params = from_pretrained(base_dirs[family], scan_layers=scan)
  lp = jlora.peft.load(tmp_path, params)
  expected = torch_logits(peft_model)
  np.testing.assert_allclose(jlora_logits(model, lp), expected, atol=TOL,
                             rtol=0)
  assert np.abs(expected - jlora_logits(model, params)).max() > 1e-2
  if family == "phi3":
    layers = lp["model"]["layers"]
    node = (layers if scan else layers["0"])["self_attn"]["qkv_proj"]["kernel"]
    assert node.b.shape[-1] == (4 + 2 * 2) * 16  # one adapter, fused width


@pytest.mark.parametrize("family", ["gemma2", "phi3"])
def test_round_trip_is_exact(base_dirs, tmp_path, family):
  """load(save(tree)) gives back the same arrays, fused kernels included."""
  from jlora.node import is_lora

  _, params = from_pretrained(base_dirs[family], scan_layers=True)
  lp = jlora.apply(params, rank=3, alpha=5.0, key=jax.random.key(0),
                   targets="all-linear")
  lp = randomize_b(lp, jax.random.key(1))
  jlora.peft.save(lp, tmp_path)
  back = jlora.peft.load(tmp_path, params)
  assert jax.tree.structure(back, is_leaf=is_lora) == jax.tree.structure(
    lp, is_leaf=is_lora)
  for x, y in zip(jax.tree.leaves(lp), jax.tree.leaves(back)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
