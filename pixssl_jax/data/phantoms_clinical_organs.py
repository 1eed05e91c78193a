"""Anatomy of the 'clinical' phantom family (`phantoms_clinical`): spine and vessels, gut,
pancreas, and the labelled solid organs with their textures, vessels and lesions.

Coordinates are the anatomy frame in mm (+x patient right, +y anterior, +z superior); shapes
are implicit functions, negative inside, painted with `Canvas.paint` in painter's order.
"""

from __future__ import annotations

import types

import numpy as np

from pixssl_jax.data.phantom_body import paint_colon
from pixssl_jax.data.phantom_geometry import capsule
from pixssl_jax.data.phantom_geometry import deformed
from pixssl_jax.data.phantom_geometry import ellipse_xy
from pixssl_jax.data.phantom_geometry import ellipsoid
from pixssl_jax.data.phantom_geometry import RandomField
from pixssl_jax.data.phantom_geometry import rotation
from pixssl_jax.data.phantom_geometry import smooth_max
from pixssl_jax.data.phantom_geometry import smooth_min
from pixssl_jax.data.phantom_geometry import tube_xy
from pixssl_jax.data.phantom_geometry import uniform

_ALL = 5000.
_PHASE_INDEX = {'non_contrast': 0, 'arterial': 1, 'portal_venous': 2}
# Lesion HU: absolute (cysts) or relative to the organ, (lo, hi) per phase.
_LESIONS = {
    'cyst': dict(absolute=True, hu=((0, 15),) * 3),
    'metastasis': dict(absolute=False, hu=((-25, -10), (-35, -20), (-60, -35)), rim=(15, 25)),
    'hypervascular': dict(absolute=False, hu=((-15, -5), (50, 90), (-20, -5))),
    'hypodense': dict(absolute=False, hu=((-15, -5), (-50, -30), (-50, -30))),
}


def exclude(f, g, gap):
  """f minus g grown by `gap` mm (smoothly)."""
  return lambda x, y, z: smooth_max(f(x, y, z), gap - g(x, y, z), 6)


