"""Config and workdir problems are found before the first step, each naming its field."""

import os

import ml_collections
import pytest

from pixssl_jax.train import config_checks
from tests.helpers import load_config


def problems(config, devices=8, processes=1):
  return config_checks.pretrain_config_problems(config, device_count=devices,
                                                process_count=processes)


@pytest.mark.parametrize('preset', ['tiny', 'demo', 'btcv_3d', 'tpu_pod'])
def test_presets_are_consistent(preset):
  config = load_config(preset)
  devices = 256 if preset == 'tpu_pod' else 8
  assert problems(config, devices=devices) == []


def test_each_problem_is_reported_with_its_field():
  config = load_config('tiny')
  config.batch_size = 12
  config.data.patch_size = (30, 32)
  config.method.weighting = 'softmax'
  config.model.pixel_level = 5
  found = '\n'.join(problems(config))
  assert 'config.batch_size=12 is not divisible by the 8 devices' in found
  assert 'config.data.patch_size=(30, 32): every axis must be divisible by 4' in found
  assert "config.method.weighting='softmax'" in found
  assert 'config.model.pixel_level=5' in found


def test_patch_axes_must_match_ndim():
  config = load_config('tiny')
  config.data.ndim = 3
  assert any('has 2 axes but config.data.ndim=3' in p for p in problems(config))


def test_unwritable_workdir_is_named(tmp_path):
  blocker = tmp_path / 'file'
  blocker.write_text('not a directory')
  with pytest.raises(config_checks.ConfigError,
                     match=f'--workdir {blocker}/run: {blocker} is not a folder'):
    config_checks.check_workdir_writable(str(blocker / 'run'))


def test_validate_raises_with_all_problems(tmp_path):
  config = load_config('tiny')
  config.batch_size = 3
  config.method.use_global = config.method.use_pixel = False
  with pytest.raises(config_checks.ConfigError) as info:
    config_checks.validate_pretrain(config, str(tmp_path), device_count=2, process_count=2)
  message = str(info.value)
  assert 'config.batch_size=3 is not divisible by the 2 devices' in message
  assert 'nothing to learn' in message
  assert not os.listdir(tmp_path)  # Nothing was written for a config that cannot run.


# One out-of-range value per checked field: (config file, field, value, words of the message).
OUT_OF_RANGE = [
    ('pretrain', 'optim.learning_rate', -1e-3, 'must be > 0'),
    ('pretrain', 'optim.ema_momentum', 1.5, 'must be in [0, 1)'),
    ('pretrain', 'optim.name', 'sgd', "choose one of ('adamw', 'lars')"),
    ('pretrain', 'optim.warmup_steps', -1, 'must be >= 0'),
    ('pretrain', 'optim.weight_decay', -0.1, 'must be >= 0'),
    ('pretrain', 'optim.grad_clip', -1.0, 'must be >= 0'),
    ('pretrain', 'batch_size', 0, 'must be >= 1'),
    ('pretrain', 'num_steps', 0, 'must be >= 1'),
    ('pretrain', 'checkpoint_every', 0, 'must be >= 1'),
    ('pretrain', 'log_every', 0, 'must be >= 1'),
    ('pretrain', 'keep_checkpoints', 0, 'must be >= 1'),
    ('pretrain', 'image_every', -1, 'must be >= 0'),
    ('pretrain', 'seed', -1, 'must be >= 0'),
    ('pretrain', 'data.min_overlap', 2.0, 'must be in [0, 1]'),
    ('pretrain', 'data.region_scale', 0.5, 'must be >= 1'),
    ('pretrain', 'data.scale_range', (1.4, 0.7), 'low <= high'),
    ('pretrain', 'data.min_body_fraction', 1.0, 'must be in [0, 1)'),
    ('pretrain', 'data.num_phantoms', 2, 'must be >= 5'),
    ('pretrain', 'data.phantom_shape_scale', 0.0, 'must be > 0'),
    ('finetune', 'data.phantom_family', 'hard', "choose one of ('basic', 'clinical')"),
    ('pretrain', 'data.intensity.prob', 1.5, 'must be in [0, 1]'),
    ('pretrain', 'data.intensity.window_jitter', 1.0, 'must be in [0, 1)'),
    ('pretrain', 'data.intensity.contrast', -0.1, 'must be in [0, 1)'),
    ('pretrain', 'data.intensity.gamma', -0.5, 'must be >= 0'),
    ('pretrain', 'data.intensity.noise_std', -0.1, 'must be >= 0'),
    ('pretrain', 'data.intensity.blur_sigma', (1.0, 0.5), 'low <= high'),
    ('pretrain', 'data.worker_count', -1, 'must be >= 0'),
    ('pretrain', 'data.read_threads', 0, 'must be >= 1'),
    ('pretrain', 'data.prefetch_buffer_size', 0, 'must be >= 1'),
    ('pretrain', 'model.num_groups', 0, 'must be >= 1'),
    ('pretrain', 'model.stabilizer_dropout', 1.0, 'must be in [0, 1)'),
    ('pretrain', 'model.pixel_proj_dim', 0, 'must be >= 1'),
    ('finetune', 'model.layers', 'gpu', "choose one of ('auto', 'flax', 'cpu')"),
    ('pretrain', 'method.tau', 0.0, 'must be > 0'),
    ('pretrain', 'method.kendall_eps', 0.0, 'must be > 0'),
    ('pretrain', 'method.threshold_start', -1.0, 'must be > 0'),
    ('pretrain', 'method.mc_samples', 0, 'must be >= 1'),
    ('pretrain', 'method.weighting_scale', 'log', "choose one of"),
    ('pretrain', 'method.tau_absolute', -1.0, 'must be > 0'),
    ('pretrain', 'method.threshold_keep_start', 0.0, 'must be in (0, 1]'),
    ('pretrain', 'optim.ema_final_init_share', 1.0, 'must be in [0, 1)'),
    ('finetune', 'optim.backbone_lr_scale', -0.5, 'must be >= 0'),
    ('pretrain', 'method.weighting', 'softmax', 'choose one of'),
    ('pretrain', 'method.match', 'nearest', 'choose one of'),
    ('pretrain', 'method.match_distance', 0.0, 'must be > 0'),
    ('pretrain', 'method.lambda_global', -1.0, 'must be >= 0'),
    ('pretrain', 'method.lambda_variance', -1.0, 'must be >= 0'),
    ('finetune', 'label_fraction', 0.0, 'must be in (0, 1]'),
    ('finetune', 'eval_every', 0, 'must be >= 1'),
    ('finetune', 'label_count', -1, 'must be >= 0'),
    ('finetune', 'label_slices', -2, 'must be >= 0'),
    ('finetune', 'data.foreground_prob', 1.5, 'must be in [0, 1]'),
    ('finetune', 'model.head_dropout', 1.0, 'must be in [0, 1)'),
    ('finetune', 'loss.dice_weight', -1.0, 'must be >= 0'),
    ('finetune', 'eval.overlap', 1.0, 'must be in [0, 1)'),
    ('finetune', 'eval.batch_size', 0, 'must be >= 1'),
    ('finetune', 'eval.split', 'training', 'choose one of'),
    ('finetune', 'eval.checkpoint', 'newest', "use 'best', 'last' or a step number"),
    ('finetune', 'optim.learning_rate', 0.0, 'must be > 0'),
]


