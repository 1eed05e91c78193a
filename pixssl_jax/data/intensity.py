"""HU windowing to [0, 1] and the per-view intensity augmentations (numpy/scipy only).

Views arrive in raw HU so the window jitter acts on real CT values (docs/design.md):
the store's window `(lo, hi)` is shifted and widened/narrowed, the HU are scaled
by it to `[0, 1]` and clipped; a random non-linear remap of the `[0, 1]` values may
follow (probability `remap_prob`), then blur, contrast, brightness, gamma and noise,
each applied with probability `prob` (docs/method.md, "Views").

The remap is Models Genesis' non-linear transform (Zhou et al. 2021): a cubic Bezier
curve from `[0, 1]` to `[0, 1]` with random control points. A monotone curve
changes contrast but keeps the order of tissue intensities; a non-monotone one
(probability `remap_nonmonotone_prob` of the remaps) can reorder them, as contrast
phases reorder organ HU.
"""
from typing import Sequence

import ml_collections
import numpy as np
from scipy import ndimage

# The remap is tabulated on this many uniform steps of [0, 1] and read by linear
# interpolation: 5x faster than `np.interp` over the curve, within 1e-5 of it.
_REMAP_STEPS = 1024
# Points on the Bezier curve from which the table is interpolated.
_CURVE_POINTS = 512


def scale_hu(hu: np.ndarray, hu_window: Sequence[float]) -> np.ndarray:
  """Maps HU to `[0, 1]` with the window `(lo, hi)`, clipping outside it.

  Args:
    hu: array of HU values, any shape.
    hu_window: (low, high) HU.

  Returns:
    float32 array of the same shape.
  """
  lo, hi = float(hu_window[0]), float(hu_window[1])
  if not hi > lo:
    raise ValueError(f'HU window must have high > low, got {tuple(hu_window)}')
  # In place after the first operation: the same float32 arithmetic, one array instead of three.
  scaled = np.asarray(hu, np.float32) - np.float32(lo)
  np.divide(scaled, np.float32(hi - lo), out=scaled)
  return np.clip(scaled, 0.0, 1.0, out=scaled)


def random_remap_table(rng: np.random.Generator, monotone: bool) -> np.ndarray:
  """Draws a smooth random curve on `[0, 1]` and tabulates it.

  The curve is a cubic Bezier `t -> (x(t), y(t))` with control points
  `(0, y0), (x1, y1), (x2, y2), (1, y3)`, `0 <= x1 <= x2 <= 1`, so `x(t)` is
  non-decreasing and the curve is a function `y(x)`. Monotone: `y0 = 0, y3 = 1`,
  `y1 <= y2`, so `y(x)` is non-decreasing. Non-monotone: all four `y` uniform in
  `[0, 1]`, then stretched to span `[0, 1]`, so the view keeps its full range.

  Args:
    rng: the only source of randomness.
    monotone: whether the curve keeps the order of intensities.

  Returns:
    `[_REMAP_STEPS + 1]` float32 values of the curve at `x = k / _REMAP_STEPS`.
  """
  x1, x2 = np.sort(rng.uniform(0.0, 1.0, 2))
  if monotone:
    y1, y2 = np.sort(rng.uniform(0.0, 1.0, 2))
    ys_ctrl = np.array([0.0, y1, y2, 1.0])
  else:
    ys_ctrl = rng.uniform(0.0, 1.0, 4)
  t = np.linspace(0.0, 1.0, _CURVE_POINTS)[:, None]
  basis = np.concatenate([(1 - t) ** 3, 3 * (1 - t) ** 2 * t, 3 * (1 - t) * t ** 2, t ** 3], 1)
  xs = basis @ np.array([0.0, x1, x2, 1.0])
  ys = basis @ ys_ctrl
  if not monotone:
    span = ys.max() - ys.min()
    ys = (ys - ys.min()) / span if span > 1e-3 else xs  # A flat curve would erase the view.
  return np.interp(np.linspace(0.0, 1.0, _REMAP_STEPS + 1), xs, ys).astype(np.float32)


def apply_remap(x: np.ndarray, table: np.ndarray) -> np.ndarray:
  """Reads `x` (float32 in `[0, 1]`) through a `random_remap_table` curve, linearly."""
  # lower + (table[i0 + 1] - lower) * frac, with the differences taken once on the table
  # (the same float32 subtractions) and each step written into its own buffer.
  pos = x * np.float32(_REMAP_STEPS)
  i0 = pos.astype(np.int32)
  np.minimum(i0, _REMAP_STEPS - 1, out=i0)
  frac = np.subtract(pos, i0.astype(np.float32), out=pos)
  out = np.take(table[1:] - table[:-1], i0)
  np.multiply(out, frac, out=out)
  return np.add(np.take(table, i0), out, out=out)