class Spine:
  """Spinal column frame (as in the basic family) and what hangs on it: back muscles, the
  aorta (label 5) with the IVC and iliac arteries, the vertebrae (label 6)."""

  def __init__(self, rng, xv0: float, yv0: float):
    self.xv0, self.yv0 = xv0, yv0
    sco, sph, lord = uniform(rng, -3, 3), uniform(rng, 0, 2 * np.pi), uniform(rng, 4, 12)
    self.xv = lambda z: xv0 + sco * np.sin(2 * np.pi * z / 600 + sph)
    self.yv = lambda z: yv0 + lord * np.exp(-((z + 70) / 110)**2)
    self.vbx, self.vby = uniform(rng, 19, 24), uniform(rng, 14, 17)
    self.bx = lambda z: self.vbx * (1 - 0.0008 * z)  # Lumbar bodies grow caudally.
    self.by = lambda z: self.vby * (1 - 0.0008 * z)
    period, z0, zph = uniform(rng, 32, 38), uniform(rng, 0, 40), uniform(rng, 0, 2 * np.pi)
    self.half_body = period * (1 - uniform(rng, 0.2, 0.26)) / 2
    self.level_dz = lambda z: ((lambda s: (s - np.round(s)) * period)(
        (z - z0) / period + 0.05 * np.sin(2 * np.pi * z / 700 + zph)))
    # Great vessels, sampled here because the organs must keep clear of the IVC.
    self.z_bif, self.r0 = uniform(rng, -115, -85), uniform(rng, 10, 13)
    dx, dy, a, b = (uniform(rng, 20, 28), uniform(rng, 8, 14), uniform(rng, 11, 15),
                    uniform(rng, 7, 10))
    self.ivc = lambda x, y, z: np.maximum(
        ellipse_xy(x - self.xv(z) - dx, y - self.yv(z) - self.by(z) - dy, a, b),
        self.z_bif - 10 - z)
    ao_dx, ao_gap = uniform(rng, 12, 20), uniform(rng, 2, 5)
    self.rad = lambda z: self.r0 * (1 + 0.0008 * z)
    self.ao_x = lambda z: self.xv(z) - ao_dx
    self.ao_y = lambda z: self.yv(z) + self.by(z) + self.rad(z) + ao_gap
    self.column = lambda x, y, z: ellipse_xy(x - xv0, y - yv0 - 5, self.vbx + 30,
                                             self.vby + 35) + 0 * z

  def paint_muscles(self, cv, rng, inside, muscle_hu, by0):
    for side in (-1, 1):
      cx, cy = self.xv0 + side * uniform(rng, 30, 36), self.yv0 - self.vby - uniform(rng, 34, 42)
      a, b = uniform(rng, 26, 32), uniform(rng, 28, 36)
      para = lambda x, y, z, cx=cx, cy=cy, a=a, b=b: ellipse_xy(x - cx, y - cy, a, b) + 0 * z
      cv.paint((cx - a - 5, -by0, -_ALL), (cx + a + 5, cy + b + 5, _ALL),
               inside(para, 'muscle', 0.), muscle_hu, 0)
      rps = lambda z: np.clip(4 + (20 - z) * 0.11, 1, 26)
      psoas = tube_xy(lambda z, s=side: self.xv(z) + s * (self.bx(z) + 0.8 * rps(z)), self.yv, rps)
      cv.paint((self.xv0 - 80, self.yv0 - 40, -_ALL), (self.xv0 + 80, self.yv0 + 40, 30),
               lambda x, y, z, p=psoas: np.maximum(p(x, y, z), z - 20), muscle_hu, 0)

  def paint_vessels(self, cv, rng, hu_of):
    x0, y0, zb = self.xv0, self.yv0, self.z_bif
    cv.paint((x0 - 20, y0 - 20, zb - 20), (x0 + 60, y0 + 60, _ALL), self.ivc, hu_of['ivc'], 0)
    aorta = tube_xy(self.ao_x, self.ao_y, self.rad)
    cv.paint((x0 - 60, y0 - 10, zb - 10), (x0 + 20, y0 + 70, _ALL),
             lambda x, y, z: np.maximum(aorta(x, y, z), zb - z), hu_of['aorta'], 5)
    for side in (-1, 1):
      spread = np.tan(np.deg2rad(uniform(rng, 20, 30)))
      iliac = tube_xy(lambda z, s=side, t=spread: self.ao_x(zb) + s * (zb - z) * t, self.ao_y,
                      lambda z: 0.62 * self.r0 + 0 * z)
      cv.paint((x0 - 150, y0 - 20, -_ALL), (x0 + 150, y0 + 70, zb + 5),
               lambda x, y, z, i=iliac: np.maximum(i(x, y, z), z - zb), hu_of['aorta'], 0)

  def paint_vertebrae(self, cv, rng, inside, hu_of):
    xv, yv, bx, by, x0, y0 = self.xv, self.yv, self.bx, self.by, self.xv0, self.yv0
    lo, hi = (x0 - 75, y0 - self.vby - 75, -_ALL), (x0 + 75, y0 + 40, _ALL)
    sect = lambda x, y, z: ellipse_xy(x - xv(z), y - yv(z), bx(z), by(z))
    cv.paint(lo, hi, lambda x, y, z: sect(x, y, z) + 0.5, hu_of['disc'], 0)
    vbody = lambda x, y, z: smooth_max(sect(x, y, z),
                                       np.abs(self.level_dz(z)) - self.half_body, 2.)
    cortex = uniform(rng, 1.5, 2.5)
    cv.paint(lo, hi, vbody, hu_of['cortex'], 6)
    cv.paint(lo, hi, lambda x, y, z: vbody(x, y, z) + cortex, hu_of['cancellous'], 6)
    ca, cb = uniform(rng, 9, 12), uniform(rng, 7, 9)
    yc = lambda z: yv(z) - by(z) - cb - 1.5
    hb = self.half_body

    def posterior(x, y, z):
      dz = np.abs(self.level_dz(z))
      arch = np.maximum(ellipse_xy(x - xv(z), y - yc(z), ca + 6, cb + 6), dz - 0.85 * hb)
      spinous = np.maximum(ellipse_xy(x - xv(z), y - yc(z) + cb + 16, 4, 14), dz - 0.6 * hb)
      transverse = np.maximum(ellipse_xy(np.abs(x - xv(z)) - bx(z) - 10, y - yc(z) - 3, 16, 5),
                              dz - 5)
      return np.minimum(np.minimum(arch, spinous), transverse)

    cv.paint(lo, hi, inside(posterior, 'muscle', 3.), hu_of['posterior'], 6)
    cv.paint(lo, hi, lambda x, y, z: ellipse_xy(x - xv(z), y - yc(z), ca, cb), hu_of['csf'], 0)


