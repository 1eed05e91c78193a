"""Rendering a view from its view-to-source transform (numpy/scipy only).

A view of shape `P` (`n = len(P)` axes) is defined by an affine `T` `[n, n + 1]`
that maps a view voxel index `i` to a continuous source coordinate,
`src = T[:, :n] @ i + T[:, n]` (docs/design.md, "The view transform"). Images are
sampled there with linear interpolation, labels with the nearest voxel; the
source is taken to be surrounded by `fill` (air, or background), so a view may
reach outside the volume. Only the bounding box of the sample points is read, so
a memory-mapped volume costs the box, not the volume.
"""
import ctypes
from typing import Optional, Sequence

import numpy as np
from scipy import ndimage

# glibc mallopt parameters (malloc.h) and the values the view pipeline runs with.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_MMAP_THRESHOLD = 32 << 20  # glibc's own ceiling for it on 64-bit hosts.
_TRIM_THRESHOLD = 256 << 20
_allocator_tuned = False


def _keep_freed_memory() -> None:
  """Lets this process's glibc heap keep freed memory for the next view (once per process).

  Rendering and augmenting a 96^3 view pair allocates and frees about 30 view-sized
  arrays. With glibc's defaults the heap shrinks back after each pair and every new array
  then page-faults its memory in again: a quarter of the pipeline's CPU time went to the
  kernel. Serving arrays up to 32 MiB from the heap and trimming it only above 256 MiB
  free removes those faults; a process keeps at most its peak heap. Without glibc
  (macOS, musl) this does nothing.
  """
  global _allocator_tuned
  if _allocator_tuned:
    return
  _allocator_tuned = True
  try:
    mallopt = ctypes.CDLL(None).mallopt
  except (OSError, AttributeError):
    return
  mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD)
  mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD)


def extract_padded(volume: np.ndarray, start: Sequence[int], size: Sequence[int],
                   fill: float) -> np.ndarray:
  """Copies `volume[start:start + size]`, filling out-of-volume voxels with `fill`.

  Args:
    volume: `[*S]` array (a memory map is fine: only the box is read).
    start: integer box start per axis (may be negative).
    size: box size per axis.
    fill: value for voxels outside the volume.

  Returns:
    `[*size]` array of the volume's dtype.
  """
  out = np.full(tuple(size), fill, dtype=volume.dtype)
  src, dst = [], []
  for s, z, dim in zip(start, size, volume.shape):
    lo, hi = max(s, 0), min(s + z, dim)
    if hi <= lo:
      return out
    src.append(slice(lo, hi))
    dst.append(slice(lo - s, hi - s))
  out[tuple(dst)] = volume[tuple(src)]
  return out


def _axis_aligned(transform: np.ndarray) -> Optional[tuple[np.ndarray, np.ndarray]]:
  """Returns (source axis per view axis, step per view axis) if `T` is a scaled permutation."""
  n = transform.shape[0]
  nonzero = np.abs(transform[:, :n]) > 1e-9
  if not (np.all(nonzero.sum(0) == 1) and np.all(nonzero.sum(1) == 1)):
    return None
  src_axis = np.argmax(nonzero, axis=0)   # view axis a reads source axis src_axis[a]
  return src_axis, transform[src_axis, np.arange(n)]


def _render_exact(source, src_axis, signs, offset, shape, fill) -> np.ndarray:
  """Integer signed permutation + integer offset: a box copy, transpose and flips."""
  n = len(shape)
  start, size = np.zeros(n, np.int64), np.zeros(n, np.int64)
  for a in range(n):
    # Source axis q = src_axis[a] is read at offset_q + sign * (0 .. P_a - 1).
    q = src_axis[a]
    size[q] = shape[a]
    start[q] = offset[q] if signs[a] > 0 else offset[q] - (shape[a] - 1)
  view = np.transpose(extract_padded(source, start, size, fill), src_axis)
  flip_axes = tuple(a for a in range(n) if signs[a] < 0)
  if flip_axes:
    view = np.flip(view, flip_axes)
  return np.ascontiguousarray(view, dtype=np.float32)


