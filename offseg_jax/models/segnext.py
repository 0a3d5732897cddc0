"""SegNeXt (MSCAN-T/S/B) with the light Hamburger head, with and without Offset Learning.

Registered models (``MODELS``):
  * ``segnext_t`` / ``segnext_s`` / ``segnext_b``: mmseg's SegNeXt
    (``LightHamHead``, per-pixel ``conv_seg`` at 1/8).
  * ``segnext_t_ol`` / ``segnext_s_ol`` / ``segnext_b_ol``: the Offset Learning
    variant (``LightHamHeadOffsetLearning``): the same head with Offset Learning
    in place of ``conv_seg``, still at 1/8.

The two heads differ only in the classifier, so ``classifier`` is the only switch.

The Hamburger's NMF starts from random bases **in every forward pass, at
evaluation too**, as the official code does. They come from the rng stream
``'ham'`` (``model.apply(..., rngs={'ham': key})``), or are given through the
head input ``ham_bases`` (shape (B*S, C/S, R), L2-normalised along axis 1),
which reproduces a torch forward exactly:
``model.apply(variables, images, ham_bases=bases)``.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from einops import rearrange
import flax.linen as nn
import jax
import jax.numpy as jnp

from offseg_jax.models import layers
from offseg_jax.models.classifiers import classify
from offseg_jax.models.family import (check_in_channels, check_segmentor_config,
                                      offset_learning_variant, register_head, register_models)
from offseg_jax.models.mscan import MSCAN, MSCAN_SIZES, mscan_config_from_official
from offseg_jax.models.segmentor import EncoderDecoder

TORCH_IGNORE = (r".*\.num_batches_tracked$",)

_EPS = 1e-6   # guards the multiplicative updates' denominators


def _normalize_columns(bases):
  """torch ``F.normalize(bases, dim=1)``: unit L2 norm along D, norms floored at 1e-12."""
  norm = jnp.sqrt(jnp.sum(jnp.square(bases), axis=1, keepdims=True))
  return bases / jnp.maximum(norm, 1e-12)


class NMF2D(nn.Module):
  """Non-negative matrix factorisation by multiplicative updates, on an NHWC map.

  The map (B, H, W, C) is split into S groups of D = C/S channels; each group
  x (D x N, N = H*W) is approximated by bases U (D x R) times coefficients V^T:

    V = softmax_R(inv_t * x^T U);
    repeat T times: V <- V * (x^T U) / (V U^T U + eps); U <- U * (x V) / (U V^T V + eps);
    V <- V * (x^T U) / (V U^T U + eps);  output U V^T.

  T is ``train_steps`` in training and ``eval_steps`` otherwise. Gradients flow
  through every iteration (the official code has no one-step-gradient trick).
  ``inv_t`` is 1: mmseg's NMF2D overrides the configured value. The arithmetic
  runs in float32 whatever the module dtype, the updates being ratios.
  """
  S: int = 1
  R: int = 64
  train_steps: int = 6
  eval_steps: int = 7
  inv_t: float = 1.0

  def draw_bases(self, batch: int, dim: int):
    """Fresh bases: U(0, 1) samples L2-normalised along D, shape (B*S, D, R)."""
    if self.has_rng("ham"):
      key = self.make_rng("ham")
    elif self.is_initializing():
      key = jax.random.key(0)     # NMF has no parameters: the draw is irrelevant
    else:
      raise ValueError(
          "The Hamburger NMF draws random bases in every forward: pass "
          "rngs={'ham': key} to apply(), or give the bases as ham_bases=...")
    return _normalize_columns(jax.random.uniform(key, (batch * self.S, dim, self.R)))

  @nn.compact
  def __call__(self, x, train: bool = False, bases=None):
    b, h, _, c = x.shape
    if c % self.S:
      raise ValueError(f"{c} channels not divisible into S={self.S} groups")
    d = c // self.S
    # x^T of every group: (B, H, W, S*D) -> (B*S, N, D), N = H*W; channel s*D + j
    # is entry j of group s, as torch's view of (B, C, H, W) as (B*S, D, N).
    xt = rearrange(x.astype(jnp.float32), "b h w (s d) -> (b s) (h w) d", s=self.S)
    if bases is None:
      bases = self.draw_bases(b, d)
    elif bases.shape != (b * self.S, d, self.R):
      raise ValueError(f"ham_bases must have shape {(b * self.S, d, self.R)}, "
                       f"got {bases.shape}")
    bases = bases.astype(jnp.float32)

    def update_coef(bases, coef):
      numerator = xt @ bases                                   # (BS, N, R)
      denominator = coef @ (bases.transpose(0, 2, 1) @ bases)
      return coef * numerator / (denominator + _EPS)

    def update_bases(bases, coef):
      numerator = xt.transpose(0, 2, 1) @ coef                 # (BS, D, R)
      denominator = bases @ (coef.transpose(0, 2, 1) @ coef)
      return bases * numerator / (denominator + _EPS)

    coef = jax.nn.softmax(self.inv_t * (xt @ bases), axis=-1)
    for _ in range(self.train_steps if train else self.eval_steps):
      coef = update_coef(bases, coef)
      bases = update_bases(bases, coef)
    coef = update_coef(bases, coef)
    out = coef @ bases.transpose(0, 2, 1)                      # (U V^T)^T: (BS, N, D)
    return rearrange(out, "(b s) (h w) d -> b h w (s d)", b=b, h=h)


class Hamburger(nn.Module):
  """ReLU(x + GN(conv(NMF(ReLU(conv_with_bias(x)))))) (torch ``ham_in/ham/ham_out``)."""
  nmf_fields: Mapping[str, Any]      # NMF2D fields (S, R, train_steps, eval_steps)
  num_groups: int = 32
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False, bases=None):
    c = x.shape[-1]
    y = layers.ConvModule(c, 1, norm=None, act=None, dtype=self.dtype, name="ham_in")(x)
    y = nn.relu(y)
    y = NMF2D(**self.nmf_fields, name="ham")(y, train, bases).astype(self.dtype)
    y = layers.ConvModule(c, 1, norm="gn", num_groups=self.num_groups, act=None,
                          dtype=self.dtype, name="ham_out")(y)
    return nn.relu(x + y)


# Constructor defaults of mmseg's Matrix_Decomposition_2D_Base (NMF2D forces inv_t=1).
NMF_DEFAULTS = dict(MD_S=1, MD_R=64, train_steps=6, eval_steps=7)


class LightHamHead(nn.Module):
  """mmseg ``LightHamHead`` / OffSeg ``LightHamHeadOffsetLearning`` on NHWC maps.

  Selected inputs are bilinearly resized to the first one's grid (stride 8 with
  ``in_index=(1, 2, 3)``), concatenated, squeezed to ``ham_channels``
  (conv-GN-ReLU), passed through the Hamburger, aligned to ``channels``
  (conv-GN-ReLU) and classified.

  Attributes:
    num_classes: output classes K.
    ham_channels: width of the squeezed map and of the NMF.
    channels: width fed to the classifier (Offset Learning's C).
    in_index: which backbone outputs to use.
    ham_kwargs: NMF options in mmseg naming (``MD_S``, ``MD_R``,
      ``train_steps``, ``eval_steps``; ``inv_t`` and ``rand_init`` are accepted
      and checked); missing ones take mmseg's defaults (R = 64).
    classifier: a kind of :func:`offseg_jax.models.classifiers.classify`.
    num_groups: GroupNorm groups of squeeze, ham_out and align.
    dropout_ratio: Dropout2d before ``conv_seg`` (only with ``classifier='conv'``).
    dtype: computation dtype.

  ``__call__(features, train, ham_bases=None)`` returns ``(logits, {})``.
  """
  num_classes: int
  ham_channels: int = 512
  channels: int = 512
  in_index: Sequence[int] = (1, 2, 3)
  ham_kwargs: Mapping[str, Any] | None = None
  classifier: str = "conv"
  num_groups: int = 32
  dropout_ratio: float = 0.1
  dtype: Any = jnp.float32

  def nmf_kwargs(self) -> dict:
    """Our NMF2D fields from ``ham_kwargs`` (mmseg names)."""
    cfg = dict(NMF_DEFAULTS, **(self.ham_kwargs or {}))
    if not cfg.pop("rand_init", True):
      raise ValueError("rand_init=False (a fixed bases buffer) is not supported")
    cfg.pop("inv_t", None)      # NMF2D overrides it to 1
    nmf = dict(S=cfg.pop("MD_S"), R=cfg.pop("MD_R"), train_steps=cfg.pop("train_steps"),
               eval_steps=cfg.pop("eval_steps"))
    if cfg:
      raise ValueError(f"Unknown ham_kwargs {sorted(cfg)}")
    return nmf

  @nn.compact
  def __call__(self, features, train: bool = False, ham_bases=None):
    feats = [features[i] for i in self.in_index]
    size = feats[0].shape[1:3]
    x = jnp.concatenate([layers.resize_bilinear(f.astype(self.dtype), size) for f in feats],
                        axis=-1)
    x = layers.ConvModule(self.ham_channels, 1, norm="gn", num_groups=self.num_groups,
                          act="relu", dtype=self.dtype, name="squeeze")(x)
    x = Hamburger(self.nmf_kwargs(), self.num_groups, dtype=self.dtype,
                  name="hamburger")(x, train, ham_bases)
    x = layers.ConvModule(self.channels, 1, norm="gn", num_groups=self.num_groups,
                          act="relu", dtype=self.dtype, name="align")(x)
    logits = classify(x, kind=self.classifier, num_classes=self.num_classes,
                      dropout_ratio=self.dropout_ratio, train=train, dtype=self.dtype)
    return logits, {}


def ham_head_from_official(head: Mapping[str, Any], num_classes: int) -> LightHamHead:
  """Maps an mmseg ``LightHamHead`` / ``LightHamHeadOffsetLearning`` config (GroupNorm)."""
  ol = offset_learning_variant(head, "LightHamHead", ("GN",))
  ham_kwargs = dict(head.get("ham_kwargs") or {})
  return LightHamHead(
      num_classes=num_classes,
      ham_channels=head.get("ham_channels", 512),
      channels=head["channels"],
      in_index=tuple(head["in_index"]),
      ham_kwargs=ham_kwargs,
      classifier="offset_learning" if ol else "conv",
      num_groups=head["norm_cfg"].get("num_groups", 32),
      dropout_ratio=head.get("dropout_ratio", 0.1))


def segnext_from_official(cfg: Mapping[str, Any], num_classes: int) -> EncoderDecoder:
  """Builds our model from an official SegNeXt(-OL) ``EncoderDecoder`` config."""
  check_segmentor_config(cfg)
  backbone = MSCAN(**mscan_config_from_official(cfg["backbone"]))
  head = ham_head_from_official(cfg["decode_head"], num_classes)
  check_in_channels(cfg["decode_head"], backbone.embed_dims)
  return EncoderDecoder(backbone=backbone, decode_head=head)


register_head("light_ham_head", LightHamHead,
              doc="LightHamHead with ``fields`` overriding its defaults (plain mmseg head).")


# Head widths of the SegNeXt configs (the OL configs keep them); MD_R is 16 in all.
HEAD_SIZES = {
    "t": dict(ham_channels=256, channels=256),
    "s": dict(ham_channels=256, channels=256),
    "b": dict(ham_channels=512, channels=512),
}
SEGNEXT_HAM = dict(MD_S=1, MD_R=16, train_steps=6, eval_steps=7)


register_models(
    "segnext", MSCAN_SIZES, backbone_cls=MSCAN, head_cls=LightHamHead,
    head_fields=lambda size, ol: dict(HEAD_SIZES[size], in_index=(1, 2, 3),
                                      ham_kwargs=SEGNEXT_HAM,
                                      classifier="offset_learning" if ol else "conv"),
    doc=lambda size, ol: f"SegNeXt-{size.upper()}" + (
        " + Offset Learning (LightHamHeadOffsetLearning)" if ol else
        " (mmseg LightHamHead, conv_seg)") + ", logits at 1/8.",
    from_official=segnext_from_official, torch_ignore=TORCH_IGNORE)
