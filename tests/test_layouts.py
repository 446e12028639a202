"""`jlora.infer_layout`: layouts read off the model, checked against the
layer definitions, and the adapted model against the merged path."""

from __future__ import annotations

import ast
import re
import warnings

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jlora
from helpers import randomize_b, rel_err
from jlora._paths import leaves_with_path
from jlora.node import factor_shapes, is_lora
from layout_models import CASES, KEY, _ids


def _spec(x):
  return jax.ShapeDtypeStruct(np.shape(x), x.dtype)


def _adapted(case, layout=None):
  layout = jlora.infer_layout(case.fn, case.params, *case.args) if (
      layout is None) else layout
  lp = jlora.apply(case.params, rank=2, alpha=4.0, key=KEY, layout=layout)
  return randomize_b(lp, jax.random.key(7), std=0.2)


def _nodes(tree):
  return [x for x in jax.tree.leaves(tree, is_leaf=is_lora) if is_lora(x)]


def _loss(y):
  """A cross-entropy-like loss over the last axis against fixed targets."""
  target = jax.random.uniform(jax.random.key(5), y.shape)
  return -jnp.mean(jnp.sum(target * jax.nn.log_softmax(y), axis=-1))


def kernel_sized_products(jaxpr, nodes) -> list[tuple[int, ...]]:
  """Shapes of `dot_general` outputs, sub-jaxprs included, that are as large
  as an adapted kernel: a kernel's own axes or its (in, out) matrix, per
  stacked index, in any order (size-1 axes ignored)."""
  forbidden = set()
  for n in nodes:
    _, fan_in, fan_out = factor_shapes(n.layout, n.shape)
    forbidden.add(tuple(sorted(d for d in (fan_in, fan_out) if d != 1)))
    forbidden.add(tuple(sorted(d for d, r in zip(n.shape, n.layout)
                               if r != "b" and d != 1)))
  found = []
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "dot_general":
      shape = tuple(eqn.outvars[0].aval.shape)
      if tuple(sorted(d for d in shape if d != 1)) in forbidden:
        found.append(shape)
    for sub in jax.extend.core.jaxprs_in_params(eqn.params):
      found += kernel_sized_products(sub, nodes)
  return found


# -- what infer_layout reads --------------------------------------------------

@pytest.mark.parametrize("name", sorted(CASES))
def test_inferred_layouts_match_the_layer_definitions(name):
  case = CASES[name]()
  layout = jlora.infer_layout(case.fn, case.params, *map(_spec, case.args))
  assert isinstance(layout, dict)
  assert dict(layout) == case.layouts
  assert set(layout.heads) == set(case.heads)
  assert set(layout.embeddings) == set(case.embeddings)
  skip = set(case.heads) | set(case.embeddings)
  assert layout.targets == [p for p in layout if p not in skip]


def test_nothing_is_computed():
  """Shape structs stand in for the params and the inputs."""
  case = CASES["gemma_like"]()
  abstract = jax.tree.map(_spec, case.params)
  calls = []
  fn = lambda p, ids: (calls.append(type(ids)), case.fn(p, ids))[1]
  layout = jlora.infer_layout(fn, abstract, _spec(case.args[0]))
  assert dict(layout) == case.layouts
  assert calls and all(issubclass(t, jax.core.Tracer) for t in calls)


def test_printable_and_editable():
  case = CASES["gemma_like"]()
  layout = jlora.infer_layout(case.fn, case.params, *case.args)
  assert ast.literal_eval(repr(layout)) == case.layouts  # prints as a dict
  layout["layer_0/linear/w"] = "io"
  del layout["layer_1/linear/w"]
  layout = layout.copy() | {"layer_0/linear/w": "io"}
  lp = jlora.apply(case.params, rank=2, key=KEY, layout=layout)
  adapted = {n.path: n.layout for n in _nodes(lp)}
  assert "layer_1/linear/w" not in adapted
  assert "input_embedding" not in adapted  # still a head after the edits
  assert adapted["layer_0/q_einsum/w"] == "oio"


# -- the adapted model --------------------------------------------------------

