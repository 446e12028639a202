"""Test models for `jlora.infer_layout`, each with its layouts written by hand.

Each builder returns a `Case`: ``fn(params, *args)``, the params, the args,
the layouts read off the layer definitions (the independent reference), and
the heads and embeddings `infer_layout` should report.

`gemma_like` and `tunix_like` follow the structure of Google's `gemma`
package (linen modules holding an einsum weight ``w``: q_einsum (N, D, H),
kv_einsum (2, K, D, H), attn_vec_einsum (N, H, D), gating_einsum (2, F, D),
a tied embedder) and tunix's NNX Llama (``w`` weights (D, N, H) and
(N, H, D), ``nnx.Linear`` MLP, remat'ed blocks). Both packages are too heavy
to install for tests (gemma pulls kauldron and Google Cloud clients; tunix
pulls tensorflow-datasets, numba and its own transformers pin), so their
layer structure is rebuilt here with flax's own classes. The models use
realistic weight scales (std 1/sqrt(fan_in)), not the near-zero init of
those libraries, so the adapters change the outputs visibly.

Params come from `jax.eval_shape` of each library's own init, filled with
NumPy normals of std 1/sqrt(fan_in): no XLA compile per model.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, NamedTuple

import equinox as eqx
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jlora import _paths

KEY = jax.random.key(0)
B, T = 2, 3  # batch and sequence sizes no kernel dimension equals


class Case(NamedTuple):
  fn: Callable[..., Any]
  params: Any
  args: tuple
  layouts: dict[str, str]
  heads: tuple[str, ...] = ()
  embeddings: tuple[str, ...] = ()


def _x(d):
  return jnp.asarray(np.random.default_rng(1).standard_normal((B, d)),
                     jnp.float32)


def _ids(vocab):
  return jnp.asarray(np.random.default_rng(2).integers(0, vocab, (B, T)),
                     jnp.int32)


def _fill(tree, layouts):
  """Concrete values for an abstract tree: normals of std 1/sqrt(fan_in)
  (fan_in from the hand-written layout; the last axis for other matrices),
  vectors of std 0.1."""
  rng = np.random.default_rng(0)

  def fill(path, leaf):
    if not isinstance(leaf, jax.ShapeDtypeStruct):
      return leaf
    shape = leaf.shape
    if path in layouts:
      std = 1 / math.sqrt(math.prod(
          s for s, r in zip(shape, layouts[path]) if r == "i"))
    else:
      std = 1 / math.sqrt(shape[-1]) if len(shape) > 1 else 0.1
    return jnp.asarray(std * rng.standard_normal(shape), leaf.dtype)
  return _paths.map_with_path(fill, tree)


def _linen(module, args, layouts):
  params = jax.eval_shape(module.init, KEY, *args)["params"]
  return (lambda p, *a: module.apply({"params": p}, *a)), _fill(params,
                                                                  layouts)


# -- linen --------------------------------------------------------------------

def linen_dense():
  class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.Dense(5, name="down")(nn.relu(nn.Dense(16, name="up")(x)))
  layouts = {"down/kernel": "io", "up/kernel": "io"}
  return Case(*_linen(MLP(), (_x(8),), layouts), (_x(8),), layouts)


def linen_dense_general():
  class Attn(nn.Module):
    @nn.compact
    def __call__(self, x):
      h = nn.DenseGeneral((2, 4), name="qkv")(x)              # (in, heads, hd)
      return nn.DenseGeneral(5, axis=(-2, -1), name="o")(h)   # (heads, hd, out)
  layouts = {"o/kernel": "iio", "qkv/kernel": "ioo"}
  return Case(*_linen(Attn(), (_x(8),), layouts), (_x(8),), layouts)


def linen_einsum():
  class E(nn.Module):
    @nn.compact
    def __call__(self, x):
      h = nn.Einsum((2, 4, 8), "bi,hdi->bhd", name="heads")(x)   # input last
      return nn.Einsum((2, 4, 6), "bhd,hdo->bo", name="out")(h)
  layouts = {"heads/kernel": "ooi", "out/kernel": "iio"}
  return Case(*_linen(E(), (_x(8),), layouts), (_x(8),), layouts)


def linen_scan():
  class Layer(nn.Module):
    @nn.compact
    def __call__(self, h, _):
      h = jnp.tanh(nn.Dense(8, name="dense")(h))
      return nn.Einsum((2, 8, 4), "bi,hid->bhd", name="proj")(h).reshape(
          h.shape), None

  class Stack(nn.Module):
    @nn.compact
    def __call__(self, x):
      layers = nn.scan(nn.remat(Layer), variable_axes={"params": 0},
                       split_rngs={"params": True}, length=3)
      return layers(name="layers")(x, None)[0]
  layouts = {"layers/dense/kernel": "bio", "layers/proj/kernel": "boio"}
  return Case(*_linen(Stack(), (_x(8),), layouts), (_x(8),), layouts)


def linen_lm():
  """Token embedding tied to the output, plus an untied head under a plain
  name: both are heads, the table is an embedding."""
  class LM(nn.Module):
    @nn.compact
    def __call__(self, ids):
      embed = nn.Embed(40, 8, name="embed")
      h = embed(ids)
      h = h + nn.Dense(8, name="mlp")(jnp.tanh(h))
      return embed.attend(h) + nn.Dense(40, name="unembed")(h)
  layouts = {"embed/embedding": "oi", "mlp/kernel": "io",
             "unembed/kernel": "io"}
  return Case(*_linen(LM(), (_ids(40),), layouts), (_ids(40),), layouts,
              heads=("embed/embedding", "unembed/kernel"),
              embeddings=("embed/embedding",))


class GemmaEinsum(nn.Module):
  """A weight ``w`` and the einsum it is called with (gemma's layer style,
  zero init as there; `_fill` gives the values)."""
  shape: tuple[int, ...]

  @nn.compact
  def __call__(self, eqn, x):
    w = self.param("w", nn.initializers.zeros_init(), self.shape)
    return jnp.einsum(eqn, x, w)


class GemmaBlock(nn.Module):
  heads: int = 4
  kv_heads: int = 2
  dim: int = 8
  head_dim: int = 6
  hidden: int = 12

  @nn.compact
  def __call__(self, x):
    n, k, d, h, f = (self.heads, self.kv_heads, self.dim, self.head_dim,
                     self.hidden)
    q = GemmaEinsum((n, d, h), name="q_einsum")("BTD,NDH->BTNH", x)
    kv = GemmaEinsum((2, k, d, h), name="kv_einsum")(
        "BSD,CKDH->CBSKH", x)
    keys = jnp.repeat(kv[0], n // k, axis=2)
    values = jnp.repeat(kv[1], n // k, axis=2)
    logits = jnp.einsum("BTNH,BSNH->BNTS", q, keys) / math.sqrt(h)
    attn = jnp.einsum("BNTS,BSNH->BTNH", jax.nn.softmax(logits), values)
    x = x + GemmaEinsum((n, h, d), name="attn_vec_einsum")(
        "BTNH,NHD->BTD", attn)
    gate, up = GemmaEinsum((2, f, d), name="gating_einsum")(
        "BTD,NFD->NBTF", x)
    return x + GemmaEinsum((f, d), name="linear")(
        "BTF,FD->BTD", jax.nn.gelu(gate) * up)


class GemmaLike(nn.Module):
  vocab: int = 32
  dim: int = 8
  layers: int = 2

  @nn.compact
  def __call__(self, ids):
    table = self.param("input_embedding", nn.initializers.zeros_init(),
                       (self.vocab, self.dim))
    x = table[ids] * math.sqrt(self.dim)
    for i in range(self.layers):
      x = GemmaBlock(dim=self.dim, name=f"layer_{i}")(x)
    return jnp.einsum("BTD,VD->BTV", x, table)  # tied output head


def gemma_like():
  layouts = {"input_embedding": "oi"}
  for i in range(2):
    layouts.update({f"layer_{i}/attn_vec_einsum/w": "iio",
                    f"layer_{i}/gating_einsum/w": "ooi",
                    f"layer_{i}/kv_einsum/w": "ooio",
                    f"layer_{i}/linear/w": "io",
                    f"layer_{i}/q_einsum/w": "oio"})
  return Case(*_linen(GemmaLike(), (_ids(32),), layouts), (_ids(32),),
              layouts, heads=("input_embedding",),
              embeddings=("input_embedding",))


# -- NNX ----------------------------------------------------------------------

def _nnx(make, layouts):
  """fn(state, *args) and the state of the NNX module `make()` builds."""
  graph, state = nnx.split(nnx.eval_shape(make))
  return (lambda s, *a: nnx.merge(graph, s)(*a)), _fill(state, layouts)


def nnx_linear():
  layouts = {"kernel": "io"}
  return Case(*_nnx(lambda: nnx.Linear(8, 5, rngs=nnx.Rngs(0)), layouts),
              (_x(8),), layouts)


def nnx_linear_general():
  class M(nnx.Module):
    def __init__(self, rngs):
      self.qkv = nnx.LinearGeneral(8, (2, 4), rngs=rngs)
      self.o = nnx.LinearGeneral((2, 4), 5, axis=(-2, -1), rngs=rngs)

    def __call__(self, x):
      return self.o(self.qkv(x))
  layouts = {"o/kernel": "iio", "qkv/kernel": "ioo"}
  return Case(*_nnx(lambda: M(nnx.Rngs(0)), layouts), (_x(8),), layouts)


def nnx_einsum():
  class M(nnx.Module):
    def __init__(self, rngs):
      self.a = nnx.Einsum("bi,oi->bo", (6, 8), rngs=rngs)         # (out, in)
      self.b = nnx.Einsum("bi,hid->bhd", (2, 6, 4), rngs=rngs)

    def __call__(self, x):
      return self.b(jnp.tanh(self.a(x)))
  layouts = {"a/kernel": "oi", "b/kernel": "oio"}
  return Case(*_nnx(lambda: M(nnx.Rngs(0)), layouts), (_x(8),), layouts)


def nnx_scan():
  class Layer(nnx.Module):
    def __init__(self, rngs):
      self.lin = nnx.Linear(8, 8, rngs=rngs)

    def __call__(self, x):
      return jnp.tanh(self.lin(x))

  class Stack(nnx.Module):
    def __init__(self, rngs):
      @nnx.split_rngs(splits=3)
      @nnx.vmap(in_axes=(0,), out_axes=0)
      def make(rngs):
        return Layer(rngs)
      self.layers = make(rngs)

    def __call__(self, x):
      @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
      def body(h, layer):
        return layer(h)
      return body(x, self.layers)
  layouts = {"layers/lin/kernel": "bio"}
  return Case(*_nnx(lambda: Stack(nnx.Rngs(0)), layouts), (_x(8),), layouts)


class TunixEinsum(nnx.Module):
  """An NNX weight ``w`` used through an einsum (tunix's layer style, zero
  init as there; `_fill` gives the values)."""

  def __init__(self, shape):
    self.w = nnx.Param(jnp.zeros(shape))

  def __call__(self, eqn, x):
    return jnp.einsum(eqn, x, self.w[...])


class TunixBlock(nnx.Module):
  def __init__(self, dim, heads, kv_heads, head_dim, hidden, rngs):
    self.heads, self.kv_heads = heads, kv_heads
    self.q_proj = TunixEinsum((dim, heads, head_dim))
    self.k_proj = TunixEinsum((dim, kv_heads, head_dim))
    self.v_proj = TunixEinsum((dim, kv_heads, head_dim))
    self.o_proj = TunixEinsum((heads, head_dim, dim))
    self.gate_proj = nnx.Linear(dim, hidden, use_bias=False, rngs=rngs)
    self.up_proj = nnx.Linear(dim, hidden, use_bias=False, rngs=rngs)
    self.down_proj = nnx.Linear(hidden, dim, use_bias=False, rngs=rngs)

  def __call__(self, x):
    q = self.q_proj("BTD,DNH->BTNH", x)
    k = jnp.repeat(self.k_proj("BSD,DKH->BSKH", x),
                   self.heads // self.kv_heads, axis=2)
    v = jnp.repeat(self.v_proj("BSD,DKH->BSKH", x),
                   self.heads // self.kv_heads, axis=2)
    logits = jnp.einsum("BTNH,BSNH->BNTS", q, k) / math.sqrt(q.shape[-1])
    attn = jnp.einsum("BNTS,BSNH->BTNH", jax.nn.softmax(logits), v)
    x = x + self.o_proj("BTNH,NHD->BTD", attn)
    return x + self.down_proj(jax.nn.silu(self.gate_proj(x))
                              * self.up_proj(x))


class TunixLike(nnx.Module):
  def __init__(self, rngs, vocab=32, dim=8, layers=2, kv_heads=1):
    self.embedder = nnx.Embed(vocab, dim, rngs=rngs)
    self.layers = nnx.List([TunixBlock(dim, 4, kv_heads, 5, 12, rngs)
                            for _ in range(layers)])
    self.lm_head = TunixEinsum((dim, vocab))

  def __call__(self, ids):
    x = self.embedder(ids)
    for layer in self.layers:
      # nnx.remat returns the layer's state from the checkpointed body.
      x = nnx.remat(lambda blk, h: blk(h))(layer, x)
    return self.lm_head("BTD,DV->BTV", x)


def tunix_like():
  layouts = {"lm_head/w": "io"}
  for i in range(2):
    layouts.update({f"layers/{i}/{n}_proj/kernel": "io"
                    for n in ("down", "gate", "up")})
    layouts.update({f"layers/{i}/{n}_proj/w": "ioo" for n in "kqv"})
    layouts[f"layers/{i}/o_proj/w"] = "iio"
  return Case(*_nnx(lambda: TunixLike(nnx.Rngs(0)), layouts), (_ids(32),),
              layouts, heads=("lm_head/w",),
              embeddings=("embedder/embedding",))


# -- equinox (a model library we do not own) ----------------------------------

class EqxLM(eqx.Module):
  embed: eqx.nn.Embedding
  attn: eqx.nn.MultiheadAttention
  mlp: eqx.nn.MLP
  unembed: eqx.nn.Linear

  def __init__(self, key, vocab=32, dim=8):
    k = jax.random.split(key, 4)
    self.embed = eqx.nn.Embedding(vocab, dim, key=k[0])
    self.attn = eqx.nn.MultiheadAttention(2, dim, key=k[1])
    self.mlp = eqx.nn.MLP(dim, dim, 12, 1, key=k[2])
    self.unembed = eqx.nn.Linear(dim, vocab, use_bias=False, key=k[3])

  def __call__(self, ids):  # one sequence (T,)
    h = jax.vmap(self.embed)(ids)
    h = h + self.attn(h, h, h)
    h = h + jax.vmap(self.mlp)(h)
    return jax.vmap(self.unembed)(h)


def equinox_lm():
  layouts = {f"attn/{n}_proj/weight": "oi"
             for n in ("query", "key", "value", "output")}
  layouts.update({"mlp/layers/0/weight": "oi", "mlp/layers/1/weight": "oi",
                  "unembed/weight": "oi"})
  model = _fill(eqx.filter_eval_shape(EqxLM, KEY), layouts)
  return Case(lambda m, ids: jax.vmap(m)(ids), model, (_ids(32),), layouts,
              heads=("unembed/weight",), embeddings=("embed/weight",))


# Built once per session: params are immutable arrays.
CASES = {f.__name__: functools.cache(f) for f in (
    linen_dense, linen_dense_general, linen_einsum, linen_scan, linen_lm,
    gemma_like, nnx_linear, nnx_linear_general, nnx_einsum, nnx_scan,
    tunix_like, equinox_lm)}
