"""Pixel features and MC-dropout uncertainty of a run, on whole volumes and on view pairs.

Volumes are RAS `[X, Y, Z]` (docs/design.md). A 3-D model encodes the volume by a sliding
window of 3-D patches; a 2-D model encodes it axial slice by axial slice (`z` is not strided),
each slice by a 2-D sliding window (`pixssl_jax.evaluation.sliding_window`). The U-Net is fully
convolutional, so the inference window may be larger than the training view (fewer windows);
GroupNorm statistics are then taken over the larger window.

The uncertainty is the one the training loss uses (docs/method.md): K runs of the student's
context stabilizer with independent dropout keys on the student's pixel projections; per pixel,
the channel-mean variance of the L2-normalised samples, in `[0, 1 / Cp]`.
"""

import dataclasses
import functools
import os
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from pixssl_jax import xla_options
from pixssl_jax.analysis.runs import Run
from pixssl_jax.data import intensity
from pixssl_jax.data import nifti_io
from pixssl_jax.data import views
from pixssl_jax.evaluation.sliding_window import sliding_window_inference
from pixssl_jax.losses import cosine_discrepancy
from pixssl_jax.models.pixssl import PixSSLModel
from pixssl_jax import objective


@dataclasses.dataclass
class Volume:
  """A preprocessed CT volume on the run's store grid.

  Attributes:
    name: the case id or file path it came from.
    hu: int16 HU `[X, Y, Z]`, RAS, clipped to the store's HU window.
    image: float32 `[X, Y, Z]` in `[0, 1]` (the window scaled), what the model sees.
    label: uint8 `[X, Y, Z]` organ labels, or None.
    spacing: voxel size in mm `(3,)`.
  """
  name: str
  hu: np.ndarray
  image: np.ndarray
  label: np.ndarray | None
  spacing: tuple[float, float, float]


def load_volume(run: Run, source, label_path=None) -> Volume:
  """A case of the run's store, or any NIfTI file preprocessed like the store.

  Args:
    run: from `load_run`.
    source: a case id of the run's store, or the path of a NIfTI CT image (HU); a file is
      reoriented to RAS, resampled to the store's spacing and clipped to its HU window.
    label_path: for a NIfTI `source`, an optional label map on the same grid.

  Returns:
    The `Volume` (with the store's label for a labelled case).

  Raises:
    ValueError: `source` is neither a case of the store nor an existing NIfTI file.
    nifti_io.CaseError: the NIfTI file is unusable (names the file and why).
  """
  store = run.store()
  source_str = os.fspath(source)
  if source_str in store.case_ids:
    hu = np.asarray(store.image(source_str))
    label = np.asarray(store.label(source_str)) if store.has_label(source_str) else None
    return Volume(source_str, hu, intensity.scale_hu(hu, store.hu_window), label,
                  tuple(store.spacing))
  if not (nifti_io.is_nifti_name(source_str) and os.path.isfile(source_str)):
    raise ValueError(f'{source_str!r} is neither a case of the store {store.data_dir} '
                     f'(e.g. {store.case_ids[:3]}) nor an existing .nii/.nii.gz file')
  case = nifti_io.preprocess_case(source_str, label_path, spacing=store.spacing,
                                  hu_window=store.hu_window, label_names=store.label_names)
  return Volume(source_str, case.image, intensity.scale_hu(case.image, store.hu_window),
                case.label, tuple(case.spacing))


def feature_stride(run: Run, level: int | None = None) -> int:
  """Stride of `encode`'s output: the pixel projection's, or decoder level `level`'s."""
  if level is None:
    return run.model.pixel_stride
  if not 0 <= level < len(run.model.features):
    raise ValueError(f'level={level} must be in [0, {len(run.model.features) - 1}] for '
                     f'model.features={tuple(run.model.features)}')
  return 2 ** level


@functools.partial(xla_options.jit, static_argnames=('model', 'level'))
def _encode_windows(params, x: jax.Array, *, model: PixSSLModel, level: int | None):
  """`[B, *P, 1]` windows -> `[B, *P / stride, C]` pixel projections or decoder features."""
  if level is None:
    return model.apply({'params': params}, x, with_predictor=False)['pixel_proj']

  def decoder_level(module, inputs):
    return module.backbone(inputs)[1][level].astype(jnp.float32)

  return model.apply({'params': params}, x, method=decoder_level)