@pytest.mark.parametrize("name", sorted(CASES))
def test_adapted_model_equals_merged_path_and_stays_factored(name):
  """Default targets adapt every inferred weight but heads and embeddings;
  outputs and gradients equal the merged path's; no product in the
  gradient forms a kernel-sized array."""
  case = CASES[name]()
  layout = jlora.infer_layout(case.fn, case.params, *case.args)
  lp = _adapted(case, layout)
  assert [n.path for n in _nodes(lp)] == layout.targets
  trainable, frozen = jlora.partition(lp)

  def wrapped(tf):
    y = jlora.wrap(case.fn)(jlora.combine(*tf), *case.args)
    return _loss(y), y

  def merged(tf):
    y = case.fn(jlora.merge(jlora.combine(*tf)), *case.args)
    return _loss(y), y

  # Differentiated and jitted over both halves, arrays only: equinox modules
  # hold functions next to their arrays, and NNX transforms refuse concrete
  # arrays inside a grad trace.
  run = lambda f: eqx.filter_jit(eqx.filter_value_and_grad(f, has_aux=True))(
      (trainable, frozen))
  (_, y), (grads, _) = run(wrapped)
  (_, y_merged), (ref, _) = run(merged)
  y_base = eqx.filter_jit(case.fn)(case.params, *case.args)
  assert rel_err(y, y_merged) < 1e-5
  assert rel_err(y_merged, y_base) > 1e-2  # the adapters change the model
  grads, ref = jax.tree.leaves(grads), jax.tree.leaves(ref)
  assert len(grads) == len(ref) == 2 * len(_nodes(lp))
  for g, r in zip(grads, ref):
    assert rel_err(g, r) < 1e-4
  grad_of = lambda f: eqx.filter_make_jaxpr(eqx.filter_grad(
      lambda tf: f(tf)[0]))((trainable, frozen))[0].jaxpr
  assert kernel_sized_products(grad_of(wrapped), _nodes(lp)) == []
  # The check finds what it looks for: the merged path forms every kernel.
  assert kernel_sized_products(grad_of(merged), _nodes(lp))


def test_nnx_remat_returning_state_stays_factored():
  """nnx.remat returns the module state from the checkpointed body: the
  kernels leave it factored instead of fused."""
  case = CASES["tunix_like"]()
  lp = _adapted(case)
  trainable, frozen = jlora.partition(lp)
  wrapped = lambda t: _loss(jlora.wrap(case.fn)(jlora.combine(t, frozen),
                                                *case.args))
  jaxpr = jax.make_jaxpr(jax.grad(wrapped))(trainable).jaxpr
  assert any(e.primitive.name == "checkpoint" or "remat" in e.primitive.name
             for e in jaxpr.eqns)
  assert kernel_sized_products(jaxpr, _nodes(lp)) == []


def test_targets_and_exclude_narrow_the_inferred_weights():
  case = CASES["tunix_like"]()
  layout = jlora.infer_layout(case.fn, case.params, *case.args)
  lp = jlora.apply(case.params, rank=2, key=KEY, layout=layout,
                   targets=r"(q|v)_proj", exclude=r"layers/1/")
  assert [n.path for n in _nodes(lp)] == ["layers/0/q_proj/w",
                                          "layers/0/v_proj/w"]
  assert [n.layout for n in _nodes(lp)] == ["ioo", "ioo"]
  lp = jlora.apply(case.params, rank=2, key=KEY, layout=layout,
                   targets="lm_head")  # a head, named explicitly
  assert [n.path for n in _nodes(lp)] == ["lm_head/w"]
  with pytest.raises(ValueError, match=r"'mlp' matched none.*infer_layout"):
    jlora.apply(case.params, rank=2, key=KEY, layout=layout, targets="mlp")


def test_regex_keyed_layouts_keep_working():
  case = CASES["gemma_like"]()
  layout = {r"q_einsum/w": "oio", r"kv_einsum/w": "ooio"}
  lp = jlora.apply(case.params, rank=2, key=KEY, layout=layout,
                   targets=r"(q|kv)_einsum")
  assert {n.layout for n in _nodes(lp)} == {"oio", "ooio"}
  lp = randomize_b(lp, KEY)
  y = jax.jit(lambda a: jlora.wrap(case.fn)(lp, a))(*case.args)
  assert rel_err(y, jax.jit(lambda a: case.fn(jlora.merge(lp), a))(
      *case.args)) < 1e-5


# -- more ways a weight reaches a product -------------------------------------

X = jnp.ones((2, 4))


@jax.custom_vjp
def _matmul(x, w):
  return x @ w


_matmul.defvjp(lambda x, w: (x @ w, (x, w)),
               lambda res, g: (g @ res[1].T, res[0].T @ g))


def test_control_flow_and_custom_derivatives():
  def fn(p, x, flag):
    y = _matmul(x, p["vjp"])
    y = y + jax.lax.cond(flag, lambda w: x @ w, lambda w: x @ (2 * w),
                         p["cond"])
    y = jax.lax.fori_loop(0, 3, lambda k, h: jnp.tanh(h @ p["loop"][k]), y)
    y = jax.jit(lambda w, h: jnp.einsum("bi,oi->bo", h, w))(p["jit"], y)
    return y @ p["cast"].astype(jnp.bfloat16).reshape(4, 2, 3).reshape(4, 6)

  params = {"vjp": jnp.ones((4, 4)), "cond": jnp.ones((4, 4)),
            "loop": jnp.ones((3, 4, 4)), "jit": jnp.ones((4, 4)),
            "cast": jnp.ones((4, 6))}
  layout = jlora.infer_layout(fn, params, X, True)
  assert dict(layout) == {"vjp": "io", "cond": "io", "loop": "bio",
                          "jit": "oi", "cast": "io"}


