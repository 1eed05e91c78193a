"""Whole-volume predictions of a segmentation network: jitted probabilities, sliding windows.

`jit_probabilities` and `jit_mc_probabilities` are the per-window functions; `VolumeScorer`
turns one of them into labels (and an uncertainty map) per volume, for validation during
fine-tuning and for `--config.mode=evaluate`.

A 3-D model slides `patch_size` windows over the volume. A 2-D model sees axial slices: it
slides `(Px, Py, 1)` windows with overlap `(o, o, 0)`, so every slice is covered exactly as a
2-D sliding window would cover it, and windows of neighbouring slices share a device batch.
"""

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from pixssl_jax import xla_options
from pixssl_jax.evaluation.sliding_window import sliding_window_inference
from pixssl_jax.models import segmentation


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


def jit_probabilities(model: segmentation.SegmentationModel) -> Callable:
  """`(params, x [B, *P, 1]) -> softmax probabilities [B, *P, K]`, jitted once."""
  def probabilities(params, x):
    return jax.nn.softmax(model.apply({'params': params}, x), axis=-1)
  return jax.jit(probabilities)


def jit_mc_probabilities(model: segmentation.SegmentationModel, num_samples: int,
                         seed: int) -> Callable:
  """MC dropout: `(params, x) -> [B, *P, K + 1]`: mean probabilities and their variance.

  The backbone runs once; the dropout + 1x1 head runs `num_samples` times. The last channel is
  the uncertainty: the variance of the softmax probabilities over the samples, summed over
  classes (0 when every sample agrees, never above 1). Every call uses the same `seed`, so
  overlapping windows average the same sampling noise and reruns reproduce the map.
  """
  def mc(params, x):
    features = model.apply({'params': params}, x, method=model.features_of)
    keys = jax.random.split(jax.random.PRNGKey(seed), num_samples)
    # A Python list, not a stacked axis: XLA:CPU reduces a leading sample axis slowly.
    samples = [jax.nn.softmax(model.apply({'params': params}, features, x.shape[1:-1], False,
                                          method=model.head, rngs={'dropout': k}), axis=-1)
               for k in keys]
    mean = sum(samples) / num_samples
    variance = sum(jnp.square(s - mean) for s in samples) / num_samples
    return jnp.concatenate([mean, jnp.sum(variance, axis=-1, keepdims=True)], axis=-1)
  return jax.jit(mc)


def local_copy(params: Any) -> Any:
  """A replicated (possibly multi-process) params tree as arrays on this process's first device.

  Inference then runs per process without collectives, on whatever cases the process holds.
  """
  return jax.tree.map(lambda x: x.addressable_data(0) if isinstance(x, jax.Array) else x,
                      params)


class VolumeScorer:
  """Predicts whole volumes with one compiled function and scores them.

  Args:
    model: the `SegmentationModel`.
    config: the fine-tuning config (uses `data.ndim`, `data.patch_size`, `eval.*`).
    uncertainty: also compute the MC-dropout uncertainty channel.
  """

  def __init__(self, model, config: ml_collections.ConfigDict, uncertainty: bool = False):
    self._config = config
    self._num_classes = model.num_classes
    prob_fn = (jit_mc_probabilities(model, config.eval.mc_samples, config.seed)
               if uncertainty else jit_probabilities(model))
    self._predictor = volume_predictor(prob_fn, config.data.ndim)

  def outputs(self, params, image: np.ndarray) -> np.ndarray:
    """`[X, Y, Z, K]` class probabilities (then the uncertainty channel, if asked for)."""
    ev = self._config.eval
    return predict_volume(self._predictor, params, image, ndim=self._config.data.ndim,
                          patch_size=self._config.data.patch_size, overlap=ev.overlap,
                          batch_size=ev.batch_size, gaussian=ev.gaussian)

  def predict(self, params, image: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """Labels `[X, Y, Z]` uint8 and the uncertainty map (or None) for one scaled image."""
    return self.split(self.outputs(params, image))

  def split(self, out: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """(labels, uncertainty or None) of `outputs`."""
    labels = np.argmax(out[..., :self._num_classes], axis=-1).astype(np.uint8)
    uncertainty = out[..., self._num_classes] if out.shape[-1] > self._num_classes else None
    return labels, uncertainty
