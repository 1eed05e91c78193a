"""Tests for the grain loaders (pipeline.py) on an in-memory stand-in of CaseStore."""
import os
import threading

import grain
import numpy as np
import pytest

from pixssl_jax import config_files
from pixssl_jax.data import pipeline
from pixssl_jax.data import views

WINDOW = (-175.0, 250.0)


class InMemoryStore:
  """Stand-in for CaseStore: the same methods over a dict of numpy volumes.

  Logs every `image` read; `label` raises for unlabelled cases (ValueError, as
  the real store) and for every case when `forbid_labels` is set.
  """

  def __init__(self, num_cases=12, shape=(40, 40, 24), *, forbid_labels=False, seed=0,
               splits=None):
    rng = np.random.default_rng(seed)
    self.ids = [f'case_{i:03d}' for i in range(num_cases)]
    self.images, self.labels = {}, {}
    for case_id in self.ids:
      image = np.full(shape, WINDOW[0], np.int16)
      m = min(4, shape[0] // 4, shape[1] // 4)  # An air rim around a random body.
      image[m:shape[0] - m, m:shape[1] - m] = rng.integers(
          -100, 250, (shape[0] - 2 * m, shape[1] - 2 * m, shape[2]))
      label = np.zeros(shape, np.uint8)
      label[1:3, 1:3, 1:3] = 1  # A tiny corner organ: random crops rarely hit it.
      self.images[case_id], self.labels[case_id] = image, label
    self.splits = splits or {'pretrain': self.ids, 'train_10': self.ids[:4],
                             'val': self.ids[4:7], 'test': self.ids[7:]}
    self.unlabelled = set()
    self.forbid_labels = forbid_labels
    self.read_log = []
    self._lock = threading.Lock()
    self.hu_window = WINDOW
    self.spacing = (1.5, 1.5, 2.0)
    self.label_names = ('background', 'organ')

  def __getstate__(self):
    # grain pickles the transforms (and this store) into worker processes.
    state = dict(self.__dict__)
    del state['_lock']
    return state

  def __setstate__(self, state):
    self.__dict__.update(state, _lock=threading.Lock())

  def __repr__(self):
    return f'InMemoryStore(num_cases={len(self.ids)})'

  def split(self, name):
    return list(self.splits[name])

  def image(self, case_id):
    with self._lock:
      self.read_log.append(case_id)
    return self.images[case_id]

  def label(self, case_id):
    if self.forbid_labels:
      raise AssertionError('pre-training must not read labels')
    if case_id in self.unlabelled:
      raise ValueError(f'{case_id} is unlabelled')
    return self.labels[case_id]

  def meta(self, case_id):
    return {'spacing': self.spacing, 'case_id': case_id}


def _cfg(ndim, patch=8):
  cfg = config_files.load('pretrain', 'demo').data
  cfg.ndim = ndim
  cfg.patch_size = (patch,) * ndim
  cfg.flip = cfg.rot90 = True  # Every kind of view transform.
  return cfg


def _finetune_cfg(ndim, patch=8):
  cfg = config_files.load('finetune', 'demo').data
  cfg.ndim = ndim
  cfg.patch_size = (patch,) * ndim
  cfg.flip = True  # Every kind of crop transform.
  return cfg


def _take(iterator, n):
  return [next(iterator) for _ in range(n)]


def _assert_batches_equal(xs, ys):
  for x, y in zip(xs, ys, strict=True):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])


@pytest.mark.parametrize('ndim', [2, 3])
def test_pretrain_batches_match_the_design_table(ndim):
  store = InMemoryStore(forbid_labels=True)
  cfg = _cfg(ndim, patch=16)
  loader = pipeline.pretrain_loader(store, cfg, batch_size=3, seed=0)
  for batch in _take(iter(loader), 2):
    assert sorted(batch) == ['transform1', 'transform2', 'view1', 'view2']
    for key in ('view1', 'view2'):
      assert batch[key].shape == (3,) + (16,) * ndim + (1,)
      assert batch[key].dtype == np.float32
      assert np.all(np.isfinite(batch[key]))
    for key in ('transform1', 'transform2'):
      assert batch[key].shape == (3, ndim, ndim + 1) and batch[key].dtype == np.float32
    assert not np.array_equal(batch['view1'], batch['view2'])
  assert store.read_log  # Labels were never read (the store raises), images were.


