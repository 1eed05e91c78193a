"""`python -m pixssl_jax.main` end to end on the tiny preset: train, checkpoint, resume."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]


def run_main(workdir, *overrides, timeout=600):
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=8',
             JAX_PLATFORMS='cpu')
  cmd = [sys.executable, '-m', 'pixssl_jax.main', '--config', 'configs/pretrain.py:tiny',
         '--workdir', str(workdir), *overrides]
  # SIGKILL on timeout: a process with jax.distributed ignores SIGTERM (docs/pitfalls.md).
  return subprocess.run(['timeout', '-s', 'KILL', str(timeout), *cmd], cwd=REPO, env=env,
                        capture_output=True, text=True)


@pytest.fixture(scope='module')
def tiny_run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp('tiny_run')
  first = run_main(workdir)
  return workdir, first


def test_tiny_run_writes_config_checkpoints_and_logs(tiny_run):
  workdir, first = tiny_run
  assert first.returncode == 0, first.stderr[-3000:]
  assert 'step 4/4' in first.stdout
  config = json.loads((workdir / 'config.json').read_text())
  assert config['preset'] == 'tiny' and config['num_steps'] == 4
  steps = sorted(int(p.name) for p in (workdir / 'checkpoints').iterdir() if p.name.isdigit())
  assert steps == [2, 4]
  records = [json.loads(line) for line in (workdir / 'metrics.jsonl').read_text().splitlines()]
  assert [r['step'] for r in records] == [1, 2, 3, 4]
  for key in ('train/loss', 'train/loss_global', 'train/loss_pixel', 'train/uncertainty_mean',
              'train/uncertainty_p90', 'train/overlap_fraction', 'train/ema_momentum',
              'train/lr', 'train/grad_norm', 'train/projection_std'):
    assert key in records[-1], key
  events = b''.join(p.read_bytes() for p in (workdir / 'tensorboard').glob('events.out.*'))
  for tag in (b'train/loss', b'images/view1', b'images/view2', b'images/overlap',
              b'images/uncertainty'):
    assert tag in events, tag


def test_rerun_resumes_from_the_last_checkpoint(tiny_run):
  workdir, _ = tiny_run
  second = run_main(workdir, '--config.num_steps=6')
  assert second.returncode == 0, second.stderr[-3000:]
  assert 'Resumed from step 4' in second.stdout
  assert 'step 6/6' in second.stdout and 'step 2/' not in second.stdout
  steps = sorted(int(p.name) for p in (workdir / 'checkpoints').iterdir() if p.name.isdigit())
  assert steps[-1] == 6


def test_unknown_config_key_and_bad_config_fail_clearly(tmp_path):
  unknown = run_main(tmp_path / 'a', '--config.no_such_field=1')
  assert unknown.returncode != 0 and 'no_such_field' in unknown.stderr
  bad = run_main(tmp_path / 'b', '--config.batch_size=12')
  assert bad.returncode == 2
  assert 'config.batch_size=12 is not divisible by the 8 devices' in bad.stderr
  assert 'Traceback' not in bad.stderr
