"""jlora.peft against PEFT itself: adapters saved by one, run by the other.

Tiny float32 transformers models, saved with `save_pretrained` and loaded
with `jlora.models.from_pretrained`; logits compared to 1e-4.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import shutil

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from hypothesis import given, settings, strategies as st  # noqa: E402
from peft.tuners.tuners_utils import check_target_module_exists  # noqa: E402
from peft.utils.other import get_pattern_key  # noqa: E402
from safetensors.numpy import load_file, save_file  # noqa: E402

import jlora  # noqa: E402
import jlora.peft  # noqa: E402
from jlora import _peft_config  # noqa: E402
from jlora.models import ModelConfig, from_config, from_pretrained  # noqa: E402
from jlora.node import is_lora  # noqa: E402

from helpers import randomize_b  # noqa: E402

TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=96,
            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM"),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),  # q/k/v biases
}
IDS = np.random.RandomState(0).randint(0, 128, (2, 9))
TOL = 1e-4


@pytest.fixture(scope="module")
def base_dirs(tmp_path_factory):
  dirs = {}
  for family, (config_cls, model_cls) in FAMILIES.items():
    config = getattr(transformers, config_cls)(
        **TINY, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = getattr(transformers, model_cls)(config)
    with torch.no_grad():
      for name, p in model.named_parameters():
        p.copy_((1.0 if "norm" in name else 0.0) + 0.1 * torch.randn_like(p))
    dirs[family] = str(tmp_path_factory.mktemp(family))
    model.save_pretrained(dirs[family])
  return dirs


def hf_model(path):
  return transformers.AutoModelForCausalLM.from_pretrained(
      path, attn_implementation="eager").eval()


def torch_logits(model) -> np.ndarray:
  with torch.no_grad():
    return model(torch.tensor(IDS)).logits.float().numpy()


def jlora_logits(model, tree, jit=False) -> np.ndarray:
  forward = jlora.wrap(model.apply)
  if jit:
    forward = jax.jit(forward)
  return np.asarray(forward({"params": tree}, jnp.asarray(IDS)))


def randomize_peft(peft_model, seed=0):
  """Non-zero lora_B (and perturbed A and DoRA magnitudes)."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in peft_model.named_parameters():
      if "lora_magnitude_vector" in name:
        p.mul_(1.0 + 0.2 * torch.rand(p.shape, generator=gen))
      elif "lora_" in name:
        p.add_(0.3 * torch.randn(p.shape, generator=gen))


def file_shapes(directory) -> dict[str, tuple[tuple[int, ...], str]]:
  tensors = load_file(os.path.join(directory, "adapter_model.safetensors"))
  return {k: (tuple(v.shape), str(v.dtype)) for k, v in tensors.items()}


def read_config(directory) -> dict:
  with open(os.path.join(directory, "adapter_config.json")) as f:
    return json.load(f)


# ------------------------------------------------------------ jlora -> PEFT

SAVE_CASES = {
    "plain_head": dict(rank=4, alpha=8.0,
                       targets=r"(q_proj|v_proj|lm_head)/kernel"),
    "dora": dict(rank=4, alpha=6.0, targets="all-linear", dora=True),
    "rslora_patterns": dict(
        rank=4, alpha=8.0, targets="all-linear", rslora=True,
        rank_pattern={"v_proj": 2, "down_proj": 6},
        alpha_pattern={"o_proj": 3.0}),
    "one_layer": dict(rank=3, alpha=5.0,
                      targets=r"layers/1/self_attn/(q|k|v)_proj/kernel"),
}


@pytest.mark.parametrize("family,case,scan", [
    ("llama", "plain_head", False),
    ("llama", "dora", True),
    ("llama", "rslora_patterns", False),
    ("qwen2", "one_layer", False),
    ("qwen2", "rslora_patterns", True),
])
def test_jlora_adapter_runs_in_peft(base_dirs, tmp_path, family, case, scan):
  model, params = from_pretrained(base_dirs[family], scan_layers=scan)
  lp = jlora.apply(params, key=jax.random.key(0), **SAVE_CASES[case])
  lp = randomize_b(lp, jax.random.key(1), std=0.3)
  if case == "dora":  # a magnitude that differs from the base's norms
    lp = jax.tree.map(lambda n: dataclasses.replace(n, m=n.m * 1.2)
                      if is_lora(n) else n, lp, is_leaf=is_lora)
  jlora.peft.save(lp, tmp_path, base_model_name_or_path=base_dirs[family])
  peft_model = peft.PeftModel.from_pretrained(hf_model(base_dirs[family]),
                                              tmp_path).eval()
  expected = torch_logits(peft_model)
  assert np.abs(expected - torch_logits(hf_model(base_dirs[family]))
                ).max() > 1e-2  # the adapter changes the model
  np.testing.assert_allclose(jlora_logits(model, lp), expected, atol=TOL,
                             rtol=0)
  config = read_config(tmp_path)
  assert config["base_model_name_or_path"] == base_dirs[family]
  assert config["task_type"] == "CAUSAL_LM"


