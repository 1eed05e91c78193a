"""Config and workdir problems are found before the first step, each naming its field."""

import os

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
  with pytest.raises(config_checks.ConfigError, match=f'--workdir {blocker}/run: not writable'):
    config_checks.check_workdir_writable(str(blocker / 'run'))


def test_validate_raises_with_all_problems(tmp_path):
  config = load_config('tiny')
  config.batch_size = 3
  config.method.use_global = config.method.use_pixel = False
  with pytest.raises(config_checks.ConfigError) as info:
    config_checks.validate_pretrain(config, str(tmp_path), device_count=2, process_count=2)
  message = str(info.value)
  assert 'config.batch_size=3 is not divisible by the 2 devices' in message
  assert 'use_global and use_pixel are both False' in message
  assert not os.listdir(tmp_path)  # Nothing was written for a config that cannot run.
