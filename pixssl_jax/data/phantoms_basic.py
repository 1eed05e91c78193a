"""Rendering of the 'basic' phantom family (`phantoms` writes it; anatomy in its docstring).

One case is painted structure by structure onto its voxel grid, in the order that later
structures cover earlier ones; every random draw comes from the case's generator in a fixed
order, so a seed gives the same files.
"""

from __future__ import annotations

import types

import numpy as np
from scipy import ndimage

from pixssl_jax.data.phantom_body import below
from pixssl_jax.data.phantom_body import Body
from pixssl_jax.data.phantom_body import diaphragm_dome
from pixssl_jax.data.phantom_body import paint_colon
from pixssl_jax.data.phantom_body import paint_body_wall
from pixssl_jax.data.phantom_body import paint_table
from pixssl_jax.data.phantom_body import paint_thorax
from pixssl_jax.data.phantom_body import UNBOUNDED
from pixssl_jax.data.phantom_geometry import Canvas
from pixssl_jax.data.phantom_geometry import canvas_for_pose
from pixssl_jax.data.phantom_geometry import deformed
from pixssl_jax.data.phantom_geometry import ellipse_xy
from pixssl_jax.data.phantom_geometry import ellipsoid
from pixssl_jax.data.phantom_geometry import RandomField
from pixssl_jax.data.phantom_geometry import rotation
from pixssl_jax.data.phantom_geometry import smooth_max
from pixssl_jax.data.phantom_geometry import smooth_min
from pixssl_jax.data.phantom_geometry import tube_xy
from pixssl_jax.data.phantom_geometry import uniform

_PSF_SIGMA = 0.5  # In-plane PSF, voxels.


def _sample_tissues(rng) -> dict[str, float]:
  """Per-case non-contrast HU of each tissue (ranges keep organs >= ~6 HU apart)."""
  ranges = dict(lung=(-880, -820), fat=(-110, -90), skin=(25, 40),
                muscle=(50, 58), liver=(58, 68), spleen=(43, 49), kidney=(26, 34),
                blood=(38, 44), wall=(35, 42), fluid=(5, 20), gas=(-980, -920),
                disc=(80, 100), cancellous=(300, 360), cortex=(750, 950),
                posterior=(500, 600), csf=(10, 20), table=(100, 200))
  return {k: round(uniform(rng, lo, hi), 1) for k, (lo, hi) in ranges.items()}


def _make_canvas(rng, shape_scale: float, body_width: float, orientation: str) -> Canvas:
  """Samples the voxel grid (matrix, spacing, FOV, patient pose) and its coordinates."""
  nxy = max(8, round(160 * shape_scale * uniform(rng, 0.85, 1.15)))
  dxy = (body_width + uniform(rng, 20, 80)) / nxy  # FOV just wider than the body, as scanned.
  dz = uniform(rng, 1.5, 5.0) / shape_scale
  nz_range = max(4, round(64 * shape_scale)), max(6, round(96 * shape_scale))
  nz = int(np.clip(round(uniform(rng, 200, 320) / dz), *nz_range))
  shape = (nxy, nxy, nz)
  # Patient pose: anatomy origin (mid-abdomen, about L1) somewhere in scanner coordinates,
  # rotated a few degrees on the table; the FOV centre is near the body centre.
  yaw = np.deg2rad(uniform(rng, -4, 4))
  shift = np.array([uniform(rng, -30, 30), uniform(rng, -30, 30), uniform(rng, -300, 300)])
  rot = np.array([[np.cos(yaw), -np.sin(yaw), 0], [np.sin(yaw), np.cos(yaw), 0], [0, 0, 1]])
  fov_centre = rot @ [uniform(rng, -10, 10), uniform(rng, -15, 10), uniform(rng, 10, 30)] + shift
  return canvas_for_pose(shape, (dxy, dxy, dz), orientation, yaw, shift, fov_centre)


