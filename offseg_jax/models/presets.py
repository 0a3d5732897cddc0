"""Named presets as compositions of registered parts (see ``models/compose.py``).

The SegFormer, SegNeXt and OffSeg presets keep the builders their family
modules register (with the official-config mapping); their specs are recorded
here so that a config can swap a part of them (``tests/test_compose.py`` checks
that each spec builds exactly the preset's parameter tree). The ECENet and FRM
presets are registered here, as compositions only.
"""

from __future__ import annotations

from offseg_jax.models import mit, mscan, offseg, segnext
from offseg_jax.models.compose import register_composition


def _register_family_specs():
  for size in mit.MIT_SIZES:
    for ol in (False, True):
      register_composition(
          f"segformer_{size}" + ("_ol" if ol else ""),
          {"backbone": (f"mit_{size}", {}),
           "head": ("segformer_head", {"channels": 256, "pool_before_classifier": ol}),
           "classifier": "offset_learning" if ol else "conv"},
          register_model=False)
  for size in mscan.MSCAN_SIZES:
    for ol in (False, True):
      register_composition(
          f"segnext_{size}" + ("_ol" if ol else ""),
          {"backbone": (f"mscan_{size}", {}),
           "head": ("light_ham_head", dict(segnext.HEAD_SIZES[size], in_index=(1, 2, 3),
                                           ham_kwargs=segnext.SEGNEXT_HAM)),
           "classifier": "offset_learning" if ol else "conv"},
          register_model=False)
  for variant, spec in offseg.VARIANTS.items():
    register_composition(
        variant,
        {"backbone": (spec["backbone"], {}),
         "head": ("offseg_head", {"new_channels": spec["new_channels"]}),
         "classifier": "offset_learning"},
        register_model=False)
  register_composition(
      "offseg_nano",
      {"backbone": (offseg.VARIANTS["offseg_t"]["backbone"], offseg.NANO_BACKBONE),
       "head": ("offseg_head", offseg.NANO_HEAD),
       "classifier": "offset_learning"},
      register_model=False)
  register_composition(
      "tiny",
      {"backbone": ("tiny_convnet", {"widths": (16, 32, 64, 96)}),
       "head": ("tiny_fpn_head", {"channels": 64}),
       "classifier": "conv"},
      register_model=False)


_register_family_specs()


# FRM (arXiv 2412.08670): VAN -> FRM (stages 1-3 pooled to 1/32, concatenated
# with stage 4, a DNL transformer block, projected back) -> FPN -> Semantic-FPN
# head, with a pixel-embedding projection on the finest FPN level for the
# contrastive loss. Widths are mmseg's Semantic FPN (neck 256, head 128); which
# VAN the paper uses is not public (docs/frm.md).
FRM_NECK = {"out_channels": 256, "num_outs": 4}
FRM_HEAD = {"channels": 128}
FRM_PROJECTION = {"embed_dim": 256}


def _register_frm():
  for size in ("b0", "b1", "b2"):
    register_composition(
        f"frm_van_{size}",
        {"backbone": (f"van_{size}", {}),
         "refiner": ("frm", {"pooling": "polyphase"}),
         "neck": ("fpn", FRM_NECK),
         "head": ("fpn_head", FRM_HEAD),
         "projection": ("projection_head", FRM_PROJECTION),
         "projection_source": ("neck", 0),
         "classifier": "conv"},
        doc=f"FRM on VAN-{size.upper()}: FRM refiner, FPN (256) and Semantic-FPN head (128).",
        torch_ignore=(r".*\.num_batches_tracked$",))


_register_frm()


# ECENet (ICCV 2023): a backbone -> the ECENet head (Feature Reconstruction,
# Explicit Class Extraction, Semantics Attention & Updater from 1/16 down to
# 1/4, Ghost upscaling) with mmseg's conv_seg; the head reads all four stages.
# ``ecenet_swin_b`` is the public configuration (Swin-B window 12, head width
# 256, 4 heads); the ResNet-50/101 (d32) and MiT-B0 variants follow the same
# group's sibling configurations. ``ecenet_mit_b0`` is the efficient setting:
# head width 128 on MiT-B0's 32/64/160/256 stages.
_ECENET_IGNORE = (r".*\.num_batches_tracked$", r".*\.relative_position_index$")


def _register_ecenet():
  for name, backbone, head in (
      ("ecenet_swin_b", "swin_b", {"channels": 256}),
      ("ecenet_r50", "resnet50_v1c", {"channels": 256}),
      ("ecenet_r101", "resnet101_v1c", {"channels": 256}),
      ("ecenet_mit_b0", "mit_b0", {"channels": 128}),
  ):
    register_composition(
        name,
        {"backbone": (backbone, {}), "head": ("ecenet_head", head), "classifier": "conv"},
        doc=f"ECENet on {backbone} (head width {head['channels']}).",
        torch_ignore=_ECENET_IGNORE)


_register_ecenet()