def paint_gut(cv, rng, body, inside, below_dome, hu_of, oral: bool):
  """Stomach, colon and small-bowel loops: an enhancing wall around fluid, food, stool or oral
  contrast, with gas on top (the patient is supine)."""
  stool, food = RandomField(rng, 60., (8., 20.), n=8), RandomField(rng, 20., (6., 15.), n=8)
  content = {'fluid': hu_of['fluid'], 'stool': lambda x, y, z: -40. + stool(x, y, z),
             'food': lambda x, y, z: 40. + food(x, y, z)}

  def hollow(lo, hi, f, gas_above_y, fill):
    cv.paint(lo, hi, f, hu_of['wall'], 0)
    lumen = lambda x, y, z: f(x, y, z) + 3.
    cv.paint(lo, hi, lumen, content.get(fill, fill), 0)
    gas = lambda x, y, z: np.maximum(lumen(x, y, z), gas_above_y - y)
    cv.paint(lo, hi, gas, hu_of['gas'], 0)

  oral_hu = lambda: hu_of['oral'] * uniform(rng, 0.7, 1.1)
  sc = np.array([uniform(rng, -70, -45), uniform(rng, 15, 40), uniform(rng, 40, 70)])
  sa = np.array([uniform(rng, 35, 48), uniform(rng, 25, 35), uniform(rng, 40, 55)])
  stomach = deformed(ellipsoid(sc, sa, rotation(uniform(rng, -20, 20))), RandomField(rng, 5.))
  fill = oral_hu() if oral else ('food' if rng.random() < 0.5 else 'fluid')
  hollow(sc - sa.max() - 20, sc + sa.max() + 20, below_dome(inside(stomach, 'cavity', 3.)),
         sc[1] + uniform(rng, -0.2, 0.5) * sa[1], fill)
  cw = body.cavity_half_width
  paint_colon(rng, body, inside, hollow)
  # Small bowel, also high enough to lie between the kidneys, liver and spleen.
  for _ in range(int(rng.integers(7, 13))):
    c = np.array([uniform(rng, -0.7, 0.7) * cw, uniform(rng, -10, 60), uniform(rng, -160, 10)])
    a = rng.uniform(10, 20, 3)
    loop = ellipsoid(c, a, rotation(*rng.uniform(-90, 90, 3)))
    fill = oral_hu() if oral and rng.random() < 0.7 else 'fluid'
    hollow(c - a.max() - 5, c + a.max() + 5, inside(loop, 'cavity', 3.),
           c[1] + (uniform(rng, -0.3, 0.5) if rng.random() < 0.35 else 1e3), fill)


