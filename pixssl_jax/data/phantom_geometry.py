"""Geometry for the CT phantoms: implicit shapes in millimetres and partial-volume painting.

Shapes are implicit functions f(x, y, z) of anatomy-frame coordinates (mm), negative inside;
`Canvas.paint` composites them onto a case's voxel grid with the fraction of each voxel they
cover (`occupancy`), which is what gives the phantoms realistic partial-volume edges.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np

Shape = Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]


def uniform(rng: np.random.Generator, lo: float, hi: float) -> float:
  return float(rng.uniform(lo, hi))


def rotation(yaw: float = 0., pitch: float = 0., roll: float = 0.) -> np.ndarray:
  """Rotation [3, 3] (about z, then y, then x; degrees) mapping local to anatomy axes."""
  a, b, c = np.deg2rad([yaw, pitch, roll])
  rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
  ry = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
  rx = np.array([[1, 0, 0], [0, np.cos(c), -np.sin(c)], [0, np.sin(c), np.cos(c)]])
  return rz @ ry @ rx


def smooth_min(a, b, k: float):
  """Smooth minimum (union of signed distances) with blend radius k mm."""
  h = np.maximum(k - np.abs(a - b), 0.) / k
  return np.minimum(a, b) - h * h * k * 0.25


def smooth_max(a, b, k: float):
  """Smooth maximum (intersection; `smooth_max(a, -b)` subtracts b)."""
  return -smooth_min(-a, -b, k)


def ellipsoid(center, axes, rot: np.ndarray | None = None, mirror_x: bool = False) -> Shape:
  """Approximate signed distance (mm) to a rotated ellipsoid, first order in (r - 1)."""
  c, a = np.asarray(center, np.float32), np.asarray(axes, np.float32)
  r = np.eye(3) if rot is None else rot

  def f(x, y, z):
    d = (x - c[0], y - c[1], z - c[2])
    q = [r[0, i] * d[0] + r[1, i] * d[1] + r[2, i] * d[2] for i in range(3)]
    if mirror_x:
      q[0] = -q[0]
    rad = np.sqrt(sum((qi / ai)**2 for qi, ai in zip(q, a)))
    grad = np.sqrt(sum((qi / ai**2)**2 for qi, ai in zip(q, a)))
    return (rad - 1.) * rad / np.maximum(grad, 1e-6)

  return f


def tube_xy(cx, cy, radius):
  """Distance (mm) to a vertical tube whose centre/radius may vary with z (arrays [1, 1, Z])."""
  return lambda x, y, z: np.hypot(x - cx(z), y - cy(z)) - radius(z)


class RandomField:
  """Smooth random scalar field: a few random plane waves (wavelengths in mm)."""

  def __init__(self, rng, amplitude: float, wavelengths=(50., 150.), n: int = 4):
    k = rng.normal(size=(n, 3))
    k *= (2 * np.pi / rng.uniform(*wavelengths, size=(n, 1))) / np.linalg.norm(k, axis=1,
                                                                                keepdims=True)
    self.k, self.phase = k.astype(np.float32), rng.uniform(0, 2 * np.pi, n).astype(np.float32)
    self.amp = (amplitude * np.sqrt(2. / n) * rng.uniform(0.6, 1.4, n)).astype(np.float32)

  def __call__(self, x, y, z):
    out = 0.
    for (kx, ky, kz), p, a in zip(self.k, self.phase, self.amp):
      out = out + a * np.sin((kx * x + ky * y + p) + kz * z)
    return out


def deformed(shape: Shape, field: RandomField) -> Shape:
  return lambda x, y, z: shape(x, y, z) + field(x, y, z)


def occupancy(f: np.ndarray) -> np.ndarray:
  """Fraction of each voxel inside `f < 0` (partial volume).

  The voxel box projects onto the surface normal as a segment over which f changes by
  w = sum_i |df/di| (one voxel step per axis), whatever the scaling of f; the inside fraction
  is then about a linear ramp across it. Thick slices therefore blur surfaces more along z.

  Args:
    f: [X, Y, Z] implicit function, negative inside, smooth on the voxel scale.

  Returns:
    [X, Y, Z] float32 in [0, 1].
  """
  w = np.zeros(f.shape, np.float32)
  for axis in range(3):
    if f.shape[axis] < 2:
      continue
    g = 0.5 * np.abs(np.diff(f, axis=axis))  # Central differences, one-sided at the ends.
    lo, hi = [slice(None)] * 3, [slice(None)] * 3
    lo[axis], hi[axis] = slice(None, -1), slice(1, None)
    w[tuple(lo)] += g
    w[tuple(hi)] += g
  return np.clip(0.5 - f / np.maximum(w, 1e-3), 0., 1.).astype(np.float32)


@dataclasses.dataclass
class Canvas:
  """The case's voxel grid, its anatomy-frame coordinates, and the volumes being painted."""
  affine: np.ndarray  # [4, 4], diagonal rotation part (RAS or LPS voxel order).
  yaw: float  # Patient rotation on the table, radians.
  shift: np.ndarray  # [3], world position of the anatomy origin, mm.
  xa: np.ndarray  # [X, Y, 1] anatomy-frame coordinates of voxel centres, mm.
  ya: np.ndarray  # [X, Y, 1]
  za: np.ndarray  # [1, 1, Z]
  hu: np.ndarray  # [X, Y, Z] float32
  label: np.ndarray  # [X, Y, Z] uint8

  def window(self, lo, hi):
    """Voxel slices covering an anatomy-frame box [lo, hi] (mm), or None if outside."""
    corners = np.array(np.meshgrid(*zip(lo, hi), indexing='ij')).reshape(3, -1)
    c, s = np.cos(self.yaw), np.sin(self.yaw)
    world = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]]) @ corners + self.shift[:, None]
    idx = (world - self.affine[:3, 3:]) / np.diag(self.affine)[:3, None]
    sl = []
    for axis, n in enumerate(self.hu.shape):
      a, b = int(np.floor(idx[axis].min())) - 1, int(np.ceil(idx[axis].max())) + 2
      a, b = max(a, 0), min(b, n)
      if b - a < 1:
        return None
      sl.append(slice(a, b))
    return tuple(sl)

  def paint(self, lo, hi, shape: Shape, hu, label: int | None = None):
    """Composites a structure over what is painted so far (painter's order = occlusion).

    Args:
      lo, hi: anatomy-frame bounding box (mm) that contains the structure.
      shape: implicit function of anatomy coordinates, negative inside.
      hu: HU value, or a callable of (x, y, z) giving HU per voxel.
      label: label value to write where the structure covers >= half a voxel; None leaves
        labels alone, 0 erases (an unlabelled structure in front of an organ).
    """
    sl = self.window(lo, hi)
    if sl is None:
      return
    x, y, z = self.xa[sl[0], sl[1]], self.ya[sl[0], sl[1]], self.za[..., sl[2]]
    f = np.broadcast_to(shape(x, y, z), tuple(s.stop - s.start for s in sl))
    occ = occupancy(f.astype(np.float32))
    value = hu(x, y, z) if callable(hu) else hu
    sub = self.hu[sl]
    sub += occ * (value - sub)
    if label is not None:
      self.label[sl][occ >= 0.5] = label


