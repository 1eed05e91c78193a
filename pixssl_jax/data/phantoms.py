r"""Synthetic abdominal CT phantoms: the embedded default dataset of pixssl_jax.

Writes the Medical Segmentation Decathlon layout (`imagesTr/`, `labelsTr/`, `dataset.json`):

  python -m pixssl_jax.data.phantoms --out /tmp/phantoms --num_cases 40 --seed 0

This module renders the 'basic' family described here; `--family clinical` renders the harder
one of `pixssl_jax.data.phantoms_clinical` (contrast phases, lesions, distractors, wide pose)
through the same writer.

Anatomy is built in patient world millimetres (nibabel's RAS+: +x patient Right, +y Anterior,
+z Superior) and only then sampled on each case's voxel grid, so it is correct whatever the
header orientation. Per case: smooth random shape (implicit surfaces = ellipsoids blended and
displaced by low-frequency random fields), size and position; body habitus and fat thickness;
voxel grid, spacing and FOV; RAS- or LPS-ordered voxels; int16 stored with or without
scl_slope/scl_inter; Gaussian noise.

Labels (MSD style, uint8):

  | value | name         | where (world)                                     |
  | ----- | ------------ | ------------------------------------------------- |
  | 0     | background   | everything else (incl. IVC, iliac arteries, discs) |
  | 1     | liver        | right upper quadrant (x > body centre), left lobe  |
  | 2     | spleen       | left (x < centre), posterior, upper               |
  | 3     | kidney_left  | x < spine, retroperitoneal                        |
  | 4     | kidney_right | x > spine, a little lower than the left           |
  | 5     | aorta        | just anterior (+y) and left (-x) of the spine, above the bifurcation |
  | 6     | vertebrae    | vertebral bodies and posterior elements (bone)    |

Non-contrast HU, drawn per case (`_sample_tissues`): air -1000, lung -850, fat -100, skin 32,
muscle 54, liver 63, spleen 46, kidney 30, blood 41, bowel wall 38, gas -950, disc 90,
cancellous bone 330, cortex 850, posterior elements 550. Mean gaps: liver-spleen 17,
spleen-kidney 16, liver-muscle 9 HU; organs also differ by shape and position.

Grid (shape_scale=1): about 160x160x80 voxels (+-15% in-plane, 64-96 slices). Slice spacing
1.5-5 mm. In-plane spacing is the field of view (adult body width + 20..80 mm, 300-430 mm)
divided by the matrix, i.e. 1.6-3.2 mm: an adult abdomen cannot fit 160 voxels of 0.6-1.0 mm
(that is a 96-160 mm FOV). `shape_scale` scales the voxel counts and divides the spacings, so
the anatomy in mm stays the same. Partial volume: each structure's occupancy of a voxel is the
box-filter fraction from its signed distance and the voxel's extent along the surface normal,
then an in-plane Gaussian PSF (sigma 0.5 voxel) that also colours the Gaussian noise
(std 10-25 HU per case after the PSF).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import pathlib
import shutil
import tempfile
import time
import types

import nibabel as nib
import numpy as np
from scipy import ndimage

from pixssl_jax.data import phantoms_clinical
from pixssl_jax.data.phantom_body import below
from pixssl_jax.data.phantom_body import Body
from pixssl_jax.data.phantom_body import diaphragm_dome
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

LABELS = {0: 'background', 1: 'liver', 2: 'spleen', 3: 'kidney_left', 4: 'kidney_right',
          5: 'aorta', 6: 'vertebrae'}
HU_MIN, HU_MAX = -1024, 3071  # The 12-bit range CT scanners store.
FAMILIES = ('basic', 'clinical')
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
  x_asc, x_desc = cw * uniform(rng, 0.6, 0.75), -cw * uniform(rng, 0.65, 0.8)
  for xc, yc, z_end, r in ((x_asc, uniform(rng, 5, 30), uniform(rng, -20, 10), uniform(rng, 18, 25)),
                           (x_desc, uniform(rng, -10, 15), uniform(rng, 15, 45), uniform(rng, 14, 20))):
    tube = lambda x, y, z, xc=xc, yc=yc, r=r, ze=z_end: np.maximum(
        np.hypot(x - xc, y - yc) - r, z - ze)
    hollow((xc - r - 10, yc - r - 10, -UNBOUNDED), (xc + r + 10, yc + r + 10, z_end + 10),
           inside(deformed(tube, RandomField(rng, 4.)), 'cavity', 3.),
           yc + uniform(rng, -0.2, 0.5) * r, 'stool')
  yt, zt, sag, rt = uniform(rng, 30, 55), uniform(rng, -10, 15), uniform(rng, 10, 50), uniform(rng, 16, 22)
  xm, hw = (x_asc + x_desc) / 2, (x_asc - x_desc) / 2
  zt_of = lambda x: zt - sag * (1 - np.clip((x - xm) / hw, -1, 1)**2)
  transverse = lambda x, y, z: np.maximum(np.hypot(y - yt, z - zt_of(x)) - rt,
                                          np.abs(x - xm) - hw)
  hollow((x_desc - 30, yt - rt - 10, zt - sag - rt - 10), (x_asc + 30, yt + rt + 10, zt + rt + 10),
         inside(deformed(transverse, RandomField(rng, 4.)), 'cavity', 3.),
         yt + uniform(rng, -0.3, 0.4) * rt, 'stool')
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
  (the PSF also blurs the anatomy: partial volume); returns the case as `_render_case` does."""
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