def test_one_layer_target_modules_are_full_names(base_dirs, tmp_path):
  _, params = from_pretrained(base_dirs["qwen2"])
  lp = jlora.apply(params, key=jax.random.key(0), **SAVE_CASES["one_layer"])
  jlora.peft.save(lp, tmp_path)
  assert read_config(tmp_path)["target_modules"] == [
      f"model.layers.1.self_attn.{p}_proj" for p in "kqv"]


def test_save_keeps_adapter_dtype(tmp_path):
  model, params = tiny_params()
  lp = jlora.apply(params, rank=2, targets="q_proj", key=jax.random.key(0),
                   dtype=jnp.bfloat16)
  jlora.peft.save(lp, tmp_path)
  assert {d for _, d in file_shapes(tmp_path).values()} == {"bfloat16"}
  loaded = jlora.peft.load(tmp_path, params)
  node = loaded["model"]["layers"]["0"]["self_attn"]["q_proj"]["kernel"]
  assert node.a.dtype == jnp.bfloat16
  node = jlora.peft.load(tmp_path, params, dtype=jnp.float32)[
      "model"]["layers"]["0"]["self_attn"]["q_proj"]["kernel"]
  assert node.a.dtype == jnp.float32
  np.testing.assert_array_equal(
      np.asarray(node.b), np.asarray(lp["model"]["layers"]["0"]["self_attn"][
          "q_proj"]["kernel"].b, np.float32))


# ------------------------------------------------------------ PEFT -> jlora

LOAD_CASES = {
    "plain": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj",
                                                       "down_proj"]),
    "dora_rslora_patterns": dict(
        r=4, lora_alpha=8, use_rslora=True, use_dora=True,
        target_modules=["q_proj", "k_proj", "o_proj", "up_proj"],
        # a per-layer rank: the scanned kernel pads layer 0 to rank 4
        rank_pattern={"model.layers.0.self_attn.q_proj": 2, "k_proj": 3},
        alpha_pattern={"o_proj": 2}),
    "regex": dict(r=2, lora_alpha=4,
                  target_modules=r".*\.(gate_proj|lm_head)"),
    "layers_to_transform": dict(r=4, lora_alpha=4, use_dora=True,
                                target_modules=["q_proj", "down_proj"],
                                layers_to_transform=[1]),
}


@pytest.mark.parametrize("family,case,scan", [
    ("llama", "plain", False),
    ("llama", "plain", True),
    ("llama", "dora_rslora_patterns", False),
    ("llama", "dora_rslora_patterns", True),
    ("llama", "regex", True),
    ("qwen2", "layers_to_transform", False),
    ("qwen2", "layers_to_transform", True),
])
def test_peft_adapter_runs_in_jlora(base_dirs, tmp_path, family, case, scan):
  peft_model = peft.get_peft_model(
      hf_model(base_dirs[family]),
      peft.LoraConfig(task_type="CAUSAL_LM", **LOAD_CASES[case])).eval()
  randomize_peft(peft_model)
  peft_model.save_pretrained(tmp_path)
  expected = torch_logits(peft_model)
  model, params = from_pretrained(base_dirs[family], scan_layers=scan)
  lp = jlora.peft.load(tmp_path, params)
  np.testing.assert_allclose(jlora_logits(model, lp, jit=scan), expected,
                             atol=TOL, rtol=0)
  assert np.abs(expected - jlora_logits(model, params)).max() > 1e-2


def test_peft_round_trip_is_exact(base_dirs, tmp_path):
  """load(save(tree)) gives back the same arrays, scanned or not."""
  for scan in (False, True):
    _, params = from_pretrained(base_dirs["llama"], scan_layers=scan)
    lp = jlora.apply(params, key=jax.random.key(0),
                     **SAVE_CASES["rslora_patterns"], dora=True)
    lp = randomize_b(lp, jax.random.key(1))
    jlora.peft.save(lp, tmp_path / str(scan))
    back = jlora.peft.load(tmp_path / str(scan), params)
    assert jax.tree.structure(back, is_leaf=is_lora) == jax.tree.structure(
        lp, is_leaf=is_lora)
    for x, y in zip(jax.tree.leaves(lp), jax.tree.leaves(back)):
      np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


