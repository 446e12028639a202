"""`jlora.combine_adapters` against PEFT's `add_weighted_adapter` and NumPy.

The PEFT references run on a tiny transformers Llama (CPU, float32): every
deterministic method's combined update ``scale * B @ A`` per target module,
transposed to (in, out), must equal jlora's ``node.delta()``. SVD methods
are compared through the update too (the factors differ by the signs of
singular-vector pairs). DARE, random in both, is checked for
reproducibility and against its definition.
"""


import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import jlora
from jlora.adapters import add_adapter, select
from jlora.merging import METHODS, combine_adapters
from jlora.node import LoRA, is_lora
from helpers import np_merge

TARGETS = ["q_proj", "v_proj", "up_proj", "down_proj"]

pytestmark = pytest.mark.filterwarnings(
    "ignore:Adapter name:UserWarning",  # PEFT dislikes the name 'a' in 'lora_'
    "ignore:The density:UserWarning",   # PEFT at density 1: nothing pruned
    "ignore::FutureWarning")


# ------------------------------------------------------------ PEFT parity


@pytest.fixture(scope="module")
def peft_model():
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  peft = pytest.importorskip("peft")
  torch.manual_seed(0)
  cfg = transformers.LlamaConfig(
      hidden_size=32, intermediate_size=64, num_hidden_layers=2,
      num_attention_heads=4, num_key_value_heads=2, vocab_size=64)
  model = transformers.LlamaForCausalLM(cfg)
  # init_lora_weights=False: B random, not zero, so every update is visible.
  pm = peft.get_peft_model(model, peft.LoraConfig(
      r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False),
                           adapter_name="a")
  pm.add_adapter("b", peft.LoraConfig(
      r=4, lora_alpha=4, target_modules=TARGETS, init_lora_weights=False))
  # c: another rank, and only some modules (PEFT skips it elsewhere).
  pm.add_adapter("c", peft.LoraConfig(
      r=2, lora_alpha=6, target_modules=["q_proj", "down_proj"],
      init_lora_weights=False))
  modules = {}
  for name, m in pm.named_modules():
    if hasattr(m, "lora_A") and "a" in m.lora_A:
      parts = name.split(".")
      layer = parts[parts.index("layers") + 1]
      modules[f"layers/{layer}/{parts[-1]}/kernel"] = m
  return pm, modules


def _jlora_set(modules):
  """The PEFT adapters imported by hand: a = lora_A.T, b = lora_B.T."""
  trees = {}
  for adapter in ("a", "b", "c"):
    tree = {}
    for path, m in modules.items():
      _, layer, proj, _ = path.split("/")
      w = m.base_layer.weight.detach().numpy().T
      leaf = jnp.asarray(w)
      if adapter in m.lora_A:
        A = m.lora_A[adapter].weight.detach().numpy()
        B = m.lora_B[adapter].weight.detach().numpy()
        leaf = LoRA(w=leaf, a=jnp.asarray(A.T), b=jnp.asarray(B.T),
                    alpha=float(m.lora_alpha[adapter]), layout="io",
                    path=path)
      tree.setdefault("layers", {}).setdefault(layer, {})[proj] = {
          "kernel": leaf}
    trees[adapter] = tree
  s = add_adapter(trees["a"], "b", trees["b"], base_name="a")
  return add_adapter(s, "c", trees["c"])


@pytest.fixture(scope="module")
def adapter_set(peft_model):
  return _jlora_set(peft_model[1])


def _node(tree, path):
  _, layer, proj, _ = path.split("/")
  return tree["layers"][layer][proj]["kernel"]


