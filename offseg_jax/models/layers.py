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
import dataclasses
import functools
from typing import Any, ClassVar, Sequence

from einops import rearrange
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
  """Exact (erf) GELU, as torch.nn.GELU() computes it.

  On CPU (:func:`cpu_forms`) with a hand-written gradient, ``Phi(x) + x phi(x)``
  from the saved input: jax's derivative of ``x * erfc(-x / sqrt 2) / 2``
  keeps more intermediates, and XLA recomputes the depthwise conv before it
  in each of its consumers (SegNeXt-T-OL's train step 5-8 % faster,
  docs/performance.md).
  """
  if cpu_forms():
    return _gelu_saving_input(x)
  return nn.gelu(x, approximate=False)


@jax.custom_vjp
def _gelu_saving_input(x):
  return nn.gelu(x, approximate=False)


def _gelu_saving_input_fwd(x):
  return nn.gelu(x, approximate=False), x


def _gelu_saving_input_bwd(x, g):
  cdf = 0.5 * (1.0 + jax.lax.erf(x * np.float32(1 / np.sqrt(2))).astype(x.dtype))
  pdf = jnp.exp(-0.5 * x * x) * np.asarray(1 / np.sqrt(2 * np.pi), x.dtype)
  return (g * (cdf + x * pdf),)


_gelu_saving_input.defvjp(_gelu_saving_input_fwd, _gelu_saving_input_bwd)


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


def field_values(module: nn.Module, cls) -> dict[str, Any]:
  """``module``'s values of the constructor fields of ``cls`` (a base of its class).

  For a module that passes a base's fields on to the submodule they configure.
  """
  return {f.name: getattr(module, f.name) for f in dataclasses.fields(cls)
          if f.name not in ("parent", "name")}


class ConvGeometry(nn.Module):
  """torch Conv2d's leading arguments, in its order: the fields every conv layer shares.

  ``padding`` is an int/pair of symmetric paddings (torch convention) or an
  explicit ((top, bottom), (left, right)).
  """
  features: int
  kernel_size: Any = 1
  stride: Any = 1
  padding: Any = 0
  dilation: Any = 1
  groups: int = 1


class Conv2d(ConvGeometry):
  """torch.nn.Conv2d in NHWC with explicit symmetric padding (see :class:`ConvGeometry`)."""
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
    elif (kh, kw) == (1, 1) and self.groups == 1 and _pointwise_as_matmul():
      y = pointwise_matmul(x.astype(self.dtype), kernel.astype(self.dtype),
                           _pair(self.stride), pad)
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