# --------------------------------------------- config semantics, vs PEFT's

SUFFIXES = ("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj")
NAMES = [f"model.layers.{i}.{s}" for i in range(3) for s in SUFFIXES] + [
    "lm_head"]


@settings(max_examples=60, deadline=None)
@given(st.dictionaries(st.sampled_from(NAMES), st.integers(1, 4),
                       min_size=1),
       st.dictionaries(st.sampled_from(NAMES), st.sampled_from([1, 2, 16]),
                       min_size=1))
def test_written_targets_and_patterns_mean_the_same_in_peft(ranks, alphas):
  """What save writes, PEFT's own matchers read back module by module."""
  alphas = {n: alphas.get(n, 8) for n in ranks}
  r, rank_pattern = _peft_config.patterns(ranks)
  alpha, alpha_pattern = _peft_config.patterns(alphas)
  config = peft.LoraConfig(
      r=r, lora_alpha=alpha, rank_pattern=rank_pattern,
      alpha_pattern=alpha_pattern,
      target_modules=_peft_config.target_modules(ranks, NAMES))
  as_dict = {"target_modules": list(config.target_modules)}
  for name in NAMES:
    targeted = bool(check_target_module_exists(config, name))
    assert targeted == (name in ranks), name
    assert _peft_config.is_targeted(as_dict, name) == targeted, name
    if targeted:
      theirs = config.rank_pattern.get(
          get_pattern_key(config.rank_pattern.keys(), name), config.r)
      assert theirs == ranks[name] == _peft_config.pattern_value(
          rank_pattern, name, r)
      theirs = config.alpha_pattern.get(
          get_pattern_key(config.alpha_pattern.keys(), name),
          config.lora_alpha)
      assert theirs == alphas[name] == _peft_config.pattern_value(
          alpha_pattern, name, alpha)


@settings(max_examples=60, deadline=None)
@given(targets=st.one_of(
           st.lists(st.sampled_from(["q_proj", "v_proj", "down_proj",
                                     "lm_head", "model.layers.1.mlp.down_proj",
                                     "self_attn.q_proj"]), min_size=1),
           st.sampled_from([r".*\.(q|v)_proj", r"model\.layers\.[02]\..*",
                            "lm_head", r".*proj"])),
       layers=st.one_of(st.none(), st.integers(0, 2),
                        st.lists(st.integers(0, 2))),
       exclude=st.one_of(st.none(), st.just(["v_proj"]),
                         st.just(r".*layers\.0.*")))
def test_is_targeted_matches_peft(targets, layers, exclude):
  config = peft.LoraConfig(target_modules=targets, exclude_modules=exclude,
                           layers_to_transform=layers
                           if not isinstance(targets, str) else None)
  as_dict = config.to_dict()
  as_dict["target_modules"] = (config.target_modules if isinstance(
      config.target_modules, str) else sorted(config.target_modules))
  if isinstance(config.exclude_modules, set):
    as_dict["exclude_modules"] = sorted(config.exclude_modules)
  for name in NAMES:
    theirs = check_target_module_exists(config, name)
    theirs = bool(theirs) and type(theirs).__name__ != "_ExcludedModule"
    assert _peft_config.is_targeted(as_dict, name) == theirs, name


# ------------------------------------------------- same file as PEFT writes


@pytest.mark.parametrize("scan", [False, True])
def test_file_matches_peft(base_dirs, tmp_path, scan):
  kwargs = dict(r=4, lora_alpha=8, use_dora=True,
                target_modules=["q_proj", "v_proj", "down_proj"],
                rank_pattern={"v_proj": 2}, alpha_pattern={"down_proj": 3})
  peft_model = peft.get_peft_model(hf_model(base_dirs["llama"]),
                                   peft.LoraConfig(task_type="CAUSAL_LM",
                                                   **kwargs))
  peft_model.save_pretrained(tmp_path / "peft")
  _, params = from_pretrained(base_dirs["llama"], scan_layers=scan)
  lp = jlora.apply(params, rank=4, alpha=8.0, dora=True,
                   targets="(q_proj|v_proj|down_proj)/kernel",
                   rank_pattern={"v_proj": 2}, alpha_pattern={"down_proj": 3},
                   key=jax.random.key(0))
  jlora.peft.save(lp, tmp_path / "jlora",
                  base_model_name_or_path=base_dirs["llama"])
  assert file_shapes(tmp_path / "jlora") == file_shapes(tmp_path / "peft")
  ours, theirs = read_config(tmp_path / "jlora"), read_config(
      tmp_path / "peft")
  assert set(ours) == set(theirs)
  theirs["inference_mode"] = True
  # Each side records its own PEFT version (jlora: the version it follows).
  assert ours.pop("peft_version") == _peft_config.PEFT_VERSION
  assert theirs.pop("peft_version") == peft.__version__
  for field in ours:
    if field != "target_modules":
      assert ours[field] == theirs[field], field
  assert sorted(ours["target_modules"]) == sorted(theirs["target_modules"])


