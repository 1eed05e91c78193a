"""HU windowing to [0, 1] and the per-view intensity augmentations (numpy/scipy only).

Views arrive in raw HU so the window jitter acts on real CT values (docs/design.md):
the store's window `(lo, hi)` is shifted and widened/narrowed, the HU are scaled
by it to `[0, 1]` and clipped, then blur, contrast, brightness, gamma and noise
follow, each applied with probability `prob` (docs/method.md, "Views").
"""
from typing import Sequence

import ml_collections
import numpy as np
from scipy import ndimage


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
  scaled = (np.asarray(hu, np.float32) - np.float32(lo)) / np.float32(hi - lo)
  return np.clip(scaled, 0.0, 1.0)


def augment_intensity(hu: np.ndarray, rng: np.random.Generator,
                      intensity_cfg: ml_collections.ConfigDict,
                      hu_window: Sequence[float]) -> np.ndarray:
  """Scales one view to `[0, 1]` and applies the random intensity augmentations.

  With `intensity_cfg.enabled` False this is exactly `scale_hu` and draws no
  random numbers, so matched voxels of two views keep identical intensities.

  Args:
    hu: `[*P]` float32 view in HU.
    rng: the only source of randomness.
    intensity_cfg: `data.intensity` (enabled, prob, window_jitter, brightness,
      contrast, gamma, noise_std, blur_sigma).
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

  sigma_lo, sigma_hi = (float(s) for s in intensity_cfg.blur_sigma)
  if sigma_hi > 0 and apply():
    x = ndimage.gaussian_filter(x, rng.uniform(sigma_lo, sigma_hi), mode='nearest')
  contrast = float(intensity_cfg.contrast)
  if contrast > 0 and apply():
    mean = x.mean()
    x = (x - mean) * np.float32(rng.uniform(1.0 - contrast, 1.0 + contrast)) + mean
  brightness = float(intensity_cfg.brightness)
  if brightness > 0 and apply():
    x = x + np.float32(rng.uniform(-brightness, brightness))
  # Stay in the window's range (gamma also needs non-negative input).
  x = np.clip(x, 0.0, 1.0)
  gamma = float(intensity_cfg.gamma)
  if gamma > 0 and apply():
    # Log-uniform keeps darkening and brightening equally likely.
    log_g = np.log1p(gamma)
    x = np.power(x, np.float32(np.exp(rng.uniform(-log_g, log_g))))
  noise_std = float(intensity_cfg.noise_std)
  if noise_std > 0 and apply():
    std = rng.uniform(0.0, noise_std)
    x = x + rng.standard_normal(x.shape, dtype=np.float32) * np.float32(std)
  return np.asarray(x, np.float32)
