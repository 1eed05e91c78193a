"""nnU-Net-style sliding-window inference over a whole volume (or one axial slice).

The volume is tiled with windows of the model's patch size that overlap by `overlap` (50% by
default); along each axis the first window starts at 0, the last ends flush with the volume,
and the windows in between are spread evenly (nnU-Net's `compute_steps_for_sliding_window`).
Each window's output is multiplied by an importance map (a Gaussian with sigma = 1/8 of the
patch, as nnU-Net, so voxels near a window's border, which saw the least context, count
least) and the outputs are averaged with those weights.

Jit: the caller jits `apply_fn` once per model (outside this function), e.g.
`apply = jax.jit(model.apply)` built once and `functools.partial(apply, params)` passed here;
a partial of a jitted function shares its compile cache, so every case of an evaluation
reuses one executable. This function only ever calls `apply_fn` with one shape,
`[batch_size, *patch_size, C]` float32: the last batch of windows is padded with copies of
its last window. Host-side accumulation overlaps with device compute: batch k + 1 is
dispatched before the outputs of batch k are read back.
"""
import math
from collections.abc import Callable, Sequence

import jax
import numpy as np


def window_starts(size: int, patch: int, overlap: float) -> list[int]:
  """Start indices of the windows along one axis (nnU-Net's rule).

  Args:
    size: axis length, `>= patch`.
    patch: window length.
    overlap: fraction of the window shared with its neighbour, in [0, 1).

  Returns:
    Sorted starts; the first is 0, the last `size - patch`.
  """
  if size < patch:
    raise ValueError(f'axis of length {size} is shorter than the window {patch}')
  target_step = patch * (1.0 - overlap)
  num = int(math.ceil((size - patch) / target_step)) + 1 if size > patch else 1
  if num == 1:
    return [0]
  step = (size - patch) / (num - 1)
  return [int(round(step * i)) for i in range(num)]


def importance_map(patch_size: Sequence[int], gaussian: bool = True,
                   sigma_scale: float = 1.0 / 8) -> np.ndarray:
  """Per-voxel weight of a window's output.

  Args:
    patch_size: window shape `P`.
    gaussian: Gaussian weights (True) or uniform ones.
    sigma_scale: Gaussian sigma as a fraction of the window size, per axis (nnU-Net: 1/8).

  Returns:
    float32 `[*P]` with maximum 1. The Gaussian is centred on the window's middle,
    `(P - 1) / 2` (nnU-Net centres its discrete kernel on voxel `P // 2`, half a voxel off for
    even sizes). Its smallest values, at the corners, are about exp(-8) per axis for sigma
    1/8 (4e-11 in 3-D): tiny but never zero, so every voxel keeps a weight.
  """
  if not gaussian:
    return np.ones(tuple(patch_size), np.float32)
  weight = np.ones((), np.float64)
  for n in patch_size:
    x = np.arange(n, dtype=np.float64) - (n - 1) / 2.0
    sigma = n * sigma_scale
    weight = np.multiply.outer(weight, np.exp(-0.5 * (x / sigma) ** 2))
  weight /= weight.max()
  return weight.astype(np.float32)


def _check_args(volume: np.ndarray, patch_size: Sequence[int], overlap: Sequence[float],
                batch_size: int, output_stride: int) -> None:
  n = len(patch_size)
  if n not in (2, 3):
    raise ValueError(f'patch_size {tuple(patch_size)} must have 2 or 3 entries')
  if volume.ndim != n + 1:
    raise ValueError(f'volume of shape {volume.shape} must be [*S, C] with {n} spatial axes '
                     f'to match patch_size {tuple(patch_size)}')
  if len(overlap) != n or not all(0.0 <= o < 1.0 for o in overlap):
    raise ValueError(f'overlap must be in [0, 1), one value or one per axis, got {overlap}')
  if batch_size < 1:
    raise ValueError(f'batch_size must be >= 1, got {batch_size}')
  if output_stride < 1 or any(p % output_stride for p in patch_size):
    raise ValueError(f'patch_size {tuple(patch_size)} must be divisible by output_stride '
                     f'{output_stride}')


