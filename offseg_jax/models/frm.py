"""FRM, the Feature Refinement Module of Wang et al. (ICIP, arXiv 2412.08670), in NHWC.

What is fixed by public material (shared/reference/ecenet_frm.md §2): FRM takes the
four backbone maps F1..F4 (strides 4, 8, 16, 32), brings F1..F3 to the 1/32 grid
with "polyphase pooling", concatenates them with F4 and refines the result with a
transformer-style block built on disentangled non-local (DNL) attention; an FPN
decoder follows. The paper text and code are not public, so every other detail is
an interpretation, and every interpretation is a field of :class:`FRM` (the
defaults and the reasons for them are in docs/frm.md).

Registered components:
  * ``BLOCKS['dnl_block']``: :class:`DisentangledNonLocal`, mmseg's
    ``DisentangledNonLocal2d`` as ``DNLHead`` uses it, with ``from_official``
    mapping a DNLHead / DisentangledNonLocal2d config (parity fixture
    ``dnl_block``; state keys ``g.conv.*``, ``theta.conv.*``, ``phi.conv.*``,
    ``conv_mask.*``, ``conv_out.conv.*``, ``conv_out.bn.*``).
  * ``NECKS['frm']``: :class:`FRM`, features -> features with the 1/32 level
    replaced by the refined map (the other levels pass through unchanged).
  * ``BLOCKS['projection_head']``: :class:`ProjectionHead`, the pixel-embedding
    head of the pixel-contrastive loss (``offseg_jax.losses.contrastive``).
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import einops
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from offseg_jax.models import layers
from offseg_jax.models.family import as_field
from offseg_jax.registry import BLOCKS, NECKS

POOLINGS = ("polyphase", "avg")
TORCH_IGNORE = (r".*\.num_batches_tracked$",)


# ----------------------------------------------------------------------------
# Pooling to the 1/32 grid.
# ----------------------------------------------------------------------------

def _fit(x, height: int, width: int):
  """Zero-pads (or crops) NHWC ``x`` at the bottom/right to ``(height, width)``."""
  x = x[:, :height, :width]
  ph, pw = height - x.shape[1], width - x.shape[2]
  if ph or pw:
    x = jnp.pad(x, ((0, 0), (0, ph), (0, pw), (0, 0)))
  return x


def polyphase_pool(x, factor: int, size: Sequence[int], p: float = 2.0):
  """Adaptive polyphase sampling (Chaman & Dokmanic, CVPR 2021) by ``factor``.

  The map is zero-padded at the bottom/right to ``factor * size`` (cropped if it
  is larger), split into its ``factor**2`` polyphase components
  ``x[:, i::factor, j::factor]``, and, per sample, the component with the largest
  l_p norm over all its positions and channels is kept (ties: the first in
  row-major ``(i, j)`` order). Parameter-free; the selection carries no gradient,
  the kept samples do.

  Args:
    x: (B, H, W, C) map.
    factor: the downsampling factor s.
    size: the output grid ``(h, w)``; ``ceil(H / s)`` for a stride-s chain.
    p: order of the norm that scores the components.

  Returns:
    (B, h, w, C).
  """
  h, w = int(size[0]), int(size[1])
  x = _fit(x, h * factor, w * factor)
  comps = einops.rearrange(x, "b (h i) (w j) c -> b (i j) h w c", i=factor, j=factor)
  # sum |x|^p ranks the components exactly as the p-norm does; no root needed.
  scores = jnp.sum(jnp.abs(comps.astype(jnp.float32)) ** p, axis=(2, 3, 4))
  best = jnp.argmax(scores, axis=1)
  return jnp.take_along_axis(comps, best[:, None, None, None, None], axis=1)[:, 0]


def avg_pool(x, factor: int, size: Sequence[int]):
  """Non-overlapping ``factor`` x ``factor`` average pooling onto ``size``.

  Windows reaching past the bottom/right edge average only the pixels inside the
  map, i.e. torch ``F.avg_pool2d(x, factor, factor, ceil_mode=True)``; a window
  wholly outside (only if ``size`` exceeds ``ceil(H / factor)``) gives 0.
  """
  h, w = int(size[0]), int(size[1])
  sums = einops.reduce(_fit(x, h * factor, w * factor).astype(jnp.float32),
                       "b (h i) (w j) c -> b h w c", "sum", i=factor, j=factor)
  inside = np.zeros((h * factor, w * factor), np.float32)
  inside[:x.shape[1], :x.shape[2]] = 1.0
  counts = einops.reduce(inside, "(h i) (w j) -> h w", "sum", i=factor, j=factor)
  return (sums / np.maximum(counts, 1.0)[None, :, :, None]).astype(x.dtype)


def pool_to_grid(x, factor: int, size: Sequence[int], kind: str = "polyphase",
                 p: float = 2.0):
  """Dispatches to :func:`polyphase_pool` or :func:`avg_pool` by ``kind``."""
  if kind == "polyphase":
    return polyphase_pool(x, factor, size, p)
  if kind == "avg":
    return avg_pool(x, factor, size)
  raise ValueError(f"Unknown FRM pooling {kind!r}; known: {POOLINGS}")


# ----------------------------------------------------------------------------
# Disentangled non-local block.
# ----------------------------------------------------------------------------

class _ConvOut(nn.Module):
  """mmcv ``ConvModule(inter, C, 1, norm_cfg, act_cfg=None)`` with NonLocal2d's init.

  ``zero_init`` zeroes the BN gamma (or, without a norm, the conv weight), as
  mmcv's ``NonLocal2d.init_weights(zeros_init=True)``, so the branch starts at 0.
  """
  features: int
  norm: str | None = "bn"
  zero_init: bool = True
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    if self.norm is None:
      kinit = (nn.initializers.zeros if self.zero_init
               else nn.initializers.variance_scaling(2.0, "fan_out", "normal"))
      return layers.Conv2d(self.features, 1, use_bias=True, dtype=self.dtype,
                           kernel_init=kinit, name="conv")(x)
    if self.norm != "bn":
      raise ValueError(f"DNL conv_out norm must be 'bn' or None, not {self.norm!r}")
    x = layers.Conv2d(self.features, 1, use_bias=False, dtype=self.dtype,
                      kernel_init=nn.initializers.variance_scaling(2.0, "fan_out", "normal"),
                      name="conv")(x)
    scale_init = nn.initializers.zeros if self.zero_init else nn.initializers.ones
    return layers.BatchNorm(dtype=self.dtype, scale_init=scale_init, name="bn")(x, train)


class DisentangledNonLocal(nn.Module):
  """mmseg ``DisentangledNonLocal2d`` (embedded-gaussian mode) on NHWC maps.

  With x of C channels at N = H*W positions and C' = max(C // reduction, 1):
  g, theta, phi are 1x1 convs with bias (C -> C'); theta and phi are centred by
  their mean over positions ("whitened"), g is not. The pairwise term is
  ``softmax_j(theta_i . phi_j / sqrt(C') / temperature) @ g`` (the sqrt only
  with ``use_scale``); the unary term is ``softmax_j(conv_mask(x)_j) @ g``, one
  C' vector broadcast to every position. Then ``conv_out`` (1x1 conv C' -> C,
  plus BN when ``norm='bn'``) of their **sum**, and the residual ``x + ...``
  when ``residual``.

  Attributes:
    reduction: C / C'.
    use_scale: divide the pairwise logits by sqrt(C').
    temperature: the pairwise logits are divided by it (0.05 in DNLHead).
    norm: ``'bn'`` or None, the norm inside ``conv_out``.
    residual: add the input (mmseg's block always does; FRM's transformer
      block adds its own residual around a pre-norm, so it turns this off).
    zero_init_out: conv_out's BN gamma (or conv weight) starts at 0, so the
      block starts as the identity (mmcv ``zeros_init=True``).
    dtype: compute dtype (softmaxes run in float32).
  """
  reduction: int = 2
  use_scale: bool = True
  temperature: float = 0.05
  norm: str | None = "bn"
  residual: bool = True
  zero_init_out: bool = True
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    b, h, w, c = x.shape
    inter = max(c // self.reduction, 1)
    # mmcv NonLocal2d.init_weights: N(0, 0.01) for g/theta/phi, zero bias.
    init = nn.initializers.normal(0.01)

    def embed(name):
      y = layers.ConvModule(inter, 1, norm=None, act=None, use_bias=True, dtype=self.dtype,
                            kernel_init=init, name=name)(x, train)
      return einops.rearrange(y, "b h w c -> b (h w) c")

    g, theta, phi = embed("g"), embed("theta"), embed("phi")
    theta = theta - jnp.mean(theta, axis=1, keepdims=True)
    phi = phi - jnp.mean(phi, axis=1, keepdims=True)
    logits = jnp.einsum("bnc,bmc->bnm", theta, phi).astype(jnp.float32)
    if self.use_scale:
      logits = logits / math.sqrt(inter)
    logits = logits / self.temperature
    pairwise = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
    y = jnp.einsum("bnm,bmc->bnc", pairwise, g)
    mask = layers.Conv2d(1, 1, use_bias=True, dtype=self.dtype, name="conv_mask")(x)
    unary = jax.nn.softmax(einops.rearrange(mask, "b h w 1 -> b (h w)").astype(jnp.float32),
                           axis=-1)
    z = jnp.einsum("bn,bnc->bc", unary.astype(self.dtype), g)
    out = einops.rearrange(y + z[:, None, :], "b (h w) c -> b h w c", h=h)
    out = _ConvOut(c, norm=self.norm, zero_init=self.zero_init_out, dtype=self.dtype,
                   name="conv_out")(out, train)
    return x.astype(self.dtype) + out if self.residual else out


def dnl_block(**fields) -> DisentangledNonLocal:
  """A :class:`DisentangledNonLocal` with the given fields."""
  return DisentangledNonLocal(**fields)


def dnl_from_official(official_config: Mapping[str, Any], num_classes=None):
  """Maps an mmseg ``DNLHead`` (or ``DisentangledNonLocal2d``) config onto the block.

  Only the options that shape the block matter (``reduction``, ``use_scale``,
  ``temperature``, ``mode``, ``norm_cfg``, ``conv_cfg``, ``sub_sample``); the
  head's own options (channels, dropout, loss...) are not the block's. Options
  we do not port raise a one-line ``ValueError`` naming them.
  """
  del num_classes                     # a block has no classifier
  cfg = dict(official_config)
  kind = cfg.get("type", "DNLHead")
  if kind not in ("DNLHead", "DisentangledNonLocal2d"):
    raise ValueError(f"dnl_block maps DNLHead / DisentangledNonLocal2d configs, not {kind!r}")
  mode = cfg.get("mode", "embedded_gaussian")
  if mode != "embedded_gaussian":
    raise ValueError(f"DNL mode={mode!r} is not ported (only 'embedded_gaussian')")
  if cfg.get("sub_sample", False):
    raise ValueError("DNL sub_sample=True (max-pooled g/phi) is not ported")
  if cfg.get("conv_cfg") is not None:
    raise ValueError(f"DNL conv_cfg={cfg['conv_cfg']!r} is not ported (plain Conv2d only)")
  norm_cfg = cfg.get("norm_cfg")
  if norm_cfg is None:
    norm = None
  elif norm_cfg.get("type") in ("BN", "SyncBN", "BN2d"):
    norm = "bn"
  else:
    raise ValueError(f"DNL norm_cfg type {norm_cfg.get('type')!r} is not ported (BN/SyncBN)")
  return DisentangledNonLocal(reduction=int(cfg.get("reduction", 2)),
                              use_scale=bool(cfg.get("use_scale", True)),
                              temperature=float(cfg.get("temperature", 0.05)), norm=norm)


BLOCKS.register("dnl_block", from_official=dnl_from_official,
                torch_ignore=TORCH_IGNORE)(dnl_block)


# ----------------------------------------------------------------------------
# The FRM transformer block and neck.
# ----------------------------------------------------------------------------

class FFN(nn.Module):
  """1x1 conv (C -> ratio*C), [depthwise 3x3], exact GELU, 1x1 conv (-> C).

  ``kind='mix'`` has the depthwise 3x3 conv (VAN's / SegFormer's Mix-FFN, named
  like VAN's ``mlp.dwconv.dwconv``); ``kind='mlp'`` is the plain
  transformer FFN applied per pixel.
  """
  mlp_ratio: float = 4.0
  kind: str = "mix"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    c = x.shape[-1]
    hidden = int(c * self.mlp_ratio)
    x = layers.Conv2d(hidden, 1, dtype=self.dtype, name="fc1")(x)
    if self.kind == "mix":
      x = layers.Conv2d(hidden, 3, padding=1, groups=hidden, dtype=self.dtype,
                        name="dwconv.dwconv")(x)
    elif self.kind != "mlp":
      raise ValueError(f"FRM ffn must be 'mix' or 'mlp', not {self.kind!r}")
    x = layers.gelu(x)
    return layers.Conv2d(c, 1, dtype=self.dtype, name="fc2")(x)


class DNLTransformerBlock(layers.PreNormResidual, kw_only=True):
  """Pre-norm transformer block with DNL attention as the token mixer.

  ``y = x + DropPath(DNL(norm1(x)))``, ``z = y + DropPath(FFN(norm2(y)))``, where
  DNL is :class:`DisentangledNonLocal` without its own residual (whitened
  pairwise term with temperature, plus the unary term, then conv_out, with BN
  when ``attn_out_norm='bn'``, zero-initialised so the branch starts at 0).
  ``norm`` is BatchNorm (VAN's choice, ``'bn'``) or a per-pixel LayerNorm (``'ln'``).
  """
  norm: str = "bn"
  ffn: str = "mix"
  reduction: int = 2
  use_scale: bool = True
  temperature: float = 0.05
  attn_out_norm: str | None = "bn"

  @nn.nowrap
  def pre_norm(self, x, name, train):
    if self.norm == "bn":
      return layers.BatchNorm(dtype=self.dtype, name=name)(x, train)
    if self.norm == "ln":
      return layers.LayerNorm(1e-5, dtype=self.dtype, name=name)(x)
    raise ValueError(f"FRM norm must be 'bn' or 'ln', not {self.norm!r}")

  @nn.nowrap
  def mixer(self, x, train):
    return DisentangledNonLocal(reduction=self.reduction, use_scale=self.use_scale,
                                temperature=self.temperature, norm=self.attn_out_norm,
                                residual=False, dtype=self.dtype, name="attn")(x, train)

  @nn.nowrap
  def mlp(self, x, train):
    return FFN(self.mlp_ratio, self.ffn, dtype=self.dtype, name="mlp")(x)


class FRM(nn.Module):
  """The feature refinement neck: pool F1..F3 to 1/32, concat with F4, refine.

  ``__call__(features, train)`` takes the backbone's maps (finest first, the
  last at the coarsest stride) and returns the same tuple with the last map
  replaced by ``proj(blocks(reduce(concat(pool(F1), ..., pool(F_{n-1}), F_n))))``
  (plus F_n when ``shortcut``); the other levels are returned unchanged, so an
  FPN neck follows as it would follow the backbone.

  Attributes:
    strides: the input levels' strides; level i is pooled by
      ``strides[-1] // strides[i]`` (8, 4, 2 for 4..32).
    pooling: ``'polyphase'`` (adaptive polyphase sampling, the paper's term as
      the reference interprets it) or ``'avg'`` (average pooling).
    polyphase_p: norm order scoring the polyphase components.
    embed_dims: if set, a 1x1 ConvModule (BN, ReLU) ``reduce`` maps the
      concatenation (sum of the input widths) to this width before the blocks;
      None keeps the full concatenation.
    depth: number of DNL transformer blocks.
    norm: ``'bn'`` (as VAN's blocks) or ``'ln'`` for the blocks' pre-norms.
    ffn: ``'mix'`` (with a depthwise 3x3, as VAN's MLP) or ``'mlp'``.
    mlp_ratio: FFN expansion.
    reduction, use_scale, temperature: the DNL attention's (DNLHead defaults).
    attn_out_norm: ``'bn'`` or None inside the DNL ``conv_out`` (DNLHead: BN).
    drop_path_rate: stochastic depth, rising linearly over the blocks to this.
    out_channels: width of the refined map (None: the input top level's width,
      so a neck configured for the backbone needs no change).
    proj_norm: ``'bn'`` or None after the 1x1 ``proj`` conv (no activation).
    shortcut: add the input top level to the refined one.
    dtype: compute dtype.
  """
  strides: Sequence[int] = (4, 8, 16, 32)
  pooling: str = "polyphase"
  polyphase_p: float = 2.0
  embed_dims: int | None = None
  depth: int = 1
  norm: str = "bn"
  ffn: str = "mix"
  mlp_ratio: float = 4.0
  reduction: int = 2
  use_scale: bool = True
  temperature: float = 0.05
  attn_out_norm: str | None = "bn"
  drop_path_rate: float = 0.0
  out_channels: int | None = None
  proj_norm: str | None = "bn"
  shortcut: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, features, train: bool = False):
    feats = tuple(features)
    if len(feats) != len(self.strides):
      raise ValueError(f"FRM got {len(feats)} feature maps for strides {tuple(self.strides)}")
    if self.pooling not in POOLINGS:
      raise ValueError(f"Unknown FRM pooling {self.pooling!r}; known: {POOLINGS}")
    top = feats[-1]
    size = top.shape[1:3]
    out_channels = self.out_channels or top.shape[-1]
    if self.shortcut and out_channels != top.shape[-1]:
      raise ValueError(f"FRM shortcut=True needs out_channels == the top level's width "
                       f"({top.shape[-1]}), got {out_channels}")
    parts = []
    for stride, f in zip(self.strides[:-1], feats[:-1]):
      if self.strides[-1] % stride:
        raise ValueError(f"FRM strides {tuple(self.strides)}: {stride} does not divide "
                         f"{self.strides[-1]}")
      parts.append(pool_to_grid(f.astype(self.dtype), self.strides[-1] // stride, size,
                                self.pooling, self.polyphase_p))
    x = jnp.concatenate(parts + [top.astype(self.dtype)], axis=-1)
    if self.embed_dims is not None:
      x = layers.ConvModule(self.embed_dims, 1, norm="bn", act="relu", dtype=self.dtype,
                            name="reduce")(x, train)
    for i, rate in enumerate(layers.drop_path_rates((self.depth,), self.drop_path_rate)[0]):
      x = DNLTransformerBlock(norm=self.norm, ffn=self.ffn, mlp_ratio=self.mlp_ratio,
                              reduction=self.reduction, use_scale=self.use_scale,
                              temperature=self.temperature, attn_out_norm=self.attn_out_norm,
                              drop_path_rate=rate, dtype=self.dtype,
                              name=f"blocks.{i}")(x, train)
    out = layers.ConvModule(out_channels, 1, norm=self.proj_norm,
                            act=None, dtype=self.dtype, name="proj")(x, train)
    if self.shortcut:
      out = out + top.astype(self.dtype)
    return feats[:-1] + (out,)


@NECKS.register("frm")
def build_frm(**fields) -> FRM:
  """FRM neck (pool to 1/32, concat, DNL transformer block, project back)."""
  return FRM(**as_field(fields))


# ----------------------------------------------------------------------------
# Pixel-embedding head of the contrastive loss.
# ----------------------------------------------------------------------------

class ProjectionHead(nn.Module):
  """Pixel embedding for the contrastive loss, l2-normalised over channels.

  ``kind='convmlp'``: 1x1 conv (C -> hidden, bias) ``proj.0``, BN ``proj.1.0``,
  ReLU, 1x1 conv (-> embed_dim, bias) ``proj.2``; ``kind='linear'``: one 1x1
  conv ``proj``. Then ``y / max(||y||, 1e-12)`` per pixel (torch
  ``F.normalize``), as the projection head of Wang et al. (ICCV 2021,
  "Exploring Cross-Image Pixel Contrast") computes it.

  Attributes:
    embed_dim: embedding width (256 there).
    hidden_dim: width of the hidden layer (None: the input width).
    kind: ``'convmlp'`` or ``'linear'``.
    dtype: compute dtype of the convs; the normalisation runs in float32 and
      the embedding is returned in float32.
  """
  embed_dim: int = 256
  hidden_dim: int | None = None
  kind: str = "convmlp"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    if self.kind == "convmlp":
      y = layers.Conv2d(self.hidden_dim or x.shape[-1], 1, dtype=self.dtype, name="proj.0")(x)
      y = nn.relu(layers.BatchNorm(dtype=self.dtype, name="proj.1.0")(y, train))
      y = layers.Conv2d(self.embed_dim, 1, dtype=self.dtype, name="proj.2")(y)
    elif self.kind == "linear":
      y = layers.Conv2d(self.embed_dim, 1, dtype=self.dtype, name="proj")(x)
    else:
      raise ValueError(f"ProjectionHead kind must be 'convmlp' or 'linear', not {self.kind!r}")
    y = y.astype(jnp.float32)
    # rsqrt(max(|y|^2, eps^2)) keeps the gradient finite at y = 0.
    return y * jax.lax.rsqrt(jnp.maximum(jnp.sum(y * y, axis=-1, keepdims=True), 1e-24))


@BLOCKS.register("projection_head")
def projection_head(**fields) -> ProjectionHead:
  """Pixel-embedding projection head (1x1 conv-BN-ReLU-1x1, l2-normalised)."""
  return ProjectionHead(**fields)
