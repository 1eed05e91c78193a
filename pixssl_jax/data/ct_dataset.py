"""TFDS builder that packs preprocessed CT cases into an ArrayRecord store.

`pixssl_jax.data.prepare` preprocesses every raw case (RAS+, target spacing, HU window) into
one `.npz` file per case in a staging folder and hands that folder to this builder as its
`manual_dir`. The builder never downloads anything. It is built programmatically, because the
`tfds build` command needs TensorFlow, which this project does not install:

```python
builder = CtVolumes(data_dir=tfds_dir, file_format='array_record')
builder.download_and_prepare(
    download_config=tfds.download.DownloadConfig(manual_dir=staging_dir))
```

All cases go into one TFDS split, `cases`, in sorted case-id order; the experiment splits
(`pretrain`, `train_10`, ...) live in `STORE/splits.json` and are resolved by `CaseStore`.
Readers should use `pixssl_jax.data.case_store.CaseStore`, never this module directly.
"""
from collections.abc import Iterator
import contextlib
import io
from typing import Any

from etils import epath
import numpy as np
import tensorflow_datasets as tfds

# The single TFDS split that holds every case.
ALL_SPLIT = 'cases'
# Keys of the per-case staging `.npz` files written by `prepare` (see `write_staged_case`).
_STAGED_KEYS = ('image', 'label', 'has_label', 'spacing', 'affine', 'original_affine',
                'original_shape', 'original_spacing')


def write_staged_case(path: epath.PathLike, case_id: str, image: np.ndarray,
                      label: np.ndarray | None, spacing, affine, original_affine,
                      original_shape, original_spacing) -> None:
  """Writes one preprocessed case in the staging format the builder reads.

  Args:
    path: target `.npz` file; its stem is not used, `case_id` is stored inside.
    case_id: unique case name.
    image: int16 HU volume `[X, Y, Z]`, RAS+, at the store spacing.
    label: uint8 labels `[X, Y, Z]`, or None for an unlabelled case.
    spacing: voxel size in mm `[3]` of `image`.
    affine: RAS voxel-to-world affine `[4, 4]` of `image`.
    original_affine: affine `[4, 4]` of the raw file, before reorientation.
    original_shape: raw image shape `[3]`.
    original_spacing: raw voxel size in mm `[3]`.
  """
  if label is None:
    # A tiny [2, 2, 2] zero dummy, not a full-size zero volume, so unlabelled cases cost no
    # storage or decoding. TFDS 4.9.10's numpy decoder truncates the stored shape to the
    # byte length of the value, so [0, 0, 0] and [1, 1, 1] do not survive a round trip.
    label = np.zeros((2, 2, 2), np.uint8)
    has_label = False
  else:
    has_label = True
  with epath.Path(path).open('wb') as f:
    np.savez(
        f, case_id=np.array(case_id), image=image.astype(np.int16, copy=False),
        label=label.astype(np.uint8, copy=False), has_label=np.array(has_label),
        spacing=np.asarray(spacing, np.float32), affine=np.asarray(affine, np.float64),
        original_affine=np.asarray(original_affine, np.float64),
        original_shape=np.asarray(original_shape, np.int32),
        original_spacing=np.asarray(original_spacing, np.float32))


class CtVolumes(tfds.core.GeneratorBasedBuilder):
  """Preprocessed CT volumes (int16 HU, RAS+, resampled) with optional uint8 labels."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'First store format (store.json format_version 1).'}
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      'Run `python -m pixssl_jax.data.prepare --raw_dir RAW --data_dir STORE`; it stages '
      'preprocessed cases as .npz files and passes that folder as manual_dir.')

  def _info(self) -> tfds.core.DatasetInfo:
    volume = (None, None, None)
    return tfds.core.DatasetInfo(
        builder=self,
        description=__doc__.split('\n')[0],
        features=tfds.features.FeaturesDict({
            # encoding='bytes': ArrayRecord already compresses each record with zstd, so
            # zlib here gains nothing and builds 5x slower (docs/pitfalls.md).
            'image': tfds.features.Tensor(shape=volume, dtype=np.int16, encoding='bytes'),
            # Unlabelled cases store a [2, 2, 2] zero dummy and has_label=False.
            'label': tfds.features.Tensor(shape=volume, dtype=np.uint8, encoding='bytes'),
            'has_label': tfds.features.Scalar(dtype=np.bool_),
            'case_id': tfds.features.Text(),
            'spacing': tfds.features.Tensor(shape=(3,), dtype=np.float32),
            'affine': tfds.features.Tensor(shape=(4, 4), dtype=np.float64),
            'original_affine': tfds.features.Tensor(shape=(4, 4), dtype=np.float64),
            'original_shape': tfds.features.Tensor(shape=(3,), dtype=np.int32),
            'original_spacing': tfds.features.Tensor(shape=(3,), dtype=np.float32),
        }),
        # Keep records in sorted case-id order so the store is byte-for-byte reproducible.
        disable_shuffling=True,
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict[str, Any]:
    manual_dir = epath.Path(dl_manager.manual_dir)
    files = sorted(manual_dir.glob('*.npz'))
    if not files:
      raise FileNotFoundError(f'{manual_dir}: no staged .npz cases to build the store from')
    return {ALL_SPLIT: self._generate_examples(files)}

  def _generate_examples(self, files: list[epath.Path]) -> Iterator[tuple[str, dict]]:
    for path in files:
      with path.open('rb') as f, np.load(f) as staged:
        example = {key: staged[key] for key in _STAGED_KEYS}
        case_id = str(staged['case_id'])
      example['has_label'] = bool(example['has_label'])
      example['case_id'] = case_id
      yield case_id, example


def build(staging_dir: epath.PathLike, tfds_dir: epath.PathLike) -> epath.Path:
  """Builds the ArrayRecord store from staged cases.

  Args:
    staging_dir: folder of `.npz` files written by `write_staged_case`.
    tfds_dir: TFDS data_dir to write into.

  Returns:
    The builder directory (`tfds_dir/ct_volumes/1.0.0`), readable with
    `tfds.builder_from_directory`.
  """
  tfds.display_progress_bar(False)
  builder = CtVolumes(data_dir=epath.Path(tfds_dir), file_format='array_record')
  # TFDS prints "Downloading and preparing..." with the temporary path; `prepare` reports.
  with contextlib.redirect_stdout(io.StringIO()):
    builder.download_and_prepare(
        # TFDS creates an (unused) downloads folder; keep it out of the store.
        download_dir=epath.Path(staging_dir) / '_tfds_downloads',
        download_config=tfds.download.DownloadConfig(manual_dir=epath.Path(staging_dir)))
  return epath.Path(builder.data_dir)
