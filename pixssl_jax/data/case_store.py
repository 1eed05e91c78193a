"""`CaseStore`: the one reader of prepared stores, backed by a memory-mapped `.npy` cache.

Random crops straight from the TFDS ArrayRecord store decode the whole volume per crop; from a
memory-mapped `.npy` they cost a small fraction of that (`benchmarks/input_pipeline.py`
measures both; docs/BENCHMARKS.md). So on first use the store's records are read once and
every case is written as `{case_id}.image.npy` (int16 HU) and `{case_id}.label.npy` (uint8)
into a cache folder: `DATA_DIR/npy_cache` for local stores, `$PIXSSL_CACHE` or
`~/.cache/pixssl_jax` plus `npy_cache/<hash>` for remote (`gs://`) stores. Files are written
under a per-process temporary name and renamed (atomic), and `cache.json` is written last, so
several processes may build the cache at once and none ever sees a half-written file.
"""
import hashlib
import json
import os
import uuid

from etils import epath
import numpy as np

from pixssl_jax.data import splits as splits_lib

SUPPORTED_FORMAT_VERSIONS = (1,)
_CACHE_MARKER = 'cache.json'


def _is_remote(path) -> bool:
  return '://' in str(path)


def default_cache_root() -> str:
  """`$PIXSSL_CACHE`, else `~/.cache/pixssl_jax`."""
  return os.environ.get('PIXSSL_CACHE') or os.path.join(
      os.path.expanduser('~'), '.cache', 'pixssl_jax')


def default_cache_dir(data_dir) -> str:
  """`DATA_DIR/npy_cache` for a local store; a local folder keyed by the URL otherwise."""
  if _is_remote(data_dir):
    key = hashlib.sha256(str(data_dir).encode()).hexdigest()[:16]
    return os.path.join(default_cache_root(), 'npy_cache', key)
  return os.path.join(os.fspath(data_dir), 'npy_cache')


def _atomic_save(path: str, array: np.ndarray) -> None:
  tmp = os.path.join(os.path.dirname(path),
                     f'.{os.path.basename(path)}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}')
  try:
    with open(tmp, 'wb') as f:
      np.save(f, np.ascontiguousarray(array))
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