def test_expert_weights_picked_per_token_are_stacked():
  def fn(p, x, expert, ids, sizes):
    one = x @ p["by_index"][expert]
    per_token = jnp.einsum("ti,tio->to", x, p["gathered"][ids])
    grouped = jax.lax.ragged_dot(x, p["ragged"], sizes)
    return one + per_token + grouped

  params = {k: jnp.ones((3, 4, 5)) for k in ("by_index", "gathered",
                                             "ragged")}
  layout = jlora.infer_layout(fn, params, X, 1, jnp.array([0, 2]),
                              jnp.array([1, 1, 0]))
  assert dict(layout) == {"by_index": "bio", "gathered": "bio",
                          "ragged": "bio"}
  assert layout.embeddings == ()


def test_weights_inside_a_shard_map_body():
  # check_vma (the default) marks the whole weights device-varying (pvary)
  # before they meet each device's rows.
  from jax.sharding import PartitionSpec as P
  mesh = jax.make_mesh((2,), ("data",),
                       axis_types=(jax.sharding.AxisType.Auto,))

  def body(x, w, experts, sizes):
    return jax.lax.ragged_dot(x @ w, experts, sizes)

  def fn(p, x, sizes):
    return jax.shard_map(body, mesh=mesh, in_specs=(P("data"), P(), P(), P()),
                         out_specs=P("data"))(x, p["w"], p["experts"], sizes)

  params = {"w": jnp.ones((4, 6)), "experts": jnp.ones((3, 6, 5))}
  layout = jlora.infer_layout(fn, params, jnp.ones((4, 4)),
                              jnp.array([1, 1, 0]))
  assert dict(layout) == {"w": "io", "experts": "bio"}


# -- errors -------------------------------------------------------------------

def test_weight_used_with_two_contractions_lists_both_uses():
  def fn(p, x):
    return x @ p["tied"] + (x @ p["tied"].T) @ p["ok"]
  params = {"tied": jnp.ones((4, 4)), "ok": jnp.ones((4, 4))}
  with pytest.raises(jlora.LayoutError) as err:
    jlora.infer_layout(fn, params, X)
  msg = str(err.value)
  assert "'tied'" in msg and "'ok'" not in msg
  assert "contracted on axes [0]" in msg and "layout 'io'" in msg
  assert "contracted on axes [1]" in msg and "layout 'oi'" in msg
  assert "test_layouts.py" in msg  # where each use is
  assert "Untie" in msg


def test_layout_error_lists_every_kernel_with_a_regex_fix():
  case = CASES["gemma_like"]()
  lp = jlora.apply(case.params, rank=2, key=KEY, targets=r"einsum/w")
  with pytest.raises(jlora.LayoutError) as err:
    jax.eval_shape(jlora.wrap(case.fn), lp, *case.args)  # traced, not run
  msg = str(err.value)
  assert msg.startswith("8 LoRA kernels are contracted")
  for i in range(2):
    for name in ("q", "kv", "attn_vec", "gating"):
      assert f"'layer_{i}/{name}_einsum/w'" in msg
  assert "jlora.infer_layout(fn, params, *args)" in msg
  fix = ast.literal_eval(re.search(r"layout=(\{.*?\})\)", msg).group(1))
  assert fix == {r"layer_\d+/q_einsum/w": "oio",
                 r"layer_\d+/kv_einsum/w": "ooio",
                 r"layer_\d+/attn_vec_einsum/w": "iio",
                 r"layer_\d+/gating_einsum/w": "ooi"}
  # Following the message once fixes every layer.
  fixed = jlora.apply(case.params, rank=2, key=KEY, targets=r"einsum/w",
                      layout=fix)
  y = jax.eval_shape(jlora.wrap(case.fn), fixed, *case.args)  # no error
  assert y.shape == (2, 3, 32)


def test_rank_error_blames_the_layout_of_a_multi_axis_kernel():
  case = CASES["tunix_like"]()  # k_proj (dim 8, kv_heads 1, head_dim 5)
  with pytest.raises(ValueError) as err:
    jlora.apply(case.params, rank=2, key=KEY, targets=r"k_proj/w")
  msg = str(err.value)
  assert "rank 2 exceeds min(in, out) = 1 for 'layers/0/k_proj/w'" in msg
  assert "layout 'bio'" in msg and "the layout is the likely cause" in msg
  assert "jlora.infer_layout(fn, params, *args)" in msg
  assert r"r'layers/\d+/k_proj/w'" in msg


