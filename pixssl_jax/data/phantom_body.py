"""The body both phantom families share: outline and layers, diaphragm, thorax base, table.

`phantoms` (the basic family) and `phantoms_clinical` draw their own sizes and poses but build
the body wall, the lungs and heart above the diaphragm, and the scanner table the same way; the
shapes live here so that neither family module imports the other.
"""

from __future__ import annotations

import numpy as np

from pixssl_jax.data.phantom_geometry import Canvas
from pixssl_jax.data.phantom_geometry import ellipse_xy
from pixssl_jax.data.phantom_geometry import deformed
from pixssl_jax.data.phantom_geometry import ellipsoid
from pixssl_jax.data.phantom_geometry import RandomField
from pixssl_jax.data.phantom_geometry import Shape
from pixssl_jax.data.phantom_geometry import smooth_max
from pixssl_jax.data.phantom_geometry import uniform

UNBOUNDED = 5000.  # "Unbounded" half-extent of a window, mm (clipped to the grid).


class Body:
  """Body outline (superellipse with harmonics) and its layers, as depths below the skin."""

  def __init__(self, rng):
    self.ax = uniform(rng, 140, 175)
    self.ay = self.ax * uniform(rng, 0.68, 0.8)
    self.p = uniform(rng, 2.0, 2.6)
    self.fat = uniform(rng, 8, 35)
    self.muscle = uniform(rng, 8, 14)
    self.harmonics = [(n, uniform(rng, 0, 0.025), uniform(rng, 0, 2 * np.pi)) for n in range(2, 6)]
    self.zwave = (uniform(rng, 0.02, 0.05), uniform(rng, 250, 500), uniform(rng, 0, 2 * np.pi))
    self.cavity_half_width = self.ax - 2 - 0.8 * self.fat - self.muscle

  def sdf(self, layer: str) -> Shape:
    """Signed distance to the outer surface of 'skin', 'fat', 'muscle' or 'cavity'."""

    def f(x, y, z):
      th = np.arctan2(y, x)
      c, s = np.abs(np.cos(th)), np.abs(np.sin(th))
      ay = np.where(y < 0, 0.92 * self.ay, self.ay)  # Flatter back, lying on the table.
      r = 1. / ((c / self.ax)**self.p + (s / ay)**self.p)**(1. / self.p)
      r = r * (1. + sum(a * np.cos(n * th + ph) for n, a, ph in self.harmonics))
      amp, wavelength, ph = self.zwave
      r = r * (1. + amp * np.sin(2 * np.pi * z / wavelength + ph))
      depth = {'skin': 0., 'fat': 2.}.get(layer)
      if depth is None:  # Subcutaneous fat thickest anteriorly, thinnest on the back.
        depth = 2. + self.fat * (0.8 + 0.3 * np.sin(th) + 0.1 * np.cos(2 * th))
        depth = depth + (self.muscle if layer == 'cavity' else 0.)
      return np.hypot(x, y) - (r - depth)

    return f

  def inside(self, f: Shape, layer: str, gap: float = 2.) -> Shape:
    """`f` kept at least `gap` mm inside `layer`'s outer surface."""
    return lambda x, y, z: np.maximum(f(x, y, z), self.sdf(layer)(x, y, z) + gap)

  @property
  def half_extent(self) -> tuple[float, float]:
    """In-plane half-extent of a window that holds the whole body, mm."""
    return self.ax * 1.2, self.ay * 1.2


def paint_body_wall(cv: Canvas, body: Body, hu_of: dict[str, float]) -> None:
  """Skin, subcutaneous fat, muscle, then visceral fat filling the cavity."""
  bx0, by0 = body.half_extent
  for layer, tissue in (('skin', 'skin'), ('fat', 'fat'), ('muscle', 'muscle'),
                        ('cavity', 'fat')):
    cv.paint((-bx0, -by0, -UNBOUNDED), (bx0, by0, UNBOUNDED), body.sdf(layer), hu_of[tissue], 0)


def diaphragm_dome(z_top: float):
  """Height (z, mm) of the diaphragm at (x, y); the right dome at `z_top`, the left ~16 mm
  lower."""
  return lambda x, y: (z_top - 8 + 8 * np.tanh(x / 30) - 0.003 * (np.abs(x) - 60)**2
                       - 0.002 * (y + 10)**2)


