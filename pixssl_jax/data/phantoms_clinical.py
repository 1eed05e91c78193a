r"""The 'clinical' phantom family: contrast phases, textures, lesions, distractors, wide pose.

  python -m pixssl_jax.data.phantoms --family clinical --out /tmp/clinical --num_cases 40

The 'basic' family (`pixssl_jax.data.phantoms`) is non-contrast, with organs told apart by a
few HU and a near-fixed pose: a U-Net trained on two labelled volumes segments it about as well
as one trained on all of them. This family adds what makes real abdominal CT need more labels.
Same six labels, layout, header conventions and writer as the basic family (`phantoms.LABELS`,
`phantoms.generate_dataset(..., family='clinical')`).

Contrast phase, one per case (a third each), shifts and reorders organ HU. Per case each tissue
draws one number u in [0, 1] and takes `lo + u (hi - lo)` of its phase's range, so the same
seed gives the same anatomy and relative brightness in every phase (`render_case(phase=...)`):

  | tissue (HU)               | non-contrast | arterial          | portal venous |
  | ------------------------- | ------------ | ----------------- | ------------- |
  | liver (1)                 | 50-65        | 60-80             | 100-130       |
  |   steatosis (20% of cases) | -15..-45     | -15..-45          | -15..-45      |
  | spleen (2)                | 40-50        | 100-150, mottled  | 110-130       |
  | kidney cortex (3, 4)      | 30-40        | 180-240           | 150-200       |
  | kidney medulla (3, 4)     | 25-35        | 60-100            | 140-190       |
  | aorta (5)                 | 35-50        | 250-350           | 150-200       |
  | vertebrae (6)             | 250-950 (cancellous core, cortex, posterior elements)        |
  | IVC (0)                   | 35-50        | 60-100            | 130-170       |
  | portal / hepatic veins    | 35-45        | 80-140            | 150-190       |
  | pancreas (0)              | 35-50        | 100-140           | 90-120        |
  | bowel / stomach wall (0)  | 35-45        | 70-110            | 90-120        |
  | muscle (0)                | 45-60        | 50-65             | 55-70         |
  | heart (0)                 | 35-50        | 200-320           | 140-190       |
  | gallbladder bile (0)      | 0-20         | 0-20              | 0-20          |
  | oral contrast (0, half the cases) | 150-400 in the stomach and most bowel loops      |
  | ribs (0)                  | 300-600      | 300-600           | 300-600       |

The store's default HU window (-175, 250) clips the brightest of these (arterial aorta, oral
contrast, bone) to the same value. Inside the organs (labelled as the organ): textures of
5-30 mm wavelength (liver +-5-9 HU; spleen +-4 HU, mottled +-20-30 HU in the arterial
phase), portal/hepatic vein branches in the liver, a cortex over medullary pyramids in the
kidneys, and lesions: 0-4 in the liver (cysts 0-15 HU; hypodense metastases with a rim;
hypervascular tumours, bright only in the arterial phase), 0-1 in the spleen (cyst or
hypodense), a cyst in each kidney with probability 0.3. Their positions and radii are in
`dataset.json` (`phantom.cases[i].lesions`, world mm).

Unlabelled distractors with organ-like HU: stomach, colon and small-bowel loops (some bright
with oral contrast), gallbladder in the liver's fossa, a lobulated pancreas with the splenic
and portal veins, the IVC beside the aorta, the iliac arteries, ribs in the body wall.

What else varies per case (ranges beyond the basic family's): patient yaw +-15 degrees and
shift +-50 mm; body half-width 135-190 mm and fat 4-45 mm; liver scale 0.85-1.2, spleen
volume 0.75-1.5; gallbladder present in 85% of cases; slice spacing 1.5-5 mm with a slice
profile (sigma 0.2-0.5 slice); reconstruction kernel, half the cases each: soft (in-plane PSF
sigma 0.8-1.3 voxels, noise 6-14 HU) or sharp (sigma 0.3-0.5 with edge enhancement, noise
18-35 HU), noise further scaled by body size (x0.8-1.3). Deterministic: case i depends only
on (seed, i), and its metadata (phase, kernel, lesions, HU table) is in `dataset.json`.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from pixssl_jax.data.phantom_body import below
from pixssl_jax.data.phantom_body import Body
from pixssl_jax.data.phantom_body import diaphragm_dome
from pixssl_jax.data.phantom_body import paint_body_wall
from pixssl_jax.data.phantom_body import paint_table
from pixssl_jax.data.phantom_body import paint_thorax
from pixssl_jax.data.phantom_geometry import Canvas
from pixssl_jax.data.phantom_geometry import canvas_for_pose
from pixssl_jax.data.phantom_geometry import uniform
from pixssl_jax.data import phantoms_clinical_organs as organs

# Bump when what this family renders changes (it names the cached stores).
GENERATOR_VERSION = 'v1'
PHASES = ('non_contrast', 'arterial', 'portal_venous')

# (lo, hi) HU per phase, in PHASES order.
_PHASE_HU = {
    'liver': ((50, 65), (60, 80), (100, 130)),
    'spleen': ((40, 50), (100, 150), (110, 130)),
    'cortex_k': ((30, 40), (180, 240), (150, 200)),
    'medulla': ((25, 35), (60, 100), (140, 190)),
    'aorta': ((35, 50), (250, 350), (150, 200)),
    'ivc': ((35, 50), (60, 100), (130, 170)),
    'portal': ((35, 45), (80, 140), (150, 190)),
    'pancreas': ((35, 50), (100, 140), (90, 120)),
    'wall': ((35, 45), (70, 110), (90, 120)),
    'muscle': ((45, 60), (50, 65), (55, 70)),
    'heart': ((35, 50), (200, 320), (140, 190)),
}
_STATIC_HU = dict(lung=(-880, -820), fat=(-115, -85), skin=(25, 40), fluid=(5, 20),
                  bile=(0, 20), gas=(-980, -920), disc=(80, 100), cancellous=(250, 360),
                  cortex=(700, 950), posterior=(450, 600), csf=(10, 20), table=(100, 200),
                  rib=(300, 600), oral=(150, 400), steatosis=(15, 45))


def _sample_tissues(rng, phase: str, steatosis: bool) -> dict[str, float]:
  """Per-case HU of each tissue in `phase`; the random draws do not depend on the phase."""
  p = PHASES.index(phase)
  hu = {}
  for name, ranges in _PHASE_HU.items():
    lo, hi = ranges[p]
    hu[name] = round(lo + rng.random() * (hi - lo), 1)
  for name, (lo, hi) in _STATIC_HU.items():
    hu[name] = round(uniform(rng, lo, hi), 1)
  if steatosis:  # Fatty liver: darker than the spleen before contrast, as in real CT.
    hu['liver'] = round(hu['liver'] - hu['steatosis'], 1)
  return hu


def _make_canvas(rng, shape_scale: float, body_width: float, orientation: str):
  """Samples the voxel grid and a wide patient pose (yaw, shift, FOV placement)."""
  nxy = max(8, round(160 * shape_scale * uniform(rng, 0.85, 1.15)))
  dxy = (body_width + uniform(rng, 20, 80)) / nxy
  dz = uniform(rng, 1.5, 5.0) / shape_scale
  nz_range = max(4, round(64 * shape_scale)), max(6, round(96 * shape_scale))
  nz = int(np.clip(round(uniform(rng, 200, 320) / dz), *nz_range))
  yaw = np.deg2rad(uniform(rng, -15, 15))
  shift = np.array([uniform(rng, -50, 50), uniform(rng, -50, 50), uniform(rng, -300, 300)])
  c, s = np.cos(yaw), np.sin(yaw)
  rot = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])
  fov_centre = rot @ [uniform(rng, -15, 15), uniform(rng, -20, 10), uniform(rng, 0, 35)] + shift
  return canvas_for_pose((nxy, nxy, nz), (dxy, dxy, dz), orientation, yaw, shift, fov_centre)


def _body(rng) -> Body:
  """The basic family's body outline with a wider habitus (size, fat)."""
  body = Body(rng)
  body.ax = uniform(rng, 135, 190)
  body.ay = body.ax * uniform(rng, 0.64, 0.82)
  # Fat thick enough to matter, thin enough to leave the kidneys room inside the cavity.
  body.fat = uniform(rng, 4, float(np.clip((body.ax - 2 - body.muscle - 98) / 0.8, 5, 45)))
  body.cavity_half_width = body.ax - 2 - 0.8 * body.fat - body.muscle
  return body


