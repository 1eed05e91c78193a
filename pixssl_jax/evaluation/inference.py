"""Whole-volume probabilities from a 2-D or 3-D patch model, by sliding windows.

A 3-D model slides `patch_size` windows over the volume. A 2-D model sees axial slices: it
slides `(Px, Py, 1)` windows with overlap `(o, o, 0)`, so every slice is covered exactly as a
2-D sliding window would cover it, and windows of neighbouring slices share a device batch.
"""

from collections.abc import Callable, Sequence

import jax
import numpy as np

from pixssl_jax import xla_options
from pixssl_jax.evaluation.sliding_window import sliding_window_inference


def volume_predictor(prob_fn: Callable, ndim: int) -> Callable:
  """Adapts `(params, x [B, *P, 1]) -> [B, *P, K]` to 3-D windows, jitted with our options.

  `prob_fn` may itself be jitted (without `compiler_options`, which only a top-level jit may
  carry): the jit here compiles it with `xla_options.compiler_options()`. Build it once per
  evaluation, not once per case.
  """
  if ndim == 3:
    adapted = prob_fn
  elif ndim == 2:
    # [B, Px, Py, 1, C] windows -> the 2-D model -> [B, Px, Py, 1, K].
    def adapted(params, x):
      return prob_fn(params, x[..., 0, :])[..., None, :]
  else:
    raise ValueError(f'ndim must be 2 or 3, got {ndim}')
  return jax.jit(adapted, compiler_options=xla_options.compiler_options())


def predict_volume(predictor: Callable, params, image: np.ndarray, *, ndim: int,
                   patch_size: Sequence[int], overlap: float = 0.5, batch_size: int = 16,
                   gaussian: bool = True) -> np.ndarray:
  """Per-voxel outputs `[X, Y, Z, K]` of `predictor` (from `volume_predictor`) over a volume.

  Args:
    predictor: `volume_predictor(prob_fn, ndim)`.
    params: the model params (on one device).
    image: `[X, Y, Z, 1]` float32, scaled as in training.
    ndim: the model's spatial dimensions.
    patch_size: the model's training patch (`ndim` entries).
    overlap: window overlap (in-plane only for 2-D models).
    batch_size: windows per device call.
    gaussian: Gaussian importance weighting.
  """
  patch = tuple(int(p) for p in patch_size)
  if len(patch) != ndim:
    raise ValueError(f'patch_size {patch} does not have {ndim} axes')
  if ndim == 2:
    patch, overlap = (*patch, 1), (overlap, overlap, 0.0)
  return sliding_window_inference(lambda x: predictor(params, x), image, patch_size=patch,
                                  overlap=overlap, batch_size=batch_size, gaussian=gaussian,
                                  pad_value=0.0)
