"""Building blocks with PyTorch semantics, in NHWC.

Every layer here is written so that an official PyTorch checkpoint converts by
name alone (see ``offseg_jax.conversion.core``): a flax submodule is named like
the torch submodule it mirrors (``'conv'``, ``'bn'``, ``'gn'``, ``'q.0'``...), a
Conv's ``kernel`` is the torch ``weight`` transposed OIHW -> HWIO, a norm's
``scale`` is the torch ``weight``, BatchNorm ``mean``/``var`` are the running stats.

Torch semantics that matter and are reproduced here:
  * convolutions pad symmetrically (explicit padding, never 'SAME');
  * norm epsilons are 1e-5 unless a model says otherwise (flax defaults to 1e-6);
  * BatchNorm momentum 0.1 in torch is flax momentum 0.9;
  * GELU is the exact erf form;
  * bilinear resize is ``align_corners=False`` without antialiasing, nearest
    resize reads ``floor(dst * in / out)``.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Dtype = Any


def _pair(v) -> tuple[int, int]:
  if isinstance(v, (tuple, list)):
    assert len(v) == 2, v
    return int(v[0]), int(v[1])
  return int(v), int(v)


def gelu(x):
  """Exact (erf) GELU, as torch.nn.GELU() computes it."""
  return nn.gelu(x, approximate=False)


def activation(name: str | None):
  """Returns the activation function called ``name`` (torch naming)."""
  if name is None or name == "none":
    return lambda x: x
  table = {"relu": nn.relu, "gelu": gelu, "sigmoid": nn.sigmoid,
           "relu6": nn.relu6, "silu": nn.silu, "hswish": nn.hard_swish}
  key = name.lower()
  if key not in table:
    raise ValueError(f"Unknown activation {name!r}; known: {sorted(table)}")
  return table[key]


class Conv2d(nn.Module):
  """torch.nn.Conv2d in NHWC with explicit symmetric padding.

  ``padding`` is an int/pair of symmetric paddings (torch convention) or an
  explicit ((top, bottom), (left, right)).
  """
  features: int
  kernel_size: Any = 1
  stride: Any = 1
  padding: Any = 0
  dilation: Any = 1
  groups: int = 1
  use_bias: bool = True
  dtype: Dtype = jnp.float32
  kernel_init: Any = nn.initializers.lecun_normal()
  bias_init: Any = nn.initializers.zeros

  @nn.compact
  def __call__(self, x):
    if isinstance(self.padding, (tuple, list)) and isinstance(self.padding[0], (tuple, list)):
      pad = tuple(tuple(int(p) for p in pp) for pp in self.padding)
    else:
      ph, pw = _pair(self.padding)
      pad = ((ph, ph), (pw, pw))
    kh, kw = _pair(self.kernel_size)
    in_features = x.shape[-1]
    if in_features % self.groups:
      raise ValueError(f"{self.name}: {in_features} input channels not divisible "
                       f"by groups={self.groups}")
    kernel = self.param("kernel", self.kernel_init,
                        (kh, kw, in_features // self.groups, self.features), jnp.float32)
    if self.groups == in_features == self.features and self.groups > 1 and _depthwise_as_shifts():
      y = depthwise_shift_add(x.astype(self.dtype), kernel.astype(self.dtype),
                              _pair(self.stride), pad, _pair(self.dilation))
    else:
      y = jax.lax.conv_general_dilated(
          x.astype(self.dtype), kernel.astype(self.dtype),
          window_strides=_pair(self.stride), padding=pad,
          rhs_dilation=_pair(self.dilation),
          dimension_numbers=("NHWC", "HWIO", "NHWC"),
          feature_group_count=self.groups)
    if self.use_bias:
      bias = self.param("bias", self.bias_init, (self.features,), jnp.float32)
      y = y + bias.astype(self.dtype)
    return y


@contextlib.contextmanager
def depthwise_impl(impl: str):
  """Traces depthwise convolutions as ``'conv'`` or ``'shift'`` inside the block.

  E.g. FLOP counters that look for convolutions in the program use 'conv'.
  """
  previous = os.environ.get("OFFSEG_DEPTHWISE")
  os.environ["OFFSEG_DEPTHWISE"] = impl
  try:
    yield
  finally:
    if previous is None:
      del os.environ["OFFSEG_DEPTHWISE"]
    else:
      os.environ["OFFSEG_DEPTHWISE"] = previous


def _depthwise_as_shifts() -> bool:
  """Whether depthwise convolutions run as k*k shifted multiply-adds.

  XLA's CPU backend runs grouped convolutions (and their gradients) 2-15x slower
  than the same arithmetic written as shifted slices; GPUs and TPUs have fast
  native depthwise kernels. ``OFFSEG_DEPTHWISE=conv|shift`` (or
  :func:`depthwise_impl`) forces either path.
  """
  choice = os.environ.get("OFFSEG_DEPTHWISE", "auto")
  if choice == "auto":
    return jax.default_backend() == "cpu"
  if choice not in ("conv", "shift"):
    raise ValueError(f"OFFSEG_DEPTHWISE must be auto, conv or shift, not {choice!r}")
  return choice == "shift"


def depthwise_shift_add(x, kernel, stride=(1, 1), padding=((0, 0), (0, 0)), dilation=(1, 1)):
  """Depthwise conv (HWIO kernel with I=1) as a sum of k*k shifted, strided slices.

  Same result as ``conv_general_dilated(..., feature_group_count=C)`` up to the
  order of the float additions.
  """
  kh, kw = kernel.shape[:2]
  (pt, pb), (pl, pr) = padding
  sh, sw = stride
  dh, dw = dilation
  x = jnp.pad(x, ((0, 0), (pt, pb), (pl, pr), (0, 0)))
  hp, wp = x.shape[1], x.shape[2]
  ho = (hp - dh * (kh - 1) - 1) // sh + 1
  wo = (wp - dw * (kw - 1) - 1) // sw + 1
  out = None
  for i in range(kh):
    for j in range(kw):
      tap = jax.lax.slice(x, (0, i * dh, j * dw, 0),
                          (x.shape[0], i * dh + (ho - 1) * sh + 1, j * dw + (wo - 1) * sw + 1,
                           x.shape[3]), (1, sh, sw, 1))
      term = tap * kernel[i, j, 0]
      out = term if out is None else out + term
  return out


class Linear(nn.Module):
  """torch.nn.Linear on the last axis (kernel stored (in, out))."""
  features: int
  use_bias: bool = True
  dtype: Dtype = jnp.float32
  kernel_init: Any = nn.initializers.lecun_normal()

  @nn.compact
  def __call__(self, x):
    kernel = self.param("kernel", self.kernel_init, (x.shape[-1], self.features), jnp.float32)
    y = jnp.matmul(x.astype(self.dtype), kernel.astype(self.dtype))
    if self.use_bias:
      bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
      y = y + bias.astype(self.dtype)
    return y


def _low_precision(x) -> bool:
  """Whether ``x`` is a reduced-precision activation (bf16/f16 compute)."""
  return jnp.issubdtype(x.dtype, jnp.floating) and jnp.dtype(x.dtype).itemsize < 4


def centred_moments(x, axes, keepdims: bool = False):
  """``(mean, var, centred)`` of a low-precision ``x`` over ``axes``.

  The sums accumulate in float32 (``mean``/``var`` are float32, ``var`` the
  biased two-pass variance), but the centred values ``x - mean`` stay in
  ``x``'s dtype: normalising a float32 copy instead would keep that copy alive
  for the backward pass, which made a bf16 conv-BN stack use 43 % *more*
  temporaries than float32 (measured on XLA CPU); this form uses none extra.
  Centring before scaling also avoids the cancellation of ``x * inv - mean * inv``
  in bf16. float32 inputs never come here (their two-pass float32 form is the
  one the parity fixtures check).
  """
  mean = jnp.mean(x, axis=axes, keepdims=True, dtype=jnp.float32)
  centred = x - mean.astype(x.dtype)
  var = jnp.mean(jnp.square(centred), axis=axes, keepdims=True, dtype=jnp.float32)
  if not keepdims:
    mean, var = jnp.squeeze(mean, axes), jnp.squeeze(var, axes)
  return mean, var, centred


_BATCH_STAT_GROUPS = contextvars.ContextVar("offseg_batch_stat_groups", default=1)


@contextlib.contextmanager
def batch_stat_groups(groups: int):
  """BatchNorm statistics per group of consecutive examples inside the block.

  With ``groups`` = the number of devices the batch is split over (in device
  order), each device normalises with its own examples' statistics, as torch
  BatchNorm2d does under DistributedDataParallel without SyncBN; no statistics
  cross devices. ``groups=1`` (the default) is SyncBN: the global batch.
  """
  token = _BATCH_STAT_GROUPS.set(int(groups))
  try:
    yield
  finally:
    _BATCH_STAT_GROUPS.reset(token)


class BatchNorm(nn.Module):
  """torch BatchNorm2d/SyncBatchNorm: eps 1e-5, momentum 0.1 (flax 0.9).

  Under ``jax.jit`` with a batch sharded over a mesh, the statistics cover the
  global batch, i.e. this behaves as SyncBN. Training updates running stats with
  the unbiased batch variance, as torch does. Statistics are float32; bf16
  inputs are normalised without a float32 copy (:func:`centred_moments`).
  Inside :func:`batch_stat_groups` the statistics are per group of examples
  (per device), and the running statistics move by their mean over groups.
  """
  epsilon: float = 1e-5
  momentum: float = 0.1          # torch convention
  dtype: Dtype = jnp.float32
  scale_init: Any = nn.initializers.ones   # zeros: a residual branch starting at 0

  @nn.compact
  def __call__(self, x, train: bool = False):
    feat = x.shape[-1]
    scale = self.param("scale", self.scale_init, (feat,), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (feat,), jnp.float32)
    ra_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((feat,), jnp.float32))
    ra_var = self.variable("batch_stats", "var", lambda: jnp.ones((feat,), jnp.float32))
    centred = None
    groups = _BATCH_STAT_GROUPS.get()
    if train and groups > 1 and not self.is_initializing():
      return self._per_group(x, groups, scale, bias, ra_mean, ra_var)
    if train:
      axes = tuple(range(x.ndim - 1))
      if _low_precision(x):
        mean, var, centred = centred_moments(x, axes)
      else:
        xf = x.astype(jnp.float32)
        mean = jnp.mean(xf, axis=axes)
        var = jnp.mean(jnp.square(xf - mean), axis=axes)
      if not self.is_initializing():
        n = int(np.prod([x.shape[a] for a in axes]))
        unbiased = var * (n / max(n - 1, 1))
        ra_mean.value = (1 - self.momentum) * ra_mean.value + self.momentum * mean
        ra_var.value = (1 - self.momentum) * ra_var.value + self.momentum * unbiased
    else:
      mean, var = ra_mean.value, ra_var.value
    inv = jax.lax.rsqrt(var + self.epsilon) * scale
    if centred is not None:
      return (centred * inv.astype(x.dtype) + bias.astype(x.dtype)).astype(self.dtype)
    return (x * inv.astype(x.dtype) + (bias - mean * inv).astype(x.dtype)).astype(self.dtype)

  def _per_group(self, x, groups, scale, bias, ra_mean, ra_var):
    """Training-mode normalisation with statistics per group of examples."""
    if x.shape[0] % groups:
      raise ValueError(f"{self.name}: batch of {x.shape[0]} does not split into "
                       f"{groups} BatchNorm statistics groups")
    xg = x.astype(jnp.float32).reshape((groups, x.shape[0] // groups) + x.shape[1:])
    axes = tuple(range(1, xg.ndim - 1))
    mean = jnp.mean(xg, axis=axes, keepdims=True)
    var = jnp.mean(jnp.square(xg - mean), axis=axes, keepdims=True)
    n = int(np.prod([xg.shape[a] for a in axes]))
    unbiased = var * (n / max(n - 1, 1))
    flat = lambda v: v.reshape(groups, -1).mean(axis=0)
    ra_mean.value = (1 - self.momentum) * ra_mean.value + self.momentum * flat(mean)
    ra_var.value = (1 - self.momentum) * ra_var.value + self.momentum * flat(unbiased)
    y = (xg - mean) * jax.lax.rsqrt(var + self.epsilon) * scale + bias
    return y.reshape(x.shape).astype(self.dtype)


class GroupNorm(nn.Module):
  """torch.nn.GroupNorm on NHWC (channels grouped contiguously), eps 1e-5.

  float32 statistics; bf16 inputs as in :class:`LayerNorm`.
  """
  num_groups: int
  epsilon: float = 1e-5
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    c = x.shape[-1]
    if c % self.num_groups:
      raise ValueError(f"{self.name}: {c} channels not divisible into {self.num_groups} groups")
    scale = self.param("scale", nn.initializers.ones, (c,), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
    axes = tuple(range(1, x.ndim - 1)) + (x.ndim,)
    if _low_precision(x):
      g = x.reshape(x.shape[:-1] + (self.num_groups, c // self.num_groups))
      _, var, centred = centred_moments(g, axes, keepdims=True)
      g = centred * jax.lax.rsqrt(var + self.epsilon).astype(x.dtype)
      return (g.reshape(x.shape) * scale.astype(x.dtype) + bias.astype(x.dtype)).astype(self.dtype)
    xf = x.astype(jnp.float32)
    g = xf.reshape(x.shape[:-1] + (self.num_groups, c // self.num_groups))
    mean = jnp.mean(g, axis=axes, keepdims=True)
    var = jnp.mean(jnp.square(g - mean), axis=axes, keepdims=True)
    g = (g - mean) * jax.lax.rsqrt(var + self.epsilon)
    return (g.reshape(x.shape) * scale + bias).astype(self.dtype)


class LayerNorm(nn.Module):
  """torch.nn.LayerNorm over the last axis; eps given explicitly (torch 1e-5).

  float32 statistics; bf16 inputs are normalised in bf16 without a float32
  copy (:func:`centred_moments`).
  """
  epsilon: float = 1e-5
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    c = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (c,), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
    if _low_precision(x):
      _, var, centred = centred_moments(x, -1, keepdims=True)
      y = (centred * jax.lax.rsqrt(var + self.epsilon).astype(x.dtype) * scale.astype(x.dtype)
           + bias.astype(x.dtype))
      return y.astype(self.dtype)
    xf = x.astype(jnp.float32)
    mean = jnp.mean(xf, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True)
    return ((xf - mean) * jax.lax.rsqrt(var + self.epsilon) * scale + bias).astype(self.dtype)


class ConvModule(nn.Module):
  """mmcv ConvModule: conv -> norm -> activation, torch names ``conv``/``bn``/``gn``.

  ``use_bias='auto'`` follows mmcv: a bias only when there is no norm.
  """
  features: int
  kernel_size: Any = 1
  stride: Any = 1
  padding: Any = 0
  dilation: Any = 1
  groups: int = 1
  norm: str | None = None          # 'bn' | 'gn' | None
  num_groups: int = 32
  act: str | None = "relu"
  use_bias: Any = "auto"
  dtype: Dtype = jnp.float32
  kernel_init: Any = nn.initializers.variance_scaling(2.0, "fan_out", "normal")

  @nn.compact
  def __call__(self, x, train: bool = False):
    bias = (self.norm is None) if self.use_bias == "auto" else bool(self.use_bias)
    x = Conv2d(self.features, self.kernel_size, self.stride, self.padding,
               self.dilation, self.groups, use_bias=bias, dtype=self.dtype,
               kernel_init=self.kernel_init, name="conv")(x)
    if self.norm == "bn":
      x = BatchNorm(dtype=self.dtype, name="bn")(x, train)
    elif self.norm == "gn":
      x = GroupNorm(self.num_groups, dtype=self.dtype, name="gn")(x)
    elif self.norm is not None:
      raise ValueError(f"Unknown norm {self.norm!r}")
    return activation(self.act)(x)


class DropPath(nn.Module):
  """Stochastic depth per sample (timm semantics); identity at eval or rate 0."""
  rate: float = 0.0

  @nn.compact
  def __call__(self, x, train: bool = False):
    if not train or self.rate == 0.0:
      return x
    keep = 1.0 - self.rate
    rng = self.make_rng("dropout")
    mask = jax.random.bernoulli(rng, keep, (x.shape[0],) + (1,) * (x.ndim - 1))
    return jnp.where(mask, x / keep, jnp.zeros_like(x))


# ----------------------------------------------------------------------------
# Resizing with torch semantics.
# ----------------------------------------------------------------------------

def _linear_taps(n_in: int, n_out: int):
  """Source indices/weights of torch bilinear, align_corners=False, per axis."""
  scale = n_in / n_out
  dst = np.arange(n_out, dtype=np.float64)
  src = np.maximum((dst + 0.5) * scale - 0.5, 0.0)
  i0 = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
  i1 = np.minimum(i0 + 1, n_in - 1)
  w1 = (src - i0).astype(np.float32)
  return i0, i1, w1


def resize_bilinear(x, size: Sequence[int]):
  """torch ``F.interpolate(mode='bilinear', align_corners=False)`` on NHWC ``x``.

  Exact for up- and down-sampling (no antialiasing), separable gathers with
  shapes known at trace time.
  """
  h_out, w_out = int(size[0]), int(size[1])
  h_in, w_in = x.shape[1], x.shape[2]
  if (h_in, w_in) == (h_out, w_out):
    return x
  dtype = x.dtype
  if h_in != h_out:
    i0, i1, w = _linear_taps(h_in, h_out)
    w = jnp.asarray(w, dtype)[None, :, None, None]
    x = jnp.take(x, i0, axis=1) * (1 - w) + jnp.take(x, i1, axis=1) * w
  if w_in != w_out:
    i0, i1, w = _linear_taps(w_in, w_out)
    w = jnp.asarray(w, dtype)[None, None, :, None]
    x = jnp.take(x, i0, axis=2) * (1 - w) + jnp.take(x, i1, axis=2) * w
  return x


def nearest_indices(n_in: int, n_out: int) -> np.ndarray:
  """torch ``mode='nearest'`` source indices: floor(dst * in / out), clamped."""
  scale = n_in / n_out
  return np.minimum(np.floor(np.arange(n_out) * scale).astype(np.int64), n_in - 1)


def resize_nearest(x, size: Sequence[int]):
  """torch ``F.interpolate(mode='nearest')`` on NHWC ``x`` (any integer dtype too)."""
  h_out, w_out = int(size[0]), int(size[1])
  if x.shape[1] != h_out:
    x = jnp.take(x, nearest_indices(x.shape[1], h_out), axis=1)
  if x.shape[2] != w_out:
    x = jnp.take(x, nearest_indices(x.shape[2], w_out), axis=2)
  return x
