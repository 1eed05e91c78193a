"""grain input pipelines: two-view pre-training, labelled fine-tuning crops, whole volumes.

All loaders read through a case store (duck typed, docs/design.md "The store":
`split`, `image`, `label`, `meta`, `hu_window`, stable `__repr__`). The record
source is the list of case ids of a split, so a record is cheap to read and the
store's memory-mapped cache does the I/O inside the random transform.

Each JAX process passes `shard_index=jax.process_index()` and
`shard_count=jax.process_count()` (this package never imports jax); `batch_size`
is per process. The processes read disjoint positions of one global stream
(`GlobalShuffleSampler`), so the global batch of a step is the same for any
number of processes: a run's result does not depend on how many hosts ran it. The loaders return a
`grain.DataLoader`; `iter(loader)` is checkpointable with
`grain.checkpoint.CheckpointSave(iterator)` / `CheckpointRestore(iterator)` in an
orbax `Composite`, or `iterator.get_state()` / `set_state()` (bytes).
"""
import hashlib
import sys
from typing import Any, Iterator, Optional, Sequence

import grain
import ml_collections
import numpy as np

from pixssl_jax.data import intensity
from pixssl_jax.data import views
# The fine-tuning transform lives in its own module; callers reach it through this one.
from pixssl_jax.data.labelled_crops import LabelledCrop
from pixssl_jax.data.labelled_crops import labelled_slice_indices  # noqa: F401


class CaseIdSource:
  """Random-access source over the case ids of one split.

  grain checks `repr(data_source)` when restoring an iterator, so the repr is
  built only from the store's repr, the split and a digest of the ids.
  """

  def __init__(self, store: Any, split: str, case_ids: Optional[Sequence[str]] = None):
    # `case_ids` replaces the split's ids (a subset drawn by the caller; `split` names it).
    self._ids = tuple(store.split(split) if case_ids is None else case_ids)
    if not self._ids:
      raise ValueError(f'split {split!r} of {store!r} has no cases')
    digest = hashlib.sha1('\n'.join(self._ids).encode()).hexdigest()[:12]
    self._repr = (f'CaseIdSource(store={store!r}, split={split!r}, '
                  f'num_cases={len(self._ids)}, ids_sha1={digest})')

  @property
  def case_ids(self) -> tuple[str, ...]:
    return self._ids

  def __len__(self) -> int:
    return len(self._ids)

  def __getitem__(self, index: int) -> str:
    return self._ids[index]

  def __repr__(self) -> str:
    return self._repr


class GlobalShuffleSampler:
  """A global stream of records, read as consecutive slices of each global batch.

  The stream is a fresh seeded permutation of the records per epoch. Global batch k holds
  stream positions [k B, (k + 1) B), B = shard_count * local_batch, and shard p reads the
  slice [k B + p b, k B + (p + 1) b), b = local_batch. So the global batch of a step, in order,
  is the same for any number of processes, and within every epoch each record is read by
  exactly one process. grain's IndexSampler instead shuffles each shard's own block of records,
  so its global batches change with the process count. The rng of a record is
  Philox(seed + stream position), as in IndexSampler, so augmentations are the same too. The
  DataLoader asks for index j = i * shard_count + shard_index for the i-th record of a shard
  (its ShardOptions striding); `__getitem__` maps that to the stream position. `first_batch`
  starts the stream at global batch k, which is how a run resumed on another number of
  processes (whose grain iterator state does not apply) continues the same data exactly.
  """

  def __init__(self, num_records: int, seed: int, num_epochs: Optional[int] = None,
               shard_count: int = 1, local_batch: int = 1, first_batch: int = 0):
    if num_records < 1:
      raise ValueError(f'num_records must be positive, got {num_records}')
    self._num_records = int(num_records)
    self._seed = int(seed)
    self._num_epochs = num_epochs
    self._shard_count = int(shard_count)
    self._local_batch = int(local_batch)
    self._first_batch = int(first_batch)
    self._cached_epoch, self._cached_order = -1, None

  def __len__(self) -> int:
    if self._num_epochs is None:
      return sys.maxsize
    global_batch = self._shard_count * self._local_batch
    remaining = self._num_records * self._num_epochs - self._first_batch * global_batch
    return max(remaining, 0) // global_batch * global_batch

  def __repr__(self) -> str:  # grain compares it when restoring an iterator.
    return (f'GlobalShuffleSampler(num_records={self._num_records}, seed={self._seed}, '
            f'num_epochs={self._num_epochs}, shard_count={self._shard_count}, '
            f'local_batch={self._local_batch}, first_batch={self._first_batch})')

  def stream_position(self, index: int) -> int:
    """The global stream position read at DataLoader index `index`."""
    i, shard = divmod(index, self._shard_count)
    batch, offset = divmod(i, self._local_batch)
    batch += self._first_batch
    return (batch * self._shard_count + shard) * self._local_batch + offset

  def _order(self, epoch: int) -> np.ndarray:
    if epoch != self._cached_epoch:
      rng = np.random.default_rng([self._seed, epoch])
      self._cached_epoch, self._cached_order = epoch, rng.permutation(self._num_records)
    return self._cached_order

  def __getitem__(self, index: int) -> grain.RecordMetadata:
    if index < 0 or index >= len(self):
      raise IndexError(f'sampler index {index} out of range [0, {len(self)})')
    position = self.stream_position(index)
    epoch, offset = divmod(position, self._num_records)
    return grain.RecordMetadata(
        index=position, record_key=int(self._order(epoch)[offset]),
        rng=np.random.Generator(np.random.Philox(key=self._seed + position)))