def gaussian_blur(x: np.ndarray, sigma: float) -> np.ndarray:
  """`ndimage.gaussian_filter(x, sigma, mode='nearest')` of a float32 array, bit for bit.

  gaussian_filter runs one 1-D pass per axis in axis order, each rounded to float32. A pass
  along the outermost axis of a C-ordered 3-D array reads lines whose voxels lie a whole
  plane apart, about 4x slower than along the other axes, so that pass runs on a copy with
  the axis moved last (the same lines, so the same sums) and the result is moved back.

  Args:
    x: float32 array, any number of axes.
    sigma: standard deviation in voxels, the same on every axis.

  Returns:
    float32 array of x's shape.
  """
  if x.ndim < 3 or sigma <= 1e-15:  # gaussian_filter copies x unfiltered below 1e-15.
    return ndimage.gaussian_filter(x, sigma, mode='nearest', output=np.float32)
  # Written plane by plane: one strided write per plane is 2.5x faster than numpy's
  # transposing copy, which reads a voxel per plane for every element.
  first = np.empty(x.shape[1:] + x.shape[:1], np.float32)
  for i, plane in enumerate(x):
    first[..., i] = plane
  ndimage.gaussian_filter1d(first, sigma, axis=-1, output=first, mode='nearest')
  out = np.ascontiguousarray(np.moveaxis(first, -1, 0))
  for axis in range(1, x.ndim):
    ndimage.gaussian_filter1d(out, sigma, axis=axis, output=out, mode='nearest')
  return out


def augment_intensity(hu: np.ndarray, rng: np.random.Generator,
                      intensity_cfg: ml_collections.ConfigDict,
                      hu_window: Sequence[float]) -> np.ndarray:
  """Scales one view to `[0, 1]` and applies the random intensity augmentations.

  With `intensity_cfg.enabled` False this is exactly `scale_hu` and draws no
  random numbers, so matched voxels of two views keep identical intensities.

  Args:
    hu: `[*P]` float32 view in HU.
    rng: the only source of randomness.
    intensity_cfg: `data.intensity` (enabled, prob, window_jitter, remap_prob,
      remap_nonmonotone_prob, brightness, contrast, gamma, noise_std, blur_sigma).
    hu_window: the store's (low, high) HU.

  Returns:
    `[*P]` float32; within `[0, 1]` except where noise pushes it out.
  """
  if not intensity_cfg.enabled:
    return scale_hu(hu, hu_window)
  prob = float(intensity_cfg.prob)

  def apply() -> bool:
    return bool(rng.random() < prob)

  lo, hi = float(hu_window[0]), float(hu_window[1])
  jitter = float(intensity_cfg.window_jitter)
  if jitter > 0 and apply():
    # Shift the centre and rescale the width, both by up to `jitter` of the width.
    width = hi - lo
    centre = 0.5 * (lo + hi) + rng.uniform(-jitter, jitter) * width
    width *= rng.uniform(1.0 - jitter, 1.0 + jitter)
    lo, hi = centre - 0.5 * width, centre + 0.5 * width
  x = scale_hu(hu, (lo, hi))
  # Tissue contrast first, then what a scanner adds (blur, noise).
  remap_prob = float(intensity_cfg.remap_prob)
  if remap_prob > 0 and rng.random() < remap_prob:
    monotone = not rng.random() < float(intensity_cfg.remap_nonmonotone_prob)
    x = apply_remap(x, random_remap_table(rng, monotone))

  sigma_lo, sigma_hi = (float(s) for s in intensity_cfg.blur_sigma)
  if sigma_hi > 0 and apply():
    x = gaussian_blur(x, rng.uniform(sigma_lo, sigma_hi))
  # From here `x` is this function's own float32 array: every step writes into it (the same
  # float32 operations as out-of-place ones, without a view-sized temporary per step).
  contrast = float(intensity_cfg.contrast)
  if contrast > 0 and apply():
    mean = x.mean()
    np.subtract(x, mean, out=x)
    np.multiply(x, np.float32(rng.uniform(1.0 - contrast, 1.0 + contrast)), out=x)
    np.add(x, mean, out=x)
  brightness = float(intensity_cfg.brightness)
  if brightness > 0 and apply():
    np.add(x, np.float32(rng.uniform(-brightness, brightness)), out=x)
  # Stay in the window's range (gamma also needs non-negative input).
  np.clip(x, 0.0, 1.0, out=x)
  gamma = float(intensity_cfg.gamma)
  if gamma > 0 and apply():
    # Log-uniform keeps darkening and brightening equally likely.
    log_g = np.log1p(gamma)
    np.power(x, np.float32(np.exp(rng.uniform(-log_g, log_g))), out=x)
  noise_std = float(intensity_cfg.noise_std)
  if noise_std > 0 and apply():
    std = rng.uniform(0.0, noise_std)
    noise = rng.standard_normal(x.shape, dtype=np.float32)
    np.multiply(noise, np.float32(std), out=noise)
    np.add(x, noise, out=x)
  return x
