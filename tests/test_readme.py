"""The README's commands, run as written from a fresh working directory with relative paths.

Each `python -m pixssl_jax...` command of the README's bash blocks is run in order, in a
temporary directory that holds the package and the configs the way a clone does. Only what
time demands is changed: the `tiny` presets stand in for `demo` and `btcv_3d`, and the
README's absolute example folders (`/data/...`) become relative ones (`data/...`), filled
with tiny phantoms. Everything else, relative `--workdir`s and `--hu_window -175,250`
included, is the README's own text.
"""

import os
import re
import shlex
import subprocess
import sys

import pytest

from pixssl_jax.data import phantoms
from tests.helpers import REPO

# What time demands, and nothing else (see the module docstring).
SUBSTITUTIONS = ((':demo', ':tiny'), (':btcv_3d', ':tiny'), (' /data/', ' data/'),
                 ('=/data/', '=data/'))


def readme_commands() -> list[str]:
  """The README's `python -m pixssl_jax...` commands, continuation lines joined, in order."""
  text = (REPO / 'README.md').read_text()
  commands = []
  for block in re.findall(r'```bash\n(.*?)```', text, flags=re.S):
    for command in block.replace('\\\n', ' ').splitlines():
      command = ' '.join(command.split())
      if command.startswith('python -m pixssl_jax'):
        commands.append(command)
  return commands


def _run(command: str, cwd, timeout: int = 600) -> subprocess.CompletedProcess:
  for old, new in SUBSTITUTIONS:
    command = command.replace(old, new)
  argv = shlex.split(command)
  assert argv[0] == 'python'
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=8',
             JAX_PLATFORMS='cpu')
  env.pop('PYTHONPATH', None)  # The package is found the way a clone's user finds it: in cwd.
  return subprocess.run(['timeout', '-s', 'KILL', str(timeout), sys.executable, *argv[1:]],
                        cwd=cwd, env=env, capture_output=True, text=True)


@pytest.fixture(scope='module')
def clone(tmp_path_factory):
  """A working directory laid out like a clone: the package and the configs."""
  root = tmp_path_factory.mktemp('clone')
  for name in ('pixssl_jax', 'configs'):
    os.symlink(REPO / name, root / name)
  return root


def test_readme_lists_every_mode():
  commands = readme_commands()
  assert any('configs/pretrain.py:demo --workdir runs/demo' in c for c in commands)
  assert any('configs/finetune.py:demo' in c and 'mode=evaluate' not in c for c in commands)
  assert any('--config.mode=evaluate' in c for c in commands)
  assert any(c.startswith('python -m pixssl_jax.data.prepare') and '--hu_window -' in c
             for c in commands)


def test_readme_commands_run_verbatim_with_relative_paths(clone):
  commands = readme_commands()
  demo, finetune, evaluate, export, prepare, pretrain_store = commands
  # The README's example raw folder, with tiny phantoms in it.
  phantoms.generate_dataset(clone / 'data' / 'Task03_Liver', 6, seed=0, shape_scale=0.4)

  first = _run(demo, clone)
  assert first.returncode == 0, first.stderr[-3000:]
  assert (clone / 'runs' / 'demo' / 'checkpoints' / '4').is_dir()
  assert (clone / 'runs' / 'demo' / 'metrics.jsonl').exists()
  again = _run(demo, clone)  # "Run the same command again and it resumes."
  assert again.returncode == 0, again.stderr[-3000:]
  assert 'Resumed from step 4' in again.stdout

  tuned = _run(finetune, clone)
  assert tuned.returncode == 0, tuned.stderr[-3000:]
  assert 'Loaded ' in tuned.stdout and (clone / 'runs' / 'demo_ft' / 'checkpoints').is_dir()
  scored = _run(evaluate, clone)
  assert scored.returncode == 0, scored.stderr[-3000:]
  assert (clone / 'runs' / 'demo_ft' / 'metrics.csv').exists()
  assert list((clone / 'runs' / 'demo_ft' / 'predictions').glob('*.nii.gz'))
  exported = _run(export, clone)
  assert exported.returncode == 0, exported.stderr[-3000:]
  assert (clone / 'demo_ft.safetensors').stat().st_size > 0

  prepared = _run(prepare, clone)
  assert prepared.returncode == 0, prepared.stderr[-3000:]
  store_json = (clone / 'data' / 'stores' / 'liver' / 'store.json').read_text()
  assert '-175' in store_json and '250' in store_json
  trained = _run(pretrain_store, clone)
  assert trained.returncode == 0, trained.stderr[-3000:]
  assert (clone / 'runs' / 'liver' / 'checkpoints' / '4').is_dir()