def _spine_frame(rng, body: Body) -> types.SimpleNamespace:
  """Spine centre line with lordosis, vertebral levels as a phase along z, and the diaphragm.

  Returns:
    A namespace of the sampled constants and the functions of z (mm) built on them: `xv`,
    `yv` (centre line), `bx`, `by` (vertebral body half-axes), `level_dz` (distance to the
    nearest level's centre), `dome`, `below_dome` (diaphragm).
  """
  xv0, yv0 = uniform(rng, -4, 4), -0.92 * body.ay + 0.5 * body.fat + uniform(rng, 70, 82)
  sco, sph, lord = uniform(rng, -3, 3), uniform(rng, 0, 2 * np.pi), uniform(rng, 4, 12)
  vbx, vby = uniform(rng, 19, 24), uniform(rng, 14, 17)
  period, z0, zph = uniform(rng, 32, 38), uniform(rng, 0, 40), uniform(rng, 0, 2 * np.pi)
  half_body = period * (1 - uniform(rng, 0.2, 0.26)) / 2
  z_top = uniform(rng, 95, 125)  # Right hemidiaphragm dome; the left is ~16 mm lower.
  dome = diaphragm_dome(z_top)
  return types.SimpleNamespace(
      xv0=xv0, yv0=yv0, vbx=vbx, vby=vby, half_body=half_body, z_top=z_top, dome=dome,
      below_dome=below(dome),
      xv=lambda z: xv0 + sco * np.sin(2 * np.pi * z / 600 + sph),
      yv=lambda z: yv0 + lord * np.exp(-((z + 70) / 110)**2),
      bx=lambda z: vbx * (1 - 0.0008 * z),  # Lumbar bodies grow caudally.
      by=lambda z: vby * (1 - 0.0008 * z),
      level_dz=lambda z: ((lambda s: (s - np.round(s)) * period)(
          (z - z0) / period + 0.05 * np.sin(2 * np.pi * z / 700 + zph))))


def _paint_back_muscles(cv: Canvas, rng, body: Body, sp, hu_of) -> None:
  """Paraspinal columns and psoas (growing caudally from about L1)."""
  _, by0 = body.half_extent
  for side in (-1, 1):
    cx, cy = sp.xv0 + side * uniform(rng, 30, 36), sp.yv0 - sp.vby - uniform(rng, 34, 42)
    a, b = uniform(rng, 26, 32), uniform(rng, 28, 36)
    para = lambda x, y, z, cx=cx, cy=cy, a=a, b=b: ellipse_xy(x - cx, y - cy, a, b) + 0 * z
    cv.paint((cx - a - 5, -by0, -UNBOUNDED), (cx + a + 5, cy + b + 5, UNBOUNDED),
             body.inside(para, 'muscle', 0.), hu_of['muscle'], 0)
    rps = lambda z: np.clip(4 + (20 - z) * 0.11, 1, 26)
    psoas = tube_xy(lambda z, s=side: sp.xv(z) + s * (sp.bx(z) + 0.8 * rps(z)), sp.yv, rps)
    cv.paint((sp.xv0 - 80, sp.yv0 - 40, -UNBOUNDED), (sp.xv0 + 80, sp.yv0 + 40, 30),
             lambda x, y, z, p=psoas: np.maximum(p(x, y, z), z - 20), hu_of['muscle'], 0)


def _paint_gut(cv: Canvas, rng, body: Body, sp, hu_of) -> None:
  """Stomach (air-fluid level: the patient is supine, gas rises to +y), colon and small-bowel
  loops, each a wall around fluid/stool and gas."""
  inside = body.inside
  stool = RandomField(rng, 60., (8., 20.), n=8)
  content = {'fluid': hu_of['fluid'],
             'stool': lambda x, y, z: -40. + stool(x, y, z)}

  def hollow(lo, hi, f, gas_above_y, fill):
    cv.paint(lo, hi, f, hu_of['wall'], 0)
    lumen = lambda x, y, z: f(x, y, z) + 3.
    cv.paint(lo, hi, lumen, content[fill], 0)
    gas = lambda x, y, z: np.maximum(lumen(x, y, z), gas_above_y - y)
    cv.paint(lo, hi, gas, hu_of['gas'], 0)

  sc = np.array([uniform(rng, -70, -45), uniform(rng, 15, 40), uniform(rng, 40, 70)])
  sa = np.array([uniform(rng, 35, 48), uniform(rng, 25, 35), uniform(rng, 40, 55)])
  stomach = deformed(ellipsoid(sc, sa, rotation(uniform(rng, -20, 20))), RandomField(rng, 5.))
  hollow(sc - sa.max() - 20, sc + sa.max() + 20, sp.below_dome(inside(stomach, 'cavity', 3.)),
         sc[1] + uniform(rng, -0.2, 0.5) * sa[1], 'fluid')
  cw = body.cavity_half_width
  paint_colon(rng, body, inside, hollow)
  for _ in range(int(rng.integers(5, 10))):
    c = np.array([uniform(rng, -0.65, 0.65) * cw, uniform(rng, 0, 60), uniform(rng, -160, -30)])
    a = rng.uniform(12, 22, 3)
    loop = ellipsoid(c, a, rotation(*rng.uniform(-90, 90, 3)))
    hollow(c - a.max() - 5, c + a.max() + 5, inside(loop, 'cavity', 3.),
           c[1] + (uniform(rng, -0.3, 0.5) if rng.random() < 0.35 else 1e3), 'fluid')


