"""ECENet and FRM configs and presets: every combination builds, losses resolve."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments.configs import ecenet, frm
from offseg_jax import losses
from offseg_jax.models import build_model, compose


def _param_count(model_config, num_classes, size=64):
  model = build_model(model_config, num_classes)
  variables = jax.eval_shape(lambda: model.init(
      jax.random.PRNGKey(0), jnp.zeros((1, size, size, 3), jnp.float32), train=False))
  return (sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(variables["params"])),
          variables["params"])


@pytest.mark.parametrize("module,variants", [(ecenet, ecenet.VARIANTS), (frm, frm.VARIANTS)])
def test_every_combination_builds_its_losses(module, variants):
  for variant in variants:
    for dataset in module.DATASETS:
      c = module.get_config(f"{variant},{dataset}")
      assert c.model.name.endswith(variant)
      loss_fn = losses.build_loss({k: dict(v) for k, v in c.losses.items()})
      assert callable(loss_fn)
      assert set(c.losses) > {"cross_entropy"}


def test_ecenet_ade20k_is_the_public_configuration():
  c = ecenet.get_config("swin_b,ade20k")
  assert tuple(c.data.crop_size) == (640, 640)
  assert (tuple(c.eval.crop_size), tuple(c.eval.stride)) == ((640, 640), (608, 608))
  assert c.losses.ecenet_diversity.weight == 0.2
  assert (c.losses.ecenet_mask.mask_weight, c.losses.ecenet_mask.dice_weight) == (5.0, 2.0)
  assert c.optimizer.custom_keys.relative_position_bias_table.decay_mult == 0.0


def test_ecenet_swin_b_head_has_the_fixture_count():
  total, params = _param_count(ecenet.get_config("swin_b,ade20k").model, 150)
  head = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(params["decode_head"]))
  assert head == 9_888_428
  assert 96e6 < total < 97.5e6            # + Swin-B (86.9 M)


def test_ecenet_on_any_backbone_with_offset_learning():
  """The head follows the backbone's widths; the classifier is one field."""
  for backbone in ("resnet50_v1c", "mscan_t", "efficientformerv2_s1_feat"):
    cfg = dict(compose.COMPOSITIONS["ecenet_mit_b0"], backbone=(backbone, {}))
    model = compose.build_composed(5, cfg, classifier="offset_learning")
    variables = jax.eval_shape(lambda m=model: m.init(
        jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3)), train=False))
    out = jax.eval_shape(lambda v, m=model: m.apply(v, jnp.zeros((2, 64, 64, 3))), variables)
    assert out[0].shape[0] == 2 and out[0].shape[-1] == 5


def test_frm_presets_compose_refiner_neck_head_and_projection():
  c = frm.get_config("b0,synthetic")
  model = build_model(c.model, 9)
  x = jax.random.normal(jax.random.PRNGKey(3), (2, 64, 64, 3))
  variables = jax.jit(lambda: model.init(jax.random.PRNGKey(0), x[:1], train=False))()
  assert set(variables["params"]) == {"backbone", "refiner", "neck", "decode_head",
                                      "projection"}
  (logits, aux), _ = jax.jit(lambda v: model.apply(
      v, x, train=True, mutable=["batch_stats"], rngs={"dropout": jax.random.PRNGKey(1)}))(
          variables)
  assert logits.shape == (2, 16, 16, 9)
  assert aux["embedding"].shape == (2, 16, 16, 64)
  np.testing.assert_allclose(np.linalg.norm(np.asarray(aux["embedding"]), axis=-1), 1.0,
                             rtol=1e-5)
  _, aux_eval = jax.eval_shape(lambda v: model.apply(v, x), variables)
  assert "embedding" not in aux_eval        # evaluation pays nothing for the projection
  loss_fn = losses.build_loss({k: dict(v) for k, v in c.losses.items()})
  labels = jnp.asarray(np.random.RandomState(0).randint(0, 9, (2, 64, 64)))
  total, terms = jax.jit(lambda lg, a: loss_fn(lg, a, labels, step=jnp.int32(10_000)))(
      logits, aux)
  assert set(terms) == {"cross_entropy", "pixel_contrastive"}
  assert np.isfinite(float(total)) and float(terms["pixel_contrastive"]) > 0