@pytest.mark.parametrize('shard_count', [2, 3])
def test_shards_split_each_epoch_disjointly_and_cover_it(shard_count):
  store = InMemoryStore(num_cases=12, shape=(12, 12, 4))
  cfg = _cfg(2, patch=4)
  seen = []
  for shard_index in range(shard_count):
    store.read_log = []
    loader = pipeline.pretrain_loader(store, cfg, batch_size=1, seed=3, shard_index=shard_index,
                                      shard_count=shard_count, num_epochs=1)
    assert len(list(loader)) == 12 // shard_count
    assert len(set(store.read_log)) == len(store.read_log)
    seen.append(list(store.read_log))
  assert sorted(sum(seen, [])) == sorted(store.ids)  # Each case once, by exactly one shard.


def test_global_batches_do_not_depend_on_the_shard_count():
  store = InMemoryStore(num_cases=5, shape=(12, 12, 4))
  cfg = _cfg(2, patch=4)

  def global_batches(shard_count, steps=4, global_batch=4):
    iters = [iter(pipeline.pretrain_loader(store, cfg, batch_size=global_batch // shard_count,
                                           seed=7, shard_index=i, shard_count=shard_count))
             for i in range(shard_count)]
    batches = []
    for _ in range(steps):
      parts = [next(it) for it in iters]
      # In order: per-example randomness in the step (dropout) follows the batch position.
      batches.append(np.concatenate([p['view1'] for p in parts]).tolist())
    return batches

  one = global_batches(1)
  assert global_batches(2) == one and global_batches(4) == one


def test_first_batch_continues_the_stream_on_any_shard_count():
  store = InMemoryStore(num_cases=5, shape=(12, 12, 4))
  cfg = _cfg(2, patch=4)
  whole = iter(pipeline.pretrain_loader(store, cfg, batch_size=4, seed=2))
  expected = [next(whole)['view1'] for _ in range(5)][3:]  # Global batches 3 and 4.
  halves = [iter(pipeline.pretrain_loader(store, cfg, batch_size=2, seed=2, shard_index=i,
                                          shard_count=2, first_batch=3)) for i in range(2)]
  for batch in expected:
    np.testing.assert_array_equal(np.concatenate([next(h)['view1'] for h in halves]), batch)


def test_pretrain_is_seeded():
  store = InMemoryStore()
  cfg = _cfg(3)
  a = _take(iter(pipeline.pretrain_loader(store, cfg, batch_size=2, seed=5)), 3)
  b = _take(iter(pipeline.pretrain_loader(store, cfg, batch_size=2, seed=5)), 3)
  c = _take(iter(pipeline.pretrain_loader(store, cfg, batch_size=2, seed=6)), 3)
  _assert_batches_equal(a, b)
  assert not np.array_equal(a[0]['view1'], c[0]['view1'])


@pytest.mark.parametrize('worker_count,num_epochs', [(0, None), (0, 3), (2, None)])
def test_restored_iterator_continues_exactly(worker_count, num_epochs):
  store = InMemoryStore(num_cases=5)
  cfg = _cfg(2)
  make = lambda: pipeline.pretrain_loader(store, cfg, batch_size=2, seed=1,
                                          worker_count=worker_count, num_epochs=num_epochs)
  iterator = iter(make())
  _take(iterator, 4)  # With 3 epochs of 5 cases this crosses an epoch boundary.
  state = iterator.get_state()
  expected = _take(iterator, 3)
  restored = iter(make())
  restored.set_state(state)
  _assert_batches_equal(_take(restored, 3), expected)


def test_iterator_checkpoints_through_orbax(tmp_path):
  ocp = pytest.importorskip('orbax.checkpoint')
  store = InMemoryStore(num_cases=5)
  cfg = _cfg(2)
  make = lambda: iter(pipeline.pretrain_loader(store, cfg, batch_size=2, seed=2))
  iterator = make()
  _take(iterator, 2)
  checkpointer = ocp.Checkpointer(grain.checkpoint.CheckpointHandler())
  checkpointer.save(os.fspath(tmp_path / 'data'), args=grain.checkpoint.CheckpointSave(iterator))
  expected = _take(iterator, 2)
  restored = make()
  checkpointer.restore(os.fspath(tmp_path / 'data'),
                       args=grain.checkpoint.CheckpointRestore(restored))
  _assert_batches_equal(_take(restored, 2), expected)