def test_module_names(base_dirs):
  names = {}
  for scan in (False, True):
    _, params = from_pretrained(base_dirs["llama"], scan_layers=scan)
    names[scan] = set(jlora.peft.module_names(params))
  expected = {n for n, m in hf_model(base_dirs["llama"]).named_modules()
              if isinstance(m, torch.nn.Linear)}
  assert names[False] == names[True] == expected


# ------------------------------------------------------------------ errors


@functools.cache
def tiny_params():
  config = ModelConfig(vocab_size=32, hidden_size=16, intermediate_size=24,
                       num_layers=2, num_heads=2, num_kv_heads=1)
  return from_config(config, jax.random.key(0))


def tiny_lora(**kwargs):
  _, params = tiny_params()
  kwargs = {"rank": 2, "targets": "q_proj|v_proj", **kwargs}
  return params, jlora.apply(params, key=jax.random.key(1), **kwargs)


def replace_node(tree, path_part, **fields):
  return jax.tree_util.tree_map_with_path(
      lambda p, n: dataclasses.replace(n, **fields)
      if is_lora(n) and path_part in n.path else n, tree, is_leaf=is_lora)


@pytest.mark.parametrize("make,match", [
    (lambda lp: replace_node(lp, "layers/0/self_attn/q_proj",
                             e=jnp.ones((2,))),
     r"'model/layers/0/self_attn/q_proj/kernel' has field e"),
    (lambda lp: replace_node(lp, "layers/1/self_attn/v_proj", rslora=True),
     r"one use_rslora .*model/layers/1/self_attn/v_proj/kernel"),
    (lambda lp: replace_node(lp, "layers/0/self_attn/q_proj", dropout=0.1),
     r"one lora_dropout"),
    (lambda lp: replace_node(lp, "layers/0/self_attn/q_proj",
                             m=jnp.ones((16,))),
     r"one use_dora"),
    (lambda lp: jlora.partition(lp)[0], r"one half of a partition"),
    (lambda lp: jlora.merge(lp), r"found no LoRA node"),
])
def test_save_errors(tmp_path, make, match):
  _, lp = tiny_lora()
  with pytest.raises(jlora.peft.PeftFormatError, match=match):
    jlora.peft.save(make(lp), tmp_path)


def test_save_errors_layout_and_embedding(tmp_path):
  params = {"dense": {"kernel": jnp.ones((4, 2, 3))}}
  lp = jlora.apply(params, rank=2, layout={"dense": "ioo"},
                   key=jax.random.key(0))
  with pytest.raises(jlora.peft.PeftFormatError,
                     match=r"'dense/kernel' has layout 'ioo'"):
    jlora.peft.save(lp, tmp_path)
  _, params = tiny_params()
  lp = jlora.apply(params, rank=2, targets="embed_tokens|q_proj",
                   key=jax.random.key(0))
  with pytest.raises(jlora.peft.PeftFormatError,
                     match=r"model/embed_tokens/embedding.*not on a linear"):
    jlora.peft.save(lp, tmp_path)


@pytest.fixture(scope="module")
def saved_once(tmp_path_factory):
  params, lp = tiny_lora(dora=True)
  directory = tmp_path_factory.mktemp("saved")
  jlora.peft.save(randomize_b(lp, jax.random.key(2)), directory)
  return directory, params


@pytest.fixture
def saved(saved_once, tmp_path):
  """A fresh copy of a small DoRA adapter, free to edit."""
  directory, params = saved_once
  shutil.copytree(directory, tmp_path / "adapter")
  return tmp_path / "adapter", params


def edit_config(directory, **fields):
  config = read_config(directory)
  config.update(fields)
  with open(os.path.join(directory, "adapter_config.json"), "w") as f:
    json.dump(config, f)


def edit_tensors(directory, fn):
  path = os.path.join(directory, "adapter_model.safetensors")
  tensors = load_file(path)
  fn(tensors)
  save_file(tensors, path)


Q0 = "base_model.model.model.layers.0.self_attn.q_proj"