def _render_case(rng, shape_scale: float, orientation: str):
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


def _save_nifti(data: np.ndarray, affine: np.ndarray, path: pathlib.Path,
                slope_inter: tuple[float, float] | None = None) -> None:
  """Writes a NIfTI-1 file with qform = sform = affine (scanner frame, mm)."""
  img = nib.Nifti1Image(data, affine)
  img.set_qform(affine, code=1)
  img.set_sform(affine, code=1)
  img.header.set_xyzt_units('mm', 'sec')
  img.header['descrip'] = b'pixssl_jax synthetic CT phantom'
  if slope_inter is not None:
    img.header.set_slope_inter(*slope_inter)
  img.to_filename(path)


def _renderer(family: str):
  """The function that renders one case of `family`."""
  if family == 'basic':
    return _render_case
  return phantoms_clinical.render_case


def _write_case(root: pathlib.Path, case_id: str, rng, shape_scale: float,
                index: int, family: str = 'basic') -> dict:
  """Renders case `index` and writes its image and label; returns its metadata."""
  # Both header orientations and both storage conventions occur in any 4 consecutive cases.
  orientation = 'RAS' if index % 2 == 0 else 'LPS'
  scaled = index % 4 in (1, 2)
  hu, label, affine, meta = _renderer(family)(rng, shape_scale, orientation)
  hu = np.clip(np.rint(hu), HU_MIN, HU_MAX).astype(np.int16)
  if scaled:  # Stored = HU + 1024 >= 0, as many scanners write it; readers apply the scaling.
    _save_nifti((hu + 1024).astype(np.int16), affine, root / 'imagesTr' / f'{case_id}.nii.gz',
                (1., -1024.))
  else:
    _save_nifti(hu, affine, root / 'imagesTr' / f'{case_id}.nii.gz')
  _save_nifti(label, affine, root / 'labelsTr' / f'{case_id}.nii.gz')
  missing = sorted(set(LABELS) - set(np.unique(label).tolist()))
  if missing:  # The grid sampling is meant to always cover every organ.
    raise RuntimeError(f'phantom {case_id}: labels {missing} not rendered (shape_scale '
                       f'{shape_scale} too small?)')
  return dict(id=case_id, scl_slope_inter=[1., -1024.] if scaled else None, **meta)