def test_restore_refuses_another_split():
  store = InMemoryStore()
  cfg = _cfg(2)
  iterator = iter(pipeline.pretrain_loader(store, cfg, batch_size=2, seed=1))
  next(iterator)
  other = iter(pipeline.pretrain_loader(store, cfg, batch_size=2, seed=1, split='test'))
  with pytest.raises(ValueError):
    other.set_state(iterator.get_state())


@pytest.mark.parametrize('ndim', [2, 3])
def test_finetune_crops_hit_foreground_at_the_requested_rate(ndim):
  store = InMemoryStore(num_cases=2)
  shape = (8,) * ndim
  for prob in (0.0, 0.67):
    crop = pipeline.LabelledCrop(store, shape, foreground_prob=prob, flip=True)
    rng = np.random.default_rng(0)
    hits = [crop.random_map(store.ids[i % 2], rng)['label'].any() for i in range(200)]
    rate = np.mean(hits)
    # Uniform crops touch the 2-voxel corner organ rarely (under 5% in 2-D, 1% in 3-D).
    assert abs(rate - prob) < 0.1, (prob, rate)


def test_foreground_crops_are_class_balanced():
  """A 1-voxel organ is the crop centre about as often as a huge one (nnU-Net sampling)."""
  store = InMemoryStore(num_cases=1, shape=(40, 40, 4))
  case = store.ids[0]
  label = np.zeros((40, 40, 4), np.uint8)
  label[:30, :30] = 1  # 3600 voxels.
  label[36, 36, 2] = 2  # One voxel.
  store.labels[case] = label
  crop = pipeline.LabelledCrop(store, (4, 4), foreground_prob=1.0, flip=False)
  rng = np.random.default_rng(0)
  centres = [crop.random_map(case, rng)['label'][2, 2] for _ in range(400)]
  assert 0.4 < np.mean(np.asarray(centres) == 2) < 0.6


def test_finetune_batches_and_small_volume_padding():
  store = InMemoryStore(num_cases=4, shape=(10, 6, 5))
  cfg = _finetune_cfg(3, patch=8)
  loader = pipeline.finetune_loader(store, cfg, split='train_10', batch_size=2, seed=0)
  batch = next(iter(loader))
  assert batch['image'].shape == (2, 8, 8, 8, 1) and batch['image'].dtype == np.float32
  assert batch['label'].shape == (2, 8, 8, 8) and batch['label'].dtype == np.int32
  assert batch['image'].min() == 0.0  # Air padding scales to 0.
  assert 0.0 <= batch['image'].min() and batch['image'].max() <= 1.0
  assert set(np.unique(batch['label'])) <= {0, 1}


def test_finetune_loader_reads_only_the_given_case_ids():
  store = InMemoryStore(num_cases=6, shape=(10, 10, 4))
  loader = pipeline.finetune_loader(store, _finetune_cfg(2, patch=8), split='pretrain',
                                    batch_size=2, seed=0, case_ids=store.ids[2:4])
  iterator = iter(loader)
  for _ in range(4):
    next(iterator)
  assert set(store.read_log) == set(store.ids[2:4])


def test_finetune_image_and_label_stay_aligned():
  store = InMemoryStore(num_cases=1, shape=(20, 20, 6))
  case = store.ids[0]
  store.labels[case] = (store.images[case] > 100).astype(np.uint8)
  crop = pipeline.LabelledCrop(store, (8, 8), foreground_prob=0.5, flip=True)
  rng = np.random.default_rng(0)
  threshold = (100 - WINDOW[0]) / (WINDOW[1] - WINDOW[0])
  for _ in range(20):
    example = crop.random_map(case, rng)
    np.testing.assert_array_equal(example['label'], example['image'][..., 0] > threshold)