@pytest.mark.parametrize("fields,match", [
    (dict(peft_type="IA3"), r"peft_type='IA3'"),
    (dict(bias="all"), r"bias='all'"),
    (dict(modules_to_save=["lm_head"]), r"modules_to_save=\['lm_head'\]"),
    (dict(use_qalora=True), r"use_qalora=True"),
    (dict(lora_bias=True), r"lora_bias=True"),
    (dict(layer_replication=[[0, 2]]), r"layer_replication"),
    (dict(trainable_token_indices=[1]), r"trainable_token_indices"),
    (dict(target_parameters=["x"]), r"target_parameters"),
    (dict(some_future_field=3), r"unknown field some_future_field=3"),
    (dict(target_modules=None), r"target_modules=None"),
    (dict(lora_dropout=1.5), r"lora_dropout=1.5"),
    (dict(target_modules=["q_proj"]),
     r"unexpected key '.*layers.0.self_attn.v_proj.*not targeted"),
    (dict(rank_pattern={"q_proj": 3}),
     rf"'{Q0}.lora_A.weight' has shape \[2, 16\] .* \[3, 16\]"),
    (dict(use_dora=False), r"unexpected key .*lora_magnitude_vector"),
    (dict(target_modules=["q_proj", "v_proj", "k_proj"]),
     r"missing key '.*layers.0.self_attn.k_proj.lora_A.weight'"),
])
def test_load_config_errors(saved, fields, match):
  directory, params = saved
  edit_config(directory, **fields)
  with pytest.raises(jlora.peft.PeftFormatError, match=match):
    jlora.peft.load(directory, params)


@pytest.mark.parametrize("edit,match", [
    (lambda t: t.pop(f"{Q0}.lora_B.weight"),
     rf"missing key '{Q0}.lora_B.weight'"),
    (lambda t: t.pop(f"{Q0}.lora_magnitude_vector"),
     rf"missing key '{Q0}.lora_magnitude_vector'"),
    (lambda t: t.update({"base_model.model.model.layers.5.mlp.up_proj"
                         ".lora_A.weight": np.zeros((2, 16), np.float32)}),
     r"unexpected key '.*layers.5.mlp.up_proj.lora_A.weight'.*no linear"),
    (lambda t: t.update({"base_model.model.model.embed_tokens"
                         ".lora_embedding_A": np.zeros((2, 32), np.float32)}),
     r"unexpected key '.*embed_tokens.lora_embedding_A' .*embedding"),
    (lambda t: t.update({f"{Q0}.lora_B.weight": np.zeros((15, 2),
                                                          np.float32)}),
     rf"'{Q0}.lora_B.weight' has shape \[15, 2\]"),
])
def test_load_tensor_errors(saved, edit, match):
  directory, params = saved
  edit_tensors(directory, edit)
  with pytest.raises(jlora.peft.PeftFormatError, match=match):
    jlora.peft.load(directory, params)


def test_load_other_errors(saved, tmp_path_factory):
  directory, params = saved
  with pytest.raises(jlora.peft.PeftFormatError, match="already hold LoRA"):
    jlora.peft.load(directory, jlora.peft.load(directory, params))
  empty = tmp_path_factory.mktemp("empty")
  with pytest.raises(FileNotFoundError, match="adapter_config.json"):
    jlora.peft.load(empty, params)
  edit_config(directory, target_modules="nothing")
  with pytest.raises(jlora.peft.PeftFormatError, match="matches no linear"):
    jlora.peft.load(directory, params)


# ------------------------------------------- adversarial files and configs


def _peft_adapter(base_dir, directory, **config):
  """A randomized PEFT adapter saved by PEFT itself; returns its logits."""
  peft_model = peft.get_peft_model(
      hf_model(base_dir), peft.LoraConfig(task_type="CAUSAL_LM", **config))
  randomize_peft(peft_model)
  peft_model.save_pretrained(directory)


def _peft_logits(base_dir, directory):
  return torch_logits(peft.PeftModel.from_pretrained(hf_model(base_dir),
                                                     directory).eval())


def _nodes(tree):
  return [x for x in jax.tree.leaves(tree, is_leaf=is_lora) if is_lora(x)]