def _kidney_shapes(rng, sp) -> dict:
  """{label: (centre, half-axes, shape)} of both kidneys; drawn before the liver and spleen,
  which wrap around them."""
  kidneys = {}
  zr = uniform(rng, -45, -20)
  for side, lab, zk in ((1, 4, zr), (-1, 3, zr + uniform(rng, 10, 25))):
    c = np.array([sp.xv0 + side * uniform(rng, 62, 76), sp.yv0 + uniform(rng, -12, 2), zk])
    a = np.array([uniform(rng, 23, 28), uniform(rng, 20, 25), uniform(rng, 48, 60)])
    # Hilum faces antero-medially, upper pole tilts medially and posteriorly; local +x is
    # lateral on both sides (mirrored on the left).
    rot = rotation(-side * uniform(rng, 20, 40), -side * uniform(rng, 8, 18), uniform(rng, 5, 15))
    hilum = ellipsoid(c + rot @ [-side * 0.95 * a[0], 0, 0], a * [0.5, 0.45, 0.45], rot,
                       mirror_x=side < 0)
    outer = ellipsoid(c, a, rot, mirror_x=side < 0)
    kidneys[lab] = (c, a, deformed(lambda x, y, z, o=outer, h=hilum: smooth_max(
        o(x, y, z), -h(x, y, z), 4), RandomField(rng, uniform(rng, 2, 4), (40., 100.))))
  return kidneys


def _exclude(f, g, gap):
  """f minus g grown by `gap` mm (smoothly)."""
  return lambda x, y, z: smooth_max(f(x, y, z), gap - g(x, y, z), 6)


def _paint_solid_organs(cv: Canvas, rng, body: Body, sp, hu_of) -> None:
  """Liver (label 1), spleen (2) and kidneys (3, 4)."""
  kidneys = _kidney_shapes(rng, sp)
  inside, below_dome = body.inside, sp.below_dome
  column = lambda x, y, z: ellipse_xy(x - sp.xv0, y - sp.yv0 - 5, sp.vbx + 30, sp.vby + 35) + 0 * z
  rc = np.array([uniform(rng, 60, 78), uniform(rng, -15, 5), uniform(rng, 25, 50)])
  ra = np.array([uniform(rng, 62, 78), uniform(rng, 62, 78), uniform(rng, 72, 88)])
  lc = np.array([uniform(rng, -25, -5), rc[1] + uniform(rng, 30, 45), rc[2] + uniform(rng, 10, 25)])
  la = np.array([uniform(rng, 50, 68), uniform(rng, 22, 34), uniform(rng, 38, 52)])
  right_lobe = ellipsoid(rc, ra, rotation(uniform(rng, -15, 15), uniform(rng, -10, 10)))
  left_lobe = ellipsoid(lc, la, rotation(uniform(rng, -15, 15)))
  liver = deformed(lambda x, y, z: smooth_min(right_lobe(x, y, z), left_lobe(x, y, z), 25),
                    RandomField(rng, uniform(rng, 5, 9)))
  liver = _exclude(_exclude(below_dome(inside(liver, 'cavity')), kidneys[4][2], 4.), column, 0.)
  texture = RandomField(rng, 3., (10., 30.))
  cv.paint(np.minimum(rc, lc) - ra.max() - 25, np.maximum(rc, lc) + ra.max() + 25, liver,
           lambda x, y, z: hu_of['liver'] + texture(x, y, z), 1)

  cw = body.cavity_half_width
  pc = np.array([-cw * uniform(rng, 0.62, 0.72), sp.yv0 - uniform(rng, 5, 25),
                 uniform(rng, 35, 65)])
  pa = np.array([uniform(rng, 24, 32), uniform(rng, 50, 62), uniform(rng, 40, 52)])
  prot = rotation(uniform(rng, 20, 40), uniform(rng, -10, 10), uniform(rng, -10, 10))
  notch = ellipsoid(pc + prot @ [1.1 * pa[0], 0, 0], pa * [0.5, 0.6, 0.6], prot)
  spleen = deformed(lambda x, y, z, o=ellipsoid(pc, pa, prot): smooth_max(
      o(x, y, z), -notch(x, y, z), 4), RandomField(rng, uniform(rng, 3, 6)))
  spleen = _exclude(below_dome(inside(spleen, 'cavity')), kidneys[3][2], 4.)
  cv.paint(pc - pa.max() - 20, pc + pa.max() + 20, spleen, hu_of['spleen'], 2)
  for lab, (c, a, kidney) in kidneys.items():
    cv.paint(c - a.max() - 15, c + a.max() + 15, inside(kidney, 'cavity'), hu_of['kidney'], lab)