def generate_dataset(out_dir: str | os.PathLike, num_cases: int, seed: int = 0,
                     shape_scale: float = 1.0, family: str = 'basic') -> pathlib.Path:
  """Generates `num_cases` labelled CT phantoms in the Medical Segmentation Decathlon layout.

  The dataset is built in a temporary directory beside `out_dir` and renamed into place, so
  an interrupted run leaves no partial `out_dir`. The same (num_cases, seed, shape_scale)
  gives byte-identical files; case i does not depend on num_cases.

  Args:
    out_dir: destination; must not exist or be an empty directory.
    num_cases: number of cases, >= 1.
    seed: non-negative integer seed.
    shape_scale: scales the voxel counts (1.0: about 160x160x80), anatomy stays in mm.
    family: 'basic' (this module) or 'clinical' (`phantoms_clinical`).

  Returns:
    The path of the dataset (`out_dir`), holding `imagesTr/case_XXXX.nii.gz`,
    `labelsTr/case_XXXX.nii.gz` and `dataset.json`.
  """
  out = pathlib.Path(out_dir)
  if isinstance(num_cases, bool) or not isinstance(num_cases, (int, np.integer)) or num_cases < 1:
    raise ValueError(f'num_cases must be a positive integer, got {num_cases!r}')
  if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
    raise ValueError(f'seed must be a non-negative integer, got {seed!r}')
  if family not in FAMILIES:
    raise ValueError(f'family must be one of {FAMILIES}, got {family!r}')
  if not 0.1 <= shape_scale <= 4.0:
    raise ValueError(f'shape_scale must be in [0.1, 4.0], got {shape_scale!r}')
  if out.exists() and (not out.is_dir() or any(out.iterdir())):
    raise FileExistsError(f'{out} already exists and is not an empty directory; remove it or '
                          'choose another --out')
  out.parent.mkdir(parents=True, exist_ok=True)
  tmp = pathlib.Path(tempfile.mkdtemp(prefix=f'.{out.name}.tmp-', dir=out.parent))
  try:
    for sub in ('imagesTr', 'labelsTr'):
      (tmp / sub).mkdir()
    cases = []
    for i in range(num_cases):
      start = time.perf_counter()
      rng = np.random.default_rng([int(seed), i])
      cases.append(_write_case(tmp, f'case_{i:04d}', rng, float(shape_scale), i, family))
      logging.info('phantom %d/%d %s shape %s spacing %s (%.2f s)', i + 1, num_cases,
                   cases[-1]['orientation'], cases[-1]['shape'], cases[-1]['spacing'],
                   time.perf_counter() - start)
    dataset = {
        'name': 'pixssl_phantom',
        'description': 'Synthetic non-contrast abdominal CT phantoms (pixssl_jax.data.phantoms)',
        'reference': 'pixssl_jax', 'licence': 'CC0', 'release': '1.0',
        'tensorImageSize': '3D',
        'modality': {'0': 'CT'},
        'labels': {str(k): v for k, v in LABELS.items()},
        'numTraining': num_cases, 'numTest': 0,
        'training': [{'image': f'./imagesTr/{c["id"]}.nii.gz',
                      'label': f'./labelsTr/{c["id"]}.nii.gz'} for c in cases],
        'test': [],
        'phantom': {'seed': int(seed), 'shape_scale': float(shape_scale), 'cases': cases},
    }
    if family != 'basic':  # The basic family's dataset.json stays as it always was.
      dataset['name'] = f'pixssl_phantom_{family}'
      dataset['description'] = ('Synthetic multi-phase abdominal CT phantoms '
                                f'(pixssl_jax.data.phantoms_{family})')
      dataset['phantom']['family'] = family
    (tmp / 'dataset.json').write_text(json.dumps(dataset, indent=2) + '\n')
    os.chmod(tmp, 0o755)  # mkdtemp makes it private.
    if out.exists():
      out.rmdir()  # Empty (checked above); a directory rename needs the target gone.
    os.rename(tmp, out)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return out


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--out', required=True, help='output directory (must not exist)')
  parser.add_argument('--num_cases', type=int, default=40)
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--shape_scale', type=float, default=1.0)
  parser.add_argument('--family', default='basic', choices=FAMILIES,
                      help="'basic' (this module) or 'clinical' (phantoms_clinical)")
  args = parser.parse_args(argv)
  logging.basicConfig(level=logging.INFO, format='%(message)s')
  start = time.perf_counter()
  path = generate_dataset(args.out, args.num_cases, args.seed, args.shape_scale, args.family)
  print(f'wrote {args.num_cases} phantoms to {path} in {time.perf_counter() - start:.1f} s')


if __name__ == '__main__':
  main()