@pytest.mark.parametrize("kind", ["int32", "bool"])
def test_integer_and_bool_tensors_load_as_float(base_dirs, tmp_path, kind):
  """PEFT copies such tensors into its float parameters; so does jlora."""
  _peft_adapter(base_dirs["llama"], tmp_path, r=4, lora_alpha=2,
                target_modules=["q_proj", "v_proj"])
  convert = {"int32": lambda x: np.round(3 * x).astype(np.int32),
             "bool": lambda x: x > 0}[kind]
  edit_tensors(tmp_path, lambda t: t.update(
      {k: convert(v) for k, v in t.items()}))
  file = load_file(os.path.join(tmp_path, "adapter_model.safetensors"))
  expected = _peft_logits(base_dirs["llama"], tmp_path)
  model, params = from_pretrained(base_dirs["llama"])
  lp = jlora.peft.load(tmp_path, params)
  for node in _nodes(lp):
    assert node.a.dtype == node.b.dtype == jnp.float32
    name = node.path.replace("/", ".").rsplit(".", 1)[0]
    np.testing.assert_array_equal(
        np.asarray(node.b), file[f"base_model.model.{name}.lora_B.weight"].T)
  np.testing.assert_allclose(jlora_logits(model, lp), expected, atol=TOL,
                             rtol=1e-5)
  merged = np.asarray(model.apply({"params": jlora.merge(lp)},
                                  jnp.asarray(IDS)))
  np.testing.assert_allclose(merged, expected, atol=TOL, rtol=1e-5)
  assert np.abs(expected - jlora_logits(model, params)).max() > 1e-2


def test_mixed_dtypes_take_the_wider_never_narrow(saved):
  directory, params = saved
  big = np.full((16, 2), 1e5, np.float32)  # beyond float16's 65504

  def mixed(t):
    for k in t:
      t[k] = t[k].astype(np.float16)
    t[f"{Q0}.lora_B.weight"] = big

  edit_tensors(directory, mixed)
  lp = jlora.peft.load(directory, params)
  assert {n.a.dtype for n in _nodes(lp)} == {jnp.dtype(jnp.float32)}
  assert {n.m.dtype for n in _nodes(lp)} == {jnp.dtype(jnp.float32)}
  node = lp["model"]["layers"]["0"]["self_attn"]["q_proj"]["kernel"]
  np.testing.assert_array_equal(np.asarray(node.b), big.T)
  with pytest.raises(jlora.peft.PeftFormatError,
                     match=rf"'{Q0}.lora_B.weight' has values up to 100000,"
                     r" beyond float16's range"):
    jlora.peft.load(directory, params, dtype=jnp.float16)
  for bad in (jnp.int32, "bool"):
    with pytest.raises(jlora.peft.PeftFormatError,
                       match=r"dtype=(int32|bool): LoRA factors are floating"):
      jlora.peft.load(directory, params, dtype=bad)


@pytest.mark.parametrize("dtypes,expected", [
    ((np.float16, ml_dtypes.bfloat16), jnp.float32),  # neither holds both
    ((ml_dtypes.bfloat16, ml_dtypes.bfloat16), jnp.bfloat16),  # no widening
    ((np.float16, np.int32), jnp.float16),  # integers take no part
    ((np.int8, np.int32), jnp.float32),
])
def test_adapter_dtype_policy(saved, dtypes, expected):
  directory, params = saved
  source = load_file(os.path.join(directory, "adapter_model.safetensors"))

  def cast(t):
    for i, k in enumerate(sorted(t)):
      t[k] = np.round(t[k] * 8).astype(dtypes[i % 2])

  edit_tensors(directory, cast)
  file = load_file(os.path.join(directory, "adapter_model.safetensors"))
  lp = jlora.peft.load(directory, params)
  for node in _nodes(lp):
    assert node.a.dtype == node.b.dtype == node.m.dtype == expected
    name = node.path.replace("/", ".").rsplit(".", 1)[0]
    np.testing.assert_array_equal(
        np.asarray(node.a, np.float64),
        file[f"base_model.model.{name}.lora_A.weight"].astype(np.float64).T)
  assert source.keys() == file.keys()


def test_nonfinite_values_are_refused(saved, tmp_path):
  directory, params = saved
  edit_tensors(directory, lambda t: t[f"{Q0}.lora_A.weight"].__setitem__(
      (1, 3), np.nan))
  with pytest.raises(jlora.peft.PeftFormatError,
                     match=rf"'{Q0}.lora_A.weight' has 1 non-finite value"):
    jlora.peft.load(directory, params)
  _, lp = tiny_lora()
  lp = replace_node(lp, "layers/1/self_attn/v_proj", b=jnp.full((2, 8),
                                                                jnp.inf))
  with pytest.raises(jlora.peft.PeftFormatError,
                     match=r"'.*layers.1.self_attn.v_proj.lora_B.weight'"
                     r" would hold 16 non-finite values"):
    jlora.peft.save(lp, tmp_path / "out")
  assert not os.path.exists(tmp_path / "out")
  _, lp = tiny_lora()
  lp = replace_node(lp, "layers/0/self_attn/q_proj",
                    a=jnp.ones((16, 2), jnp.int32))
  with pytest.raises(jlora.peft.PeftFormatError,
                     match=r"q_proj/kernel' has a of dtype int32"):
    jlora.peft.save(lp, tmp_path / "out")