def sample_organ_geometry(rng, body, xv0, yv0, spine):
  """Kidney, liver and spleen shapes (the pancreas and the veins are placed around them)."""
  g = types.SimpleNamespace(cw=body.cavity_half_width, kidneys={})
  g.zr = zr = uniform(rng, -45, -20)
  for side, lab, zk in ((1, 4, zr), (-1, 3, zr + uniform(rng, 10, 25))):
    c = np.array([xv0 + side * uniform(rng, 62, 76), yv0 + uniform(rng, -12, 2), zk])
    a = np.array([uniform(rng, 23, 28), uniform(rng, 20, 25), uniform(rng, 48, 60)])
    rot = rotation(-side * uniform(rng, 20, 40), -side * uniform(rng, 8, 18), uniform(rng, 5, 15))
    hilum = ellipsoid(c + rot @ [-side * 0.95 * a[0], 0, 0], a * [0.5, 0.45, 0.45], rot,
                      mirror_x=side < 0)
    outer = ellipsoid(c, a, rot, mirror_x=side < 0)
    g.kidneys[lab] = (c, a, deformed(lambda x, y, z, o=outer, h=hilum: smooth_max(
        o(x, y, z), -h(x, y, z), 4), RandomField(rng, uniform(rng, 2, 4), (40., 100.))))
  s = uniform(rng, 0.85, 1.2)  # Liver size (hepatomegaly at the top of the range).
  g.rc = np.array([uniform(rng, 60, 78), uniform(rng, -15, 5), uniform(rng, 25, 50)])
  g.ra = s * np.array([uniform(rng, 62, 78), uniform(rng, 62, 78), uniform(rng, 72, 88)])
  g.lc = np.array([uniform(rng, -25, -5), g.rc[1] + uniform(rng, 30, 45),
                   g.rc[2] + uniform(rng, 10, 25)])
  g.la = s * np.array([uniform(rng, 50, 68), uniform(rng, 22, 34), uniform(rng, 38, 52)])
  right_lobe = ellipsoid(g.rc, g.ra, rotation(uniform(rng, -15, 15), uniform(rng, -10, 10)))
  left_lobe = ellipsoid(g.lc, g.la, rotation(uniform(rng, -15, 15)))
  g.liver_raw = deformed(lambda x, y, z: smooth_min(right_lobe(x, y, z), left_lobe(x, y, z), 25),
                         RandomField(rng, uniform(rng, 5, 9)))
  s = uniform(rng, 0.75, 1.5)  # Spleen size (splenomegaly at the top of the range).
  g.pc = np.array([-g.cw * uniform(rng, 0.62, 0.72), yv0 - uniform(rng, 5, 25),
                   uniform(rng, 35, 65)])
  g.pa = s**(1 / 3) * np.array([uniform(rng, 24, 32), uniform(rng, 50, 62), uniform(rng, 40, 52)])
  prot = rotation(uniform(rng, 20, 40), uniform(rng, -10, 10), uniform(rng, -10, 10))
  notch = ellipsoid(g.pc + prot @ [1.1 * g.pa[0], 0, 0], g.pa * [0.5, 0.6, 0.6], prot)
  g.spleen_raw = deformed(lambda x, y, z, o=ellipsoid(g.pc, g.pa, prot): smooth_max(
      o(x, y, z), -notch(x, y, z), 4), RandomField(rng, uniform(rng, 3, 6)))
  # Gallbladder under the right lobe, in its fossa (absent in some cases: cholecystectomy).
  g.gallbladder = None
  if rng.random() < 0.85:
    gc = g.rc + g.ra * [-uniform(rng, 0.2, 0.4), uniform(rng, 0.35, 0.55), -uniform(rng, 0.6, 0.8)]
    ga = np.array([uniform(rng, 12, 20), uniform(rng, 12, 20), uniform(rng, 28, 42)])
    g.gallbladder = ellipsoid(gc, ga, rotation(uniform(rng, -30, 30), uniform(rng, 15, 40)))
    g.gc, g.ga = gc, ga
  g.hilum = g.rc + g.ra * [-0.45, 0.1, -0.35]
  g.zp = zr + uniform(rng, 25, 45)  # Pancreas level.
  return g


