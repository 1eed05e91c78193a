"""Exact resume: kill -9 or SIGTERM a run, start the same command again, get the same losses;
a damaged newest checkpoint: resume from the one before, and still end where an uninterrupted
run ends."""

import json
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from pixssl_jax.train import config_checks
from pixssl_jax.train import pretrain
from tests.helpers import logged_steps
from tests.helpers import load_config
from tests.helpers import damage

REPO = pathlib.Path(__file__).resolve().parents[1]
NUM_STEPS = 20  # Long enough to kill at step 9 and SIGTERM at 6 mid-run.
COMMAND_OVERRIDES = (f'--config.num_steps={NUM_STEPS}', '--config.checkpoint_every=4')


def main_command(workdir):
  return [sys.executable, '-m', 'pixssl_jax.main', '--config', 'configs/pretrain.py:tiny',
          '--workdir', str(workdir), *COMMAND_OVERRIDES]


def environment():
  return dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=8',
              JAX_PLATFORMS='cpu')


def run_to_completion(workdir):
  done = subprocess.run(['timeout', '-s', 'KILL', '600', *main_command(workdir)], cwd=REPO,
                        env=environment(), capture_output=True, text=True)
  assert done.returncode == 0, done.stderr[-3000:]
  return done


def start_and_signal_at(workdir, step, sig):
  """Starts a run and sends `sig` once it has logged `step`; returns the finished process."""
  proc = subprocess.Popen(main_command(workdir), cwd=REPO, env=environment(),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 300
  while time.time() < deadline and proc.poll() is None:
    if logged_steps(workdir) and max(logged_steps(workdir)) >= step:
      proc.send_signal(sig)
      break
    time.sleep(0.02)
  out, err = proc.communicate(timeout=300)
  return proc.returncode, out, err


def losses(workdir):
  """train/loss per step; a step logged twice (before a kill and after resume) keeps the last."""
  records = [json.loads(l) for l in (workdir / 'metrics.jsonl').read_text().splitlines()]
  return {r['step']: r['train/loss'] for r in records}


def checkpoint_steps(workdir):
  return sorted(int(p.name) for p in (workdir / 'checkpoints').iterdir() if p.name.isdigit())


@pytest.fixture(scope='module')
def reference(tmp_path_factory):
  workdir = tmp_path_factory.mktemp('uninterrupted')
  run_to_completion(workdir)
  return losses(workdir)


def test_kill_9_then_rerun_matches_uninterrupted_run(tmp_path, reference):
  code, _, _ = start_and_signal_at(tmp_path, 9, signal.SIGKILL)
  assert code == -signal.SIGKILL, 'the run finished before it could be killed'
  killed_at = max(logged_steps(tmp_path))
  resumed = run_to_completion(tmp_path)
  resume_step = int(resumed.stdout.split('Resumed from step ')[1].split()[0])
  # The save begun at step 8 may still have been in flight at the kill: then step 4 is the
  # latest complete checkpoint, and the half-written one must have been ignored.
  assert resume_step in (4, 8) and resume_step <= killed_at
  after = losses(tmp_path)
  assert sorted(after) == list(range(1, NUM_STEPS + 1))
  for step in range(resume_step + 1, NUM_STEPS + 1):
    np.testing.assert_allclose(after[step], reference[step], rtol=1e-6, err_msg=f'step {step}')


def test_sigterm_saves_at_the_step_boundary_exits_0_and_resumes(tmp_path, reference):
  code, out, err = start_and_signal_at(tmp_path, 6, signal.SIGTERM)
  assert code == 0, err[-3000:]
  assert 'Stop requested (SIGTERM): saved step' in out
  saved = int(out.split('saved step ')[1].split(',')[0])
  assert checkpoint_steps(tmp_path)[-1] == saved < NUM_STEPS
  assert max(logged_steps(tmp_path)) == saved  # Nothing ran past the saved boundary.
  resumed = run_to_completion(tmp_path)
  assert f'Resumed from step {saved}' in resumed.stdout
  after = losses(tmp_path)
  for step in range(saved + 1, NUM_STEPS + 1):
    np.testing.assert_allclose(after[step], reference[step], rtol=1e-6, err_msg=f'step {step}')


def short_config():
  config = load_config('tiny')
  config.num_steps = 6  # Checkpoints at 2, 4 and 6 (tiny: checkpoint_every=2, keep 3).
  config.image_every = 0
  return config


@pytest.fixture(scope='module')
def uninterrupted(tmp_path_factory):
  workdir = tmp_path_factory.mktemp('short_uninterrupted')
  state = pretrain.train(short_config(), str(workdir), print_fn=lambda _: None)
  return workdir, jax.device_get(state.params)


# A missing manifest fails one array of many while TensorStore still reads the others: the
# "Event loop is closed" errors that leaves behind must not reach the console.
@pytest.mark.filterwarnings('error::pytest.PytestUnraisableExceptionWarning')
def test_damaged_newest_checkpoint_resumes_from_the_previous_one_exactly(
    tmp_path, uninterrupted, capsys):
  # One kind of damage here (a run costs a compile); test_checkpointing restores past each.
  source, final_params = uninterrupted
  workdir = tmp_path / 'run'
  shutil.copytree(source, workdir)
  damage(workdir / 'checkpoints' / '6', 'missing_manifest')
  lines = []
  state = pretrain.train(short_config(), str(workdir), print_fn=lines.append)
  warnings = [l for l in capsys.readouterr().err.splitlines() if l.startswith('warning:')]
  assert len(warnings) == 1 and warnings[0].startswith(
      f'warning: checkpoint step 6 cannot be restored ({workdir / "checkpoints" / "6"}: ')
  assert f'Resumed from step 4 in {workdir}' in lines
  # Step 6 was computed and saved again, beside the damaged copy set aside.
  assert sorted(int(p.name) for p in (workdir / 'checkpoints').iterdir()) == [2, 4, 6]
  assert (workdir / 'damaged_checkpoints' / '6').is_dir()
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.params), final_params)


def test_every_checkpoint_damaged_stops_with_a_config_error(tmp_path, uninterrupted):
  workdir = tmp_path / 'run'
  shutil.copytree(uninterrupted[0], workdir)
  for step in (2, 4, 6):
    damage(workdir / 'checkpoints' / str(step), 'empty_metadata')
  with pytest.raises(config_checks.ConfigError,
                     match=re.escape(f'no checkpoint in {workdir / "checkpoints"} can be '
                                     'restored')):
    pretrain.train(short_config(), str(workdir), print_fn=lambda _: None)
