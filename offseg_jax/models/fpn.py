"""mmseg's FPN neck and the Semantic-FPN decode head (``FPNHead``), in NHWC.

Registered components:
  * ``NECKS`` ``fpn``: :class:`FPN`: 1x1 lateral convs, a top-down path that adds
    each coarser lateral, nearest-upsampled to the finer lateral's exact size, then
    3x3 output convs; ``num_outs`` beyond the inputs come from stride-2 max pooling
    (or extra stride-2 convs with ``add_extra_convs``).
  * ``HEADS`` ``fpn_head``: :class:`FPNHead`: per level a stack of 3x3
    ConvModules (BN, ReLU), each followed by a 2x bilinear upsample, enough of them
    to reach the finest stride; the levels are summed at the finest level's size
    and classified (``classifier``, see ``models.classifiers``). Logits are at the
    finest input stride (stride 4 on a usual backbone).
  * ``HEADS`` ``fpn_fpnhead``: :class:`SemanticFPN`: the neck and the head as one
    head (submodules ``neck`` and ``decode_head``, as in an official checkpoint),
    returning ``(logits, {'neck': FPN outputs})``. It is the component of the
    ``fpn_fpnhead`` parity fixture, whose official config is ``{neck, decode_head}``,
    and plugs onto any backbone as a head.

Torch semantics reproduced:
  * the top-down nearest upsampling reads source index ``floor(dst * in / out)``
    (``layers.resize_nearest``), so odd sizes, where the coarser map is not exactly
    half the finer one, match ``F.interpolate(size=..., mode='nearest')``;
  * the head's ``Upsample(scale_factor=2)`` resizes to exactly (2h, 2w) and the final
    per-level resize to the finest level's size is bilinear with
    ``align_corners=False`` and no antialiasing (``layers.resize_bilinear``).

Initialisation follows mmseg: Xavier-uniform FPN convs with zero bias, Kaiming
(fan-out) head convs, ``conv_seg`` N(0, 0.01).
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax.numpy as jnp

from offseg_jax.models import layers
from offseg_jax.models.classifiers import classify
from offseg_jax.models.family import as_field, module_fields, register_head
from offseg_jax.registry import HEADS, NECKS

_EXTRA_SOURCES = ("on_input", "on_lateral", "on_output")


class FPN(nn.Module):
  """mmseg ``FPN`` on a tuple of NHWC maps (finest first); returns a tuple of maps.

  Attributes (mmseg names; input widths are inferred from the inputs):
    out_channels: width of every output.
    num_outs: number of outputs (default: one per used input level).
    start_level: first input level used.
    end_level: one past the last input level used (exclusive, as in mmseg);
      -1 = up to the last input.
    add_extra_convs: False (extra levels by stride-2 max pooling) or the source of
      the extra stride-2 3x3 convs: 'on_input' (last used input), 'on_lateral'
      (last lateral) or 'on_output' (last output).
    relu_before_extra_convs: ReLU before every extra conv after the first.
    no_norm_on_lateral: no norm on the lateral convs even if ``norm`` is set.
    norm: None, 'bn' or 'gn' on every conv (mmseg default: None, so convs have bias).
    num_groups: groups of 'gn'.
    act: activation after every conv (mmseg default: None).
    upsample_mode: 'nearest' (mmseg default) or 'bilinear' (align_corners=False).
    in_channels: optional expected input widths, checked against the inputs.
    dtype: computation dtype.
  """
  out_channels: int = 256
  num_outs: int | None = None
  start_level: int = 0
  end_level: int = -1
  add_extra_convs: Any = False
  relu_before_extra_convs: bool = False
  no_norm_on_lateral: bool = False
  norm: str | None = None
  num_groups: int = 32
  act: str | None = None
  upsample_mode: str = "nearest"
  in_channels: Sequence[int] | None = None
  dtype: Any = jnp.float32

  def _conv(self, kernel, stride, padding, norm, name):
    return layers.ConvModule(self.out_channels, kernel, stride, padding, norm=norm,
                             num_groups=self.num_groups, act=self.act, dtype=self.dtype,
                             kernel_init=nn.initializers.xavier_uniform(), name=name)

  @nn.compact
  def __call__(self, features, train: bool = False):
    features = tuple(features)
    if self.in_channels is not None:
      widths = [f.shape[-1] for f in features]
      if list(widths) != list(self.in_channels):
        raise ValueError(f"FPN in_channels {list(self.in_channels)} do not match the "
                         f"input widths {widths}")
    end = len(features) if self.end_level == -1 else self.end_level
    if not 0 <= self.start_level < end <= len(features):
      raise ValueError(f"FPN levels [{self.start_level}, {end}) do not fit "
                       f"{len(features)} inputs")
    used = end - self.start_level
    num_outs = used if self.num_outs is None else self.num_outs
    if num_outs < used or (self.end_level != -1 and num_outs != used):
      raise ValueError(f"FPN num_outs={num_outs} is incompatible with {used} used levels "
                       f"(end_level={self.end_level})")
    extra = self.add_extra_convs
    if extra not in (False, None) and extra not in _EXTRA_SOURCES:
      raise ValueError(f"FPN add_extra_convs={extra!r}; use False or one of {_EXTRA_SOURCES}")
    if self.upsample_mode not in ("nearest", "bilinear"):
      raise ValueError(f"FPN upsample_mode {self.upsample_mode!r} (nearest or bilinear)")

    lateral_norm = None if self.no_norm_on_lateral else self.norm
    laterals = [self._conv(1, 1, 0, lateral_norm, f"lateral_convs.{i}")(
        features[self.start_level + i], train) for i in range(used)]
    resize = (layers.resize_nearest if self.upsample_mode == "nearest"
              else layers.resize_bilinear)
    # Top-down: each coarser lateral, resized to the finer one's exact size (not a
    # fixed 2x, which would not fit odd sizes), is added to it.
    for i in range(used - 1, 0, -1):
      laterals[i - 1] = laterals[i - 1] + resize(laterals[i], laterals[i - 1].shape[1:3])
    outs = [self._conv(3, 1, 1, self.norm, f"fpn_convs.{i}")(laterals[i], train)
            for i in range(used)]
    if num_outs > used and not extra:
      for _ in range(num_outs - used):
        # torch max_pool2d(kernel 1, stride 2) is a stride-2 subsampling.
        outs.append(outs[-1][:, ::2, ::2, :])
    elif num_outs > used:
      source = {"on_input": features[end - 1], "on_lateral": laterals[-1],
                "on_output": outs[-1]}[extra]
      outs.append(self._conv(3, 2, 1, self.norm, f"fpn_convs.{used}")(source, train))
      for i in range(used + 1, num_outs):
        x = nn.relu(outs[-1]) if self.relu_before_extra_convs else outs[-1]
        outs.append(self._conv(3, 2, 1, self.norm, f"fpn_convs.{i}")(x, train))
    return tuple(outs)


class FPNHead(nn.Module):
  """mmseg ``FPNHead`` (Semantic FPN) on NHWC maps; logits at the first level's size.

  Attributes:
    num_classes: output classes K.
    channels: width of the scale heads (128 in the Semantic-FPN configs).
    feature_strides: stride of each selected level; level i gets
      ``max(1, log2(s_i / s_0))`` ConvModules, each followed by a 2x upsample
      when ``s_i != s_0``.
    in_index: which input maps to use (one per feature stride).
    dropout_ratio: Dropout2d before ``conv_seg`` (``classifier='conv'`` only).
    classifier: a kind of :func:`offseg_jax.models.classifiers.classify`.
    norm: 'bn' (default), 'gn' or None for the scale-head ConvModules.
    num_groups: groups of 'gn'.
    act: activation of the scale-head ConvModules.
    dtype: computation dtype.

  ``__call__(features, train)`` returns ``(logits, {})`` with NHWC logits.
  """
  num_classes: int
  channels: int = 128
  feature_strides: Sequence[int] = (4, 8, 16, 32)
  in_index: Sequence[int] = (0, 1, 2, 3)
  dropout_ratio: float = 0.1
  classifier: str = "conv"
  norm: str | None = "bn"
  num_groups: int = 32
  act: str | None = "relu"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, features, train: bool = False):
    if len(self.in_index) != len(self.feature_strides):
      raise ValueError(f"FPNHead: {len(self.in_index)} in_index entries for "
                       f"{len(self.feature_strides)} feature_strides")
    if sorted(self.feature_strides) != list(self.feature_strides):
      raise ValueError(f"FPNHead feature_strides {self.feature_strides} must be ascending")
    feats = [features[i] for i in self.in_index]
    output = None
    for i, (x, stride) in enumerate(zip(feats, self.feature_strides)):
      steps = max(1, int(math.log2(stride) - math.log2(self.feature_strides[0])))
      upsample = stride != self.feature_strides[0]
      for k in range(steps):
        # Official Sequential indices: ConvModules at even positions when 2x
        # Upsample modules sit between them.
        index = 2 * k if upsample else k
        x = layers.ConvModule(self.channels, 3, 1, 1, norm=self.norm,
                              num_groups=self.num_groups, act=self.act, dtype=self.dtype,
                              name=f"scale_heads.{i}.{index}")(x, train)
        if upsample:
          x = layers.resize_bilinear(x, (2 * x.shape[1], 2 * x.shape[2]))
      output = x if output is None else output + layers.resize_bilinear(x, output.shape[1:3])
    logits = classify(output, kind=self.classifier, num_classes=self.num_classes,
                      dropout_ratio=self.dropout_ratio, train=train, dtype=self.dtype)
    return logits, {}


class SemanticFPN(nn.Module):
  """FPN neck + FPNHead as one head: ``features -> (logits, {'neck': FPN outputs})``.

  Submodules are named ``neck`` and ``decode_head`` so that an official segmentor
  checkpoint's ``neck.*`` and ``decode_head.*`` keys map onto it.
  """
  neck: FPN
  decode_head: FPNHead

  def __call__(self, features, train: bool = False):
    outs = tuple(self.neck(features, train=train))
    logits, aux = self.decode_head(outs, train=train)
    return logits, {**aux, "neck": outs}


# ----------------------------------------------------------------------------
# Official configs -> our modules
# ----------------------------------------------------------------------------

def _check_keys(what: str, cfg: Mapping[str, Any], known: Sequence[str]) -> None:
  unknown = sorted(set(cfg) - set(known))
  if unknown:
    raise ValueError(f"{what} option {unknown[0]!r} is not supported by this port")


def _norm_from_official(what: str, norm_cfg) -> tuple[str | None, int]:
  """mmcv ``norm_cfg`` -> (our norm name, GN groups)."""
  if not norm_cfg:
    return None, 32
  kind = norm_cfg.get("type")
  if kind in ("BN", "SyncBN", "BN2d"):
    return "bn", 32
  if kind == "GN":
    return "gn", int(norm_cfg["num_groups"])
  raise ValueError(f"{what} norm_cfg {dict(norm_cfg)} is not supported (BN, SyncBN, GN)")


def _act_from_official(what: str, act_cfg) -> str | None:
  if not act_cfg:
    return None
  kind = str(act_cfg.get("type", "")).lower()
  if kind not in ("relu", "gelu", "relu6", "silu", "sigmoid"):
    raise ValueError(f"{what} act_cfg {dict(act_cfg)} is not supported")
  return kind


def fpn_from_official(cfg: Mapping[str, Any], num_classes=None) -> FPN:
  """Builds :class:`FPN` from an mmseg ``FPN`` config (``num_classes`` unused)."""
  del num_classes
  if cfg.get("type", "FPN") != "FPN":
    raise ValueError(f"Not an FPN config: type {cfg.get('type')!r}")
  _check_keys("FPN", cfg, (
      "type", "in_channels", "out_channels", "num_outs", "start_level", "end_level",
      "add_extra_convs", "extra_convs_on_inputs", "relu_before_extra_convs",
      "no_norm_on_lateral", "conv_cfg", "norm_cfg", "act_cfg", "upsample_cfg", "init_cfg"))
  if cfg.get("conv_cfg"):
    raise ValueError(f"FPN conv_cfg {cfg['conv_cfg']} is not supported (plain Conv2d only)")
  upsample = dict(cfg.get("upsample_cfg") or {"mode": "nearest"})
  if "scale_factor" in upsample:
    raise ValueError("FPN upsample_cfg scale_factor is not supported (size-matched resize only)")
  if upsample.get("align_corners"):
    raise ValueError("FPN upsample_cfg align_corners=True is not supported")
  mode = upsample.get("mode", "nearest")
  if mode not in ("nearest", "bilinear"):
    raise ValueError(f"FPN upsample_cfg mode {mode!r} is not supported (nearest, bilinear)")
  extra = cfg.get("add_extra_convs", False)
  if extra is True:   # mmseg: True means 'on_input' or 'on_output' by the old flag
    extra = "on_input" if cfg.get("extra_convs_on_inputs", False) else "on_output"
  norm, groups = _norm_from_official("FPN", cfg.get("norm_cfg"))
  return FPN(out_channels=int(cfg["out_channels"]), num_outs=int(cfg["num_outs"]),
             start_level=int(cfg.get("start_level", 0)), end_level=int(cfg.get("end_level", -1)),
             add_extra_convs=extra or False,
             relu_before_extra_convs=bool(cfg.get("relu_before_extra_convs", False)),
             no_norm_on_lateral=bool(cfg.get("no_norm_on_lateral", False)),
             norm=norm, num_groups=groups, act=_act_from_official("FPN", cfg.get("act_cfg")),
             upsample_mode=mode, in_channels=tuple(cfg["in_channels"]))


# BaseDecodeHead options that only concern training (losses, sampling) or weight
# loading, not the forward.
_HEAD_TRAINING_OPTIONS = ("loss_decode", "ignore_index", "sampler", "init_cfg", "threshold")


def fpn_head_from_official(cfg: Mapping[str, Any], num_classes) -> FPNHead:
  """Builds :class:`FPNHead` from an mmseg ``FPNHead`` config.

  ``num_classes`` (when given) replaces the config's; input widths are inferred
  from the features at call time.
  """
  if cfg.get("type", "FPNHead") != "FPNHead":
    raise ValueError(f"Not an FPNHead config: type {cfg.get('type')!r}")
  _check_keys("FPNHead", cfg, ("type", "in_channels", "in_index", "feature_strides",
                               "channels", "dropout_ratio", "num_classes", "out_channels",
                               "conv_cfg", "norm_cfg", "act_cfg", "align_corners",
                               "input_transform") + _HEAD_TRAINING_OPTIONS)
  if cfg.get("align_corners", False):
    raise ValueError("FPNHead align_corners=True is not supported")
  if cfg.get("conv_cfg"):
    raise ValueError(f"FPNHead conv_cfg {cfg['conv_cfg']} is not supported")
  if cfg.get("input_transform", "multiple_select") != "multiple_select":
    raise ValueError(f"FPNHead input_transform {cfg['input_transform']!r} is not supported "
                     "(multiple_select only)")
  num_classes = int(num_classes if num_classes is not None else cfg["num_classes"])
  if cfg.get("out_channels", num_classes) != num_classes:
    raise ValueError("FPNHead out_channels != num_classes (sigmoid heads) is not supported")
  loss = cfg.get("loss_decode") or {}
  if isinstance(loss, Mapping) and loss.get("use_sigmoid"):
    raise ValueError("FPNHead loss_decode use_sigmoid=True is not supported")
  in_index = cfg.get("in_index", (0, 1, 2, 3))
  in_index = tuple(in_index) if isinstance(in_index, (list, tuple)) else (int(in_index),)
  strides = tuple(cfg["feature_strides"])
  if "in_channels" in cfg and len(cfg["in_channels"]) != len(in_index):
    raise ValueError("FPNHead in_channels and in_index must have the same length")
  norm, groups = _norm_from_official("FPNHead", cfg.get("norm_cfg"))
  return FPNHead(num_classes=num_classes, channels=int(cfg["channels"]),
                 feature_strides=strides, in_index=in_index,
                 dropout_ratio=float(cfg.get("dropout_ratio", 0.1)), norm=norm,
                 num_groups=groups,
                 act=_act_from_official("FPNHead", cfg.get("act_cfg", {"type": "ReLU"})))


def semantic_fpn_from_official(cfg: Mapping[str, Any], num_classes) -> SemanticFPN:
  """Builds :class:`SemanticFPN` from ``{'neck': FPN config, 'decode_head': FPNHead config}``.

  Also accepts a whole ``EncoderDecoder`` config (its backbone is ignored). The
  head's declared ``in_channels`` must be the neck's ``out_channels``.
  """
  if "neck" not in cfg or "decode_head" not in cfg:
    raise ValueError("a Semantic-FPN config needs 'neck' and 'decode_head' entries")
  neck = fpn_from_official(cfg["neck"])
  head = fpn_head_from_official(cfg["decode_head"], num_classes)
  declared = cfg["decode_head"].get("in_channels")
  if declared is not None and any(c != neck.out_channels for c in declared):
    raise ValueError(f"FPNHead in_channels {list(declared)} do not match the FPN "
                     f"out_channels {neck.out_channels}")
  return SemanticFPN(neck=neck, decode_head=head)


# ----------------------------------------------------------------------------
# Registration
# ----------------------------------------------------------------------------

@NECKS.register("fpn", from_official=fpn_from_official)
def build_fpn(**fields) -> FPN:
  """mmseg FPN with ``fields`` overriding its defaults (out_channels 256, nearest)."""
  return FPN(**as_field(fields))


register_head("fpn_head", FPNHead, from_official=fpn_head_from_official,
              doc="mmseg FPNHead (Semantic FPN) with ``fields`` overriding its defaults "
                  "(channels 128).")


@HEADS.register("fpn_fpnhead", from_official=semantic_fpn_from_official)
def build_semantic_fpn(num_classes: int, *, neck: Mapping[str, Any] | None = None,
                       decode_head: Mapping[str, Any] | None = None,
                       dtype: Any = jnp.float32, **fields) -> SemanticFPN:
  """FPN neck + FPNHead as one head (VAN-Segmentation's Semantic-FPN defaults).

  ``neck`` / ``decode_head`` give the fields of each part; any other field goes to
  the one part that has it (``out_channels`` -> neck, ``channels`` /
  ``classifier`` -> head); names both parts have (``norm``, ``act``...) must be
  given through ``neck`` or ``decode_head``. ``dtype`` goes to both.
  """
  neck_kw = as_field(dict(neck or {}))
  head_kw = as_field(dict(decode_head or {}))
  neck_names, head_names = module_fields(FPN), module_fields(FPNHead) - {"num_classes"}
  for key, value in as_field(fields).items():
    if key in neck_names and key in head_names:
      raise TypeError(f"fpn_fpnhead field {key!r} belongs to both parts; pass it in "
                      "neck={...} or decode_head={...}")
    if key in neck_names:
      neck_kw[key] = value
    elif key in head_names:
      head_kw[key] = value
    else:
      raise TypeError(f"Unknown fpn_fpnhead field {key!r}; neck fields: {sorted(neck_names)}, "
                      f"head fields: {sorted(head_names)}")
  return SemanticFPN(neck=FPN(dtype=dtype, **neck_kw),
                     decode_head=FPNHead(num_classes=num_classes, dtype=dtype, **head_kw))