def paint_pancreas(cv, rng, g, spine, hu_of, phase):
  """Lobulated pancreas (head right of the aorta, tail at the splenic hilum) with the splenic
  vein behind it and the portal vein up to the liver hilum. All unlabelled."""
  ay = float(spine.ao_y(np.float32(g.zp)))
  head = np.array([spine.xv0 + uniform(rng, 25, 40), ay + uniform(rng, 20, 30), g.zp - 10])
  neck = np.array([spine.xv0 + uniform(rng, 0, 10), ay + uniform(rng, 28, 38), g.zp])
  tail = g.pc + [uniform(rng, 30, 40), uniform(rng, 25, 35), -uniform(rng, 10, 20)]
  rh, rt = uniform(rng, 12, 16), uniform(rng, 8, 11)
  pancreas = deformed(lambda x, y, z, a=capsule(head, neck, rh), b=capsule(neck, tail, rt):
                      smooth_min(a(x, y, z), b(x, y, z), 8),
                      RandomField(rng, 2.5, (12., 30.), n=6))
  lobules = RandomField(rng, 12., (5., 12.), n=10)  # Fat between the lobules.
  lo, hi = np.minimum(head, tail) - 30, np.maximum(head, tail) + 30
  cv.paint(lo, hi, pancreas, lambda x, y, z: hu_of['pancreas'] + lobules(x, y, z), 0)
  back = np.array([0., uniform(rng, 10, 14), 0.])
  confluence = neck - back
  for p0, p1, r in ((confluence, tail - back, uniform(rng, 3.5, 5)),
                    (confluence, g.hilum, uniform(rng, 6, 8))):
    cv.paint(np.minimum(p0, p1) - 15, np.maximum(p0, p1) + 15, capsule(p0, p1, r),
             hu_of['portal'], 0)


def _place(rng, sdf, centre, axes, radius, tries=256):
  """A point where a ball of `radius` fits inside `sdf` (None if none is found)."""
  pts = centre + axes * rng.uniform(-0.9, 0.9, (tries, 3))
  d = sdf(pts[:, 0], pts[:, 1], pts[:, 2])
  ok = np.flatnonzero(d < -radius - 3)
  return pts[ok[0]] if ok.size else None


def _lesions(cv, rng, organ_sdf, final_sdf, centre, axes, kinds, count, r_range, organ_hu,
             label, phase, organ):
  p = _PHASE_INDEX[phase]
  out = []
  for _ in range(count):
    kind = kinds[int(rng.integers(len(kinds)))]
    r, u = uniform(rng, *r_range), rng.random()
    spec = _LESIONS[kind]
    lo, hi = spec['hu'][p]
    value = (0. if spec['absolute'] else organ_hu) + lo + u * (hi - lo)
    shape_rot = rotation(*rng.uniform(-90, 90, 3))
    stretch = rng.uniform(0.8, 1.2, 3)
    c = _place(rng, final_sdf, centre, axes, r * stretch.max())
    if c is None:
      continue
    ball = deformed(ellipsoid(c, r * stretch, shape_rot), RandomField(rng, 0.1 * r, (10., 30.)))
    inner = lambda x, y, z, b=ball: np.maximum(b(x, y, z), organ_sdf(x, y, z))
    box = (c - 1.5 * r - 5, c + 1.5 * r + 5)
    # Drawn in every phase, so that the phase changes no shape.
    rim = uniform(rng, *spec['rim']) if 'rim' in spec else 0.
    if rim and p > 0:  # Enhancing rim around a darker core.
      cv.paint(*box, inner, value + rim, label)
      cv.paint(*box, lambda x, y, z, i=inner: i(x, y, z) + 3., value, label)
    else:
      cv.paint(*box, inner, value, label)
    out.append(dict(organ=organ, kind=kind, label=label, centre=c, radius_mm=round(r, 2),
                    hu=round(value, 1)))
  return out