@pytest.mark.parametrize("fields,match", [
    # PEFT reads "false" as true (rsLoRA on); jlora refuses it.
    (dict(use_rslora="false"),
     r"use_rslora='false' \(str\); expected true or false"),
    (dict(use_dora="true"), r"use_dora='true' \(str\); expected true or"),
    (dict(use_rslora=None), r"use_rslora=None \(NoneType\)"),
    (dict(r=2.0), r"r=2.0 \(float\); expected a positive int"),
    (dict(r="2"), r"r='2' \(str\); expected a positive int"),
    (dict(r=0), r"r=0 \(int\); expected a positive int"),
    (dict(r=True), r"r=True \(bool\); expected a positive int"),
    (dict(lora_alpha="2"), r"lora_alpha='2' \(str\); expected a finite"),
    (dict(lora_alpha=None), r"lora_alpha=None \(NoneType\)"),
    (dict(lora_alpha=float("nan")), r"lora_alpha=nan \(float\)"),
    (dict(lora_dropout="0.1"), r"lora_dropout='0.1' \(str\); expected a"
     r" dropout rate"),
    (dict(target_modules=3), r"target_modules=3 \(int\); expected a regex"),
    (dict(target_modules=["q_proj", 3]), r"target_modules=\['q_proj', 3\]"
     r" \(list\)"),
    (dict(target_modules={"q_proj": 1}), r"target_modules=\{'q_proj': 1\}"),
    (dict(target_modules="(q_proj"), r"target_modules='\(q_proj', not a"
     r" valid regular expression"),
    (dict(exclude_modules=5), r"exclude_modules=5 \(int\)"),
    (dict(rank_pattern={"q_proj": 2.0}),
     r"rank_pattern\['q_proj'\]=2.0 \(float\); expected a positive int"),
    (dict(rank_pattern={"q_proj": -2}), r"rank_pattern\['q_proj'\]=-2"),
    (dict(rank_pattern=[2]), r"rank_pattern=\[2\] \(list\); expected an"
     r" object"),
    (dict(rank_pattern={"q_proj(": 2}), r"rank_pattern key='q_proj\(', not a"
     r" valid regular"),
    (dict(alpha_pattern={"q_proj": "3"}),
     r"alpha_pattern\['q_proj'\]='3' \(str\); expected a finite number"),
    (dict(layers_to_transform="1"), r"layers_to_transform='1' \(str\)"),
    (dict(layers_to_transform=[True]), r"layers_to_transform=\[True\]"),
    (dict(layers_to_transform=[-1]), r"layers_to_transform=\[-1\]"),
    (dict(layers_to_transform=1.0), r"layers_to_transform=1.0 \(float\)"),
    (dict(layers_pattern=3), r"layers_pattern=3 \(int\)"),
    (dict(fan_in_fan_out="true"), r"fan_in_fan_out='true' \(str\)"),
    (dict(peft_type=3), r"peft_type=3"),
])
def test_config_types_are_checked(saved, fields, match):
  directory, params = saved
  edit_config(directory, **fields)
  with pytest.raises(jlora.peft.PeftFormatError,
                     match=r"adapter_config.json has " + match):
    jlora.peft.load(directory, params)


@pytest.mark.parametrize("fields,match", [
    (dict(target_modules=r".*q_proj", layers_to_transform=[0]),
     r"layers_to_transform=\[0\] with a regex target_modules"),
    (dict(target_modules=r".*q_proj", layers_pattern="layers",
          layers_to_transform=None), r"layers_pattern='layers' with a regex"),
    (dict(layers_pattern="layers"), r"layers_pattern='layers' but no"
     r" layers_to_transform"),
])
def test_config_combinations_peft_refuses(saved, fields, match):
  directory, params = saved
  with pytest.raises(ValueError):  # PEFT's own LoraConfig refuses them too
    peft.LoraConfig(**{"target_modules": ["q_proj"], **fields})
  edit_config(directory, **fields)
  with pytest.raises(jlora.peft.PeftFormatError, match=match):
    jlora.peft.load(directory, params)


