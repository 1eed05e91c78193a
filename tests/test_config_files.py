"""The config files as a pair: what fine-tuning must share with pre-training, and loading."""

import importlib.util
import shutil

from pixssl_jax import config_files
from pixssl_jax import config_loading
from pixssl_jax.data import default_dataset

# The data fields that name the store: a fine-tuning's splits come from the same store as the
# pre-training run it starts from.
STORE_FIELDS = ('data_dir', 'cache_dir', 'num_phantoms', 'phantom_seed', 'phantom_shape_scale',
                'phantom_spacing', 'phantom_family')


def _store_dir(data):
  return default_dataset.phantom_store_dir(
      '/cache', data.num_phantoms, data.phantom_seed, data.phantom_shape_scale,
      data.phantom_spacing, data.phantom_family)


def test_presets_of_the_same_name_read_the_same_store():
  for preset in ('tiny', 'demo', 'btcv_3d'):
    pre = config_files.load('pretrain', preset).data
    fine = config_files.load('finetune', preset).data
    for field in STORE_FIELDS:
      assert pre[field] == fine[field], (preset, field, pre[field], fine[field])
    assert _store_dir(pre) == _store_dir(fine)


def test_shared_defaults_agree():
  pre, fine = config_files.load('pretrain'), config_files.load('finetune')
  for field in ('worker_count', 'read_threads', 'prefetch_buffer_size', 'ndim', 'patch_size'):
    assert pre.data[field] == fine.data[field], field
  shared = set(pre.data.intensity) - {'enabled'}
  assert shared == set(fine.data.intensity) - {'enabled'}
  assert all(pre.data.intensity[k] == fine.data.intensity[k] for k in shared)
  for field in ('features', 'num_groups', 'dtype', 'layers'):
    assert pre.model[field] == fine.model[field], field


def test_a_copied_config_folder_loads_with_its_own_common(tmp_path):
  # The files find configs/common.py beside themselves, not on sys.path nor in the package.
  for name in (*config_files.NAMES, config_files.SHARED):
    shutil.copy(config_files.CONFIG_DIR / f'{name}.py', tmp_path / f'{name}.py')
  common = tmp_path / 'common.py'
  common.write_text(common.read_text().replace('read_threads = 2', 'read_threads = 5'))
  config = config_loading.load_file(f'{tmp_path / "finetune.py"}:tiny')
  assert config.data.read_threads == 5 and config.data.num_phantoms == 6
  spec = importlib.util.spec_from_file_location('copied_pretrain', tmp_path / 'pretrain.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  assert module.get_config('demo').data.read_threads == 5