def _set(config, field, value):
  *parents, leaf = field.split('.')
  node = config
  for name in parents:
    node = node[name]
  node[leaf] = value


@pytest.mark.parametrize('file,field,value,words', OUT_OF_RANGE,
                         ids=[f'{f}:{k}' for f, k, _, _ in OUT_OF_RANGE])
def test_each_field_out_of_range_is_named(file, field, value, words):
  from pixssl_jax import config_files
  config = config_files.load(file, 'tiny')
  _set(config, field, value)
  if file == 'pretrain':
    found = problems(config)
  else:
    config.init = 'scratch'
    found = config_checks.finetune_config_problems(config, device_count=8, process_count=1)
  named = [p for p in found if p.startswith(f'config.{field}=')]
  assert len(named) == 1, found
  assert words in named[0], named[0]


def test_missing_or_unprepared_data_dir_is_named_before_anything_is_written(tmp_path):
  config = load_config('tiny')
  config.data.data_dir = str(tmp_path / 'no_store')
  workdir = tmp_path / 'run'
  with pytest.raises(config_checks.ConfigError, match='no_store: no such folder'):
    config_checks.validate_pretrain(config, str(workdir), device_count=8, process_count=1)
  (tmp_path / 'raw').mkdir()
  config.data.data_dir = str(tmp_path / 'raw')
  with pytest.raises(config_checks.ConfigError, match='raw: not a prepared store'):
    config_checks.validate_pretrain(config, str(workdir), device_count=8, process_count=1)
  assert not workdir.exists()


@pytest.mark.parametrize('file', ['pretrain', 'finetune'])
def test_config_upgrade_leaves_current_configs_alone_and_fills_old_ones(file):
  from pixssl_jax import config_files
  from pixssl_jax.rundir import config_upgrade
  current = config_files.load(file, 'tiny')
  # Every added field is in today's config files: upgrading a current config changes nothing.
  assert config_upgrade.upgrade(current).to_dict() == current.to_dict()
  old = config_files.load(file, 'tiny')
  added = [(path, value) for path, value, files in config_upgrade.ADDED_FIELDS if file in files]
  for path, _ in added:
    parent, _, leaf = path.rpartition('.')
    del (config_checks.field_at(old, parent) if parent else old)[leaf]
  if file == 'pretrain':
    old.method.tau = 2e-3
    del old.method['tau_absolute']
  upgraded = config_upgrade.upgrade(old)
  for path, value in added:
    expected = value() if callable(value) else value
    got = config_checks.field_at(upgraded, path)
    if isinstance(expected, ml_collections.ConfigDict):  # A block: compare its fields.
      expected, got = expected.to_dict(), got.to_dict()
    assert got == expected, path
  if file == 'finetune':  # Runs without the block had no intensity augmentation.
    assert upgraded.data.intensity.enabled is False
  if file == 'pretrain':  # The absolute weighting's temperature was kept in tau.
    assert upgraded.method.tau_absolute == 2e-3 and upgraded.method.weighting_scale == 'absolute'
  else:
    assert 'ema_final_init_share' not in upgraded.optim