def torch_fan_out_normal(groups: int = 1):
  """mmseg's conv init: N(0, 2 / fan_out), fan_out = kh * kw * out / groups.

  Flax's ``variance_scaling`` cannot see the group count, which matters for
  depthwise convolutions, hence this closure.
  """

  def init(key, shape, dtype=jnp.float32):
    kh, kw, _, out = shape
    std = np.sqrt(2.0 / (kh * kw * out // groups))
    return std * jax.random.normal(key, shape, dtype)

  return init


def fan_out_conv(features, kernel, padding=0, stride=1, dilation=1, groups=1,
                 dtype=jnp.float32, name=None) -> Conv2d:
  """A :class:`Conv2d` with :func:`torch_fan_out_normal` init (MiT's, VAN's, MSCAN's convs).

  Depthwise convs (``groups == channels``) take ``Conv2d``'s depthwise path,
  which runs as shifted multiply-adds on CPU.
  """
  return Conv2d(features, kernel, stride, padding, dilation, groups, dtype=dtype,
                kernel_init=torch_fan_out_normal(groups), name=name)


# How depthwise (and 1x1) convolutions are traced: see :func:`depthwise_impl`.
CONV_IMPLS = ("auto", "conv", "shift")
_CONV_IMPL = contextvars.ContextVar("offseg_conv_impl", default="auto")


def check_conv_impl(impl: str) -> str:
  """``impl`` if it is one of :data:`CONV_IMPLS`, else a ``ValueError`` naming them."""
  if impl not in CONV_IMPLS:
    raise ValueError(f"conv_impl must be one of {CONV_IMPLS}, not {impl!r}")
  return impl


@contextlib.contextmanager
def depthwise_impl(impl: str):
  """Traces depthwise convolutions as ``'conv'`` or ``'shift'`` inside the block.

  'shift' also traces 1x1 convolutions as matmuls (:func:`pointwise_matmul`),
  'conv' keeps every convolution a ``conv_general_dilated``: FLOP counters that
  look for convolutions in the program use 'conv'. 'auto' (the default outside
  any block) picks 'shift' on the CPU backend and 'conv' elsewhere. The choice
  is a context variable read while a model traces; a model's own
  ``EncoderDecoder.conv_impl`` (``config.model.conv_impl``), when not 'auto',
  takes precedence inside its forward.
  """
  token = _CONV_IMPL.set(check_conv_impl(impl))
  try:
    yield
  finally:
    _CONV_IMPL.reset(token)


_REFERENCE_FORMS = contextvars.ContextVar("offseg_reference_forms", default=False)


@contextlib.contextmanager
def reference_forms(enabled: bool = True):
  """Traces the reference formulations of the CPU-tuned layers inside the block.

  Bilinear resizes as gathers (:func:`resize_bilinear_gather`), non-overlapping
  max pools as ``nn.max_pool`` with jax's own gradient, 1x1 convolutions as
  ``conv_general_dilated``, FreqFusion's CARAFE with the loop's own gradient,
  depthwise convolutions' shifted slices and GELU with jax's own gradients:
  the program before the rewrites of docs/performance.md, for A/B timing
  (``tools.profile --ab``) and tests. Same results up to float rounding.
  (Whether depthwise convolutions are shifted slices at all is their own
  switch, :func:`depthwise_impl`.)
  """
  token = _REFERENCE_FORMS.set(bool(enabled))
  try:
    yield
  finally:
    _REFERENCE_FORMS.reset(token)


def _depthwise_as_shifts() -> bool:
  """Whether depthwise convolutions run as k*k shifted multiply-adds.

  XLA's CPU backend runs grouped convolutions (and their gradients) 2-15x slower
  than the same arithmetic written as shifted slices; GPUs and TPUs have fast
  native depthwise kernels. :func:`depthwise_impl` (or a model's ``conv_impl``)
  forces either path; 'auto' follows the backend.
  """
  choice = _CONV_IMPL.get()
  if choice == "auto":
    return jax.default_backend() == "cpu"
  return choice == "shift"


def _pointwise_as_matmul() -> bool:
  """Whether 1x1 convolutions run as matrix products (:func:`pointwise_matmul`).

  XLA's CPU backend runs a 1x1 convolution's gradients 3-6x slower than the
  same products as a matmul (kernel gradient of SegFormer's 1024 -> 256
  ``fusion_conv`` at 128x128: 9.2 s vs 1.5 s per forward+backward, measured on
  2 cores), and its forward up to 2x slower. GPUs and TPUs rewrite 1x1
  convolutions as matmuls themselves. Follows :func:`depthwise_impl`: 'conv'
  keeps every convolution a convolution (what the FLOP counters of
  ``tools.complexity`` look for), 'shift' forces the CPU forms, 'auto' uses
  them on CPU only.
  """
  return cpu_forms()


def cpu_forms() -> bool:
  """Whether models trace their CPU-tuned formulations (same results up to rounding).

  True on CPU unless the convolution choice is 'conv' (:func:`depthwise_impl`
  or a model's ``conv_impl``: the program an accelerator runs and FLOP counters
  read) or inside :func:`reference_forms`. Used for 1x1 convolutions as
  matmuls, the hand-written gradients of unit-stride depthwise convolutions
  and GELU, and FreqFusion's CARAFE gradient as batched matmuls
  (docs/performance.md).
  """
  return not _REFERENCE_FORMS.get() and _depthwise_as_shifts()


def pointwise_matmul(x, kernel, stride=(1, 1), padding=((0, 0), (0, 0))):
  """A 1x1 convolution (HWIO kernel (1, 1, C, D)) as one (B*H*W, C) x (C, D) matmul.

  Same result as ``conv_general_dilated`` up to the order of the float additions.
  """
  if any(p for pair in padding for p in pair):
    x = jnp.pad(x, ((0, 0),) + tuple(tuple(p) for p in padding) + ((0, 0),))
  if tuple(stride) != (1, 1):
    x = x[:, ::stride[0], ::stride[1]]
  b, h = x.shape[:2]
  y = jnp.matmul(rearrange(x, "b h w c -> (b h w) c"), rearrange(kernel, "1 1 c d -> c d"))
  return rearrange(y, "(b h w) d -> b h w d", b=b, h=h)


def depthwise_shift_add(x, kernel, stride=(1, 1), padding=((0, 0), (0, 0)), dilation=(1, 1)):
  """Depthwise conv (HWIO kernel with I=1) as a sum of k*k shifted, strided slices.

  Same result as ``conv_general_dilated(..., feature_group_count=C)`` up to the
  order of the float additions. Unit-stride, undilated convs (all but a few
  downsampling ones) take a hand-written gradient on CPU
  (:func:`_depthwise_unit_stride`); inside :func:`reference_forms`, and for
  the rest, jax differentiates the shifted slices.
  """
  kh, kw = kernel.shape[:2]
  (pt, pb), (pl, pr) = padding
  if (cpu_forms() and tuple(stride) == (1, 1) and tuple(dilation) == (1, 1)
      and max(pt, pb) < kh and max(pl, pr) < kw):
    return _depthwise_unit_stride(x, kernel, ((pt, pb), (pl, pr)))
  return _shifted_taps(x, kernel, stride, padding, dilation)


def _shifted_taps(x, kernel, stride=(1, 1), padding=((0, 0), (0, 0)), dilation=(1, 1)):
  """The forward of :func:`depthwise_shift_add`: the k*k taps summed in order."""
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


# Rows of (batch, width, channels) per step of the kernel-gradient loop: about
# 512 KiB of output gradient (and as much input), so that every tap re-reads
# them from cache rather than from memory (256 KiB to 1 MiB measured within
# 10 % of each other on SegNeXt-T's shapes, 2 MiB 1.5-2.5x slower).
_KERNEL_GRAD_CHUNK_BYTES = 1 << 19


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _depthwise_unit_stride(x, kernel, padding):
  """A unit-stride depthwise conv as shifted taps, with a hand-written gradient.

  jax's own gradient of the shifted slices keeps every tap of the input alive
  for the kernel gradient (XLA writes each one out in the forward) and reduces
  each tap over the whole batch in its own pass from memory: 8-25 passes over
  two activations per conv, the largest cost of SegNeXt's training step on CPU
  (docs/performance.md). Here the input gradient is the same shift-and-add on
  the output gradient with the flipped kernel, and the kernel gradient loops
  over chunks of rows small enough to stay in cache, summing all taps of a
  chunk while it is there.
  """
  return _shifted_taps(x, kernel, padding=padding)


def _depthwise_unit_stride_fwd(x, kernel, padding):
  return _shifted_taps(x, kernel, padding=padding), (x, kernel)


def _depthwise_unit_stride_bwd(padding, residuals, g):
  x, kernel = residuals
  kh, kw = kernel.shape[:2]
  (pt, pb), (pl, pr) = padding
  # x[h] meets g[h + pt - i] through tap i: padding g by kh-1-pt on top turns
  # that into tap kh-1-i of a plain forward conv.
  grad_x = _shifted_taps(g, kernel[::-1, ::-1],
                         padding=((kh - 1 - pt, kh - 1 - pb), (kw - 1 - pl, kw - 1 - pr)))
  return grad_x.astype(x.dtype), _depthwise_kernel_grad(x, g, kernel, padding)


_depthwise_unit_stride.defvjp(_depthwise_unit_stride_fwd, _depthwise_unit_stride_bwd)


def _depthwise_kernel_grad(x, g, kernel, padding):
  """sum over (b, h, w) of padded-x[b, h+i, w+j, c] * g[b, h, w, c], for every tap (i, j).

  Loops over chunks of output rows (``lax.map``): each step slices the rows of
  padded x a chunk needs (with the kh-1 halo rows) and sums every tap over
  them. The batch axis is kept until the end so that a batch sharded over
  devices is reduced once, after the loop. Accumulates in float32.
  """
  kh, kw = kernel.shape[:2]
  (pt, pb), (pl, pr) = padding
  b, h, w, c = g.shape
  row_bytes = b * w * c * 4
  rows = int(max(1, min(h, _KERNEL_GRAD_CHUNK_BYTES // row_bytes)))
  chunks = -(-h // rows)
  extra = chunks * rows - h  # zero rows of g (and x) that round h up to whole chunks
  g = jnp.pad(g.astype(jnp.float32), ((0, 0), (0, extra), (0, 0), (0, 0)))
  xp = jnp.pad(x.astype(jnp.float32), ((0, 0), (pt, pb + extra), (pl, pr), (0, 0)))

  def chunk_taps(start):
    x_rows = jax.lax.dynamic_slice_in_dim(xp, start, rows + kh - 1, axis=1)
    g_rows = jax.lax.dynamic_slice_in_dim(g, start, rows, axis=1)
    return jnp.stack([jnp.sum(x_rows[:, i:i + rows, j:j + w] * g_rows, axis=(1, 2))
                      for i in range(kh) for j in range(kw)], axis=1)  # (b, taps, c)

  per_chunk = jax.lax.map(chunk_taps, jnp.arange(chunks) * rows)
  grad = jnp.sum(per_chunk, axis=(0, 1))
  return rearrange(grad, "(i j) c -> i j 1 c", i=kh).astype(kernel.dtype)


class Linear(nn.Dense):
  """torch.nn.Linear on the last axis: flax's ``Dense`` (kernel stored (in, out)).

  The compute dtype defaults to float32, as every layer here (``Dense`` infers
  it from the input and float32 parameters: float32 too). The subclass keeps
  the class name, hence auto-generated submodule names (``Linear_0``).
  """
  dtype: Dtype = jnp.float32


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
  Not ``nn.BatchNorm``: torch's unbiased running variance, per-device statistics groups.
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
    xg = rearrange(x.astype(jnp.float32), "(g b) ... -> g b ...", g=groups)
    axes = tuple(range(1, xg.ndim - 1))
    mean = jnp.mean(xg, axis=axes, keepdims=True)
    var = jnp.mean(jnp.square(xg - mean), axis=axes, keepdims=True)
    n = int(np.prod([xg.shape[a] for a in axes]))
    unbiased = var * (n / max(n - 1, 1))
    flat = lambda v: v.reshape(groups, -1).mean(axis=0)
    ra_mean.value = (1 - self.momentum) * ra_mean.value + self.momentum * flat(mean)
    ra_var.value = (1 - self.momentum) * ra_var.value + self.momentum * flat(unbiased)
    y = (xg - mean) * jax.lax.rsqrt(var + self.epsilon) * scale + bias
    return rearrange(y, "g b ... -> (g b) ...").astype(self.dtype)


class GroupNorm(nn.Module):
  """torch.nn.GroupNorm on NHWC (channels grouped contiguously), eps 1e-5.

  float32 statistics; bf16 inputs as in :class:`LayerNorm`.
  Not ``nn.GroupNorm``: flax normalises bf16 inputs as a float32 copy (x - float32 mean).
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
    split = lambda t: rearrange(t, "... (g c) -> ... g c", g=self.num_groups)
    merge = lambda t: rearrange(t, "... g c -> ... (g c)")
    if _low_precision(x):
      _, var, centred = centred_moments(split(x), axes, keepdims=True)
      g = centred * jax.lax.rsqrt(var + self.epsilon).astype(x.dtype)
      return (merge(g) * scale.astype(x.dtype) + bias.astype(x.dtype)).astype(self.dtype)
    g = split(x.astype(jnp.float32))
    mean = jnp.mean(g, axis=axes, keepdims=True)
    var = jnp.mean(jnp.square(g - mean), axis=axes, keepdims=True)
    g = (g - mean) * jax.lax.rsqrt(var + self.epsilon)
    return (merge(g) * scale + bias).astype(self.dtype)


class LayerNorm(nn.Module):
  """torch.nn.LayerNorm over the last axis; eps given explicitly (torch 1e-5).

  float32 statistics; bf16 inputs are normalised in bf16 without a float32
  copy (:func:`centred_moments`).
  Not ``nn.LayerNorm``: flax normalises bf16 inputs as a float32 copy (x - float32 mean).
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


class ConvModule(ConvGeometry):
  """mmcv ConvModule: conv -> norm -> activation, torch names ``conv``/``bn``/``gn``.

  ``use_bias='auto'`` follows mmcv: a bias only when there is no norm.
  """
  norm: str | None = None          # 'bn' | 'gn' | None
  num_groups: int = 32
  act: str | None = "relu"
  use_bias: Any = "auto"
  dtype: Dtype = jnp.float32
  kernel_init: Any = nn.initializers.variance_scaling(2.0, "fan_out", "normal")

  @nn.compact
  def __call__(self, x, train: bool = False):
    bias = (self.norm is None) if self.use_bias == "auto" else bool(self.use_bias)
    x = Conv2d(**field_values(self, ConvGeometry), use_bias=bias, dtype=self.dtype,
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


def drop_path_rates(depths: Sequence[int], max_rate: float) -> list[list[float]]:
  """Per stage, its blocks' stochastic-depth rates: linear from 0 to ``max_rate``.

  The rule of mmseg's MiT, MSCAN, VAN and Swin (``torch.linspace`` over all
  blocks of all stages); ``depths`` gives the blocks of each stage.
  """
  rates = np.linspace(0.0, max_rate, sum(depths)).tolist()
  bounds = np.cumsum([0, *depths]).tolist()
  return [rates[start:end] for start, end in zip(bounds[:-1], bounds[1:])]


class PreNormResidual(nn.Module):
  """Pre-norm residual block: ``x + DropPath(s1 * mixer(norm1 x))``, then ``mlp``/``norm2``.

  The block of MiT, VAN, MSCAN and FRM: a subclass gives :meth:`pre_norm` (called
  with the torch names ``norm1``/``norm2``), :meth:`mixer` and :meth:`mlp`,
  which create their submodules in this block's scope. ``layer_scale_init``
  (a class attribute) adds per-channel scales ``layer_scale_1``/``layer_scale_2``
  (s1, s2; VAN, MSCAN) starting at that value; without it s1 = s2 = 1. The
  residual stream runs in ``dtype``.
  """
  mlp_ratio: float = 4.0
  drop_path_rate: float = 0.0
  dtype: Dtype = jnp.float32

  layer_scale_init: ClassVar[float | None] = None

  @nn.nowrap
  def pre_norm(self, x, name: str, train: bool):
    """The pre-norm ``name`` of ``x``."""
    raise NotImplementedError

  @nn.nowrap
  def mixer(self, x, train: bool):
    """The token mixer (attention) branch."""
    raise NotImplementedError

  @nn.nowrap
  def mlp(self, x, train: bool):
    """The channel MLP branch (``mlp_ratio`` times wider inside)."""
    raise NotImplementedError

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = x.astype(self.dtype)
    s1 = s2 = None
    if self.layer_scale_init is not None:
      init = nn.initializers.constant(self.layer_scale_init)
      s1, s2 = (self.param(f"layer_scale_{i}", init, (x.shape[-1],), jnp.float32)
                .astype(self.dtype) for i in (1, 2))
    y = self.mixer(self.pre_norm(x, "norm1", train), train)
    x = x + DropPath(self.drop_path_rate)(y if s1 is None else s1 * y, train)
    y = self.mlp(self.pre_norm(x, "norm2", train), train)
    return x + DropPath(self.drop_path_rate)(y if s2 is None else s2 * y, train)


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

  Exact for up- and down-sampling (no antialiasing), one axis after the other.
  An axis resized by an integer factor (every resize of the SegFormer head and
  of the loss at 512x512) is computed without gathers (:func:`_resize_axis`),
  upsampling with a hand-written gradient: the gather form's gradient is a
  scatter-add, which XLA's CPU backend runs ~10x slower than that gradient
  (docs/performance.md).
  Other ratios gather (:func:`resize_bilinear_gather`, the reference).
  """
  if _REFERENCE_FORMS.get():
    return resize_bilinear_gather(x, size)
  return _resize_separably(x, size, _resize_axis)


def resize_bilinear_gather(x, size: Sequence[int]):
  """:func:`resize_bilinear` as two separable gathers (any ratio; the reference)."""
  return _resize_separably(x, size, _resize_axis_gather)


def _resize_separably(x, size: Sequence[int], resize_axis):
  """NHWC ``x`` resized to ``size`` by ``resize_axis(x, axis, n_out)``: rows, then columns.

  An axis already of its output size is left untouched.
  """
  h_out, w_out = int(size[0]), int(size[1])
  if x.shape[1] != h_out:
    x = resize_axis(x, 1, h_out)
  if x.shape[2] != w_out:
    x = resize_axis(x, 2, w_out)
  return x


def _axis_weights(w, axis: int, ndim: int, dtype):
  """``w`` (1-D) as an array broadcasting along ``axis`` of an ``ndim`` array."""
  shape = [1] * ndim
  shape[axis] = len(w)
  return jnp.asarray(np.asarray(w, np.float32).reshape(shape), dtype)


def _resize_axis_gather(x, axis: int, n_out: int):
  i0, i1, w = _linear_taps(x.shape[axis], n_out)
  w = _axis_weights(w, axis, x.ndim, x.dtype)
  return jnp.take(x, i0, axis=axis) * (1 - w) + jnp.take(x, i1, axis=axis) * w


def _upsample_weights(n_in: int, s: int) -> tuple[np.ndarray, np.ndarray]:
  """``(w, lo)`` of upsampling ``n_in`` by an integer ``s``, per sub-position r.

  Output ``s*i + r`` reads inputs i - 1 and i (``lo[r]``: r < s/2, source
  offset ``(r + 0.5)/s - 0.5 < 0``) or i and i + 1, the second with weight
  ``w[r]``: the float32 weight :func:`_linear_taps` gives output ``s + r``
  (i = 1; the same for every i), so both forms blend with equal weights.
  """
  d = (np.arange(s) + 0.5) / s - 0.5
  lo = d < 0
  _, _, taps_w = _linear_taps(n_in, n_in * s)
  w = taps_w[s:2 * s] if n_in > 1 else np.where(lo, 1.0 + d, d).astype(np.float32)
  return w, lo


def _upsample_forward(x, axis: int, s: int):
  n = x.shape[axis]
  w, lo = _upsample_weights(n, s)
  take = lambda start, stop: jax.lax.slice_in_dim(x, start, stop, axis=axis)
  shifted = lambda parts: jnp.concatenate(parts, axis=axis) if n > 1 else x
  prev = shifted([take(0, 1), take(0, n - 1)])       # x[max(i - 1, 0)]
  nxt = shifted([take(1, n), take(n - 1, n)])        # x[min(i + 1, n - 1)]
  ex = lambda t: jnp.expand_dims(t, axis + 1)
  weights = lambda v: _axis_weights(v, axis + 1, x.ndim + 1, x.dtype)
  parts = []
  if lo.any():
    wl = weights(w[lo])
    parts.append(ex(prev) * (1 - wl) + ex(x) * wl)
  if (~lo).any():
    wh = weights(w[~lo])
    parts.append(ex(x) * (1 - wh) + ex(nxt) * wh)
  y = jnp.concatenate(parts, axis=axis + 1) if len(parts) > 1 else parts[0]
  return y.reshape(x.shape[:axis] + (n * s,) + x.shape[axis + 1:])


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def _upsample_axis(x, axis: int, s: int):
  """Bilinear (align_corners=False) upsampling of one axis by an integer ``s``.

  Forward: three shifted copies of ``x`` (the input, its upper and lower
  neighbours with replicated edges: torch's clamping) blended with the
  sub-position weights, stacked on a new axis and reshaped. Backward: the exact
  transpose written out (:func:`_upsample_axis_bwd`); jax's transpose of the
  forward reduces the stacked axis through pads and concatenations, 7x slower
  on XLA CPU for the loss's 1/8 -> 1/1 resize, and the gather form's transpose
  is a scatter-add, 10x slower.
  """
  return _upsample_forward(x, axis, s)


def _upsample_axis_fwd(x, axis, s):
  return _upsample_forward(x, axis, s), None


def _upsample_axis_bwd(axis, s, _, g):
  """dx[j] = sum over the outputs that read x[j] of their weights times g.

  With ``g`` viewed as (n, s) along ``axis``: output (i, r) puts
  ``(1 - w_r)`` (lo) or ``w_r`` (hi) on x[i] itself, ``1 - w_r`` (lo) on
  x[i - 1] and ``w_r`` (hi) on x[i + 1], clamped to the edges.
  """
  n = g.shape[axis] // s
  w, lo = _upsample_weights(n, s)
  gr = g.reshape(g.shape[:axis] + (n, s) + g.shape[axis + 1:])
  one = lambda c: jnp.asarray(c, g.dtype)
  own = to_prev = to_next = None
  plus = lambda acc, t: t if acc is None else acc + t
  for r in range(s):
    gr_r = jax.lax.index_in_dim(gr, r, axis + 1, keepdims=False)
    if lo[r]:
      own = plus(own, gr_r * one(w[r]))
      to_prev = plus(to_prev, gr_r * one(1 - w[r]))
    else:
      own = plus(own, gr_r * one(1 - w[r]))
      to_next = plus(to_next, gr_r * one(w[r]))
  if n == 1:
    return (sum(t for t in (own, to_prev, to_next) if t is not None),)
  take = lambda t, start, stop: jax.lax.slice_in_dim(t, start, stop, axis=axis)
  dx = own
  if to_prev is not None:       # x[j] receives to_prev[j + 1], and x[0] also to_prev[0]
    dx = dx + jnp.concatenate([take(to_prev, 0, 1) + take(to_prev, 1, 2), take(to_prev, 2, n),
                               jnp.zeros_like(take(to_prev, 0, 1))], axis=axis)
  if to_next is not None:       # x[j] receives to_next[j - 1], and x[n-1] also to_next[n-1]
    dx = dx + jnp.concatenate([jnp.zeros_like(take(to_next, 0, 1)), take(to_next, 0, n - 2),
                               take(to_next, n - 2, n - 1) + take(to_next, n - 1, n)],
                              axis=axis)
  return (dx,)


_upsample_axis.defvjp(_upsample_axis_fwd, _upsample_axis_bwd)


def _resize_axis(x, axis: int, n_out: int):
  """Bilinear (align_corners=False) resize of one axis; integer factors without gathers.

  Up by s: :func:`_upsample_axis`. Down by s: the source of output ``o`` is
  ``o*s + (s-1)/2``: the middle input of each block of s (odd s) or the mean
  of the middle two (even s), strided slices. Other ratios: gathers.
  """
  n_in = x.shape[axis]
  if n_in == n_out:
    return x
  if n_out > n_in and n_out % n_in == 0:
    return _upsample_axis(x, axis, n_out // n_in)
  if n_in > n_out and n_in % n_out == 0:
    s = n_in // n_out
    blocks = x.reshape(x.shape[:axis] + (n_out, s) + x.shape[axis + 1:])
    pick = lambda j: jnp.squeeze(jax.lax.slice_in_dim(blocks, j, j + 1, axis=axis + 1),
                                 axis + 1)
    if s % 2:
      # Weight 0 on the second tap: the gather form's x0 * 1 + x1 * 0 is x0.
      return pick((s - 1) // 2)
    half = jnp.asarray(0.5, x.dtype)
    return pick(s // 2 - 1) * half + pick(s // 2) * half
  return _resize_axis_gather(x, axis, n_out)


def max_pool(x, window: Sequence[int], strides: Sequence[int] | None = None):
  """torch ``MaxPool2d(window, stride)`` (no padding, floor mode) on NHWC ``x``.

  Non-overlapping windows (``strides == window``, the Offset Learning head's
  2x2 pool) are a max over a reshaped block axis with a custom gradient: the
  output gradient goes to the first maximum of each window in row-major order
  (torch's choice among ties), computed as dense masks. jax's own gradient of
  ``reduce_window`` is a select-and-scatter, which XLA's CPU backend runs as a
  serial scatter. Other windows use ``nn.max_pool``.
  """
  kh, kw = _pair(window)
  sh, sw = _pair(strides if strides is not None else window)
  if (kh, kw) != (sh, sw) or _REFERENCE_FORMS.get():
    return nn.max_pool(x, (kh, kw), strides=(sh, sw), padding="VALID")
  return _block_max_pool(x, kh, kw)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def _block_max_pool(x, kh: int, kw: int):
  return _block_max(x, kh, kw)[0]


def _windows(x, kh: int, kw: int):
  """(B, ho, kh, wo, kw, C) non-overlapping kh x kw windows of ``x`` (floor mode)."""
  ho, wo = x.shape[1] // kh, x.shape[2] // kw
  return rearrange(x[:, :ho * kh, :wo * kw], "b (ho kh) (wo kw) c -> b ho kh wo kw c",
                   kh=kh, kw=kw)


def _block_max(x, kh, kw):
  blocks = _windows(x, kh, kw)
  return jnp.max(blocks, axis=(2, 4)), blocks


def _block_max_pool_fwd(x, kh, kw):
  y, _ = _block_max(x, kh, kw)
  return y, (x, y)


def _block_max_pool_bwd(kh, kw, res, g):
  x, y = res
  h, w = x.shape[1:3]
  ho, wo = y.shape[1], y.shape[2]
  blocks = _windows(x, kh, kw)
  taken = None
  rows = []
  for i in range(kh):
    cols = []
    for j in range(kw):
      hit = blocks[:, :, i, :, j, :] == y
      if taken is not None:
        hit = hit & ~taken
      taken = hit if taken is None else taken | hit
      cols.append(jnp.where(hit, g, jnp.zeros_like(g)))
    rows.append(jnp.stack(cols, axis=3))           # (b, ho, wo, kw, c)
  dx = rearrange(jnp.stack(rows, axis=2), "b ho kh wo kw c -> b (ho kh) (wo kw) c")
  if (ho * kh, wo * kw) != (h, w):                  # floor mode: dropped rows/columns
    dx = jnp.pad(dx, ((0, 0), (0, h - ho * kh), (0, w - wo * kw), (0, 0)))
  return (dx,)


_block_max_pool.defvjp(_block_max_pool_fwd, _block_max_pool_bwd)


def nearest_indices(n_in: int, n_out: int) -> np.ndarray:
  """torch ``mode='nearest'`` source indices: floor(dst * in / out), clamped."""
  scale = n_in / n_out
  return np.minimum(np.floor(np.arange(n_out) * scale).astype(np.int64), n_in - 1)


def resize_nearest(x, size: Sequence[int]):
  """torch ``F.interpolate(mode='nearest')`` on NHWC ``x`` (any integer dtype too)."""
  return _resize_separably(
      x, size, lambda x, axis, n_out: jnp.take(x, nearest_indices(x.shape[axis], n_out), axis=axis))