def _as_model_input(run: Run, volume) -> np.ndarray:
  """float32 `[X, Y, Z]` (or `[X, Y]` for 2-D models) in [0, 1]; checks dimensionality."""
  if isinstance(volume, Volume):
    array = volume.image
  elif isinstance(volume, (str, os.PathLike)):
    array = load_volume(run, volume).image
  else:
    array = np.asarray(volume)
    if np.issubdtype(array.dtype, np.integer):  # Stored HU (CaseStore.image): scale them.
      array = intensity.scale_hu(array, run.store().hu_window)
  if array.ndim == 4 and array.shape[-1] == 1:
    array = array[..., 0]
  allowed = (2, 3) if run.ndim == 2 else (3,)
  if array.ndim not in allowed:
    expected = ('an [X, Y, Z] volume or an [X, Y] axial slice' if run.ndim == 2
                else 'an [X, Y, Z] volume')
    raise ValueError(f'volume of shape {array.shape} does not fit the {run.ndim}-D model of '
                     f'{run.workdir}: expected {expected}')
  return np.asarray(array, np.float32)


def encode(run: Run, volume, *, params: Any = None, level: int | None = None,
           slices: Sequence[int] | None = None, patch_size: Sequence[int] | None = None,
           overlap: float = 0.5, batch_size: int = 4, gaussian: bool = True) -> np.ndarray:
  """Pixel feature maps of a volume by sliding window.

  Args:
    run: from `load_run`.
    volume: a `Volume`, a case id or NIfTI path (`load_volume`), a float `[X, Y, Z]` array
      in [0, 1], or an integer HU array (scaled with the store's window). A 2-D model also
      takes one axial slice `[X, Y]`.
    params: parameters to use; None is `run.params` (the teacher unless loaded otherwise).
    level: None for the pixel projections the loss compares (`[.., Cp]`, stride
      `pixel_stride`); an int for the U-Net decoder features of that level (stride
      `2**level`; levels finer than `model.pixel_level` are trained by pre-training only
      through the pixel projector's hypercolumn, `model.pixel_hypercolumn`).
    slices: 2-D models only: the axial slices to encode (default all), in this order.
    patch_size: inference window (each entry divisible by the model's
      `downsampling_factor`); None is the training view size.
    overlap, batch_size, gaussian: as `sliding_window_inference`.

  Returns:
    float32 features: 3-D model `[ceil(X/s), ceil(Y/s), ceil(Z/s), C]`; 2-D model on a
    volume `[ceil(X/s), ceil(Y/s), len(slices), C]`, on a slice `[ceil(X/s), ceil(Y/s), C]`.

  Raises:
    ValueError: the volume's dimensionality does not fit the model, or a bad `slices`,
      `patch_size` or `level`.
  """
  array = _as_model_input(run, volume)
  stride = feature_stride(run, level)
  patch = tuple(int(p) for p in (patch_size or run.patch_size))
  factor = run.model.downsampling_factor
  if len(patch) != run.ndim or any(p % factor for p in patch):
    raise ValueError(f'patch_size {patch} must have {run.ndim} entries divisible by '
                     f'{factor} (the U-Net bottleneck stride)')
  apply_fn = functools.partial(_encode_windows, run.params if params is None else params,
                               model=run.model, level=level)

  def window(image):  # [*S] -> [*ceil(S/s), C]
    return sliding_window_inference(apply_fn, image[..., None], patch_size=patch,
                                    overlap=overlap, batch_size=batch_size, gaussian=gaussian,
                                    output_stride=stride)

  if run.ndim == 3 or array.ndim == 2:
    if slices is not None:
      raise ValueError('slices= selects axial slices for a 2-D model encoding a volume')
    return window(array)
  depth = array.shape[2]
  slices = list(range(depth)) if slices is None else [int(k) for k in slices]
  bad = [k for k in slices if not 0 <= k < depth]
  if bad or not slices:
    raise ValueError(f'slices {bad or slices} are not axial slice indices of a volume with '
                     f'{depth} slices')
  return np.stack([window(array[:, :, k]) for k in slices], axis=2)