def _reconstruct(volume: np.ndarray, psf: float, sharpen: float, z_sigma: float):
  """Applies the reconstruction kernel: in-plane PSF, slice profile, edge enhancement."""
  out = ndimage.gaussian_filter(volume, (psf, psf, z_sigma))
  if sharpen:
    out = out + sharpen * (out - ndimage.gaussian_filter(out, (1.5, 1.5, 0.)))
  return out


def _paint_ribs(cv: Canvas, rng, body: Body, z_top: float, rib_hu: float) -> None:
  """Ribs inside the muscle layer of the upper abdomen (bone that is not vertebra)."""
  bx0, by0 = body.half_extent
  rib_gap, rib_r = uniform(rng, 24, 30), uniform(rng, 4, 6)
  muscle_mid = lambda x, y, z: body.sdf('muscle')(x, y, z) + 0.5 * body.muscle
  for k in range(7):
    zk0 = z_top + 20 - k * rib_gap
    drop = uniform(rng, 60, 100)  # Ribs run down anteriorly: short arcs in an axial slice.
    front = 0.8 - 0.15 * k  # Lower ribs stop further back (floating ribs).

    def rib(x, y, z, zk0=zk0, drop=drop, front=front):
      th_s = y / np.maximum(np.hypot(x, y), 1e-3)  # sin of the polar angle.
      d = np.hypot(muscle_mid(x, y, z), z - (zk0 - drop * (1 + th_s) / 2)) - rib_r
      return np.maximum(np.maximum(d, th_s - front), 25 - np.abs(x))

    cv.paint((-bx0, -by0, zk0 - drop - 15), (bx0, by0, zk0 + 15), rib, rib_hu, 0)


