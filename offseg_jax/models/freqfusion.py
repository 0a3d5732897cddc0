"""FreqFusion (TPAMI 2024) as OffSeg's decoder uses it, with CARAFE and grid-sample in JAX.

FreqFusion fuses a high-resolution skip feature with the next coarser feature:

  * an adaptive low-pass filter (ALPF, 5x5 CARAFE kernels predicted from both
    levels) upsamples the coarse feature x2;
  * an adaptive high-pass filter (AHPF, 3x3 kernels) boosts the skip feature:
    hr' = 2 hr - LP(hr);
  * a local-similarity-guided resampler (``LocalSimGuidedSampler``) moves the
    upsampled coarse feature by learned sub-pixel offsets (grid-sample, 4 groups).

Only OffSeg's configuration is implemented (semi_conv, comp_feat_upsample,
use_high_pass, hr_residual, feature_resample with 4 groups, no Hamming window,
scale_factor 1, up_group 1), which is the official repo copy's defaults.

CARAFE follows the CUDA op the official code runs: zero padding, no
renormalisation at borders, output pixel (Y, X) reads the k x k neighbourhood of
the low-res parent (floor(Y/s), floor(X/s)), mask channel (group*k + row)*k + col.
It is computed by shift-and-accumulate over the k^2 taps, so nothing k^2 times
the output is ever materialised in the forward pass; its gradient is the same
on accelerators, and small matmuls per low-res pixel over its stacked taps on
CPU (see :func:`carafe`).
"""

from __future__ import annotations

import functools
from typing import Any

from einops import rearrange
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from offseg_jax.models import layers

Dtype = Any


def carafe(x, masks, kernel_size: int, scale: int, groups: int = 1):
  """Content-aware reassembly: out[Y, X] = sum_pq m[Y, X, p*k+q] x[Y//s + p - r, X//s + q - r].

  Args:
    x: (B, h, w, C) features.
    masks: (B, s*h, s*w, groups*k*k) reassembly kernels (already normalised);
      channel (g*k + p)*k + q is tap (p, q) of group g.
    kernel_size: odd k.
    scale: integer upsampling factor s (1 = dynamic filtering in place).
    groups: channel groups sharing a kernel (contiguous channel blocks).

  Returns:
    (B, s*h, s*w, C). Taps outside the input read zeros and the kernel is not
    renormalised there.

  Computed by a rolled loop of shifted multiply-adds (:func:`_carafe_loop`),
  which never materialises k^2 copies of the input. On CPU
  (``layers.cpu_forms()``) its gradient is replaced by batched matmuls over
  the stacked taps (:func:`_carafe_matmul_grad`, 3-5x faster there).
  """
  b, h, w, c = x.shape
  k, s = int(kernel_size), int(scale)
  if k % 2 != 1:
    raise ValueError(f"CARAFE kernel size must be odd, got {k}")
  if masks.shape[:3] != (b, s * h, s * w) or masks.shape[3] != groups * k * k:
    raise ValueError(f"CARAFE masks must be (B, {s}*h, {s}*w, {groups}*{k}^2) for features "
                     f"{x.shape}; got {masks.shape}")
  if c % groups:
    raise ValueError(f"CARAFE: {c} channels not divisible into {groups} groups")
  if layers.cpu_forms():
    return _carafe_matmul_grad(x, masks, k, s, groups)
  return _carafe_loop(x, masks, k, s, groups)