@functools.partial(xla_options.jit, static_argnames=('model', 'mc_samples'))
def _mc_uncertainty(params, pixel_proj: jax.Array, key: jax.Array, *, model: PixSSLModel,
                    mc_samples: int) -> jax.Array:
  return objective.stabilized_prediction(
      params, pixel_proj, key, model=model, mc_samples=mc_samples)[1]


def _check_stabilizer(run: Run) -> int:
  if not run.config.method.use_stabilizer:
    raise ValueError(f'{run.workdir} was trained with method.use_stabilizer=False: its '
                     'stabilizer is untrained and gives no uncertainty')
  return int(run.config.method.mc_samples)


def stabilizer_uncertainty(run: Run, pixel_proj: np.ndarray, *, mc_samples: int | None = None,
                           seed: int = 0, chunk: int = 16384) -> np.ndarray:
  """Per-pixel MC-dropout uncertainty of the student's stabilizer on given projections.

  The stabilizer acts on each pixel alone (1x1 convs, per-pixel LayerNorm), so the map is
  processed as fixed-size chunks of pixels: one compile for any volume size.

  Args:
    run: from `load_run`.
    pixel_proj: `[*G, Cp]` STUDENT pixel projections (`encode(run, v,
      params=run.student_params)`); the stabilizer was trained on those.
    mc_samples: K dropout samples; None is the run's `method.mc_samples`.
    seed: dropout key seed.
    chunk: pixels per stabilizer call.

  Returns:
    float32 `[*G]` in `[0, 1 / Cp]` (zeros if K <= 1 or the stabilizer has no dropout).
  """
  k = _check_stabilizer(run) if mc_samples is None else int(mc_samples)
  pixel_proj = np.asarray(pixel_proj, np.float32)
  cp = run.model.pixel_proj_dim
  if pixel_proj.shape[-1] != cp:
    raise ValueError(f'pixel_proj has {pixel_proj.shape[-1]} channels; the stabilizer of '
                     f'{run.workdir} takes pixel projections with {cp} (encode with level=None)')
  flat = pixel_proj.reshape(-1, cp)
  n = flat.shape[0]
  padded = np.zeros((-(-n // chunk) * chunk, cp), np.float32)
  padded[:n] = flat
  key = jax.random.PRNGKey(seed)
  out = [np.asarray(_mc_uncertainty(run.student_params, padded[i:i + chunk],
                                    jax.random.fold_in(key, i // chunk), model=run.model,
                                    mc_samples=k))
         for i in range(0, padded.shape[0], chunk)]
  return np.concatenate(out)[:n].reshape(pixel_proj.shape[:-1])


def volume_uncertainty(run: Run, volume, *, mc_samples: int | None = None, seed: int = 0,
                       **encode_kwargs) -> np.ndarray:
  """MC-dropout uncertainty map of a whole volume (student projections + K stabilizer runs).

  Args:
    run: from `load_run`.
    volume: as `encode`.
    mc_samples, seed: as `stabilizer_uncertainty`.
    **encode_kwargs: `slices`, `patch_size`, `overlap`, `batch_size`, `gaussian` of `encode`.

  Returns:
    float32 `[*G]` on the grid of `encode(run, volume)`.
  """
  _check_stabilizer(run)
  proj = encode(run, volume, params=run.student_params, **encode_kwargs)
  return stabilizer_uncertainty(run, proj, mc_samples=mc_samples, seed=seed)


@dataclasses.dataclass
class PairAnalysis:
  """Two views of one case through the run's student and teacher, as the loss sees them.

  Rows are (view 1, view 2). Cells are on the pixel grid `G = P / stride`.

  Attributes:
    views: float32 `[2, *P]` in [0, 1].
    transforms: float32 `[2, n, n + 1]` view voxel -> source coordinate.
    slice_index: the axial slice both views come from (2-D), else None.
    stride: pixel feature stride.
    student_proj, teacher_proj: float32 `[2, *G, Cp]` pixel projections.
    uncertainty: float32 `[2, *G]` MC-dropout uncertainty of the student's stabilizer.
    overlap: bool `[2, *G]`, True where the cell has a match in the other view.
    discrepancy: float32 `[2, *G]`, `2 - 2 cos` of the stabilized student prediction and the
      teacher's matched target (meaningful where `overlap`).
  """
  views: np.ndarray
  transforms: np.ndarray
  slice_index: int | None
  stride: int
  student_proj: np.ndarray
  teacher_proj: np.ndarray
  uncertainty: np.ndarray
  overlap: np.ndarray
  discrepancy: np.ndarray


@functools.partial(xla_options.jit, static_argnames=('model', 'method_cfg'))
def _pair_forward(student_params, teacher_params, batch, key, *, model: PixSSLModel,
                  method_cfg: ml_collections.FrozenConfigDict):
  views_ = jnp.concatenate([batch['view1'], batch['view2']], axis=0)
  student = model.apply({'params': student_params}, views_, with_predictor=False)['pixel_proj']
  teacher = model.apply({'params': teacher_params}, views_, with_predictor=False)['pixel_proj']
  pred, uncertainty, matched, valid = objective.pixel_predictions(
      student_params, student, teacher, batch, key, model=model, method_cfg=method_cfg)
  return student, teacher, uncertainty, valid, cosine_discrepancy(pred, matched)


def _body_fraction(view: np.ndarray, window: Sequence[float]) -> float:
  lo, hi = float(window[0]), float(window[1])
  return float(np.mean(view > lo + 0.1 * (hi - lo)))  # The body test of views._pick_slice.


def analyse_view_pair(run: Run, case, *, seed: int = 0, augment: bool = False,
                      mc_samples: int | None = None, min_body_fraction: float = 0.5,
                      max_tries: int = 50) -> PairAnalysis:
  """Samples two views of a case as pre-training does and runs the pixel branch on them.

  Args:
    run: from `load_run`.
    case: a case id, NIfTI path or `Volume`.
    seed: seeds the view sampling (and intensity augmentation) and the dropout keys.
    augment: apply the run's intensity augmentation to each view (else only the HU window).
    mc_samples: K; None is the run's `method.mc_samples`.
    min_body_fraction: pairs are re-drawn until both views show at least this fraction of
      body voxels (a pair of air shows nothing); 0 keeps the first pair, as training does.
    max_tries: draws before giving up on `min_body_fraction`.

  Returns:
    The `PairAnalysis`.

  Raises:
    ValueError: no pair of `max_tries` reached `min_body_fraction`.
  """
  volume = case if isinstance(case, Volume) else load_volume(run, case)
  window = run.store().hu_window
  rng = np.random.default_rng(seed)
  for _ in range(max_tries):
    pair = views.sample_view_pair(volume.hu, rng, run.config.data, window)
    if min(_body_fraction(pair.view1, window),
           _body_fraction(pair.view2, window)) >= min_body_fraction:
      break
  else:
    raise ValueError(f'{volume.name}: no view pair of {max_tries} draws has both views '
                     f'{min_body_fraction:.0%} body; lower min_body_fraction')
  if augment:
    images = [intensity.augment_intensity(v, rng, run.config.data.intensity, window)
              for v in (pair.view1, pair.view2)]
  else:
    images = [intensity.scale_hu(v, window) for v in (pair.view1, pair.view2)]
  batch = {'view1': images[0][None, ..., None], 'view2': images[1][None, ..., None],
           'transform1': pair.transform1[None], 'transform2': pair.transform2[None]}
  method = ml_collections.ConfigDict(run.config.method.to_dict())
  if mc_samples is not None:
    method.mc_samples = int(mc_samples)
  outputs = _pair_forward(run.student_params, run.teacher_params, batch,
                          jax.random.PRNGKey(seed), model=run.model,
                          method_cfg=ml_collections.FrozenConfigDict(method))
  student, teacher, uncertainty, valid, discrepancy = jax.device_get(outputs)
  return PairAnalysis(
      views=np.stack(images), transforms=np.stack([pair.transform1, pair.transform2]),
      slice_index=pair.slice_index, stride=run.model.pixel_stride,
      student_proj=np.asarray(student), teacher_proj=np.asarray(teacher),
      uncertainty=np.asarray(uncertainty), overlap=np.asarray(valid, bool),
      discrepancy=np.asarray(discrepancy))