def _paint_great_vessels(cv: Canvas, rng, sp, hu_of) -> None:
  """IVC right-anterior of the spine (unlabelled), aorta left-anterior (label 5) down to its
  bifurcation into the (unlabelled) common iliac arteries."""
  xv0, yv0, xv, yv, by = sp.xv0, sp.yv0, sp.xv, sp.yv, sp.by
  z_bif, r0 = uniform(rng, -115, -85), uniform(rng, 10, 13)
  ivc_dx, ivc_dy, ivc_a, ivc_b = (uniform(rng, 20, 28), uniform(rng, 8, 14), uniform(rng, 11, 15),
                                  uniform(rng, 7, 10))
  ivc = lambda x, y, z: np.maximum(
      ellipse_xy(x - xv(z) - ivc_dx, y - yv(z) - by(z) - ivc_dy, ivc_a, ivc_b), z_bif - 10 - z)
  cv.paint((xv0 - 20, yv0 - 20, z_bif - 20), (xv0 + 60, yv0 + 60, UNBOUNDED), ivc,
           hu_of['blood'], 0)
  ao_dx, ao_gap = uniform(rng, 12, 20), uniform(rng, 2, 5)
  rad = lambda z: r0 * (1 + 0.0008 * z)
  ao_x = lambda z: xv(z) - ao_dx
  ao_y = lambda z: yv(z) + by(z) + rad(z) + ao_gap
  aorta = tube_xy(ao_x, ao_y, rad)
  cv.paint((xv0 - 60, yv0 - 10, z_bif - 10), (xv0 + 20, yv0 + 70, UNBOUNDED),
           lambda x, y, z: np.maximum(aorta(x, y, z), z_bif - z), hu_of['blood'], 5)
  for side in (-1, 1):
    spread = np.tan(np.deg2rad(uniform(rng, 20, 30)))
    iliac = tube_xy(lambda z, s=side, t=spread: ao_x(z_bif) + s * (z_bif - z) * t, ao_y,
                     lambda z: 0.62 * r0 + 0 * z)
    cv.paint((xv0 - 150, yv0 - 20, -UNBOUNDED), (xv0 + 150, yv0 + 70, z_bif + 5),
             lambda x, y, z, i=iliac: np.maximum(i(x, y, z), z - z_bif), hu_of['blood'], 0)