PARITY = [
    # (weights, method, jlora kwargs, jitted)
    ({"a": 0.7, "b": -0.4}, "linear", {}, False),
    ({"a": 0.7, "b": -0.4, "c": 1.3}, "cat", {}, False),
    ({"a": 0.7, "b": -0.4, "c": 1.3}, "svd", {}, False),
    ({"a": 0.7, "b": -0.4}, "svd", {"rank": 3}, True),
    ({"a": 0.7, "b": -0.4}, "ties", {"density": 0.5}, True),
    ({"a": 1.0, "b": 0.6}, "ties",
     {"density": 0.3, "majority_sign_method": "frequency"}, True),
    ({"a": 0.7, "b": -0.4}, "magnitude_prune", {"density": 0.6}, True),
    ({"a": 0.7, "b": -0.4, "c": 1.3}, "ties_svd", {"density": 0.5}, True),
    ({"a": 0.7, "b": 0.4}, "magnitude_prune_svd", {"density": 0.5}, True),
    # DARE at density 1 keeps everything: deterministic, comparable.
    ({"a": 0.7, "b": -0.4}, "dare_ties", {"density": 1.0}, True),
    ({"a": 0.7, "b": -0.4, "c": 1.3}, "dare_linear_svd", {"density": 1.0},
     True),
    # One adapter: PEFT (and jlora) fall back to "linear".
    ({"b": 2.0}, "ties", {"density": 0.5}, False),
]


@pytest.mark.parametrize("weights,method,kwargs,jit", PARITY,
                         ids=[f"{m}-{i}" for i, (_, m, _, _) in
                              enumerate(PARITY)])
def test_matches_peft_add_weighted_adapter(peft_model, adapter_set, weights,
                                           method, kwargs, jit):
  pm, modules = peft_model
  name = f"mix{len(pm.peft_config)}"
  peft_kwargs = {("svd_rank" if k == "rank" else k): v
                 for k, v in kwargs.items()}
  pm.add_weighted_adapter(list(weights), list(weights.values()), name,
                          combination_type=method, **peft_kwargs)
  fn = lambda s, w: combine_adapters(s, w, method, key=jax.random.key(0),
                                     **kwargs)
  out = (jax.jit(fn) if jit else fn)(adapter_set, weights)
  for path, m in modules.items():
    node = _node(out, path)
    assert is_lora(node) and node.scale == 1.0
    ref = m.get_delta_weight(name).detach().numpy().T  # (in, out)
    got = np.asarray(node.delta())
    tol = 2e-5 if method.endswith("svd") else 1e-6
    np.testing.assert_allclose(got, ref, rtol=0,
                               atol=tol * np.abs(ref).max(), err_msg=path)
    if method == "cat":
      assert node.rank == sum(
          m.r[n] for n in weights if n in m.lora_A), path