class MakeViewPair(grain.transforms.RandomMap):
  """Case id -> one pre-training example (two views and their transforms).

  Reads only `store.image`: pre-training never touches labels. With `data.mask_ratio`
  > 0 the example also holds one patch mask per view (`views.patch_mask`).
  """

  def __init__(self, store: Any, data_cfg: ml_collections.ConfigDict):
    self._store = store
    self._cfg = ml_collections.FrozenConfigDict(data_cfg)
    self._window = tuple(float(v) for v in store.hu_window)
    views.patch_shape(self._cfg)  # Fail at construction on a bad patch size.

  def random_map(self, case_id: str, rng: np.random.Generator) -> dict[str, np.ndarray]:
    pair = views.sample_view_pair(self._store.image(case_id), rng, self._cfg, self._window)
    example = {
        'view1': intensity.augment_intensity(
            pair.view1, rng, self._cfg.intensity, self._window)[..., None],
        'view2': intensity.augment_intensity(
            pair.view2, rng, self._cfg.intensity, self._window)[..., None],
        'transform1': pair.transform1,
        'transform2': pair.transform2,
    }
    ratio = float(self._cfg.mask_ratio)
    if ratio > 0:
      # The masks travel beside the views, not applied to them: the teacher sees both
      # views whole, only the student's input is masked (by the objective).
      for k in ('1', '2'):
        example['student_mask' + k] = views.patch_mask(
            pair.view1.shape, rng, ratio, int(self._cfg.mask_patch))[..., None]
    return example


def _make_loader(store: Any, split: str, transform: grain.transforms.RandomMap,
                 data_cfg: ml_collections.ConfigDict, *, batch_size: int, seed: int,
                 shard_index: int, shard_count: int, worker_count: Optional[int],
                 num_epochs: Optional[int], first_batch: int = 0,
                 case_ids: Optional[Sequence[str]] = None) -> grain.DataLoader:
  """Seeded, sharded, shuffled, batched DataLoader over the case ids of `split`."""
  if batch_size < 1:
    raise ValueError(f'batch_size must be positive, got {batch_size}')
  if not 0 <= shard_index < shard_count:
    raise ValueError(f'shard_index {shard_index} not in [0, shard_count={shard_count})')
  source = CaseIdSource(store, split, case_ids)
  shard_options = grain.sharding.ShardOptions(shard_index, shard_count, drop_remainder=True)
  sampler = GlobalShuffleSampler(len(source), seed, num_epochs, shard_count, batch_size,
                                 first_batch)
  if worker_count is None:
    worker_count = int(data_cfg.worker_count)
  # grain's defaults (16 threads, 500 elements) hold about 1 GB of crops (docs/pitfalls.md).
  read_options = grain.ReadOptions(num_threads=int(data_cfg.read_threads),
                                   prefetch_buffer_size=int(data_cfg.prefetch_buffer_size))
  return grain.DataLoader(
      data_source=source, sampler=sampler,
      operations=[transform, grain.transforms.Batch(batch_size, drop_remainder=True)],
      worker_count=worker_count, shard_options=shard_options, read_options=read_options)