def _render_separable(source, src_axis, steps, offset, shape, fill) -> np.ndarray:
  """Scaled permutation: multilinear interpolation done as one 1-D lerp per axis.

  Equal to `affine_transform(order=1)` (the weights of multilinear interpolation
  factor over axes) at a fraction of its cost (`benchmarks/input_pipeline.py` times both).
  """
  n = len(shape)
  coords = [steps[a] * np.arange(shape[a]) + offset[src_axis[a]] for a in range(n)]
  lo, size = np.zeros(n, np.int64), np.zeros(n, np.int64)
  for a in range(n):
    # One voxel beyond floor(max) so that `i0 + 1` is always inside the box.
    q = src_axis[a]
    lo[q] = np.floor(coords[a].min())
    size[q] = np.floor(coords[a].max()) + 2 - lo[q]
  box = np.transpose(extract_padded(source, lo, size, fill), src_axis).astype(np.float32)
  for a in range(n):
    c = coords[a] - lo[src_axis[a]]
    i0 = np.minimum(np.floor(c).astype(np.int64), box.shape[a] - 2)
    w = (c - i0).astype(np.float32).reshape([-1 if b == a else 1 for b in range(n)])
    x0 = np.take(box, i0, axis=a)
    # x0 + (x1 - x0) * w, computed in the buffer of x1: the same float32 operations
    # without three more view-sized temporaries (allocating them costs as much as the math).
    box = np.take(box, i0 + 1, axis=a)
    np.subtract(box, x0, out=box)
    np.multiply(box, w, out=box)
    np.add(x0, box, out=box)
  return np.ascontiguousarray(box, dtype=np.float32)


def render_view(source: np.ndarray, transform: np.ndarray, shape: Sequence[int], fill: float,
                fast_paths: bool = True) -> np.ndarray:
  """Samples `source` at `T @ [i, 1]` for every view index `i` (linear interpolation).

  Args:
    source: `[*S]` array with `n` axes (int16 HU or float); outside is `fill`.
    transform: `[n, n + 1]` view index -> source coordinate.
    shape: view shape P (length n).
    fill: value of the source outside its extent (air).
    fast_paths: when `T` is an integer signed permutation with integer offset,
      copy by slicing/transpose/flip (exact); when it is any scaled permutation
      (every T that `crop_transform` builds), interpolate axis by axis. False
      always uses `scipy.ndimage.affine_transform`, the reference.

  Returns:
    `[*P]` float32 view.
  """
  _keep_freed_memory()
  n = len(shape)
  transform = np.asarray(transform, np.float64)
  if source.ndim != n or transform.shape != (n, n + 1):
    raise ValueError(f'render_view: source {source.shape} / transform {transform.shape} '
                     f'do not match view shape {tuple(shape)}')
  offset = transform[:, n]
  aligned = _axis_aligned(transform) if fast_paths else None
  if aligned is not None:
    src_axis, steps = aligned
    if (np.allclose(np.abs(steps), 1.0, atol=1e-6)
        and np.allclose(offset, np.round(offset), atol=1e-4)):
      return _render_exact(source, src_axis, np.sign(steps), np.round(offset).astype(np.int64),
                           shape, fill)
    return _render_separable(source, src_axis, steps, offset, shape, fill)

  # Read only the bounding box of the sample points (plus one voxel for the
  # interpolation stencil), padded with air, then resample inside it.
  corners = np.stack(np.meshgrid(*[[0, s - 1] for s in shape], indexing='ij'), -1).reshape(-1, n)
  pts = corners @ transform[:, :n].T + offset
  lo = np.floor(pts.min(0)).astype(np.int64) - 1
  hi = np.ceil(pts.max(0)).astype(np.int64) + 2
  box = extract_padded(source, lo, hi - lo, fill).astype(np.float32)
  return ndimage.affine_transform(
      box, transform[:, :n], offset=offset - lo, output_shape=tuple(shape),
      output=np.float32, order=1, mode='nearest', prefilter=False)


def render_labels(source: np.ndarray, transform: np.ndarray, shape: Sequence[int],
                  fill: int) -> np.ndarray:
  """Nearest-neighbour samples of a label volume at `T @ [i, 1]` (labels do not interpolate).

  Args:
    source: `[*S]` integer labels with `n` axes; outside is `fill`.
    transform: `[n, n + 1]` scaled signed permutation (what `crop_transform` builds).
    shape: view shape P (length n).
    fill: label outside the source (background).

  Returns:
    `[*P]` array of the source's dtype.
  """
  n = len(shape)
  transform = np.asarray(transform, np.float64)
  aligned = _axis_aligned(transform)
  if source.ndim != n or aligned is None:
    raise ValueError(f'render_labels: needs an axis-aligned [{n}, {n + 1}] transform for a '
                     f'{n}-D source, got {transform.shape} for {source.shape}')
  src_axis, steps = aligned
  # Round half up: the nearest source voxel to each view voxel's centre.
  index = [np.floor(steps[a] * np.arange(shape[a]) + transform[src_axis[a], n] + 0.5)
           .astype(np.int64) for a in range(n)]
  lo, size = np.zeros(n, np.int64), np.zeros(n, np.int64)
  for a in range(n):
    lo[src_axis[a]] = index[a].min()
    size[src_axis[a]] = index[a].max() + 1 - index[a].min()
  box = np.transpose(extract_padded(source, lo, size, fill), src_axis)
  return box[np.ix_(*[index[a] - lo[src_axis[a]] for a in range(n)])]