def test_svd_clamp(peft_model, adapter_set):
  """Factors agree with PEFT's up to the sign of each singular pair; the clamp
  (q-quantile of both factors pooled, applied symmetrically) on float64."""
  pm, modules = peft_model
  weights = {"a": 0.7, "b": -0.4}
  pm.add_weighted_adapter(list(weights), list(weights.values()), "svd_ref",
                          combination_type="svd")
  plain = combine_adapters(adapter_set, weights, "svd")
  clamped = combine_adapters(adapter_set, weights, "svd", svd_clamp=0.9)
  for path, m in modules.items():
    a, b = (np.asarray(x, np.float64) for x in (_node(plain, path).a,
                                                _node(plain, path).b))
    A = m.lora_A["svd_ref"].weight.detach().numpy().T  # (in, r)
    B = m.lora_B["svd_ref"].weight.detach().numpy().T  # (r, out)
    signs = np.sign(np.sum(a * A, axis=0))
    np.testing.assert_allclose(a, A * signs, atol=5e-5 * np.abs(A).max())
    np.testing.assert_allclose(b, B * signs[:, None],
                               atol=5e-5 * np.abs(B).max())
    hi = np.quantile(np.concatenate([b.ravel(), a.ravel()]), 0.9)
    got = _node(clamped, path)
    np.testing.assert_allclose(np.asarray(got.a), np.clip(a, -hi, hi),
                               rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(np.asarray(got.b), np.clip(b, -hi, hi),
                               rtol=1e-6, atol=1e-7)


# -------------------------------------------------------------------- DARE


def _synthetic_set(fan_in=128, fan_out=64, rank=16):
  rng = np.random.default_rng(0)
  base = {"dense": {"kernel": jnp.asarray(rng.normal(size=(fan_in, fan_out)),
                                          jnp.float32)}}
  trees = {}
  for name in ("x", "y"):
    node = LoRA(w=base["dense"]["kernel"],
                a=jnp.asarray(rng.normal(size=(fan_in, rank)), jnp.float32),
                b=jnp.asarray(rng.normal(size=(rank, fan_out)), jnp.float32),
                alpha=float(2 * rank), path="dense/kernel")
    trees[name] = {"dense": {"kernel": node}}
  return trees


@pytest.mark.parametrize("method", ["dare_ties", "dare_linear_svd"])
def test_dare_is_reproducible_given_the_key(method):
  trees = _synthetic_set(32, 16, 4)
  w = {"x": 0.8, "y": 0.5}
  run = lambda k: combine_adapters(trees, w, method, density=0.5,
                                   key=jax.random.key(k))["dense"]["kernel"]
  one, same, other = run(1), run(1), run(2)
  np.testing.assert_array_equal(np.asarray(one.delta()),
                                np.asarray(same.delta()))
  assert not np.allclose(np.asarray(one.delta()), np.asarray(other.delta()))


def test_dare_keeps_density_and_rescales(density=0.3):
  trees = _synthetic_set()
  x = trees["x"]["dense"]["kernel"]
  # Weight 0 for y: the result is x's factors (or update), DARE-pruned.
  w = {"x": 1.0, "y": 0.0}
  out = combine_adapters(trees, w, "dare_linear", density=density,
                         key=jax.random.key(3))["dense"]["kernel"]
  root = np.sqrt(x.scale)
  for got, orig in ((out.a, x.a), (out.b, x.b)):
    ratio = np.asarray(got, np.float64) / (root * np.asarray(orig, np.float64))
    kept = np.abs(ratio) > 0
    assert abs(kept.mean() - density) < 0.05, kept.mean()
    np.testing.assert_allclose(ratio[kept], 1 / density, rtol=1e-5)
  # On the full update (svd variant at full rank, so nothing is truncated).
  out = combine_adapters(trees, w, "dare_linear_svd", density=density,
                         rank=64, key=jax.random.key(4))["dense"]["kernel"]
  got = np.asarray(out.delta(), np.float64)
  full = np.asarray(x.delta(), np.float64)
  kept = np.abs(got) > 0.5 * np.abs(full) / density
  assert abs(kept.mean() - density) < 0.03, kept.mean()
  np.testing.assert_allclose(got, np.where(kept, full / density, 0), rtol=0,
                             atol=1e-4 * np.abs(full).max())


# ------------------------------------------------- NumPy / structure checks


@settings(max_examples=6, deadline=None)
@given(fan_in=st.integers(2, 9), fan_out=st.integers(2, 9),
       ranks=st.lists(st.integers(1, 3), min_size=2, max_size=3),
       with_e=st.booleans(), rslora=st.booleans(), seed=st.integers(0, 99))
def test_cat_is_the_exact_weighted_sum(fan_in, fan_out, ranks, with_e, rslora,
                                       seed):
  """float64 NumPy: cat's update is sum_i w_i s_i a_i diag(e_i) b_i."""
  rng = np.random.default_rng(seed)
  kernel = jnp.asarray(rng.normal(size=(fan_in, fan_out)), jnp.float32)
  trees, weights, ref = {}, {}, np.zeros((fan_in, fan_out))
  for i, r in enumerate(ranks):
    node = LoRA(w=kernel, a=jnp.asarray(rng.normal(size=(fan_in, r)),
                                        jnp.float32),
                b=jnp.asarray(rng.normal(size=(r, fan_out)), jnp.float32),
                e=(jnp.asarray(rng.normal(size=(r,)), jnp.float32)
                   if with_e else None),
                alpha=float(rng.integers(1, 9)), rslora=rslora, path="k")
    name = f"n{i}"
    trees[name] = {"k": node}
    weights[name] = float(rng.normal())
    ref += weights[name] * (np_merge({"k": node})["k"] -
                            np.asarray(kernel, np.float64))
  out = combine_adapters(trees, weights, "cat")["k"]
  assert out.rank == sum(ranks)
  np.testing.assert_allclose(np.asarray(out.delta(), np.float64), ref,
                             rtol=1e-5, atol=1e-5 * np.abs(ref).max())


def test_stacked_kernels_combine_per_slice():
  """A scanned (layers, in, out) kernel combines as each layer on its own."""
  rng = np.random.default_rng(1)
  kernel = jnp.asarray(rng.normal(size=(3, 8, 6)), jnp.float32)
  stacked, per_layer = {}, [{} for _ in range(3)]
  for name in ("x", "y"):
    a = jnp.asarray(rng.normal(size=(3, 8, 2)), jnp.float32)
    b = jnp.asarray(rng.normal(size=(3, 2, 6)), jnp.float32)
    stacked[name] = {"k": LoRA(w=kernel, a=a, b=b, alpha=3.0, layout="bio",
                               path="k")}
    for layer in range(3):
      per_layer[layer][name] = {"k": LoRA(w=kernel[layer], a=a[layer],
                                          b=b[layer], alpha=3.0, path="k")}
  w = {"x": 0.9, "y": -0.6}
  for method, kw in (("ties", {"density": 0.5}),
                     ("ties_svd", {"density": 0.4})):
    got = combine_adapters(stacked, w, method, **kw)["k"]
    assert got.layout == "bio" and got.a.shape[0] == 3
    for layer in range(3):
      ref = combine_adapters(per_layer[layer], w, method, **kw)["k"]
      np.testing.assert_allclose(np.asarray(got.delta()[layer]),
                                 np.asarray(ref.delta()), rtol=1e-5,
                                 atol=1e-5, err_msg=f"{method} layer {layer}")


def test_result_is_an_ordinary_lora_tree(adapter_set):
  out = combine_adapters(adapter_set, {"a": 1.0, "b": 0.5}, "ties",
                         density=0.5)
  s = add_adapter(adapter_set, "mix", out)
  mix = select(s, "mix")
  assert jax.tree.structure(mix) == jax.tree.structure(out)
  fused = jlora.merge(out)
  np.testing.assert_allclose(
      np.asarray(fused["layers"]["0"]["q_proj"]["kernel"], np.float64),
      np_merge(out)["layers"]["0"]["q_proj"]["kernel"], rtol=1e-5, atol=1e-6)
  # The same from a dict of LoRA trees as from the set.
  as_dict = {n: select(adapter_set, n) for n in ("a", "b")}
  again = combine_adapters(as_dict, {"a": 1.0, "b": 0.5}, "ties", density=0.5)
  for x, y in zip(jax.tree.leaves(out), jax.tree.leaves(again)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_errors(adapter_set):
  w = {"a": 1.0, "c": 1.0}
  with pytest.raises(ValueError, match="unknown method"):
    combine_adapters(adapter_set, w, "average")
  with pytest.raises(ValueError, match="pass density"):
    combine_adapters(adapter_set, w, "ties")
  with pytest.raises(ValueError, match="PRNG key"):
    combine_adapters(adapter_set, w, "dare_linear", density=0.5)
  with pytest.raises(ValueError, match=r"one rank.*'layers/0/down_proj/"):
    combine_adapters(adapter_set, w, "linear")
  with pytest.raises(ValueError, match="rank 40 exceeds min"):
    combine_adapters(adapter_set, w, "svd", rank=40)
  with pytest.raises(KeyError, match="no adapter 'zzz'"):
    combine_adapters(adapter_set, {"zzz": 1.0}, "cat")
  with pytest.raises(ValueError, match="quantile"):
    combine_adapters(adapter_set, w, "svd", svd_clamp=2.0)
  assert set(METHODS) >= {"linear", "cat", "svd", "ties", "dare_ties_svd"}


def test_dora_is_refused():
  params = {"dense": {"kernel": jnp.ones((4, 3))}}
  lp = jlora.apply(params, rank=2, key=jax.random.key(0), dora=True)
  with pytest.raises(ValueError, match="DoRA"):
    combine_adapters({"x": lp, "y": lp}, {"x": 1.0, "y": 1.0}, "cat")
