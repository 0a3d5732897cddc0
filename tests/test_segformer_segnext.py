"""SegFormer (MiT) and SegNeXt (MSCAN + light Hamburger), with and without Offset Learning.

Parity against the official PyTorch forward (fixtures in shared/parity), parameter
counts against the papers, the NMF's random bases, other input shapes and a
jitted training forward.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from offseg_jax.conversion.core import flax_to_torch, torch_to_flax
from offseg_jax.models import MODELS, layers
from offseg_jax.models.segnext import NMF2D

_REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("OFFSEG_SHARED", _REPO / ".." / "shared"))
PARITY = SHARED / "parity"


def _nchw_to_nhwc(a):
  return np.asarray(a).transpose(0, 2, 3, 1)


def _param_count(model, shape=(1, 64, 64, 3)) -> int:
  variables = jax.eval_shape(
      lambda x: model.init({"params": jax.random.key(0)}, x),
      jax.ShapeDtypeStruct(shape, jnp.float32))
  return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(variables["params"]))


def _random_variables(model, shape, seed=0):
  """Random variables with the model's structure, without running ``model.init``.

  Initialisers compile slowly on CPU (eager or jitted), so tests that only need
  sane weights fill ``jax.eval_shape``'s template with fan-in-scaled normals.
  """
  template = jax.eval_shape(
      lambda x: model.init({"params": jax.random.key(0)}, x),
      jax.ShapeDtypeStruct(shape, jnp.float32))
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    name, shape = path[-1].key, leaf.shape
    if name == "var":
      return np.ones(shape, np.float32)
    if name == "mean":
      return np.zeros(shape, np.float32)
    if name == "kernel":
      std = 1 / np.sqrt(np.prod(shape[:-1]))
    elif name == "in_proj_weight":
      std = 1 / np.sqrt(shape[-1])
    else:
      std = 0.1
    value = rng.normal(0, std, shape).astype(np.float32)
    return value + 1 if name == "scale" else value

  return jax.tree_util.tree_map_with_path(fill, template)


# ---------------------------------------------------------------------------
# Parity with the official implementation.
# ---------------------------------------------------------------------------

@pytest.fixture(scope="module", params=["segformer_b0_ol", "segnext_t_ol"])
def parity_run(request):
  """Builds the fixture's model from its official config, loads its weights, runs it."""
  name = request.param
  if not (PARITY / f"{name}.npz").exists():
    pytest.skip(f"parity fixture {name} not found under {PARITY}")
  meta = json.loads((PARITY / f"{name}.json").read_text())
  arrays = np.load(PARITY / f"{name}.npz")
  header = meta["parity"]
  entry = MODELS.get(header["build"])
  model = entry.from_official(header["official_config"], header["num_classes"])
  images = jnp.asarray(_nchw_to_nhwc(arrays["input"]))
  inputs = {}
  if "ham/bases" in header["inputs"]:
    inputs["ham_bases"] = jnp.asarray(arrays["ham/bases"])
  template = jax.eval_shape(
      lambda x: model.init({"params": jax.random.key(0)}, x, **inputs), images)
  state = {k[len("state/"):]: arrays[k] for k in arrays.files if k.startswith("state/")}
  variables, _ = torch_to_flax(state, template, ignore=entry.torch_ignore, strict=True)
  with jax.default_matmul_precision("highest"):
    logits, aux = jax.jit(lambda v, x, kw: model.apply(v, x, **kw))(variables, images, inputs)
  return dict(name=name, meta=meta, arrays=arrays, model=model, state=state,
              variables=variables, images=images, logits=np.asarray(logits),
              backbone=[np.asarray(f) for f in aux["backbone"]])


def test_parity_logits(parity_run):
  ref = _nchw_to_nhwc(parity_run["arrays"]["logits"])
  atol = parity_run["meta"]["parity"]["compare"]["logits"]
  err = np.abs(parity_run["logits"] - ref).max()
  print(f"{parity_run['name']} logits max abs err {err:.3g} (atol {atol})")
  assert parity_run["logits"].shape == ref.shape
  assert err <= atol