class CaseStore:
  """Read access to a prepared store: splits, metadata and memory-mapped volumes.

  Usage:
    store = CaseStore(data_dir)
    for case_id in store.split('pretrain'):
      image = store.image(case_id)   # int16 [X, Y, Z] HU, memory map
  """

  def __init__(self, data_dir, cache_dir=None):
    """Opens a store (cheap: the `.npy` cache is built on the first volume access).

    Args:
      data_dir: store folder written by `pixssl_jax.data.prepare` (local or `gs://`).
      cache_dir: local folder for the `.npy` cache; None chooses the default (module doc).

    Raises:
      FileNotFoundError: no `store.json` in `data_dir`.
      ValueError: `store.json` is unreadable or of an unsupported format version.
    """
    self._data_dir = epath.Path(data_dir)
    store_json = self._data_dir / 'store.json'
    try:
      raw = store_json.read_bytes()
    except FileNotFoundError as e:
      raise FileNotFoundError(f'{store_json}: no store here; create one with python -m '
                              'pixssl_jax.data.prepare --raw_dir RAW --data_dir STORE') from e
    try:
      self._store = json.loads(raw)
      version = self._store['format_version']
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
      raise ValueError(f'{store_json}: not a valid store.json ({e!r})') from e
    if version not in SUPPORTED_FORMAT_VERSIONS:
      raise ValueError(f'{store_json}: format_version {version} is not supported '
                       f'(this code reads {SUPPORTED_FORMAT_VERSIONS}); re-run prepare')
    # Identifies this exact build, so a cache made for another build is never reused.
    self._fingerprint = hashlib.sha256(raw).hexdigest()[:16]
    self._splits = splits_lib.read_splits(self._data_dir / 'splits.json')
    self._cases = self._store['cases']
    if cache_dir is None:
      cache_dir = default_cache_dir(self._data_dir)
    self._cache_dir = os.path.abspath(os.fspath(cache_dir))
    self._cache_ready = False
    self._arrays: dict[str, np.ndarray] = {}

  def __repr__(self) -> str:
    # Stable across processes and restarts: grain compares it when restoring iterators.
    return f'CaseStore(data_dir={str(self._data_dir)!r}, cache_dir={self._cache_dir!r})'

  def __getstate__(self) -> dict:
    # Memory maps do not pickle; worker processes reopen them on demand.
    state = self.__dict__.copy()
    state['_arrays'] = {}
    return state

  @property
  def data_dir(self) -> str:
    return str(self._data_dir)

  @property
  def cache_dir(self) -> str:
    return self._cache_dir

  @property
  def raw_dir(self) -> str | None:
    """The raw dataset folder the store was prepared from, or None if it is not found.

    Tried in order: the absolute path recorded by `prepare`, then the recorded path relative
    to the store (a store moved or renamed together with its raw folder).
    """
    candidates = [self._store.get('raw_dir')]
    if self._store.get('raw_dir_relative'):
      candidates.append(str(self._data_dir / self._store['raw_dir_relative']))
    for candidate in candidates:
      if candidate and epath.Path(candidate).is_dir():
        return os.path.normpath(candidate) if '://' not in candidate else candidate
    return None

  @property
  def hu_window(self) -> tuple[float, float]:
    """(lo, hi) HU window the stored voxels are clipped to."""
    return tuple(float(v) for v in self._store['hu_window'])

  @property
  def spacing(self) -> tuple[float, float, float]:
    """Voxel size in mm of every stored volume, (x, y, z) in RAS."""
    return tuple(float(v) for v in self._store['spacing'])

  @property
  def label_names(self) -> dict[int, str]:
    """{label value: name}, including 0: background."""
    return {int(k): v for k, v in self._store['label_names'].items()}

  @property
  def case_ids(self) -> list[str]:
    """Every case id, sorted."""
    return sorted(self._cases)

  @property
  def split_names(self) -> list[str]:
    return sorted(self._splits)

  def split(self, name: str) -> list[str]:
    """Case ids of a split: 'pretrain', 'train_100', 'train_10', 'val' or 'test'."""
    if name not in self._splits:
      raise ValueError(f'{self._data_dir}: no split {name!r}; available: {self.split_names}')
    return list(self._splits[name])

  def _case(self, case_id: str) -> dict:
    try:
      return self._cases[case_id]
    except KeyError:
      raise KeyError(f'{case_id!r} is not a case of the store {self._data_dir}') from None

  def has_label(self, case_id: str) -> bool:
    return bool(self._case(case_id)['has_label'])

  def meta(self, case_id: str) -> dict:
    """Geometry of a case.

    Returns:
      dict with `spacing` (3,), `affine` [4, 4] (RAS, resampled; maps the stored volume's
      voxel indices to world mm), `shape` (3,), `original_affine` [4, 4],
      `original_shape` (3,), `original_spacing` (3,), `has_label`, `image_file`,
      `label_file` (paths relative to the raw folder).
    """
    m = self._case(case_id)
    return {
        'spacing': tuple(m['spacing']), 'affine': np.asarray(m['affine'], np.float64),
        'shape': tuple(m['shape']),
        'original_affine': np.asarray(m['original_affine'], np.float64),
        'original_shape': tuple(m['original_shape']),
        'original_spacing': tuple(m['original_spacing']), 'has_label': m['has_label'],
        'image_file': m['image_file'], 'label_file': m['label_file'],
    }

  def image(self, case_id: str) -> np.ndarray:
    """int16 HU volume `[X, Y, Z]` (read-only memory map)."""
    self._case(case_id)
    return self._array(case_id, 'image')

  def label(self, case_id: str) -> np.ndarray:
    """uint8 label volume `[X, Y, Z]` (read-only memory map).

    Raises:
      ValueError: the case has no label (it is in 'pretrain' only).
    """
    if not self.has_label(case_id):
      raise ValueError(f'case {case_id!r} of {self._data_dir} has no label '
                       '(unlabelled cases are for pre-training only)')
    return self._array(case_id, 'label')

  def _array(self, case_id: str, kind: str) -> np.ndarray:
    key = f'{case_id}.{kind}'
    array = self._arrays.get(key)
    if array is None:
      self.ensure_cache()
      array = np.load(os.path.join(self._cache_dir, f'{key}.npy'), mmap_mode='r')
      self._arrays[key] = array
    return array

  def cache_is_complete(self) -> bool:
    marker = os.path.join(self._cache_dir, _CACHE_MARKER)
    try:
      with open(marker) as f:
        return json.load(f).get('fingerprint') == self._fingerprint
    except (OSError, ValueError):
      return False

  def ensure_cache(self) -> bool:
    """Builds the `.npy` cache unless a complete one for this build exists.

    Returns:
      True if this call wrote the cache, False if it was already there.
    """
    if self._cache_ready or self.cache_is_complete():
      self._cache_ready = True
      return False
    self._build_cache()
    self._cache_ready = True
    return True

  def _build_cache(self) -> None:
    # Imported here: TFDS is slow to import and only needed once per cache.
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    try:
      os.makedirs(self._cache_dir, exist_ok=True)
    except OSError as e:
      raise OSError(f'{self._cache_dir}: cannot create the .npy cache ({e}); pass '
                    'CaseStore(..., cache_dir=WRITABLE_DIR)') from e
    tfds_info = self._store['tfds']
    builder = tfds.builder_from_directory(self._data_dir / tfds_info['builder_dir'])
    source = builder.as_data_source(split=tfds_info['split'])
    seen = set()
    for index in range(len(source)):
      example = source[index]
      case_id = example['case_id']
      case_id = case_id.decode() if isinstance(case_id, bytes) else str(case_id)
      if case_id not in self._cases:
        continue
      seen.add(case_id)
      _atomic_save(os.path.join(self._cache_dir, f'{case_id}.image.npy'), example['image'])
      if example['has_label']:
        _atomic_save(os.path.join(self._cache_dir, f'{case_id}.label.npy'), example['label'])
    missing = sorted(set(self._cases) - seen)
    if missing:
      raise ValueError(f'{self._data_dir}: store.json lists cases that are not in the TFDS '
                       f'records: {missing[:5]}; the store is damaged, re-run prepare')
    marker = os.path.join(self._cache_dir, _CACHE_MARKER)
    tmp = f'{marker}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}'
    with open(tmp, 'w') as f:
      json.dump({'fingerprint': self._fingerprint, 'num_cases': len(seen),
                 'data_dir': str(self._data_dir)}, f)
    os.replace(tmp, marker)
