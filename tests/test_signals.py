"""SIGINT and SIGTERM: save at the next step boundary and exit 0; a second Ctrl-C interrupts."""

import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from pixssl_jax import config_files
from pixssl_jax.models import pixssl
from pixssl_jax.train import checkpointing
from pixssl_jax.train import finetune
from pixssl_jax.train import mesh as mesh_lib
from pixssl_jax.train import optimizers
from pixssl_jax.train import preemption
from pixssl_jax.train import pretrain
from tests.helpers import logged_steps
from tests.helpers import REPO
from tests.helpers import load_config

NUM_STEPS = 12
OVERRIDES = (f'--config.num_steps={NUM_STEPS}', '--config.checkpoint_every=50',
             '--config.image_every=0')


@pytest.fixture
def handlers_kept():
  """Puts the process's SIGINT and SIGTERM handlers back whatever the test did."""
  kept = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
  yield
  for s, handler in kept.items():
    signal.signal(s, handler)


@pytest.mark.parametrize('sig', [signal.SIGTERM, signal.SIGINT])
def test_a_signal_requests_a_stop_and_close_restores_the_handlers(handlers_kept, sig):
  for s in (signal.SIGINT, signal.SIGTERM):
    signal.signal(s, lambda *_: None)
  previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
  notes = []
  stop = preemption.StopRequest(manager=None, notify=notes.append)
  assert not stop(1)
  signal.raise_signal(sig)  # The Python handler runs before this returns.
  assert stop(2) and stop.reason == sig.name
  assert len(notes) == 1 and notes[0].startswith(f'pixssl_jax: {sig.name} received: saving')
  stop.close()
  assert {s: signal.getsignal(s) for s in previous} == previous


def test_a_second_sigint_goes_to_the_previous_handler(handlers_kept):
  seen = []
  signal.signal(signal.SIGINT, lambda signum, frame: seen.append(signum))
  stop = preemption.StopRequest(manager=None, notify=lambda _: None)
  signal.raise_signal(signal.SIGINT)
  assert stop(1) and seen == []
  signal.raise_signal(signal.SIGINT)  # What Python's default handler turns into KeyboardInterrupt.
  assert seen == [signal.SIGINT]
  signal.raise_signal(signal.SIGTERM)  # Still a stop request, nothing more.
  stop.close()


def test_an_ignored_sigint_stays_ignored(handlers_kept):
  signal.signal(signal.SIGINT, signal.SIG_IGN)
  stop = preemption.StopRequest(manager=None, notify=lambda _: None)
  assert signal.getsignal(signal.SIGINT) == signal.SIG_IGN
  signal.raise_signal(signal.SIGINT)
  assert not stop(1)
  stop.close()
  assert signal.getsignal(signal.SIGINT) == signal.SIG_IGN


def test_sigint_during_finetuning_saves_at_the_step_boundary(handlers_kept, tmp_path):
  signal.signal(signal.SIGINT, signal.default_int_handler)  # As in a terminal.
  config = config_files.load('finetune', 'tiny')
  config.init = 'scratch'
  lines = []

  def print_and_interrupt(line):
    lines.append(line)
    if line.startswith('step 2/'):
      signal.raise_signal(signal.SIGINT)  # As Ctrl-C would, between two steps.

  finetune.train_and_evaluate(config, str(tmp_path), print_fn=print_and_interrupt)
  assert lines[-1] == 'Stop requested (SIGINT): saved step 3, exiting.'
  assert sorted(int(p.name) for p in (tmp_path / 'checkpoints').iterdir()) == [3]


def cli_environment(cache_dir):
  # One compilation cache for the three runs of the module: only the first compiles.
  return dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=8',
              JAX_PLATFORMS='cpu', JAX_COMPILATION_CACHE_DIR=str(cache_dir),
              JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0',
              JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES='0')


def cli_command(workdir):
  return [sys.executable, '-m', 'pixssl_jax.main', '--config', 'configs/pretrain.py:tiny',
          '--workdir', str(workdir), *OVERRIDES]


def run_to_completion(workdir, env):
  done = subprocess.run(['timeout', '-s', 'KILL', '300', *cli_command(workdir)], cwd=REPO,
                        env=env, capture_output=True, text=True)
  assert done.returncode == 0, done.stderr[-3000:]
  return done


def with_default_sigint(command):
  """`command` with SIGINT at its default, as in a terminal, even where pytest runs with it
  ignored (a background job of a script): the child would inherit that and keep it
  (preemption.py). Python resets it and execs the command: the same process, the same pid.
  (Not Popen's preexec_fn: forking this multithreaded process can deadlock.)"""
  reset = ('import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); '
           'os.execv(sys.argv[1], sys.argv[1:])')
  return [sys.executable, '-c', reset, *command]


def interrupt_once(workdir, env, after_step):
  """Runs the CLI and sends SIGINT to its Python process once it has logged `after_step`."""
  out, err = workdir.parent / 'interrupted.out', workdir.parent / 'interrupted.err'
  with open(out, 'w') as stdout, open(err, 'w') as stderr:
    # No wrapper (`timeout`, a shell): the signal must reach python itself. The hard limits
    # are the deadlines below, each ending in SIGKILL.
    proc = subprocess.Popen(with_default_sigint(cli_command(workdir)), cwd=REPO, env=env,
                            stdout=stdout, stderr=stderr)
    try:
      deadline = time.time() + 300
      while proc.poll() is None and max(logged_steps(workdir), default=0) < after_step:
        assert time.time() < deadline, 'no progress'
        time.sleep(0.05)
      assert proc.poll() is None, 'the run finished before it could be interrupted'
      proc.send_signal(signal.SIGINT)
      code = proc.wait(timeout=300)
    finally:
      if proc.poll() is None:
        proc.kill()
        proc.wait()
  return code, out.read_text(), err.read_text()


def final_params(workdir):
  config = load_config('tiny')
  model = pixssl.build_model(config.model, config.data.ndim)
  tx = optimizers.make_optimizer(config.optim, NUM_STEPS)
  template = pretrain.abstract_train_state(model, tx, config, mesh_lib.make_data_mesh())
  state, step, _ = checkpointing.restore_latest(checkpointing.open_reader(
      workdir / 'checkpoints'), template, None)
  assert step == NUM_STEPS
  return jax.device_get(state.params)


def test_cli_sigint_saves_exits_0_and_the_rerun_ends_like_an_uninterrupted_run(tmp_path):
  env = cli_environment(tmp_path / 'jax_cache')
  reference = tmp_path / 'uninterrupted'
  run_to_completion(reference, env)
  workdir = tmp_path / 'interrupted'
  code, out, err = interrupt_once(workdir, env, after_step=3)
  assert code == 0, err[-3000:]
  assert 'pixssl_jax: SIGINT received: saving a checkpoint at the next step boundary' in err
  saved = int(out.split('Stop requested (SIGINT): saved step ')[1].split(',')[0])
  assert 3 <= saved < NUM_STEPS
  assert sorted(int(p.name) for p in (workdir / 'checkpoints').iterdir()) == [saved]
  assert max(logged_steps(workdir)) == saved  # Nothing ran past the saved boundary.
  resumed = run_to_completion(workdir, env)
  assert f'Resumed from step {saved} in {workdir}' in resumed.stdout
  jax.tree.map(np.testing.assert_array_equal, final_params(workdir), final_params(reference))