def test_parity_backbone(parity_run):
  noise = parity_run["meta"]["float32_vs_float64"]["backbone"]
  for i, ours in enumerate(parity_run["backbone"]):
    ref = _nchw_to_nhwc(parity_run["arrays"][f"backbone/{i}"])
    atol = max(10 * noise[i], 1e-4)
    err = np.abs(ours - ref).max()
    print(f"{parity_run['name']} backbone/{i} max abs err {err:.3g} (atol {atol:.2g})")
    assert ours.shape == ref.shape
    assert err <= atol


def test_parity_full_resolution_and_prediction(parity_run):
  arrays = parity_run["arrays"]
  full = np.asarray(layers.resize_bilinear(jnp.asarray(parity_run["logits"]),
                                           parity_run["images"].shape[1:3]))
  classes = arrays["logits_full_classes"]
  atol = max(10 * parity_run["meta"]["float32_vs_float64"]["logits_full"], 1e-4)
  err = np.abs(full[..., classes] - _nchw_to_nhwc(arrays["logits_full"])).max()
  flips = np.mean(full.argmax(-1) != arrays["pred"])
  print(f"{parity_run['name']} logits_full max abs err {err:.3g}, pred flips {flips:.2g}")
  assert err <= atol
  assert flips <= 1e-3


def test_parity_round_trip_and_param_count(parity_run):
  meta = parity_run["meta"]
  exported = flax_to_torch(parity_run["variables"])
  expected = {k for k in parity_run["state"] if not k.endswith("num_batches_tracked")}
  assert set(exported) == expected
  for key in expected:
    np.testing.assert_array_equal(exported[key].reshape(parity_run["state"][key].shape),
                                  parity_run["state"][key])
  params = parity_run["variables"]["params"]
  assert sum(np.size(a) for a in jax.tree.leaves(params)) == meta["params"]["num_params"]


# ---------------------------------------------------------------------------
# Model zoo: parameter counts.
# ---------------------------------------------------------------------------

# Exact counts at K=150 (conv_seg included, as in the official counts). The OL
# figures are the fixtures' (B0, T) and the spec's derived counts, which match
# the papers' tables; the plain ones round to Tables 3/4 (SegFormer-B0 3.8 M,
# B1 13.7, B2 24.8, B3 44.6, B4 61.4, B5 82.0; SegNeXt-T 4.3, S 13.9, B 27.6).
PARAM_COUNTS = {
    "segformer_b0": 3_753_718, "segformer_b0_ol": 3_923_490,
    "segformer_b1": 13_716_822, "segformer_b1_ol": 13_886_594,
    "segformer_b2": 24_761_686, "segformer_b2_ol": 24_931_458,
    "segformer_b3": 44_637_526, "segformer_b3_ol": 44_807_298,
    "segformer_b4": 61_408_086, "segformer_b4_ol": 61_577_858,
    "segformer_b5": 82_008_406, "segformer_b5_ol": 82_178_178,
    "segnext_t": 4_263_414, "segnext_t_ol": 4_433_186,
    "segnext_s": 13_932_886, "segnext_s_ol": 14_102_658,
    "segnext_b": 27_636_310, "segnext_b_ol": 28_237_698,
}
PAPER_M = {
    "segformer_b0": 3.8, "segformer_b1": 13.7, "segformer_b2": 24.8, "segformer_b3": 44.6,
    "segformer_b4": 61.4, "segformer_b5": 82.0, "segnext_t": 4.3, "segnext_s": 13.9,
    "segnext_b": 27.6,
}
SPEC_OL_M = {
    "segformer_b0_ol": 3.923, "segformer_b1_ol": 13.887, "segformer_b2_ol": 24.931,
    "segformer_b3_ol": 44.807, "segformer_b4_ol": 61.578, "segformer_b5_ol": 82.178,
    "segnext_t_ol": 4.433, "segnext_s_ol": 14.103, "segnext_b_ol": 28.238,
}


