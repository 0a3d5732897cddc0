"""Models as compositions: presets equal their specs, parts swap from the config."""

import jax
import jax.numpy as jnp
import pytest

from offseg_jax.models import build_model, compose
from offseg_jax.registry import MODELS


def _param_shapes(model, size=64):
  images = jnp.zeros((1, size, size, 3), jnp.float32)
  variables = jax.eval_shape(
      lambda: model.init({"params": jax.random.PRNGKey(0), "ham": jax.random.PRNGKey(1),
                          "dropout": jax.random.PRNGKey(2)}, images))
  return jax.tree_util.tree_map(lambda x: (x.shape, x.dtype), variables)


@pytest.mark.parametrize("name", ["segformer_b0_ol", "segnext_t", "offseg_nano", "tiny",
                                  "offseg_t"])
def test_family_presets_are_their_compositions(name):
  """The family builder and the recorded spec build the same variables."""
  preset = MODELS.build(name, num_classes=7)
  composed = compose.build_composed(7, compose.COMPOSITIONS[name])
  assert _param_shapes(preset) == _param_shapes(composed)


def test_config_swaps_a_part_and_the_classifier():
  base = {"name": "segformer_b0", "classifier": "conv"}
  plain = build_model(base, 5)
  swapped = build_model(dict(base, head="tiny_fpn_head"), 5)
  assert type(swapped.decode_head).__name__ == "TinyFPNHead"
  assert type(plain.decode_head).__name__ == "SegformerHead"
  ol = build_model(dict(base, head="tiny_fpn_head", classifier="offset_learning"), 5)
  names = set(_param_shapes(ol)["params"]["decode_head"])
  assert any("offset" in n or "class_embed" in n or "conv_seg" in n for n in names), names
  assert _param_shapes(ol) != _param_shapes(swapped)


def test_parts_alone_and_part_fields():
  model = build_model({"name": "", "backbone": "tiny_convnet", "head": "tiny_fpn_head",
                       "head_args": {"channels": 8}, "classifier": "conv"}, 3)
  logits, aux = model.apply(model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3))),
                            jnp.zeros((2, 32, 32, 3)))
  assert logits.shape == (2, 8, 8, 3) and len(aux["backbone"]) == 4
  assert model.decode_head.channels == 8


def test_bad_parts_are_named():
  with pytest.raises(KeyError, match="backbone 'mit_b9'"):
    build_model({"name": "segformer_b0", "backbone": "mit_b9"}, 3)
  with pytest.raises(ValueError, match="not a composition"):
    build_model({"name": "pixel_linear", "head": "tiny_fpn_head"}, 3)
  with pytest.raises(ValueError, match="needs a backbone and a head"):
    build_model({"name": "", "backbone": "tiny_convnet"}, 3)
