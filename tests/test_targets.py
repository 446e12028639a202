"""Target selection: regexes, callables, all-linear, and near-miss errors."""

import numpy as np
import pytest

from jlora.targets import HEAD_PATTERN, select

LEAVES = [
    ("model/layers_0/self_attn/q_proj/kernel", np.zeros((8, 8))),
    ("model/layers_0/self_attn/q_proj/bias", np.zeros((8,))),
    ("model/layers_0/self_attn/v_proj/kernel", np.zeros((8, 4))),
    ("model/layers_0/mlp/up_proj/kernel", np.zeros((8, 16))),
    ("model/embed_tokens/embedding", np.zeros((32, 8))),
    ("lm_head/kernel", np.zeros((8, 32))),
]


def test_default_is_all_linear_without_head_or_embedding():
  assert select(LEAVES) == [
      "model/layers_0/self_attn/q_proj/kernel",
      "model/layers_0/self_attn/v_proj/kernel",
      "model/layers_0/mlp/up_proj/kernel"]
  assert select(LEAVES, "all-linear") == select(LEAVES)


def test_regex_is_searched_and_skips_vectors():
  assert select(LEAVES, "q_proj") == ["model/layers_0/self_attn/q_proj/kernel"]
  assert select(LEAVES, r".*(q_proj|v_proj)/kernel") == [
      "model/layers_0/self_attn/q_proj/kernel",
      "model/layers_0/self_attn/v_proj/kernel"]


def test_list_callable_and_exclude():
  chosen = select(LEAVES, ["q_proj", lambda p, x: x.shape == (8, 32)],
                  exclude="q_proj")
  assert chosen == ["lm_head/kernel"]
  # An explicit target may pick a head or an embedding.
  assert select(LEAVES, "embedding") == ["model/embed_tokens/embedding"]


def test_pattern_matching_nothing_lists_near_misses():
  with pytest.raises(ValueError, match="q_prj") as err:
    select(LEAVES, "q_prj/kernel")
  assert "model/layers_0/self_attn/q_proj/kernel" in str(err.value)


def test_each_pattern_of_a_list_must_match():
  with pytest.raises(ValueError, match="k_proj"):
    select(LEAVES, ["q_proj", "k_proj"])


def test_pattern_matching_only_vectors_says_so():
  with pytest.raises(ValueError, match="fewer than 2 axes"):
    select(LEAVES, "q_proj/bias")


def test_stacked_biases_are_never_targets():
  stacked = [("layers/q_proj/kernel", np.zeros((3, 8, 8))),
             ("layers/q_proj/bias", np.zeros((3, 8))),
             ("layers/norm/scale", np.zeros((3, 8)))]
  assert select(stacked, "q_proj") == ["layers/q_proj/kernel"]
  with pytest.raises(ValueError, match="biases, scales"):
    select(stacked, "q_proj/bias")


def test_bad_selector_type():
  with pytest.raises(TypeError, match="regex string"):
    select(LEAVES, [3])


@pytest.mark.parametrize("path,is_head", [
    ("lm_head/kernel", True), ("head/kernel", True),
    ("classifier/kernel", True), ("model/layers_0/mlp/up_proj/kernel", False),
    ("heads_proj/kernel", False)])
def test_head_pattern(path, is_head):
  assert bool(HEAD_PATTERN.search(path)) == is_head


def test_path_regex_folds_layer_numbers():
  from jlora.targets import format_layout_dict, path_regex
  import re
  rx = path_regex("model/layers/12/attn.q/w")
  assert rx == r"model/layers/\d+/attn\.q/w"
  assert re.fullmatch(rx, "model/layers/3/attn.q/w")
  assert not re.fullmatch(rx, "model/layers/3/attnxq/w")
  assert path_regex("layer_0/mlp/kernel") == r"layer_\d+/mlp/kernel"
  assert format_layout_dict({rx: "io", "plain/w": "oi"}) == (
      r"{r'model/layers/\d+/attn\.q/w': 'io', 'plain/w': 'oi'}")


def test_all_linear_names_what_it_skips():
  leaves = LEAVES + [("model/layers_0/mlp/w", np.zeros((8, 4))),
                     ("model/layers_1/mlp/w", np.zeros((8, 4)))]
  with pytest.warns(UserWarning, match=r"\[r'model/layers_\\d\+/mlp/w'\]"
                    r".*jlora.infer_layout"):
    assert select(leaves) == select(LEAVES)
  with pytest.raises(ValueError, match=r"have none.*'model/layers_\\d\+/mlp/w'"
                     r".*infer_layout"):
    select(leaves[-2:])