def test_param_counts_of_all_models():
  counts = {name: _param_count(MODELS.build(name, 150)) for name in PARAM_COUNTS}
  assert counts == PARAM_COUNTS
  for name, millions in PAPER_M.items():
    assert round(counts[name] / 1e6, 1) == millions, name
  for name, millions in SPEC_OL_M.items():
    assert round(counts[name] / 1e6, 3) == millions, name
    # OL adds K*C + 2*C^2 + 2*K on top of the plain model (C = 512 for SegNeXt-B).
    c = 512 if name == "segnext_b_ol" else 256
    assert counts[name] - counts[name[:-3]] == 150 * c + 2 * c * c + 2 * 150


def test_builders_accept_overrides_and_reject_unknown_ones():
  small = MODELS.build("segformer_b0", 19, embed_dims=16, num_layers=(1, 1, 1, 1),
                       channels=64, drop_path_rate=0.0)
  assert small.backbone.embed_dims == 16 and small.decode_head.channels == 64
  assert _param_count(small) < _param_count(MODELS.build("segformer_b0", 19))
  assert MODELS.build("segnext_t_ol", 19, classifier="conv").decode_head.classifier == "conv"
  bf16 = MODELS.build("segnext_s", 19, dtype=jnp.bfloat16)
  assert bf16.backbone.dtype == bf16.decode_head.dtype == jnp.bfloat16
  with pytest.raises(TypeError, match="Unknown override"):
    MODELS.build("segformer_b0", 19, ham_channels=64)


def _official_segformer(head_type: str) -> dict:
  return dict(
      type="EncoderDecoder",
      backbone=dict(type="MixVisionTransformer", in_channels=3, embed_dims=32,
                    num_stages=4, num_layers=[2, 2, 2, 2], num_heads=[1, 2, 5, 8],
                    patch_sizes=[7, 3, 3, 3], sr_ratios=[8, 4, 2, 1],
                    out_indices=(0, 1, 2, 3), mlp_ratio=4, qkv_bias=True, drop_rate=0.0,
                    attn_drop_rate=0.0, drop_path_rate=0.1),
      decode_head=dict(type=head_type, in_channels=[32, 64, 160, 256],
                       in_index=[0, 1, 2, 3], channels=256, dropout_ratio=0.1,
                       num_classes=19, norm_cfg=dict(type="SyncBN", requires_grad=True),
                       align_corners=False))


def test_from_official_matches_registered_builders():
  x = jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32)
  for head_type, name in (("SegformerHead", "segformer_b0"),
                          ("SegformerHeadOffsetLearning", "segformer_b0_ol")):
    official = MODELS.get(name).from_official(_official_segformer(head_type), 19)
    ours = MODELS.build(name, 19)
    assert official.decode_head.classifier == ours.decode_head.classifier
    assert (official.decode_head.pool_before_classifier
            == ours.decode_head.pool_before_classifier)
    shapes = [jax.tree.map(lambda a: a.shape, jax.eval_shape(m.init, jax.random.key(0), x))
              for m in (official, ours)]
    assert shapes[0] == shapes[1]
  wrong = _official_segformer("SegformerHead")
  wrong["decode_head"]["in_channels"] = [64, 128, 320, 512]
  with pytest.raises(ValueError, match="in_channels"):
    MODELS.get("segformer_b0").from_official(wrong, 19)
  # A config that only sets MD_R inherits mmseg's other NMF defaults.
  if not (PARITY / "segnext_t_ol.json").exists():
    pytest.skip(f"parity fixture segnext_t_ol not found under {PARITY}")
  cfg = json.loads((PARITY / "segnext_t_ol.json").read_text())["parity"]["official_config"]
  cfg["decode_head"] = dict(cfg["decode_head"], type="LightHamHead", ham_kwargs=dict(MD_R=16))
  head = MODELS.get("segnext_t").from_official(cfg, 19).decode_head
  assert head.classifier == "conv"
  assert head.nmf_kwargs() == dict(S=1, R=16, train_steps=6, eval_steps=7)