def _paint_vertebrae(cv: Canvas, rng, body: Body, sp, hu_of) -> None:
  """Vertebrae (label 6): discs along a column, bodies with a bright cortex over cancellous
  bone, posterior elements around the (unlabelled) spinal canal."""
  xv, yv, bx, by, level_dz, half_body = sp.xv, sp.yv, sp.bx, sp.by, sp.level_dz, sp.half_body
  spine_lo = (sp.xv0 - 75, sp.yv0 - sp.vby - 75, -UNBOUNDED)
  spine_hi = (sp.xv0 + 75, sp.yv0 + 40, UNBOUNDED)
  sect = lambda x, y, z: ellipse_xy(x - xv(z), y - yv(z), bx(z), by(z))
  cv.paint(spine_lo, spine_hi, lambda x, y, z: sect(x, y, z) + 0.5, hu_of['disc'], 0)
  vbody = lambda x, y, z: smooth_max(sect(x, y, z), np.abs(level_dz(z)) - half_body, 2.)
  cortex = uniform(rng, 1.5, 2.5)
  cv.paint(spine_lo, spine_hi, vbody, hu_of['cortex'], 6)
  cv.paint(spine_lo, spine_hi, lambda x, y, z: vbody(x, y, z) + cortex, hu_of['cancellous'], 6)
  ca, cb = uniform(rng, 9, 12), uniform(rng, 7, 9)
  yc = lambda z: yv(z) - by(z) - cb - 1.5

  def posterior(x, y, z):
    dz = np.abs(level_dz(z))
    arch = np.maximum(ellipse_xy(x - xv(z), y - yc(z), ca + 6, cb + 6), dz - 0.85 * half_body)
    spinous = np.maximum(ellipse_xy(x - xv(z), y - yc(z) + cb + 16, 4, 14),
                         dz - 0.6 * half_body)
    transverse = np.maximum(ellipse_xy(np.abs(x - xv(z)) - bx(z) - 10, y - yc(z) - 3, 16, 5),
                            dz - 5)
    return np.minimum(np.minimum(arch, spinous), transverse)

  cv.paint(spine_lo, spine_hi, body.inside(posterior, 'muscle', 3.), hu_of['posterior'], 6)
  cv.paint(spine_lo, spine_hi, lambda x, y, z: ellipse_xy(x - xv(z), y - yc(z), ca, cb),
           hu_of['csf'], 0)


def _form_image(cv: Canvas, rng, orientation: str, hu_of):
  """White noise through the in-plane PSF, scaled so that its std after the PSF is `sigma`
  (the PSF also blurs the anatomy: partial volume); returns the case as `render_case` does."""
  sigma = uniform(rng, 10, 25)
  impulse = np.zeros((15, 15))
  impulse[7, 7] = 1.
  gain = np.sqrt((ndimage.gaussian_filter(impulse, _PSF_SIGMA)**2).sum())
  cv.hu += (sigma / gain) * rng.standard_normal(cv.hu.shape, dtype=np.float32)
  hu = ndimage.gaussian_filter(cv.hu, (_PSF_SIGMA, _PSF_SIGMA, 0.))
  meta = dict(orientation=orientation, shape=list(cv.hu.shape),
              spacing=[round(float(s), 4) for s in np.abs(np.diag(cv.affine)[:3])],
              noise_sigma_hu=round(sigma, 2), tissues_hu=hu_of)
  return hu, cv.label, cv.affine, meta


def render_case(rng, shape_scale: float, orientation: str):
  """Builds one phantom, painting structures in the order that later ones cover earlier ones.

  Returns:
    hu: [X, Y, Z] float32 HU; label: [X, Y, Z] uint8; affine [4, 4]; meta dict.
  """
  hu_of = _sample_tissues(rng)
  body = Body(rng)
  cv = _make_canvas(rng, shape_scale, 2 * body.ax, orientation)
  paint_body_wall(cv, body, hu_of)
  sp = _spine_frame(rng, body)
  paint_thorax(cv, body, sp.xv0, sp.yv0, sp.z_top, hu_of['lung'], hu_of['blood'])
  _paint_back_muscles(cv, rng, body, sp, hu_of)
  _paint_gut(cv, rng, body, sp, hu_of)
  _paint_solid_organs(cv, rng, body, sp, hu_of)
  _paint_great_vessels(cv, rng, sp, hu_of)
  _paint_vertebrae(cv, rng, body, sp, hu_of)
  paint_table(cv, rng, body, hu_of['table'])
  return _form_image(cv, rng, orientation, hu_of)
