"""User paths are made absolute where a run starts; URLs are left as they are."""

import os

from pixssl_jax import config_files
from pixssl_jax import paths


def test_relative_and_home_paths_become_absolute(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  assert paths.absolute('runs/demo') == str(tmp_path / 'runs' / 'demo')
  assert paths.absolute('~/x') == os.path.join(os.path.expanduser('~'), 'x')
  assert paths.absolute('/abs/run') == '/abs/run'


def test_urls_and_unset_fields_are_unchanged():
  assert paths.absolute('gs://bucket/runs/demo') == 'gs://bucket/runs/demo'
  assert paths.absolute(None) is None
  assert paths.absolute('') == ''


def test_config_path_fields_are_resolved_in_a_copy(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  config = config_files.load('finetune', 'tiny')
  config.pretrained_workdir = 'runs/demo'
  config.data.data_dir = 'gs://bucket/store'
  resolved = paths.with_absolute_paths(config)
  assert resolved.pretrained_workdir == str(tmp_path / 'runs' / 'demo')
  assert resolved.data.data_dir == 'gs://bucket/store'
  assert resolved.data.cache_dir is None
  assert config.pretrained_workdir == 'runs/demo'  # The caller's config is not modified.
  pre = paths.with_absolute_paths(config_files.load('pretrain', 'tiny'))  # No pretrained_workdir.
  assert 'pretrained_workdir' not in pre