def _form_image(cv: Canvas, rng, body: Body, sharp: bool):
  """White noise through the reconstruction kernel, scaled so that its std after the kernel is
  `sigma`; larger patients are noisier.

  Returns:
    hu: the reconstructed [X, Y, Z] float32 HU; the kernel's meta entries.
  """
  if sharp:
    psf, sharpen, sigma = uniform(rng, 0.3, 0.5), uniform(rng, 0.3, 0.7), uniform(rng, 18, 35)
  else:
    psf, sharpen, sigma = uniform(rng, 0.8, 1.3), 0., uniform(rng, 6, 14)
  sigma *= float(np.clip((body.ax / 160)**1.5, 0.8, 1.3))
  z_sigma = uniform(rng, 0.2, 0.5)
  impulse = np.zeros((21, 21, 9), np.float32)
  impulse[10, 10, 4] = 1.
  gain = np.sqrt((_reconstruct(impulse, psf, sharpen, z_sigma)**2).sum())
  cv.hu += (sigma / gain) * rng.standard_normal(cv.hu.shape, dtype=np.float32)
  return _reconstruct(cv.hu, psf, sharpen, z_sigma), sigma


def _lesions_in_world(cv: Canvas, lesions: list[dict]) -> list[dict]:
  """The lesions with their anatomy-frame centres replaced by scanner (world) coordinates."""
  c, s = np.cos(cv.yaw), np.sin(cv.yaw)
  to_world = lambda p: (np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]]) @ p + cv.shift)
  for lesion in lesions:
    lesion['centre_world'] = [round(float(v), 2) for v in to_world(lesion.pop('centre'))]
  return lesions