def _carafe_loop(x, masks, k: int, s: int, groups: int):
  """CARAFE by shift-and-accumulate over the k^2 taps (the accelerator form)."""
  b, h, w, c = x.shape
  r = (k - 1) // 2
  cg = c // groups
  xp = rearrange(jnp.pad(x, ((0, 0), (r, r), (r, r), (0, 0))), "b h w (g c) -> b h w g c",
                 g=groups)
  # Tap-major masks, so each tap's kernel plane is one contiguous slice. Output
  # pixel (s*y + i, s*x + j) is laid out as axes (y, i, x, j): the shifted low-res
  # view then broadcasts over the sub-pixel axes, no upsampled copy is made.
  m = rearrange(masks.astype(x.dtype), "b (h i) (w j) (g t) -> t b h i w j g 1",
                i=s, j=s, g=groups)

  # A rolled loop keeps the program small (fast compiles, one fused kernel per
  # tap); rematerialising the tap keeps autodiff from stacking k*k shifted views.
  @jax.checkpoint
  def tap(t, xp, m):
    view = jax.lax.dynamic_slice(xp, (0, t // k, t % k, 0, 0), (b, h, w, groups, cg))
    return view[:, :, None, :, None] * m[t]

  out = jax.lax.fori_loop(0, k * k, lambda t, acc: acc + tap(t, xp, m),
                          jnp.zeros((b, h, s, w, s, groups, cg), x.dtype))
  return rearrange(out, "b h i w j g c -> b (h i) (w j) (g c)")


def _carafe_taps(x, k: int, groups: int):
  """The k*k shifted views of zero-padded ``x``, stacked: (B, h, w, groups, k*k, C/groups)."""
  b, h, w, c = x.shape
  r = (k - 1) // 2
  xp = jnp.pad(x, ((0, 0), (r, r), (r, r), (0, 0)))
  taps = jnp.stack([xp[:, p:p + h, q:q + w] for p in range(k) for q in range(k)], axis=3)
  return rearrange(taps, "b h w t (g c) -> b h w g t c", g=groups)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _carafe_matmul_grad(x, masks, k: int, s: int, groups: int):
  """CARAFE: the loop form's forward, gradients as matmuls over the stacked taps.

  Per low-res pixel and group, the output is M T, with M its (s*s, k*k)
  kernels and T its (k*k, C/groups) taps: the mask gradient is G T^T and the
  tap gradient M^T G, two batched matmuls, after which the taps' gradient is
  folded back onto the input (the transpose of the stacking). The taps (k^2
  times the low-res input) exist only inside the backward pass. XLA's CPU
  backend runs the loop form's own gradient (a channel reduction per tap
  inside the loop) at a fraction of its speed: forward + backward of
  FreqFusion's 224-channel 1/8 -> 1/4 CARAFE of OffSeg-T, batch 2 at 512x512,
  is ~8x faster this way (docs/performance.md); the loop's forward stays (it is
  faster than the stacked-taps matmul forward).
  """
  return _carafe_loop(x, masks, k, s, groups)


def _carafe_matmul_grad_fwd(x, masks, k, s, groups):
  return _carafe_loop(x, masks, k, s, groups), (x, masks)


def _carafe_matmul_grad_bwd(k, s, groups, res, g):
  x, masks = res
  taps, taps_vjp = jax.vjp(lambda x: _carafe_taps(x, k, groups), x)
  m = rearrange(masks.astype(x.dtype), "b (h i) (w j) (g t) -> b h w g (i j) t",
                i=s, j=s, g=groups)
  gr = rearrange(g.astype(x.dtype), "b (h i) (w j) (g c) -> b h w g (i j) c",
                 i=s, j=s, g=groups)
  dm = jnp.matmul(gr, jnp.swapaxes(taps, -1, -2))          # (b, h, w, g, s*s, k*k)
  (dx,) = taps_vjp(jnp.matmul(jnp.swapaxes(m, -1, -2), gr))
  dmasks = rearrange(dm, "b h w g (i j) t -> b (h i) (w j) (g t)", i=s, j=s)
  return dx, dmasks.astype(masks.dtype)


_carafe_matmul_grad.defvjp(_carafe_matmul_grad_fwd, _carafe_matmul_grad_bwd)


def kernel_normalizer(logits):
  """Softmax over the k*k taps (last axis): FreqFusion's kernel normaliser.

  The reference multiplies by a Hamming window and renormalises; with OffSeg's
  ``hamming_window=False`` the window is the scalar 1, so this is the softmax.
  """
  return jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(logits.dtype)


def grid_sample(x, grid):
  """torch ``F.grid_sample(mode='bilinear', padding_mode='border', align_corners=False)``.

  Args:
    x: (N, H, W, C) input.
    grid: (N, Ho, Wo, 2) normalised sampling positions in [-1, 1], last axis (x, y).

  Returns:
    (N, Ho, Wo, C). Each position reads its 4 neighbours with one gather each
    (no dense interpolation matrix); coordinates are clamped to the border first.
  """
  n, h, w, c = x.shape
  _, ho, wo, _ = grid.shape
  grid = grid.astype(jnp.float32)
  # Unnormalise (align_corners=False) and clamp into the image ('border').
  px = jnp.clip(((grid[..., 0] + 1) * w - 1) / 2, 0, w - 1)
  py = jnp.clip(((grid[..., 1] + 1) * h - 1) / 2, 0, h - 1)
  x0 = jnp.floor(px)
  y0 = jnp.floor(py)
  wx1 = (px - x0)[..., None]
  wy1 = (py - y0)[..., None]
  x0 = x0.astype(jnp.int32)
  y0 = y0.astype(jnp.int32)
  # At the last row/column the second neighbour has weight 0; clamp its index.
  x1 = jnp.minimum(x0 + 1, w - 1)
  y1 = jnp.minimum(y0 + 1, h - 1)
  flat = rearrange(x, "n h w c -> n (h w) c")

  def corner(yi, xi):
    idx = rearrange(yi * w + xi, "n ho wo -> n (ho wo) 1")      # row-major pixel index
    picked = jnp.take_along_axis(flat, idx, axis=1)
    return rearrange(picked, "n (ho wo) c -> n ho wo c", ho=ho).astype(jnp.float32)

  top = corner(y0, x0) * (1 - wx1) + corner(y0, x1) * wx1
  bottom = corner(y1, x0) * (1 - wx1) + corner(y1, x1) * wx1
  return (top * (1 - wy1) + bottom * wy1).astype(x.dtype)


def local_cosine_similarity(x, dilation: int = 2):
  """Cosine similarity of each pixel with its 8 neighbours of a dilated 3x3 window.

  Neighbours at row/column offsets {-d, 0, +d} in row-major order without the
  centre; zero padding, so out-of-image neighbours give 0. Norms are clamped at
  1e-8 as torch's ``cosine_similarity`` does.
  """
  b, h, w, c = x.shape
  d = int(dilation)
  xf = x.astype(jnp.float32)
  norm = jnp.sqrt(jnp.sum(xf * xf, axis=-1, keepdims=True))
  unit = xf / jnp.maximum(norm, 1e-8)
  padded = jnp.pad(unit, ((0, 0), (d, d), (d, d), (0, 0)))
  sims = []
  for dy in (0, d, 2 * d):
    for dx in (0, d, 2 * d):
      if dy == d and dx == d:
        continue
      sims.append(jnp.sum(unit * padded[:, dy:dy + h, dx:dx + w], axis=-1))
  return jnp.stack(sims, axis=-1).astype(x.dtype)


def pixel_unshuffle(x, factor: int):
  """torch ``F.pixel_unshuffle`` in NHWC: channel c*f*f + i*f + j <- (f*y + i, f*x + j, c)."""
  return rearrange(x, "b (h i) (w j) c -> b h w (c i j)", i=int(factor), j=int(factor))


def sampler_init_pos(groups: int, scale: int = 2) -> np.ndarray:
  """The official ``init_pos`` buffer, flat (2*groups*scale^2,).

  Channel comp*G*s^2 + g*s^2 + i*s + j holds the sub-pixel centre of (i, j) in
  low-res pixel units: (j - (s-1)/2)/s for the x component (comp 0) and
  (i - (s-1)/2)/s for y (comp 1).
  """
  centre = (np.arange(scale) - (scale - 1) / 2) / scale
  x_comp = np.broadcast_to(centre[None, None, :], (groups, scale, scale))
  y_comp = np.broadcast_to(centre[None, :, None], (groups, scale, scale))
  return rearrange(np.stack([x_comp, y_comp]), "xy g i j -> (xy g i j)").astype(np.float32)


_xavier = nn.initializers.xavier_uniform()


class LocalSimGuidedSampler(nn.Module):
  """FreqFusion's offset generator and resampler (style 'lp', scale 2, 'sim' features).

  Offsets (per group and sub-pixel, in low-res pixel units) are
  (offset(S_lr) + PU(hr_offset(S_hr))) * sigmoid(direct_scale(L) + PU(hr_direct_scale(H)))
  + init_pos, where H, L are the group-normalised compressed features, S the local
  cosine similarities and PU pixel-unshuffle. The upsampled feature is then
  grid-sampled (bilinear, border) per group of contiguous channels.
  """
  groups: int = 4
  scale: int = 2
  kernel_size: int = 3
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, hr_x, lr_x, feat):
    if self.scale != 2:
      raise ValueError("LocalSimGuidedSampler supports scale 2 only (as the reference)")
    g, s = self.groups, self.scale
    cc = hr_x.shape[-1]
    if cc < 8 or cc % g or feat.shape[-1] % g:
      raise ValueError(f"compressed channels ({cc}, at least 8) and feature channels "
                       f"({feat.shape[-1]}) must be divisible by the {g} groups")
    hr_x = layers.GroupNorm(cc // 8, dtype=self.dtype, name="norm_hr")(hr_x)
    lr_x = layers.GroupNorm(cc // 8, dtype=self.dtype, name="norm_lr")(lr_x)
    hr_sim = local_cosine_similarity(hr_x, dilation=2)
    lr_sim = local_cosine_similarity(lr_x, dilation=2)

    def conv(features, name):
      return layers.Conv2d(features, self.kernel_size, padding=self.kernel_size // 2,
                           dtype=self.dtype, kernel_init=_xavier, name=name)

    out_lr, out_hr = 2 * g * s * s, 2 * g
    offset = conv(out_lr, "offset")(lr_sim) + pixel_unshuffle(conv(out_hr, "hr_offset")(hr_sim), s)
    gate = conv(out_lr, "direct_scale")(lr_x) + pixel_unshuffle(
        conv(out_hr, "hr_direct_scale")(hr_x), s)
    offset = offset * jax.nn.sigmoid(gate) + jnp.asarray(sampler_init_pos(g, s), offset.dtype)
    return self._sample(feat, offset)

  def _sample(self, feat, offset):
    """Resamples ``feat`` (B, s*h, s*w, C) at low-res centres moved by ``offset``.

    ``offset`` is (B, h, w, 2*G*s*s) in low-res pixel units, channel
    comp*G*s^2 + g*s^2 + i*s + j (comp 0 = x, 1 = y).
    """
    g, s = self.groups, self.scale
    h, w = offset.shape[1:3]
    # Channel layout comp*G*s^2 + g*s^2 + i*s + j -> (B*G, s*h, s*w, (x, y)).
    off = rearrange(offset.astype(jnp.float32), "b h w (xy g i j) -> (b g) (h i) (w j) xy",
                    xy=2, g=g, i=s, j=s)
    centres_x = jnp.repeat(jnp.arange(w, dtype=jnp.float32) + 0.5, s)
    centres_y = jnp.repeat(jnp.arange(h, dtype=jnp.float32) + 0.5, s)
    # Normalised as the reference does (by the low-res size), so the round trip
    # through grid_sample's unnormalisation rounds as it does.
    grid_x = 2 * (centres_x[None, None, :] + off[..., 0]) / w - 1
    grid_y = 2 * (centres_y[None, :, None] + off[..., 1]) / h - 1
    grid = jnp.stack([grid_x, grid_y], axis=-1)
    # Each group of contiguous channels is sampled at its own offsets.
    sampled = grid_sample(rearrange(feat, "b h w (g c) -> (b g) h w c", g=g), grid)
    return rearrange(sampled, "(b g) h w c -> b h w (g c)", g=g)


class FreqFusion(nn.Module):
  """Fuses ``hr_feat`` (B, 2h, 2w, C_hr) with ``lr_feat`` (B, h, w, C_lr).

  Returns ``(lowpass_kernels, hr_out, lr_out)``: the normalised 5x5 ALPF kernels
  (B, 2h, 2w, 25), the high-pass-boosted skip feature (C_hr channels) and the
  upsampled, resampled coarse feature (C_lr channels at 2h x 2w).
  """
  compressed_channels: int
  lowpass_kernel: int = 5
  highpass_kernel: int = 3
  encoder_kernel: int = 3
  encoder_dilation: int = 1
  feature_resample_groups: int = 4
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, hr_feat, lr_feat):
    b, big_h, big_w, _ = hr_feat.shape
    if lr_feat.shape[0] != b or (2 * lr_feat.shape[1], 2 * lr_feat.shape[2]) != (big_h, big_w):
      raise ValueError(f"FreqFusion needs the high-res feature exactly 2x the low-res one; got "
                       f"{hr_feat.shape} and {lr_feat.shape}")
    kl, kh, cc = self.lowpass_kernel, self.highpass_kernel, self.compressed_channels
    hr_feat = hr_feat.astype(self.dtype)
    lr_feat = lr_feat.astype(self.dtype)

    def compressor(name):
      return layers.Conv2d(cc, 1, dtype=self.dtype, kernel_init=_xavier, name=name)

    pad = (self.encoder_kernel - 1) * self.encoder_dilation // 2
    encoder_init = nn.initializers.normal(1e-3)
    lowpass_encoder = layers.Conv2d(kl * kl, self.encoder_kernel, padding=pad,
                                    dilation=self.encoder_dilation, dtype=self.dtype,
                                    kernel_init=encoder_init, name="content_encoder")
    highpass_encoder = layers.Conv2d(kh * kh, self.encoder_kernel, padding=pad,
                                     dilation=self.encoder_dilation, dtype=self.dtype,
                                     kernel_init=encoder_init, name="content_encoder2")

    comp_hr = compressor("hr_channel_compressor")(hr_feat)
    comp_lr = compressor("lr_channel_compressor")(lr_feat)

    # Kernel logits at high resolution: the skip's own plus the coarse level's,
    # the latter upsampled by CARAFE with kernels from the previous estimate.
    hp_logits_hr = highpass_encoder(comp_hr)
    comp_hr = 2 * comp_hr - carafe(comp_hr, kernel_normalizer(hp_logits_hr), kh, 1)
    lp_logits_hr = lowpass_encoder(comp_hr)
    lp_logits = lp_logits_hr + carafe(lowpass_encoder(comp_lr),
                                      kernel_normalizer(lp_logits_hr), kl, 2)
    lowpass = kernel_normalizer(lp_logits)
    hp_logits = hp_logits_hr + carafe(highpass_encoder(comp_lr), lowpass, kl, 2)
    highpass = kernel_normalizer(hp_logits)

    lr_up = carafe(lr_feat, lowpass, kl, 2)
    hr_out = (hr_feat - carafe(hr_feat, highpass, kh, 1)) + hr_feat
    lr_out = LocalSimGuidedSampler(groups=self.feature_resample_groups, dtype=self.dtype,
                                   name="dysampler")(comp_hr, comp_lr, lr_up)
    return lowpass, hr_out, lr_out
