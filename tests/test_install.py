"""The package as a user installs it: `pip install .` into a fresh virtualenv, then the console
scripts from a directory outside the repository.

The virtualenv sees this interpreter's site-packages (`--system-site-packages`), so pip finds
jax and the other dependencies installed and downloads none of them; the build backend
(setuptools) comes from PyPI as in any `pip install .`.
"""

import os
import shutil
import subprocess
import sys

import pytest

from tests.helpers import REPO

SHIPPED = ('pyproject.toml', 'README.md', 'pixssl_jax', 'configs')


@pytest.fixture(scope='module')
def venv(tmp_path_factory):
  root = tmp_path_factory.mktemp('install')
  source = root / 'source'  # A copy, so the build leaves nothing in the repository.
  source.mkdir()
  for name in SHIPPED:
    if (REPO / name).is_dir():
      shutil.copytree(REPO / name, source / name, symlinks=True,
                      ignore=shutil.ignore_patterns('__pycache__'))
    else:
      shutil.copy(REPO / name, source / name)
  env_dir = root / 'venv'
  subprocess.run([sys.executable, '-m', 'venv', '--system-site-packages', str(env_dir)],
                 check=True)
  done = subprocess.run([str(env_dir / 'bin' / 'pip'), 'install', '-q',
                         '--disable-pip-version-check', str(source)],
                        capture_output=True, text=True, cwd=root)
  assert done.returncode == 0, done.stderr[-3000:]
  return env_dir


def _run(venv, tmp_path, *argv, timeout=600):
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=8',
             JAX_PLATFORMS='cpu', PIXSSL_CACHE=str(tmp_path / 'cache'))
  env.pop('PYTHONPATH', None)
  return subprocess.run(['timeout', '-s', 'KILL', str(timeout), str(venv / 'bin' / argv[0]),
                         *argv[1:]], cwd=tmp_path, env=env, capture_output=True, text=True)


def test_console_scripts_run_from_outside_the_repository(venv, tmp_path):
  for script in ('pixssl-train', 'pixssl-prepare', 'pixssl-predict', 'pixssl-evaluate',
                 'pixssl-export'):
    assert (venv / 'bin' / script).exists(), script
  shown = _run(venv, tmp_path, 'pixssl-train', '--help')
  assert '--config.data.patch_size=(128, 128)' in shown.stdout, shown.stderr[-2000:]
  assert 'presets: tiny, demo, btcv_3d, tpu_pod' in shown.stdout
  assert '--workdir' in shown.stdout + shown.stderr
  trained = _run(venv, tmp_path, 'pixssl-train', '--config', 'configs/pretrain.py:tiny',
                 '--workdir', 'run')
  assert trained.returncode == 0, trained.stderr[-3000:]
  assert 'step 4/4' in trained.stdout
  assert sorted(p.name for p in (tmp_path / 'run' / 'checkpoints').iterdir()) == ['2', '4']
  imported = subprocess.run(
      [str(venv / 'bin' / 'python'), '-c', 'import pixssl_jax; print(pixssl_jax.__file__)'],
      cwd=tmp_path, capture_output=True, text=True)
  assert str(venv) in imported.stdout  # The installed copy, not the repository's.