# ---------------------------------------------------------------------------
# The Hamburger's NMF.
# ---------------------------------------------------------------------------

def _nmf_reference(x, bases, steps):
  """float64 multiplicative-update NMF on x (B, D, N) from bases (B, D, R)."""
  x, u = x.astype(np.float64), bases.astype(np.float64)
  xt = x.transpose(0, 2, 1)
  logits = xt @ u
  v = np.exp(logits - logits.max(-1, keepdims=True))
  v /= v.sum(-1, keepdims=True)
  for _ in range(steps):
    v = v * (xt @ u) / (v @ (u.transpose(0, 2, 1) @ u) + 1e-6)
    u = u * (x @ v) / (u @ (v.transpose(0, 2, 1) @ v) + 1e-6)
  v = v * (xt @ u) / (v @ (u.transpose(0, 2, 1) @ u) + 1e-6)
  return u @ v.transpose(0, 2, 1)


def test_nmf_matches_reference_updates_with_given_bases():
  rng = np.random.default_rng(0)
  x = rng.uniform(size=(2, 4, 5, 32)).astype(np.float32)          # NHWC, non-negative
  bases = rng.uniform(size=(2 * 2, 16, 8)).astype(np.float32)      # S=2 groups of D=16
  bases /= np.linalg.norm(bases, axis=1, keepdims=True)
  nmf = NMF2D(S=2, R=8)
  for train, steps in ((False, 7), (True, 6)):
    out = np.asarray(nmf.apply({}, jnp.asarray(x), train, jnp.asarray(bases)))
    # torch's view: (B, C, H, W) -> (B*S, D, N), channel c = s*D + d.
    x_grouped = x.transpose(0, 3, 1, 2).reshape(4, 16, 20)
    ref = _nmf_reference(x_grouped, bases, steps).reshape(2, 32, 4, 5).transpose(0, 2, 3, 1)
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-5)


def test_nmf_bases_are_fresh_per_rng_and_differentiable():
  x = jax.random.uniform(jax.random.key(1), (2, 4, 4, 16))
  nmf = NMF2D(S=1, R=4)
  drawn = [nmf.apply({}, 2, 16, method=NMF2D.draw_bases, rngs={"ham": jax.random.key(k)})
           for k in (0, 1)]
  assert drawn[0].shape == (2, 16, 4)
  np.testing.assert_allclose(np.linalg.norm(drawn[0], axis=1), 1.0, rtol=1e-5)
  assert float(jnp.min(drawn[0])) >= 0
  assert not np.allclose(drawn[0], drawn[1])
  with pytest.raises(ValueError, match="ham"):
    nmf.apply({}, x)
  # Gradients flow through every update: the gradient matches finite
  # differences of the full computation (a one-step gradient would not).
  loss = jax.jit(lambda x: jnp.sum(jnp.sin(3 * nmf.apply({}, x, True, drawn[0]))))
  direction = jax.random.normal(jax.random.key(2), x.shape)
  analytic = float(jnp.vdot(jax.jit(jax.grad(loss))(x), direction))
  eps = 1e-2
  numeric = float(loss(x + eps * direction) - loss(x - eps * direction)) / (2 * eps)
  assert abs(analytic) > 1e-2
  assert analytic == pytest.approx(numeric, rel=2e-2)


def test_segnext_draws_differ_per_rng_and_given_bases_reproduce():
  model = MODELS.build("segnext_t_ol", 7, embed_dims=(16, 32, 32, 64), depths=(1, 1, 1, 1),
                       ham_channels=64, channels=64)
  images = jax.random.normal(jax.random.key(0), (2, 64, 64, 3))
  variables = _random_variables(model, images.shape)
  keys = [jax.random.key(k) for k in (2, 3)]

  @jax.jit
  def forward(key, bases):
    return model.apply(variables, images, rngs={"ham": key}, ham_bases=bases)[0]

  drawn = forward(keys[0], None), forward(keys[1], None), forward(keys[0], None)
  assert np.abs(np.asarray(drawn[0] - drawn[1])).max() > 1e-4
  np.testing.assert_array_equal(drawn[0], drawn[2])
  # Given bases replace the draw: the rng no longer matters (the parity test
  # runs with given bases and no rng at all).
  bases = NMF2D(R=16).apply({}, 2, 64, method=NMF2D.draw_bases, rngs={"ham": keys[0]})
  np.testing.assert_array_equal(forward(keys[0], bases), forward(keys[1], bases))