def render_case(rng, shape_scale: float, orientation: str, phase: str | None = None):
  """Builds one clinical phantom, painting structures in the order that later ones cover
  earlier ones.

  Args:
    rng: the case's generator.
    shape_scale: voxel-count scale (anatomy stays in mm).
    orientation: 'RAS' or 'LPS' voxel order.
    phase: force a contrast phase (one of PHASES); None draws it. The anatomy does not depend
      on it.

  Returns:
    hu: [X, Y, Z] float32 HU; label: [X, Y, Z] uint8; affine [4, 4]; meta dict.
  """
  drawn = PHASES[int(rng.integers(3))]
  phase = phase or drawn
  if phase not in PHASES:
    raise ValueError(f'phase must be one of {PHASES}, got {phase!r}')
  steatosis, oral = bool(rng.random() < 0.2), bool(rng.random() < 0.5)
  sharp = bool(rng.random() < 0.5)
  hu_of = _sample_tissues(rng, phase, steatosis)
  body = _body(rng)
  cv = _make_canvas(rng, shape_scale, 2 * body.ax, orientation)
  _, by0 = body.half_extent

  # 1. Body wall and ribs. 2. Spine frame (as the basic family), lungs, heart, back muscles.
  paint_body_wall(cv, body, hu_of)
  z_top = uniform(rng, 95, 125)  # Right hemidiaphragm dome; the left is ~16 mm lower.
  _paint_ribs(cv, rng, body, z_top, hu_of['rib'])
  xv0, yv0 = uniform(rng, -4, 4), -0.92 * body.ay + 0.5 * body.fat + uniform(rng, 70, 82)
  spine = organs.Spine(rng, xv0, yv0)
  below_dome = below(diaphragm_dome(z_top))
  paint_thorax(cv, body, xv0, yv0, z_top, hu_of['lung'], hu_of['heart'])
  spine.paint_muscles(cv, rng, body.inside, hu_of['muscle'], by0)

  # 3. Gut (unlabelled): stomach, colon, small-bowel loops up to the kidneys' level; with
  #    oral contrast most lumens are bright.
  organs.paint_gut(cv, rng, body, body.inside, below_dome, hu_of, oral)

  # 4. Pancreas with the splenic and portal veins, in front of the left kidney and aorta.
  geo = organs.sample_organ_geometry(rng, body, xv0, yv0, spine)
  organs.paint_pancreas(cv, rng, geo, spine, hu_of, phase)

  # 5. Solid organs with textures, vessels and lesions (labelled as the organ); the
  #    gallbladder in the liver's fossa (unlabelled).
  lesions = organs.paint_solid_organs(cv, rng, geo, spine, body.inside, below_dome, hu_of,
                                      phase)

  # 6. Great vessels, vertebrae, table. 7. Image formation.
  spine.paint_vessels(cv, rng, hu_of)
  spine.paint_vertebrae(cv, rng, body.inside, hu_of)
  paint_table(cv, rng, body, hu_of['table'])
  hu, sigma = _form_image(cv, rng, body, sharp)
  meta = dict(family='clinical', orientation=orientation, shape=list(cv.hu.shape),
              spacing=[round(float(v), 4) for v in np.abs(np.diag(cv.affine)[:3])],
              phase=phase, kernel='sharp' if sharp else 'soft', oral_contrast=oral,
              steatosis=steatosis, gallbladder=geo.gallbladder is not None,
              yaw_deg=round(float(np.rad2deg(cv.yaw)), 2),
              noise_sigma_hu=round(sigma, 2), tissues_hu=hu_of,
              lesions=_lesions_in_world(cv, lesions))
  return hu, cv.label, cv.affine, meta