def pretrain_loader(store: Any, data_cfg: ml_collections.ConfigDict, *, batch_size: int,
                    seed: int, shard_index: int = 0, shard_count: int = 1,
                    worker_count: Optional[int] = None, num_epochs: Optional[int] = None,
                    split: str = 'pretrain', first_batch: int = 0) -> grain.DataLoader:
  """Two-view pre-training batches (docs/design.md batch table).

  Args:
    store: case store; only `split`, `image` and `hu_window` are used.
    data_cfg: the `data` config (configs/pretrain.py's fields).
    batch_size: examples per batch in this process.
    seed: shuffle and augmentation seed (0 <= seed < 2**32).
    shard_index, shard_count: this process's share of the global stream.
    worker_count: grain worker processes; None reads `data_cfg.worker_count`.
    num_epochs: None repeats forever.
    split: store split to read.
    first_batch: start at this global batch of the stream (resuming without iterator state).

  Returns:
    A DataLoader whose batches are dicts: `view1`, `view2` `[B, *P, 1]` float32 and
    `transform1`, `transform2` `[B, n, n + 1]` float32; with `data_cfg.mask_ratio` > 0 also
    `student_mask1`, `student_mask2` `[B, *P, 1]` bool, True where the student's input of
    that view is hidden.
  """
  return _make_loader(store, split, MakeViewPair(store, data_cfg), data_cfg,
                      batch_size=batch_size, seed=seed, shard_index=shard_index,
                      shard_count=shard_count, worker_count=worker_count, num_epochs=num_epochs,
                      first_batch=first_batch)


def finetune_loader(store: Any, data_cfg: ml_collections.ConfigDict, *, split: str,
                    batch_size: int, seed: int, shard_index: int = 0, shard_count: int = 1,
                    worker_count: Optional[int] = None,
                    num_epochs: Optional[int] = None,
                    case_ids: Optional[Sequence[str]] = None,
                    label_slices: int = 0,
                    first_batch: int = 0) -> grain.DataLoader:
  """Labelled random crops of `data_cfg.patch_size` (2-D slices or 3-D patches).

  Args:
    store: case store with labels for `split`.
    data_cfg: the fine-tuning `data` config (configs/finetune.py's fields): ndim, patch_size,
      foreground_prob, flip, scale_range, intensity and the loader fields.
    split: labelled split, e.g. 'train_10'.
    batch_size: examples per batch in this process.
    seed: shuffle and augmentation seed.
    shard_index, shard_count: this process's share of the global stream.
    worker_count: grain worker processes; None reads `data_cfg.worker_count`.
    num_epochs: None repeats forever.
    case_ids: read these cases instead of the whole split (a drawn label fraction).
    label_slices: > 0: only this many evenly spaced axial slices of each case are labelled
      (`LabelledCrop`); needs 2-D crops. 0: whole volumes.
    first_batch: start at this global batch of the stream (resuming without iterator state).

  Returns:
    A DataLoader whose batches are dicts: `image` `[B, *P, 1]` float32 in [0, 1]
    and `label` `[B, *P]` int32.
  """
  transform = LabelledCrop(store, views.patch_shape(data_cfg), float(data_cfg.foreground_prob),
                           bool(data_cfg.flip), label_slices=label_slices,
                           intensity_cfg=data_cfg.intensity, scale_range=data_cfg.scale_range)
  return _make_loader(store, split, transform, data_cfg,
                      batch_size=batch_size, seed=seed, shard_index=shard_index,
                      shard_count=shard_count, worker_count=worker_count, num_epochs=num_epochs,
                      first_batch=first_batch, case_ids=case_ids)


def volume_iterator(store: Any, split: str, *, shard_index: int = 0, shard_count: int = 1,
                    with_labels: bool = True) -> Iterator[dict[str, Any]]:
  """Yields whole volumes of a split, one at a time, for sliding-window inference.

  Cases are dealt round-robin to shards (none dropped), in split order.

  Args:
    store: case store.
    split: split name, e.g. 'val' or 'test'.
    shard_index, shard_count: this process's share of the cases.
    with_labels: also read labels (skipped for unlabelled cases).

  Yields:
    Dicts with `case_id` (str), `image` `[X, Y, Z, 1]` float32 in [0, 1],
    `label` `[X, Y, Z]` int32 (only if labelled and `with_labels`), `meta` (dict).
  """
  if not 0 <= shard_index < shard_count:
    raise ValueError(f'shard_index {shard_index} not in [0, shard_count={shard_count})')
  for case_id in list(store.split(split))[shard_index::shard_count]:
    example = {
        'case_id': case_id,
        'image': intensity.scale_hu(store.image(case_id), store.hu_window)[..., None],
        'meta': store.meta(case_id),
    }
    if with_labels:
      try:
        example['label'] = np.asarray(store.label(case_id), np.int32)
      except ValueError:
        pass  # Unlabelled case: the store says so with ValueError (docs/design.md).
    yield example