# ---------------------------------------------------------------------------
# Other inputs and training mode.
# ---------------------------------------------------------------------------

# Logit grids (H, W) per input size: MiT's stride-4 embedding pads 3, so 72x100
# gives an 18x25 map, which the OL head's max pool floors to 9x12; MSCAN's
# stride-2 convs give 9x13 at stride 8.
@pytest.mark.parametrize("name,grids", [
    ("segformer_b0", {(64, 96): (16, 24), (72, 100): (18, 25)}),
    ("segformer_b0_ol", {(64, 96): (8, 12), (72, 100): (9, 12)}),
    ("segnext_t", {(64, 96): (8, 12), (72, 100): (9, 13)}),
    ("segnext_t_ol", {(64, 96): (8, 12), (72, 100): (9, 13)}),
])
def test_output_shapes_for_other_sizes_batches_and_classes(name, grids):
  model = MODELS.build(name, 19)
  for (h, w), grid in grids.items():
    x = jax.ShapeDtypeStruct((2, h, w, 3), jnp.float32)
    variables = jax.eval_shape(model.init, {"params": jax.random.key(0)}, x)
    logits, aux = jax.eval_shape(
        lambda v, x: model.apply(v, x, rngs={"ham": jax.random.key(0)}), variables, x)
    assert logits.shape == (2,) + grid + (19,)
    assert len(aux["backbone"]) == 4


def test_eval_forward_is_per_sample_on_a_non_square_batch():
  model = MODELS.build("segformer_b0_ol", 19, num_layers=(1, 1, 1, 1))
  images = jax.random.normal(jax.random.key(0), (2, 64, 96, 3))
  variables = _random_variables(model, images.shape)
  forward = jax.jit(lambda x: model.apply(variables, x)[0])
  # Same batch shape, different second image: the first image's logits stay.
  changed = images.at[1].set(jax.random.normal(jax.random.key(1), images.shape[1:]))
  a, b = forward(images), forward(changed)
  assert a.shape == (2, 8, 12, 19)
  np.testing.assert_array_equal(a[0], b[0])
  assert np.abs(np.asarray(a[1] - b[1])).max() > 1e-3


@pytest.mark.parametrize("name", ["segformer_b0", "segnext_t_ol"])
def test_jitted_train_forward_updates_batch_stats(name):
  model = MODELS.build(name, 19)
  images = jax.random.normal(jax.random.key(0), (2, 64, 96, 3))
  variables = _random_variables(model, images.shape)

  @jax.jit
  def train_forward(variables, images, key):
    dropout, ham = jax.random.split(key)
    (logits, _), updates = model.apply(variables, images, train=True,
                                       mutable=["batch_stats"],
                                       rngs={"dropout": dropout, "ham": ham})
    return logits, updates

  logits, updates = train_forward(variables, images, jax.random.key(2))
  other, _ = train_forward(variables, images, jax.random.key(3))
  assert logits.shape == ((2, 16, 24, 19) if name == "segformer_b0" else (2, 8, 12, 19))
  assert bool(jnp.all(jnp.isfinite(logits)))
  assert np.abs(np.asarray(logits - other)).max() > 0       # dropout / drop path / bases
  old = jax.tree.leaves(variables["batch_stats"])
  new = jax.tree.leaves(updates["batch_stats"])
  assert len(old) == len(new) > 0
  assert all(a.shape == b.shape for a, b in zip(old, new))
  assert any(np.abs(np.asarray(a - b)).max() > 0 for a, b in zip(old, new))