def below(dome):
  """Shape transform: `f` kept `gap` mm below the diaphragm `dome`."""
  return lambda f, gap=3.: lambda x, y, z: np.maximum(f(x, y, z), z - dome(x, y) + gap)


def paint_thorax(cv: Canvas, body: Body, xv0: float, yv0: float, z_top: float,
                 lung_hu: float, heart_hu: float) -> None:
  """Lungs above the diaphragm around the mediastinum, the heart on the dome.

  Args:
    cv: the case's canvas.
    body: the case's body.
    xv0, yv0: the spine's centre line at mid-abdomen, mm.
    z_top: height of the right diaphragm dome, mm.
    lung_hu, heart_hu: HU of lung parenchyma and of the blood in the heart.
  """
  bx0, by0 = body.half_extent
  dome = diaphragm_dome(z_top)
  med = lambda x, y, z: ellipse_xy(x - xv0 + 5, y - (yv0 + body.ay) / 2, 45, 70 + 0 * z)
  lung = lambda x, y, z: smooth_max(np.maximum(body.sdf('cavity')(x, y, z) + 2, dome(x, y) - z),
                                    -med(x, y, z), 5)
  cv.paint((-bx0, -by0, z_top - 80), (bx0, by0, UNBOUNDED), lung, lung_hu, 0)
  heart = ellipsoid((xv0 - 15, (yv0 + 0.8 * body.ay) / 2, z_top + 45), (55, 50, 55))
  cv.paint((-80, -by0, z_top - 40), (80, by0, z_top + 110),
           lambda x, y, z: np.maximum(heart(x, y, z), dome(x, y) - z + 2), heart_hu, 0)


def paint_table(cv: Canvas, rng, body: Body, table_hu: float) -> None:
  """The scanner table under the patient (a curved carbon plate)."""
  y_table = -0.92 * body.ay - uniform(rng, 5, 40)
  table = lambda x, y, z: np.maximum(np.abs(y - y_table + 6 - x * x / 1200) - 6,
                                     np.abs(x) - 230 + 0 * z)
  cv.paint((-240, y_table - 20, -UNBOUNDED), (240, y_table + 60, UNBOUNDED), table, table_hu, 0)


def paint_colon(rng, body: Body, inside, hollow) -> None:
  """Ascending and descending colon (vertical tubes ending at random heights) and the sagging
  transverse colon between them, each painted by `hollow(lo, hi, sdf, gas_above_y, 'stool')`.

  `inside(sdf, region, margin)` clips a shape to the body's cavity. Both phantom families
  draw the same random numbers here, in the same order.
  """
  cw = body.cavity_half_width
  x_asc, x_desc = cw * uniform(rng, 0.6, 0.75), -cw * uniform(rng, 0.65, 0.8)
  colons = ((x_asc, uniform(rng, 5, 30), uniform(rng, -20, 10), uniform(rng, 18, 25)),
            (x_desc, uniform(rng, -10, 15), uniform(rng, 15, 45), uniform(rng, 14, 20)))
  for xc, yc, z_end, r in colons:
    tube = lambda x, y, z, xc=xc, yc=yc, r=r, ze=z_end: np.maximum(
        np.hypot(x - xc, y - yc) - r, z - ze)
    hollow((xc - r - 10, yc - r - 10, -UNBOUNDED), (xc + r + 10, yc + r + 10, z_end + 10),
           inside(deformed(tube, RandomField(rng, 4.)), 'cavity', 3.),
           yc + uniform(rng, -0.2, 0.5) * r, 'stool')
  yt, zt = uniform(rng, 30, 55), uniform(rng, -10, 15)
  sag, rt = uniform(rng, 10, 50), uniform(rng, 16, 22)
  xm, hw = (x_asc + x_desc) / 2, (x_asc - x_desc) / 2
  zt_of = lambda x: zt - sag * (1 - np.clip((x - xm) / hw, -1, 1)**2)
  transverse = lambda x, y, z: np.maximum(np.hypot(y - yt, z - zt_of(x)) - rt,
                                          np.abs(x - xm) - hw)
  hollow((x_desc - 30, yt - rt - 10, zt - sag - rt - 10),
         (x_asc + 30, yt + rt + 10, zt + rt + 10),
         inside(deformed(transverse, RandomField(rng, 4.)), 'cavity', 3.),
         yt + uniform(rng, -0.3, 0.4) * rt, 'stool')
