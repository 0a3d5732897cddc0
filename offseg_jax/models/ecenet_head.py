"""ECENet decode head ("SegDecodingTransformer"), NHWC, with the public port's semantics.

ECENet (Liu et al., ICCV 2023, "Boosting Semantic Segmentation from the Perspective
of Explicit Class Embeddings") decodes with explicit class embeddings that flow from
the coarsest backbone level to the finest one. The only public code is an
inference-only MindSpore + MSAdapter port; this module reproduces it exactly (see
``shared/reference/ecenet_frm.md`` section 1.3 and the ``ecenet_head_swinb`` parity
fixture), in NHWC and with the port's state-dict names:

1. Feature Reconstruction (``layer_slcts.i`` + ``norms.i``), per level with C
   channels: intrinsic branch P = BN(1x1 conv C->C/2), diverse branch
   G = BN(depthwise 3x3 conv of P, with bias), a channel gate
   a = Linear(ReLU(Linear(GAP(G)))) applied raw (no sigmoid), fuse
   1x1 conv(concat[G*a, P]) (diverse first), then LayerNorm(C).
2. Laterals (``laterals.i``): bias-free 1x1 convs to ``channels`` = D.
3. Explicit Class Extraction at 1/32: ``learner`` (grouped 1x1 conv, then 1x1 conv
   to K) gives mask logits M; ``token_emb.3`` pools each class map of M to
   1x1, 2x2, 3x3, 6x6 and LxL grids (torch adaptive-pool bins), concatenates them
   row-major and applies a Linear -> class embeddings E (B, K, D).
4. Semantics Attention & Updater from 1/16 down to 1/4 (``transfer.i``,
   ``token_emb.i``, ``gated_tokens.i``): pixels of level i attend to E; the
   head-averaged *pre-softmax* similarities are the level mask, which is pooled to
   tokens that update E (a K-Net-style gated updater). The attention weights are
   ``softmax(-S)``: the port subtracts the logits from their row maximum ("stable
   training"), so aggregation favours the least similar class embeddings.
5. Aggregation: Ghost + PixelShuffle upscaling (``ghost_up_layers``) of the 1/8,
   1/16 and 1/32 maps to 1/4, concat, ``proj`` (3x3 ConvModule), the classifier;
   plus the class-embedding-weighted masks
   ``diag(softmax(trans(E)))[k] * sigmoid(sum of masks)[k]`` (the port's einsum
   ``'bkk,bkhw->bkhw'`` reads the diagonal).
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import einops
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from offseg_jax.models import classifiers, layers
from offseg_jax.registry import HEADS

Dtype = Any

# Official keys that carry nothing for us.
TORCH_IGNORE = (r".*\.num_batches_tracked$",)

# ----------------------------------------------------------------------------
# Small torch-semantics helpers.
# ----------------------------------------------------------------------------

def token_grid_length(num_classes: int, ratio: float) -> int:
  """The largest pooling grid of the class tokens: int(sqrt(K) * ratio), made odd."""
  length = int(math.sqrt(num_classes) * ratio)
  return length if length % 2 else length + 1


def adaptive_pool_matrix(n: int, s: int) -> np.ndarray:
  """(s, n) averaging matrix of torch ``adaptive_avg_pool`` from n to s bins.

  Bin i covers [floor(i*n/s), ceil((i+1)*n/s)); bins overlap when s does not
  divide n, and a bin may repeat an input when s > n.
  """
  mat = np.zeros((s, n), np.float32)
  for i in range(s):
    start = (i * n) // s
    end = -((-(i + 1) * n) // s)
    mat[i, start:end] = 1.0 / (end - start)
  return mat


def adaptive_avg_pool(x, size: int):
  """torch ``adaptive_avg_pool2d(x, size)`` of NHWC ``x`` -> (B, size, size, C).

  Rectangular bins make the average separable: rows, then columns.
  """
  ph = jnp.asarray(adaptive_pool_matrix(x.shape[1], size), x.dtype)
  pw = jnp.asarray(adaptive_pool_matrix(x.shape[2], size), x.dtype)
  return jnp.einsum("bhwc,ih,jw->bijc", x, ph, pw)


def pixel_shuffle(x, r: int = 2):
  """torch ``F.pixel_shuffle`` on NHWC: channel c*r*r + i*r + j -> (c, y*r+i, x*r+j)."""
  return einops.rearrange(x, "b h w (c i j) -> b (h i) (w j) c", i=r, j=r)


# ----------------------------------------------------------------------------
# Submodules, named like the port's torch modules.
# ----------------------------------------------------------------------------

class FeatureReconstruction(nn.Module):
  """``AdaptiveFeatureSelector_1_layers``: intrinsic + gated diverse branch, fused.

  Returns ``(gated_diverse, fused)``: G*a (B, H, W, C/2), the diversity-loss
  input, and the fused map (B, H, W, C) before the level's LayerNorm.
  """
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    c = x.shape[-1]
    half = c // 2
    intrinsic = layers.Conv2d(half, 1, use_bias=False, dtype=self.dtype, name="primary.0")(x)
    intrinsic = layers.BatchNorm(dtype=self.dtype, name="primary.1")(intrinsic, train)
    diverse = layers.Conv2d(half, 3, padding=1, groups=half, use_bias=True, dtype=self.dtype,
                            name="cheap.0")(intrinsic)
    diverse = layers.BatchNorm(dtype=self.dtype, name="cheap.1")(diverse, train)
    pooled = jnp.mean(diverse.astype(jnp.float32), axis=(1, 2)).astype(self.dtype)
    gate = layers.Linear(half // 2, use_bias=False, dtype=self.dtype,
                         name="layer_channel_slct.0")(pooled)
    gate = layers.Linear(half, use_bias=False, dtype=self.dtype,
                         name="layer_channel_slct.2")(nn.relu(gate))
    # The port multiplies by the raw MLP output: there is no sigmoid on the gate.
    gated = diverse * gate[:, None, None, :]
    fused = layers.Conv2d(c, 1, use_bias=False, dtype=self.dtype, name="conv_out")(
        jnp.concatenate([gated, intrinsic], axis=-1))
    return gated, fused


class TokenEmbedding(nn.Module):
  """``TokenEmbedding_noCoord_seg``: class maps -> class tokens (B, K, D).

  Every class map (raw logits, no sigmoid) is adaptively average-pooled to the
  grids in ``pool_sizes``; the grids are flattened row-major, concatenated in
  that order and projected by ``cls_learner`` (Linear with bias).
  """
  out_dim: int
  pool_sizes: Sequence[int]
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, mask):
    b, _, _, k = mask.shape
    pooled = [einops.rearrange(adaptive_avg_pool(mask.astype(self.dtype), s),
                               "b i j k -> b k (i j)") for s in self.pool_sizes]
    feats = jnp.concatenate(pooled, axis=-1)
    assert feats.shape == (b, k, sum(s * s for s in self.pool_sizes))
    return layers.Linear(self.out_dim, dtype=self.dtype, name="cls_learner")(feats)


class TokenUpdater(nn.Module):
  """``TokenUpdator``: gated update of the class embeddings by new tokens.

  With T the new tokens and E the current embeddings (both (B, K, D)):
  [p_in, p_out] = dynamic_layer(T); g = sigmoid(norm_in(update_gate(input_layer(E)
  * p_in))); E' = g * norm_out(p_out) + E; output ReLU(fc_norm(fc_layer(E'))).
  Every Linear has a bias, every LayerNorm eps 1e-5.
  """
  feat_channels: int
  out_channels: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, update, embeddings):
    d = embeddings.shape[-1]
    params = layers.Linear(2 * d, dtype=self.dtype, name="dynamic_layer")(update)
    param_in, param_out = params[..., :d], params[..., d:]
    gate_feats = layers.Linear(d, dtype=self.dtype, name="input_layer")(embeddings) * param_in
    gate = layers.Linear(self.feat_channels, dtype=self.dtype, name="update_gate")(gate_feats)
    gate = nn.sigmoid(layers.LayerNorm(1e-5, dtype=self.dtype, name="norm_in")(gate))
    param_out = layers.LayerNorm(1e-5, dtype=self.dtype, name="norm_out")(param_out)
    feats = gate * param_out + embeddings
    feats = layers.Linear(self.out_channels, dtype=self.dtype, name="fc_layer")(feats)
    return nn.relu(layers.LayerNorm(1e-5, dtype=self.dtype, name="fc_norm")(feats))


class CrossAttentionOptions(nn.Module):
  """The fields of :class:`ClassCrossAttention` (``FeatureTransferLayer`` passes them on)."""
  num_heads: int
  qkv_bias: bool = True
  query_relu: bool = True
  attn_drop_rate: float = 0.0
  drop_rate: float = 0.0
  dtype: Dtype = jnp.float32


class ClassCrossAttention(CrossAttentionOptions):
  """``MultiHeadAttention``: pixels (queries) attend to class embeddings.

  Returns ``(out, mask)``: the projected attention output (B, H, W, D) and the
  level mask (B, H, W, K), the pre-softmax logits q.k/sqrt(d) averaged over heads.
  Channel c belongs to head c // d (torch reshape order).
  """

  @nn.compact
  def __call__(self, query, key_value, train: bool = False):
    b, h, w, d_model = query.shape
    head_dim = d_model // self.num_heads
    # Port: DepthwiseSeparableConvModule(act_cfg=None) whose ConvModules turn
    # act_cfg=None into ReLU, so both convs are followed by a ReLU; mmcv proper
    # would apply none (query_relu=False).
    act = "relu" if self.query_relu else None
    q = layers.ConvModule(d_model, 3, padding=1, groups=d_model, act=act,
                          use_bias=self.qkv_bias, dtype=self.dtype,
                          name="q.depthwise_conv")(query)
    q = layers.ConvModule(d_model, 1, act=act, use_bias=self.qkv_bias, dtype=self.dtype,
                          name="q.pointwise_conv")(q)
    kv = layers.Linear(2 * d_model, use_bias=False, dtype=self.dtype, name="kv")(key_value)
    k, v = kv[..., :d_model], kv[..., d_model:]
    q = einops.rearrange(q, "b h w (n d) -> b n (h w) d", n=self.num_heads)
    k = einops.rearrange(k, "b k (n d) -> b n k d", n=self.num_heads)
    v = einops.rearrange(v, "b k (n d) -> b n k d", n=self.num_heads)
    logits = jnp.einsum("bnqd,bnkd->bnqk", q, k).astype(jnp.float32) * head_dim ** -0.5
    mask = einops.rearrange(jnp.mean(logits, axis=1), "b (h w) k -> b h w k", h=h, w=w)
    # softmax(rowmax(S) - S) == softmax(-S): the port's "stable training" weights.
    weights = jax.nn.softmax(-logits, axis=-1)
    weights = nn.Dropout(self.attn_drop_rate, deterministic=not train)(weights)
    out = jnp.einsum("bnqk,bnkd->bnqd", weights.astype(self.dtype), v)
    out = einops.rearrange(out, "b n (h w) d -> b h w (n d)", h=h, w=w)
    out = layers.Conv2d(d_model, 1, use_bias=True, dtype=self.dtype, name="proj")(out)
    out = nn.Dropout(self.drop_rate, deterministic=not train)(out)
    return out, mask


class FeatureTransferLayer(CrossAttentionOptions):
  """``FeaTransLayer``: cross-attention to the class embeddings + a Mix-FFN.

  R = attn(LN(low), LN(E)) + low; R' = R + FFN(LN(R)) with FFN = 1x1 conv (D->rD),
  depthwise 3x3 conv, GELU, dropout, 1x1 conv (rD->D), dropout (``mlp.0/1/4``).
  ``drop_rate`` also drops inside the FFN.
  """
  mlp_ratio: int = 4
  gelu_approximate: bool = True

  @nn.compact
  def __call__(self, low, embeddings, train: bool = False):
    d_model = low.shape[-1]
    query = layers.LayerNorm(1e-5, dtype=self.dtype, name="norm_low")(low)
    key_value = layers.LayerNorm(1e-5, dtype=self.dtype, name="norm_high")(embeddings)
    attn_out, mask = ClassCrossAttention(**layers.field_values(self, CrossAttentionOptions),
                                         name="cross_attn")(query, key_value, train)
    out = attn_out + low
    hidden = self.mlp_ratio * d_model
    y = layers.LayerNorm(1e-5, dtype=self.dtype, name="norm_mlp")(out)
    y = layers.Conv2d(hidden, 1, dtype=self.dtype, name="mlp.0")(y)
    y = layers.Conv2d(hidden, 3, padding=1, groups=hidden, dtype=self.dtype, name="mlp.1")(y)
    y = nn.gelu(y, approximate=self.gelu_approximate)
    y = nn.Dropout(self.drop_rate, deterministic=not train)(y)
    y = layers.Conv2d(d_model, 1, dtype=self.dtype, name="mlp.4")(y)
    y = nn.Dropout(self.drop_rate, deterministic=not train)(y)
    return out + y, mask


class GhostUpscale(nn.Module):
  """``GhostUpscale``: ``num_layers`` x (ghost conv D->4D, PixelShuffle(2)) = x2^n.

  Each layer: primary = ConvModule 1x1 D->2D (BN, ReLU); cheap = depthwise
  ConvModule 3x3 on 2D (BN, ReLU); concat [primary, cheap] -> PixelShuffle(2).
  """
  channels: int
  num_layers: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    init_dims = 2 * self.channels          # ceil(4D / ghost ratio 2)
    for j in range(self.num_layers):
      primary = layers.ConvModule(init_dims, 1, norm="bn", act="relu", dtype=self.dtype,
                                  name=f"layers.{j}.primary")(x, train)
      cheap = layers.ConvModule(init_dims, 3, padding=1, groups=init_dims, norm="bn",
                                act="relu", dtype=self.dtype,
                                name=f"layers.{j}.cheap")(primary, train)
      x = pixel_shuffle(jnp.concatenate([primary, cheap], axis=-1), 2)
    return x


# ----------------------------------------------------------------------------
# The head.
# ----------------------------------------------------------------------------

class ECENetHead(nn.Module):
  """ECENet's decode head on N >= 2 feature maps at strides 4, 8, 16, 32 (...).

  Attributes:
    num_classes: K.
    channels: decoder width D (256 in the public config).
    num_heads: attention heads of the SAU cross-attention (D must divide).
    mlp_ratio: Mix-FFN expansion.
    qkv_bias: bias of the query's depthwise-separable convs.
    ratio: token grid rule, L = int(sqrt(K) * ratio) made odd (config: 1).
    in_index: which backbone outputs to use, finest first.
    classifier: a ``classifiers.KINDS`` name; ``'conv'`` is the port's ``conv_seg``.
    dropout_ratio: Dropout2d before a ``'conv'`` classifier.
    attn_drop_rate, drop_rate: dropout in the SAU layers (0 in the config).
    query_relu: the port's reading of ``DepthwiseSeparableConvModule(act_cfg=None)``
      (True: ReLU after both the depthwise and the pointwise query conv, which
      the fixture confirms); False gives mmcv's meaning of ``act_cfg=None`` (no
      activation), which the unpublished PyTorch original most likely had.
    gelu_approximate: the port's Mix-FFN GELU is MindSpore's tanh approximation
      (True, matches the fixture); False is torch ``nn.GELU()``'s exact erf, as
      the PyTorch original would compute it (logits move by ~2e-4).
    dtype: computation dtype; parameters stay float32.

  ``__call__(features, train=False)`` returns ``(logits, aux)``: logits
  (B, H/4, W/4, K) float32 = classifier(proj(...)) + mask_logits, and ``aux``:

    * ``'masks'``: tuple of N level masks at native resolution, finest first,
      (B, H_i, W_i, K); the last is the 1/32 learner output, the others the
      head-averaged pre-softmax attention logits of each SAU level.
    * ``'wo_mask'``: the sum of all but the finest mask, each bilinearly resized
      to 1/4 (B, H/4, W/4, K): the input of the ``ecenet_mask`` loss.
    * ``'mask_logits'``: diag(softmax(class_logits)) * sigmoid(sum of all masks),
      the term added to the classifier output.
    * ``'div'``: tuple of N maps (B, H_i*W_i): per level, the max over channels of
      the spatial softmax of the gated diverse branch (the diversity-loss input).
    * ``'div_channels'``: tuple of N scalars, the diverse-branch channel counts
      C_i // 2 (the diversity loss normalises by them).
    * ``'fr'``: tuple of N Feature Reconstruction outputs after their LayerNorm.
    * ``'class_embeddings'``: final class embeddings E (B, K, D).
    * ``'class_embeddings_level'``: tuple of N: index i holds E after the update
      at level i; index 0 is the final E, index N-1 the 1/32 ECE output.
    * ``'class_logits'``: ``trans(E)`` (B, K, K), before the softmax.
  """
  num_classes: int
  channels: int = 256
  num_heads: int = 4
  mlp_ratio: int = 4
  qkv_bias: bool = True
  ratio: float = 1.0
  in_index: Sequence[int] = (0, 1, 2, 3)
  classifier: str = "conv"
  dropout_ratio: float = 0.1
  attn_drop_rate: float = 0.0
  drop_rate: float = 0.0
  query_relu: bool = True
  gelu_approximate: bool = True
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, features, train: bool = False):
    feats = [features[i] for i in self.in_index]
    n = len(feats)
    if n < 2:
      raise ValueError(f"ECENetHead needs at least 2 feature maps, got {n}")
    if self.channels % self.num_heads:
      raise ValueError(f"channels={self.channels} is not divisible by "
                       f"num_heads={self.num_heads}")
    d, k = self.channels, self.num_classes
    length = token_grid_length(k, self.ratio)
    pool_sizes = (1, 2, 3, 6, length)

    # 1. Feature Reconstruction.
    gated, recon = [], []
    for i, x in enumerate(feats):
      g, y = FeatureReconstruction(dtype=self.dtype, name=f"layer_slcts.{i}")(
          x.astype(self.dtype), train)
      gated.append(g)
      recon.append(layers.LayerNorm(1e-5, dtype=self.dtype, name=f"norms.{i}")(y))

    # 2. Laterals.
    laterals = [layers.Conv2d(d, 1, use_bias=False, dtype=self.dtype, name=f"laterals.{i}")(x)
                for i, x in enumerate(recon)]

    # 3. Explicit Class Extraction on the coarsest level.
    last_mask = layers.Conv2d(d, 1, groups=self.num_heads, use_bias=False, dtype=self.dtype,
                              name="learner.0")(laterals[-1])
    last_mask = layers.Conv2d(k, 1, use_bias=False, dtype=self.dtype,
                              name="learner.1")(last_mask)
    embeddings = TokenEmbedding(d, pool_sizes, dtype=self.dtype,
                                name=f"token_emb.{n - 1}")(last_mask)

    # 4. Semantics Attention & Updater, coarse to fine (the inverted flow). The
    # attention of a level uses the embeddings from before that level's update.
    masks = {n - 1: last_mask.astype(jnp.float32)}
    outs = {n - 1: laterals[-1]}
    levels = {n - 1: embeddings}
    for i in range(n - 2, -1, -1):
      refined, mask = FeatureTransferLayer(
          self.num_heads, mlp_ratio=self.mlp_ratio, qkv_bias=self.qkv_bias,
          query_relu=self.query_relu, gelu_approximate=self.gelu_approximate,
          attn_drop_rate=self.attn_drop_rate, drop_rate=self.drop_rate, dtype=self.dtype,
          name=f"transfer.{i}")(laterals[i], embeddings, train)
      tokens = TokenEmbedding(d, pool_sizes, dtype=self.dtype, name=f"token_emb.{i}")(mask)
      embeddings = TokenUpdater(d, d, dtype=self.dtype, name=f"gated_tokens.{i}")(
          tokens, embeddings)
      masks[i], outs[i], levels[i] = mask, refined, embeddings

    # 5. Aggregation at 1/4: Ghost upscaling by 2^i, resize (a no-op for sizes
    # divisible by the largest stride), concat finest first, proj.
    size = recon[0].shape[1:3]
    ups = [outs[0]] + [GhostUpscale(d, i, dtype=self.dtype, name=f"ghost_up_layers.{i - 1}")(
        outs[i], train) for i in range(1, n)]
    ups = [layers.resize_bilinear(u, size) for u in ups]
    x = layers.ConvModule(d, 3, padding=1, norm="bn", act="relu", dtype=self.dtype,
                          name="proj")(jnp.concatenate(ups, axis=-1), train)

    # 6. Class-embedding-weighted masks, all at 1/4.
    mask_size = masks[0].shape[1:3]
    resized = [layers.resize_bilinear(masks[i], mask_size) for i in range(n - 1, -1, -1)]
    total = sum(resized)
    wo_mask = sum(resized[:-1])
    class_logits = layers.Linear(k, dtype=self.dtype, name="trans")(embeddings)
    class_logits = class_logits.astype(jnp.float32)
    # einsum('bkk,bkhw->bkhw') in torch takes the diagonal: p_k = P[b, k, k].
    class_scores = jnp.diagonal(jax.nn.softmax(class_logits, axis=-1), axis1=1, axis2=2)
    mask_logits = class_scores[:, None, None, :] * nn.sigmoid(total)

    logits = classifiers.classify(x, kind=self.classifier, num_classes=k,
                                  dropout_ratio=self.dropout_ratio, train=train,
                                  dtype=self.dtype)
    logits = logits + mask_logits

    div = []
    for g in gated:
      spatial = jax.nn.softmax(einops.rearrange(g.astype(jnp.float32), "b h w c -> b (h w) c"),
                               axis=1)
      div.append(jnp.max(spatial, axis=-1))
    aux = {
        "masks": tuple(masks[i] for i in range(n)),
        "wo_mask": wo_mask,
        "mask_logits": mask_logits,
        "div": tuple(div),
        "div_channels": tuple(jnp.asarray(g.shape[-1], jnp.float32) for g in gated),
        "fr": tuple(r.astype(jnp.float32) for r in recon),
        "class_embeddings": embeddings.astype(jnp.float32),
        "class_embeddings_level": tuple(levels[i].astype(jnp.float32) for i in range(n)),
        "class_logits": class_logits,
    }
    return logits, aux


# ----------------------------------------------------------------------------
# Registration and the official config mapping.
# ----------------------------------------------------------------------------

# Official SegDecodingTransformer / BaseDecodeHead options we accept; any other
# key is refused by name.
_OFFICIAL_KEYS = {
    "type", "num_heads", "attn_drop_rate", "drop_rate", "qkv_bias", "mlp_ratio",
    "ln_norm_cfg", "all_levels", "mask_loss", "ghost_up", "in_channels", "channels",
    "num_classes", "dropout_ratio", "norm_cfg", "act_cfg", "in_index", "ratio", "div_loss",
    "align_corners", "input_transform", "conv_cfg", "loss_decode", "ignore_index",
    "sampler", "init_cfg",
}


def ecenet_head_from_official(head: Mapping[str, Any], num_classes: int | None = None
                              ) -> ECENetHead:
  """Maps the port's ``SegDecodingTransformer`` config onto :class:`ECENetHead`.

  ``num_classes`` overrides the config's. The port's readings are kept
  (``query_relu=True``, ``gelu_approximate=True``). Options the port does not
  implement or we do not port raise a one-line ``ValueError`` naming them.
  ``loss_decode`` is accepted and ignored: losses belong to ``config.losses``.
  """
  head = dict(head)
  unknown = sorted(set(head) - _OFFICIAL_KEYS)
  if unknown:
    raise ValueError(f"ECENet head option(s) {unknown} are not supported")
  if head.get("type", "SegDecodingTransformer") != "SegDecodingTransformer":
    raise ValueError(f"Not an ECENet head config: type={head['type']!r}")
  if not head.get("all_levels", True):
    raise ValueError("ECENet head option all_levels=False is not supported")
  if not head.get("ghost_up", False):
    # The port's ghost_up=False path resizes the masks to the 1/32 grid and then
    # adds them to the 1/4 logits, which fails; only ghost_up=True runs.
    raise ValueError("ECENet head option ghost_up=False is not supported")
  if head.get("input_transform", "multiple_select") != "multiple_select":
    raise ValueError(f"ECENet head option input_transform={head['input_transform']!r} "
                     "is not supported")
  if head.get("align_corners", False):
    raise ValueError("ECENet head option align_corners=True is not supported")
  if head.get("conv_cfg") is not None:
    raise ValueError(f"ECENet head option conv_cfg={head['conv_cfg']} is not supported")
  if head.get("sampler") is not None:
    raise ValueError(f"ECENet head option sampler={head['sampler']} is not supported")
  norm = (head.get("norm_cfg") or {}).get("type")
  if norm not in ("BN", "SyncBN"):
    raise ValueError(f"ECENet head option norm_cfg={head.get('norm_cfg')} is not supported")
  act = (head.get("act_cfg") or {"type": "ReLU"}).get("type")
  if act != "ReLU":
    raise ValueError(f"ECENet head option act_cfg={head.get('act_cfg')} is not supported")
  ln = (head.get("ln_norm_cfg") or {}).get("type")
  if ln != "LN":
    raise ValueError(f"ECENet head option ln_norm_cfg={head.get('ln_norm_cfg')} is not "
                     "supported")
  in_index = head.get("in_index", (0, 1, 2, 3))
  in_index = tuple(int(i) for i in (in_index if isinstance(in_index, (list, tuple))
                                    else (in_index,)))
  in_channels = head.get("in_channels")
  if in_channels is not None and len(in_channels) != len(in_index):
    raise ValueError(f"ECENet head in_channels {in_channels} and in_index {in_index} "
                     "differ in length")
  k = num_classes if num_classes is not None else head.get("num_classes")
  if k is None:
    raise ValueError("num_classes is neither given nor in the ECENet head config")
  return ECENetHead(
      num_classes=int(k),
      channels=int(head.get("channels", 256)),
      num_heads=int(head.get("num_heads", 4)),
      mlp_ratio=int(head.get("mlp_ratio", 4)),
      qkv_bias=bool(head.get("qkv_bias", True)),
      ratio=float(head.get("ratio", math.sqrt(2))),
      in_index=in_index,
      dropout_ratio=float(head.get("dropout_ratio", 0.1)),
      attn_drop_rate=float(head.get("attn_drop_rate", 0.0)),
      drop_rate=float(head.get("drop_rate", 0.0)))


@HEADS.register("ecenet_head", from_official=ecenet_head_from_official,
                torch_ignore=TORCH_IGNORE)
def build_ecenet_head(num_classes: int, **fields) -> ECENetHead:
  """ECENetHead with ``fields`` overriding its defaults (the Swin-B/ADE20K config)."""
  if "in_index" in fields:
    fields["in_index"] = tuple(int(i) for i in fields["in_index"])
  return ECENetHead(num_classes=num_classes, **fields)