def _pad(volume: np.ndarray, patch: tuple[int, ...], stride: int,
         pad_value: float | None) -> np.ndarray:
  """Pads at the end of each axis to at least one window and a whole number of output cells."""
  spatial = volume.shape[:-1]
  padded = tuple(max(p, stride * -(-s // stride)) for p, s in zip(patch, spatial))
  if padded == spatial:
    return volume
  fill = float(volume.min()) if pad_value is None else float(pad_value)
  return np.pad(volume, [(0, p - s) for p, s in zip(padded, spatial)] + [(0, 0)],
                constant_values=fill)


class _Accumulator:
  """The weighted sum of window outputs and of their weights, on the padded output grid."""

  def __init__(self, out_padded, out_patch, gaussian: bool, batch_size: int, patch, stride):
    self.out_padded, self.out_patch = out_padded, out_patch
    self.expected = (batch_size, *out_patch)
    self.patch, self.stride = patch, stride
    self.weight = importance_map(out_patch, gaussian)[..., None]
    self.accum = None  # Allocated at the first batch, when the number of channels is known.
    self.weight_sum = np.zeros(out_padded + (1,), np.float32)

  def add(self, outputs, batch_corners) -> None:
    outputs = np.asarray(outputs, np.float32)
    if outputs.shape[:-1] != self.expected:
      raise ValueError(f'apply_fn returned shape {outputs.shape}; expected {self.expected} + '
                       f'(K,) for windows {self.patch} at output_stride {self.stride}')
    if self.accum is None:
      self.accum = np.zeros(self.out_padded + (outputs.shape[-1],), np.float32)
    for out, corner in zip(outputs, batch_corners):
      where = tuple(slice(c, c + p) for c, p in zip(corner, self.out_patch))
      self.accum[where] += out * self.weight
      self.weight_sum[where] += self.weight

  def average(self) -> np.ndarray:
    return self.accum / self.weight_sum


def _run_batches(apply_fn, volume: np.ndarray, corners, patch, stride: int, batch_size: int,
                 acc: _Accumulator) -> None:
  """Feeds the windows to `apply_fn` in batches; the last batch is padded with its last window
  (outputs dropped). Each batch is dispatched before the previous one is read back, so host
  work overlaps device work."""
  pending = None
  for first in range(0, len(corners), batch_size):
    batch_corners = corners[first:first + batch_size]
    windows = [volume[tuple(slice(stride * c, stride * c + p) for c, p in zip(corner, patch))]
               for corner in batch_corners]
    windows += [windows[-1]] * (batch_size - len(windows))
    outputs = apply_fn(jax.numpy.asarray(np.stack(windows).astype(np.float32, copy=False)))
    if pending is not None:
      acc.add(*pending)
    pending = (outputs, batch_corners)
  acc.add(*pending)


def sliding_window_inference(apply_fn: Callable[[jax.Array], jax.Array], volume: np.ndarray, *,
                             patch_size: Sequence[int], overlap: float | Sequence[float] = 0.5,
                             batch_size: int = 4, gaussian: bool = True,
                             output_stride: int = 1,
                             pad_value: float | None = None) -> np.ndarray:
  """Runs a patch model over a whole volume with overlapping, weighted windows.

  Args:
    apply_fn: maps a float32 `[B, *P, C]` array to `[B, *P / output_stride, K]` (logits or
      probabilities); jitted by the caller (module doc). Called with `B = batch_size` only.
    volume: `[*S, C]` numpy array, `len(S) == len(patch_size)` (2 or 3), already scaled as
      the model expects.
    patch_size: window shape `P`, divisible by `output_stride`.
    overlap: fraction of a window shared with its neighbour, for every axis or per axis
      (a 2-D model runs over all axial slices as windows `(Px, Py, 1)` with overlap
      `(o, o, 0)`, so windows of many slices share a batch).
    batch_size: windows per `apply_fn` call.
    gaussian: Gaussian importance weighting (nnU-Net) if True, else uniform averaging.
    output_stride: spatial stride of `apply_fn`'s output relative to its input.
    pad_value: value for padding; None uses the volume's minimum (air in CT).

  Returns:
    float32 `[*ceil(S / output_stride), K]`: the weighted average of the window outputs.
    Axes shorter than the patch, or not a multiple of the stride, are padded at their end
    with `pad_value` and the output is cropped back.
  """
  volume = np.asarray(volume)
  overlap = ((float(overlap),) * len(patch_size) if np.isscalar(overlap)
             else tuple(float(o) for o in overlap))
  _check_args(volume, patch_size, overlap, batch_size, output_stride)
  patch = tuple(int(p) for p in patch_size)
  stride = int(output_stride)
  out_spatial = tuple(-(-s // stride) for s in volume.shape[:-1])
  # 1. Pad to at least one window and to a whole number of output cells.
  volume = _pad(volume, patch, stride, pad_value)
  # 2. Window starts on the output grid, so input and output windows stay aligned.
  out_patch = tuple(p // stride for p in patch)
  out_padded = tuple(p // stride for p in volume.shape[:-1])
  starts = [window_starts(s, p, o) for s, p, o in zip(out_padded, out_patch, overlap)]
  corners = [tuple(c) for c in np.stack(np.meshgrid(*starts, indexing='ij'), -1).reshape(
      -1, len(patch))]
  # 3. Batches of windows, accumulated with their importance weights.
  acc = _Accumulator(out_padded, out_patch, gaussian, batch_size, patch, stride)
  _run_batches(apply_fn, volume, corners, patch, stride, batch_size, acc)
  return acc.average()[tuple(slice(0, o) for o in out_spatial)]