def paint_solid_organs(cv, rng, g, spine, inside, below_dome, hu_of, phase):
  """Liver, gallbladder, spleen, kidneys. Returns the lesions painted (anatomy-frame centres)."""
  kidneys = g.kidneys
  liver = exclude(exclude(below_dome(inside(g.liver_raw, 'cavity')), kidneys[4][2], 4.),
                  spine.column, 0.)
  later = [lambda x, y, z: -spine.ivc(x, y, z) - 3]  # Painted over the liver afterwards.
  if g.gallbladder is not None:
    later.append(lambda x, y, z: -g.gallbladder(x, y, z) - 3)
  liver_final = lambda x, y, z: np.maximum.reduce([liver(x, y, z)] + [f(x, y, z) for f in later])
  fine, coarse = RandomField(rng, uniform(rng, 5, 9), (5., 15.), n=12), RandomField(
      rng, 3., (10., 30.))
  lo = np.minimum(g.rc, g.lc) - g.ra.max() - 25
  hi = np.maximum(g.rc, g.lc) + g.ra.max() + 25
  cv.paint(lo, hi, liver, lambda x, y, z: hu_of['liver'] + fine(x, y, z) + coarse(x, y, z), 1)
  # Portal branches from the hilum and hepatic veins towards the IVC, inside the liver.
  box_c, box_a = (lo + hi) / 2, (hi - lo) / 2
  top = np.array([spine.xv0 + 25, spine.yv0 + 25, g.rc[2] + 0.6 * g.ra[2]])
  for start, n, hu in ((g.hilum, int(rng.integers(4, 8)), hu_of['portal']),
                       (top, int(rng.integers(2, 4)), hu_of['ivc'])):
    for _ in range(n):
      end = _place(rng, liver, box_c, box_a, 8.)
      if end is None:
        continue
      vessel = capsule(start, end, uniform(rng, 2.5, 5))
      cv.paint(np.minimum(start, end) - 10, np.maximum(start, end) + 10,
               lambda x, y, z, v=vessel: np.maximum(v(x, y, z), liver(x, y, z) + 2), hu, 1)
  lesions = _lesions(cv, rng, liver, liver_final, g.rc, g.ra, ('cyst', 'metastasis',
                     'hypervascular'), int(rng.integers(0, 5)), (5, 22), hu_of['liver'], 1,
                     phase, 'liver')
  if g.gallbladder is not None:
    gb_lo, gb_hi = g.gc - g.ga.max() - 10, g.gc + g.ga.max() + 10
    gb = inside(g.gallbladder, 'cavity', 3.)
    cv.paint(gb_lo, gb_hi, gb, hu_of['wall'], 0)
    cv.paint(gb_lo, gb_hi, lambda x, y, z: gb(x, y, z) + 2., hu_of['bile'], 0)

  spleen = exclude(below_dome(inside(g.spleen_raw, 'cavity')), kidneys[3][2], 4.)
  # Arterial-phase spleen is mottled (arciform enhancement); later it is homogeneous.
  mottle_hu = uniform(rng, 20, 30)
  mottle = RandomField(rng, mottle_hu if phase == 'arterial' else 4., (8., 25.), n=10)
  cv.paint(g.pc - g.pa.max() - 20, g.pc + g.pa.max() + 20, spleen,
           lambda x, y, z: hu_of['spleen'] + mottle(x, y, z), 2)
  lesions += _lesions(cv, rng, spleen, spleen, g.pc, g.pa, ('cyst', 'hypodense'),
                      int(rng.integers(0, 2)), (5, 14), hu_of['spleen'], 2, phase, 'spleen')
  for lab, (c, a, kidney) in kidneys.items():
    k = inside(kidney, 'cavity')
    box = (c - a.max() - 15, c + a.max() + 15)
    cv.paint(*box, k, hu_of['cortex_k'], lab)
    pyramids = RandomField(rng, 2.5, (8., 20.), n=8)
    thickness = uniform(rng, 5, 8)
    cv.paint(*box, lambda x, y, z, k=k, p=pyramids, t=thickness: k(x, y, z) + t + p(x, y, z),
             hu_of['medulla'], lab)
    lesions += _lesions(cv, rng, k, k, c, a, ('cyst',), int(rng.random() < 0.3), (5, 14),
                        hu_of['cortex_k'], lab, phase,
                        'kidney_right' if lab == 4 else 'kidney_left')
  return lesions