def test_missing_fields_take_peft_defaults(base_dirs, tmp_path):
  """No r / lora_alpha in the file: LoraConfig's defaults (8, 8), as in
  PEFT's from_pretrained."""
  _peft_adapter(base_dirs["llama"], tmp_path, r=8, lora_alpha=8,
                target_modules=["q_proj", "down_proj"])
  config = read_config(tmp_path)
  for field in ("r", "lora_alpha", "use_rslora", "lora_dropout",
                "rank_pattern"):
    del config[field]
  with open(os.path.join(tmp_path, "adapter_config.json"), "w") as f:
    json.dump(config, f)
  expected = _peft_logits(base_dirs["llama"], tmp_path)
  model, params = from_pretrained(base_dirs["llama"])
  lp = jlora.peft.load(tmp_path, params)
  assert {(n.rank, n.scale) for n in _nodes(lp)} == {(8, 1.0)}
  np.testing.assert_allclose(jlora_logits(model, lp), expected, atol=TOL,
                             rtol=0)


def test_missing_r_with_other_ranks_names_the_default(saved):
  directory, params = saved
  config = read_config(directory)
  del config["r"]
  with open(os.path.join(directory, "adapter_config.json"), "w") as f:
    json.dump(config, f)
  with pytest.raises(jlora.peft.PeftFormatError,
                     match=rf"'{Q0}.lora_A.weight' has shape \[2, 16\] but .*"
                     r"\[8, 16\].*has no r, so it is LoraConfig's default, 8"):
    jlora.peft.load(directory, params)


def test_fan_in_fan_out_does_not_change_linear_adapters(base_dirs, tmp_path):
  """PEFT ignores fan_in_fan_out=True on nn.Linear (it records a Conv1D
  base); lora_A / lora_B mean the same either way."""
  _peft_adapter(base_dirs["qwen2"], tmp_path, r=4, lora_alpha=8,
                target_modules=["q_proj", "o_proj", "up_proj"])
  edit_config(tmp_path, fan_in_fan_out=True)
  expected = _peft_logits(base_dirs["qwen2"], tmp_path)
  model, params = from_pretrained(base_dirs["qwen2"])
  lp = jlora.peft.load(tmp_path, params)
  np.testing.assert_allclose(jlora_logits(model, lp), expected, atol=TOL,
                             rtol=0)
  assert np.abs(expected - jlora_logits(model, params)).max() > 1e-2


def test_damaged_and_foreign_files(saved, tmp_path):
  directory, params = saved
  weights = os.path.join(directory, "adapter_model.safetensors")
  config = os.path.join(directory, "adapter_config.json")
  data = open(weights, "rb").read()
  # a truncated safetensors file
  with open(weights, "wb") as f:
    f.write(data[:len(data) // 2])
  with pytest.raises(jlora.peft.PeftFormatError,
                     match=r"cannot read .*adapter_model.safetensors .*"
                     r"truncated"):
    jlora.peft.load(directory, params)
  # a pickled adapter_model.bin instead
  os.rename(weights, os.path.join(directory, "adapter_model.bin"))
  with pytest.raises(FileNotFoundError,
                     match=r"has adapter_model.bin, a pickled torch file.*"
                     r"safetensors.torch.save_file"):
    jlora.peft.load(directory, params)
  with open(weights, "wb") as f:
    f.write(data)
  # a config that is not JSON, or not an object
  text = open(config).read()
  with open(config, "w") as f:
    f.write(text[:-10])
  with pytest.raises(jlora.peft.PeftFormatError, match=r"not valid JSON"):
    jlora.peft.load(directory, params)
  with open(config, "w") as f:
    json.dump([1, 2], f)
  with pytest.raises(jlora.peft.PeftFormatError, match=r"holds a JSON list"):
    jlora.peft.load(directory, params)
  with open(config, "w") as f:
    f.write(text)
  # both spellings of one magnitude vector
  edit_tensors(directory, lambda t: t.update({
      f"{Q0}.lora_magnitude_vector.weight": t[f"{Q0}.lora_magnitude_vector"]}))
  with pytest.raises(jlora.peft.PeftFormatError,
                     match=r"two magnitude vectors for one module"):
    jlora.peft.load(directory, params)


def test_adapter_for_another_base_model(saved):
  """Hidden size 16 in the file, 32 in the base: the key and both shapes."""
  directory, _ = saved
  config = ModelConfig(vocab_size=32, hidden_size=32, intermediate_size=24,
                       num_layers=2, num_heads=2, num_kv_heads=1)
  _, other = from_config(config, jax.random.key(0))
  with pytest.raises(jlora.peft.PeftFormatError,
                     match=rf"'{Q0}.lora_A.weight' has shape \[2, 16\] but the"
                     r" base kernel and the config give \[2, 32\]"):
    jlora.peft.load(directory, other)