def test_all_linear_on_weights_not_named_kernel_raises():
  case = CASES["equinox_lm"]()
  fn, model = case.fn, case.params
  with pytest.raises(ValueError) as err:
    jlora.apply(model, rank=2, key=KEY)
  msg = str(err.value)
  assert "'all-linear' (the default) picks leaves named 'kernel'" in msg
  assert "'attn/query_proj/weight'" in msg
  assert r"r'mlp/layers/\d+/weight'" in msg  # layers folded, none left out
  assert "'embed/weight'" not in msg  # an embedding is no target anyway
  assert "jlora.infer_layout(fn, params, *args)" in msg
  layout = jlora.infer_layout(fn, model, _ids(32))  # the fix it names
  assert len(_nodes(jlora.apply(model, rank=2, key=KEY, layout=layout))) == 6



@pytest.mark.parametrize("method", ["nf4", "fp8"])
def test_inferred_layout_picks_what_quantize_stores(method):
  """An equinox model's weights (named 'weight', (out, in)): quantize with
  the inferred layout stores exactly the weights apply adapts, and the
  adapted quantized model equals its merged path."""
  case = CASES["equinox_lm"]()
  layout = jlora.infer_layout(case.fn, case.params, *case.args)
  with pytest.raises(ValueError, match="'all-linear' \\(the default\\)"):
    jlora.quantize(case.params, method)  # no layout: names, not uses
  q = jlora.quantize(case.params, method, layout=layout)
  stored = [p for p, x in leaves_with_path(q) if jlora.quant.is_quantized(x)]
  assert stored == layout.targets
  lp = _adapted(case._replace(params=q), layout)
  assert [n.path for n in _nodes(lp)] == layout.targets
  y = eqx.filter_jit(jlora.wrap(case.fn))(lp, *case.args)
  y_merged = eqx.filter_jit(case.fn)(jlora.merge(lp), *case.args)
  assert rel_err(y, y_merged) < 1e-2  # bf16 compute dtype

def test_all_linear_warns_about_skipped_weights():
  case = CASES["tunix_like"]()
  with pytest.warns(UserWarning) as record:
    lp = jlora.apply(case.params, rank=1, key=KEY)
  ours = [w for w in record if "all-linear" in str(w.message)]
  assert len(ours) == 1
  msg = str(ours[0].message)
  assert str(ours[0].filename).endswith("test_layouts.py")  # the apply call
  for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
    assert rf"r'layers/\d+/{name}/w'" in msg
  assert "kernel'" not in msg.split("skips")[1].split("If")[0]
  assert "lm_head" not in msg and "embedder" not in msg
  assert "jlora.infer_layout" in msg
  assert all(n.path.endswith("kernel") for n in _nodes(lp))
  with pytest.warns(UserWarning, match="all-linear") as record:
    jlora.quantize(case.params, "nf4")  # selects as apply does
  assert str(record[0].filename).endswith("test_layouts.py")
  with warnings.catch_warnings():
    warnings.simplefilter("error")  # an inferred layout: no warning
    jlora.apply(case.params, rank=1, key=KEY, layout=jlora.infer_layout(
        case.fn, case.params, *case.args))


def test_inferring_from_adapted_params_is_refused():
  case = CASES["gemma_like"]()
  lp = jlora.apply(case.params, rank=2, key=KEY,
                   layout=jlora.infer_layout(case.fn, case.params,
                                             *case.args))
  with pytest.raises(ValueError, match="before jlora.apply"):
    jlora.infer_layout(case.fn, lp, *case.args)


def test_layout_from_another_tree_is_refused():
  case = CASES["gemma_like"]()
  layout = jlora.infer_layout(case.fn, case.params, *case.args)
  other = jax.tree.map(lambda x: x, case.params)
  del other["layer_1"]
  with pytest.raises(ValueError, match="'layer_1/q_einsum/w'.*same params"):
    jlora.apply(other, rank=2, key=KEY, layout=layout)


def test_guide_prints_what_its_comments_say(capsys):
  """The "Other model libraries" guide's blocks run and print the layouts
  their comments show."""
  import pathlib
  page = (pathlib.Path(__file__).resolve().parents[1] / "docs" / "guides" /
          "other-libraries.md").read_text()
  blocks = re.findall(r"```python\n(.*?)```", page, re.S)
  assert len(blocks) >= 3  # linen, NNX, equinox (and a language model)
  namespace: dict = {}
  for block in blocks:
    exec(block, namespace)
  printed = capsys.readouterr().out
  shown = re.findall(r"print\(\w+_layout\)\s+# (\{.*\})", page)
  assert len(shown) == 3
  for layout in shown:
    assert layout in printed
  grads = namespace["eqx_grads"].layers[0].weight
  assert grads.a.shape == (16, 4) and float(jnp.abs(grads.b).max()) > 0