def ellipse_xy(dx, dy, a, b):
  """Approximate signed distance (mm) to an axis-aligned ellipse in the axial plane."""
  ex, ey = dx / a, dy / b
  r = np.sqrt(ex * ex + ey * ey)
  return (r - 1.) * r / np.maximum(np.sqrt((ex / a)**2 + (ey / b)**2), 1e-6)


def capsule(p0, p1, radius: float) -> Shape:
  """Signed distance (mm) to a straight tube of `radius` from p0 to p1 with round ends."""
  a, b = np.asarray(p0, np.float32), np.asarray(p1, np.float32)
  ab = b - a
  inv = 1. / max(float(ab @ ab), 1e-6)

  def f(x, y, z):
    d = (x - a[0], y - a[1], z - a[2])
    t = np.clip((d[0] * ab[0] + d[1] * ab[1] + d[2] * ab[2]) * inv, 0., 1.)
    return np.sqrt(sum((di - t * abi)**2 for di, abi in zip(d, ab))) - radius

  return f


def canvas_for_pose(shape, spacing, orientation: str, yaw: float, shift,
                    fov_centre) -> Canvas:
  """A blank canvas (air, label 0) for a voxel grid and a patient pose on the table.

  Args:
    shape: voxel counts (X, Y, Z).
    spacing: voxel size in mm (x, y, z).
    orientation: 'RAS' or 'LPS' voxel order.
    yaw: patient rotation about the scanner z axis, radians.
    shift: [3] world position of the anatomy origin, mm.
    fov_centre: [3] world position of the grid centre, mm.
  """
  signs = np.array([1., 1., 1.]) if orientation == 'RAS' else np.array([-1., -1., 1.])
  diag = signs * np.asarray(spacing, np.float64)
  shift = np.asarray(shift, np.float64)
  affine = np.eye(4)
  affine[:3, :3] = np.diag(diag)
  affine[:3, 3] = np.asarray(fov_centre) - diag * (np.array(shape) - 1) / 2
  xw, yw, zw = (affine[a, 3] + diag[a] * np.arange(n) for a, n in enumerate(shape))
  dxw, dyw = (xw - shift[0])[:, None, None], (yw - shift[1])[None, :, None]
  c, s = np.cos(yaw), np.sin(yaw)  # Anatomy frame = rot^T (world - shift).
  return Canvas(affine=affine, yaw=yaw, shift=shift,
                xa=(c * dxw + s * dyw).astype(np.float32),
                ya=(-s * dxw + c * dyw).astype(np.float32),
                za=(zw - shift[2])[None, None, :].astype(np.float32),
                hu=np.full(tuple(shape), -1000., np.float32),
                label=np.zeros(tuple(shape), np.uint8))