@pytest.mark.parametrize('ndim', [2, 3])
def test_resized_finetune_crops_keep_image_and_label_aligned(ndim):
  """Image (linear) and label (nearest) of a resized crop read the same source points."""
  shape3 = (40, 28, 12)
  store = InMemoryStore(num_cases=1, shape=shape3)
  case = store.ids[0]
  x = np.arange(shape3[0])[:, None, None] * np.ones(shape3)
  # HU = air + 10 (x + 1): the image reads back its source x, and air continues the ramp below
  # x = 0. Labels only for x < 20 and crops centred on them, so no crop reaches x = 39.
  store.images[case] = (WINDOW[0] + 10 * (x + 1)).astype(np.int16)
  store.labels[case] = np.where(x < 20, x % 5, 0).astype(np.uint8)
  crop = pipeline.LabelledCrop(store, (8,) * ndim, foreground_prob=1.0, flip=False,
                               scale_range=(0.5, 2.0))
  rng = np.random.default_rng(0)
  steps = set()
  for _ in range(20):
    example = crop.random_map(case, rng)
    hu = example['image'][..., 0] * (WINDOW[1] - WINDOW[0]) + WINDOW[0]
    source_x = (hu - WINDOW[0]) / 10 - 1
    nearest = np.floor(source_x + 0.5).astype(int)
    # Air beyond y and z lowers a voxel below its row's value; rounding ties are ambiguous.
    pure = source_x >= source_x.max(axis=tuple(range(1, ndim)), keepdims=True) - 1e-3
    pure &= (source_x > 0) & (np.abs(source_x % 1 - 0.5) > 1e-3)
    np.testing.assert_array_equal(example['label'][pure],
                                  np.where(nearest < 20, nearest % 5, 0)[pure])
    steps.add(round(float(np.median(np.diff(source_x.max(axis=tuple(range(1, ndim)))))), 3))
  assert len(steps) > 5 and min(steps) < 0.9 and max(steps) > 1.1  # Scales vary both ways.


def test_finetune_augmentation_is_off_by_default_and_seeded_when_on():
  store = InMemoryStore(num_cases=2)
  fine = config_files.load('finetune', 'demo').data
  assert not fine.intensity.enabled and tuple(fine.scale_range) == (1.0, 1.0) and not fine.flip

  def crops(**kwargs):
    crop = pipeline.LabelledCrop(store, (8, 8), 0.5, False, **kwargs)
    rng = np.random.default_rng(4)
    return [crop.random_map(store.ids[i % 2], rng) for i in range(6)]

  plain = crops()
  _assert_batches_equal(plain, crops(intensity_cfg=fine.intensity, scale_range=fine.scale_range))
  fine.intensity.enabled = True
  fine.intensity.prob = 1.0
  on = crops(intensity_cfg=fine.intensity, scale_range=(0.7, 1.4))
  _assert_batches_equal(on, crops(intensity_cfg=fine.intensity, scale_range=(0.7, 1.4)))
  assert all(np.abs(a['image'] - b['image']).mean() > 0.01 for a, b in zip(on, plain))


def test_student_masks_come_only_when_asked():
  store = InMemoryStore(num_cases=2)
  cfg = _cfg(3, patch=16)
  plain = pipeline.MakeViewPair(store, cfg).random_map(store.ids[0], np.random.default_rng(0))
  assert not any(k.startswith('student_mask') for k in plain)
  cfg.mask_ratio, cfg.mask_patch = 0.25, 4
  masked = pipeline.MakeViewPair(store, cfg).random_map(store.ids[0], np.random.default_rng(0))
  for k in ('1', '2'):
    mask = masked['student_mask' + k]
    assert mask.shape == (16, 16, 16, 1) and mask.dtype == bool and mask.mean() == 0.25
    # The views themselves are not masked: the teacher sees them whole.
    np.testing.assert_array_equal(masked['view' + k], plain['view' + k])
  assert not np.array_equal(masked['student_mask1'], masked['student_mask2'])


def test_volume_iterator_yields_whole_scaled_volumes():
  store = InMemoryStore(num_cases=12)
  store.unlabelled.add(store.ids[5])
  examples = list(pipeline.volume_iterator(store, 'val'))
  assert [e['case_id'] for e in examples] == store.ids[4:7]
  for e in examples:
    assert e['image'].shape == (40, 40, 24, 1) and e['image'].dtype == np.float32
    np.testing.assert_allclose(
        e['image'][..., 0],
        (store.images[e['case_id']].astype(np.float32) - WINDOW[0]) / (WINDOW[1] - WINDOW[0]))
    assert e['meta']['case_id'] == e['case_id']
  assert 'label' not in examples[1]
  assert examples[0]['label'].dtype == np.int32 and examples[0]['label'].sum() == 8
  shards = [[e['case_id'] for e in pipeline.volume_iterator(store, 'test', shard_index=i,
                                                             shard_count=2, with_labels=False)]
            for i in range(2)]
  assert sorted(shards[0] + shards[1]) == store.ids[7:] and not set(shards[0]) & set(shards[1])


def test_bad_arguments_are_named():
  store = InMemoryStore(num_cases=2)
  cfg = _cfg(2)
  with pytest.raises(ValueError, match='shard_index'):
    pipeline.pretrain_loader(store, cfg, batch_size=1, seed=0, shard_index=2, shard_count=2)
  store.splits['empty'] = []
  with pytest.raises(ValueError, match="split 'empty'"):
    pipeline.pretrain_loader(store, cfg, batch_size=1, seed=0, split='empty')


def test_loaders_through_a_real_prepared_case_store(tmp_path):
  """NIfTI -> prepare -> CaseStore -> all three loaders, with no stand-in."""
  nib = pytest.importorskip('nibabel')
  from pixssl_jax.data import case_store  # pylint: disable=g-import-not-at-top
  from pixssl_jax.data import prepare  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  (tmp_path / 'raw' / 'images').mkdir(parents=True)
  (tmp_path / 'raw' / 'labels').mkdir()
  affine = np.diag([1.5, 1.5, 2.0, 1.0])  # Already at the target spacing: no resampling.
  for i in range(6):
    image = rng.integers(-300, 300, (24, 24, 10)).astype(np.int16)
    nib.save(nib.Nifti1Image(image, affine), tmp_path / 'raw' / 'images' / f'c{i}.nii.gz')
    if i < 5:  # c5 is unlabelled: pre-training only.
      label = np.zeros((24, 24, 10), np.uint8)
      label[10:14, 10:14, 4:6] = 1
      nib.save(nib.Nifti1Image(label, affine), tmp_path / 'raw' / 'labels' / f'c{i}.nii.gz')
  prepare.prepare_dataset(tmp_path / 'raw', tmp_path / 'store', strict=True, verbose=False)
  store = case_store.CaseStore(tmp_path / 'store', cache_dir=tmp_path / 'cache')
  assert len(store.case_ids) == 6
  # Pre-training reads the labelled training cases and the unlabelled one, never val or test.
  assert 'c5' in store.split('pretrain')
  assert not set(store.split('pretrain')) & set(store.split('val') + store.split('test'))

  cfg = _cfg(2, patch=16)
  cfg.intensity.enabled = False
  batch = next(iter(pipeline.pretrain_loader(store, cfg, batch_size=2, seed=0)))
  assert batch['view1'].shape == (2, 16, 16, 1) and batch['transform2'].shape == (2, 2, 3)
  # Each view is the windowed store image sampled at its transform, on some axial slice.
  lo, hi = store.hu_window
  slices = [np.asarray(store.image(c), np.float32)[:, :, z]
            for c in store.split('pretrain') for z in range(10)]
  for view, t in zip(batch['view1'][..., 0], batch['transform1']):
    candidates = [np.clip((views.render_view(s, t, (16, 16), lo) - lo) / (hi - lo), 0, 1)
                  for s in slices]
    assert min(np.abs(c - view).max() for c in candidates) < 1e-5

  fine = next(iter(pipeline.finetune_loader(store, _finetune_cfg(2, patch=16),
                                            split='train_100', batch_size=2, seed=0)))
  assert fine['image'].shape == (2, 16, 16, 1) and fine['label'].shape == (2, 16, 16)
  volumes = list(pipeline.volume_iterator(store, 'val'))
  assert volumes and all(v['image'].shape == (24, 24, 10, 1) and 'label' in v for v in volumes)
