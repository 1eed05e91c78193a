"""Checkpoint retention, atomicity of an interrupted save, and damaged checkpoints on restore."""

import json
import os
import subprocess
import sys

import jax.numpy as jnp
import pytest

from pixssl_jax.train import checkpointing
from pixssl_jax.train import config_checks
from tests.helpers import REPO
from tests.helpers import damage


class FakeIterator:
  """A data iterator stand-in with grain's get_state/set_state protocol."""

  def __init__(self):
    self.position = 0

  def get_state(self):
    return json.dumps({'position': self.position}).encode()

  def set_state(self, state):
    self.position = json.loads(state)['position']

  def start_prefetch(self):
    pass


@pytest.mark.parametrize('mode,best_step', [('max', 2), ('min', 3)])
def test_keeps_the_last_k_plus_the_best(tmp_path, mode, best_step):
  manager = checkpointing.make_manager(str(tmp_path), keep=2, best_metric='dice',
                                       best_mode=mode, async_save=False)
  dice = {1: 0.5, 2: 0.9, 3: 0.1, 4: 0.6, 5: 0.7, 6: 0.4}
  for step, value in dice.items():
    checkpointing.save(manager, step, {'w': jnp.full((2,), step)}, FakeIterator(),
                       metrics={'dice': value})
  manager.wait_until_finished()
  assert manager.all_steps() == sorted({best_step, 5, 6})


def test_without_a_best_metric_only_the_last_k_stay(tmp_path):
  manager = checkpointing.make_manager(str(tmp_path), keep=2, async_save=False)
  for step in range(1, 5):
    checkpointing.save(manager, step, {'w': jnp.zeros(2)}, FakeIterator())
  manager.wait_until_finished()
  assert manager.all_steps() == [3, 4]


def test_unfinished_save_is_ignored_on_restore(tmp_path):
  manager = checkpointing.make_manager(str(tmp_path), keep=3, async_save=False)
  checkpointing.save(manager, 1, {'w': jnp.ones(2)}, FakeIterator())
  manager.wait_until_finished()
  # What a crash in the middle of writing step 2 leaves behind: Orbax's temporary directory.
  (tmp_path / 'checkpoints' / '2.orbax-checkpoint-tmp' / 'state').mkdir(parents=True)
  fresh = checkpointing.make_manager(str(tmp_path), keep=3)
  iterator = FakeIterator()
  iterator.position = 7
  state, step, data_restored = checkpointing.restore_latest(fresh, {'w': jnp.zeros(2)}, iterator)
  assert step == 1 and data_restored and iterator.position == 0  # Position came back too.
  assert state['w'].tolist() == [1.0, 1.0]


DAMAGES = ('truncated_data', 'missing_manifest', 'empty_metadata')


def saved_steps(tmp_path, steps, keep=3):
  manager = checkpointing.make_manager(str(tmp_path), keep=keep, async_save=False)
  for step in steps:
    iterator = FakeIterator()
    iterator.position = step
    checkpointing.save(manager, step, {'w': jnp.full((4, 4), float(step))}, iterator)
  manager.wait_until_finished()
  return tmp_path / 'checkpoints'


@pytest.mark.parametrize('how', DAMAGES)
def test_damaged_newest_falls_back_warns_once_and_can_be_saved_again(tmp_path, how):
  ckpt = saved_steps(tmp_path, (1, 2, 3))
  damage(ckpt / '3', how)
  manager = checkpointing.make_manager(str(tmp_path), keep=3, async_save=False)
  iterator, warnings = FakeIterator(), []
  state, step, data_restored = checkpointing.restore_latest(
      manager, {'w': jnp.zeros((4, 4))}, iterator, warn=warnings.append)
  assert step == 2 and data_restored and iterator.position == 2
  assert state['w'].tolist() == [[2.0] * 4] * 4
  assert len(warnings) == 1, warnings
  line = warnings[0]
  assert line.startswith('warning: checkpoint step 3 cannot be restored') and '\n' not in line
  assert str(ckpt / '3') in line and 'Error' in line and 'resumed from step 2' in line
  # Set aside for inspection, out of the manager's sight: step 3 can be saved again and the
  # damaged copy does not count among the kept checkpoints.
  assert (tmp_path / 'damaged_checkpoints' / '3' / 'state').is_dir()
  assert manager.all_steps() == [1, 2]
  for again in (3, 4):
    checkpointing.save(manager, again, {'w': jnp.full((4, 4), 10.0 + again)}, iterator)
  manager.wait_until_finished()
  assert manager.all_steps() == [2, 3, 4]
  fresh = checkpointing.make_manager(str(tmp_path), keep=3)
  state, step, _ = checkpointing.restore_latest(fresh, {'w': jnp.zeros((4, 4))}, FakeIterator(),
                                                warn=warnings.append)
  assert step == 4 and state['w'][0, 0] == 14.0 and len(warnings) == 1


def test_a_step_damaged_twice_is_set_aside_under_a_new_name(tmp_path):
  ckpt = saved_steps(tmp_path, (1, 2))
  (tmp_path / 'damaged_checkpoints' / '2').mkdir(parents=True)  # From an earlier fallback.
  damage(ckpt / '2', 'empty_metadata')
  manager = checkpointing.make_manager(str(tmp_path), keep=3)
  warnings = []
  _, step, _ = checkpointing.restore_latest(manager, {'w': jnp.zeros((4, 4))}, FakeIterator(),
                                            warn=warnings.append)
  assert step == 1 and str(tmp_path / 'damaged_checkpoints' / '2.2') in warnings[0]
  assert (tmp_path / 'damaged_checkpoints' / '2.2' / 'state').is_dir()


def test_no_restorable_checkpoint_is_a_config_error_naming_the_directory(tmp_path):
  ckpt = saved_steps(tmp_path, (1, 2))
  for step, how in ((1, 'missing_manifest'), (2, 'truncated_data')):
    damage(ckpt / str(step), how)
  manager = checkpointing.make_manager(str(tmp_path), keep=3)
  warnings = []
  with pytest.raises(config_checks.ConfigError) as error:
    checkpointing.restore_latest(manager, {'w': jnp.zeros((4, 4))}, FakeIterator(),
                                 warn=warnings.append)
  lines = str(error.value).splitlines()
  assert lines[0] == f'no checkpoint in {ckpt} can be restored:'
  assert lines[1].startswith(f'  - step 2 ({ckpt / "2"}): ValueError: ')
  assert lines[2].startswith(f'  - step 1 ({ckpt / "1"}): ValueError: NOT_FOUND')
  assert 'fresh --workdir' in lines[3] and len(lines) == 4
  assert not warnings and manager.all_steps() == [1, 2]  # Nothing moved when nothing restores.


def test_an_explicit_step_does_not_fall_back(tmp_path):
  ckpt = saved_steps(tmp_path, (1, 2))
  damage(ckpt / '2', 'empty_metadata')
  reader = checkpointing.open_reader(ckpt)
  with pytest.raises(config_checks.ConfigError) as error:
    checkpointing.restore_latest(reader, {'w': jnp.zeros((4, 4))}, None, step=2,
                                 choose='--config.eval.checkpoint=STEP')
  message = str(error.value)
  assert message.startswith(f'checkpoint step 2 cannot be restored ({ckpt / "2"}: '
                            'JSONDecodeError: ')
  assert '--config.eval.checkpoint=STEP (other steps: [1])' in message
  assert '\n' not in message and (ckpt / '2').is_dir()


def test_the_manager_has_removed_unfinished_saves_when_it_is_returned(tmp_path):
  # Orbax removes them in a thread; one still running at exit prints a traceback.
  leftover = tmp_path / 'checkpoints' / '3.orbax-checkpoint-tmp' / 'state'
  leftover.mkdir(parents=True)
  checkpointing.make_manager(str(tmp_path), keep=3)
  assert not leftover.parent.exists()


def test_evaluate_before_finetuning_is_one_error_line(tmp_path):
  # A save cut short leaves this behind; it made Orbax's cleanup thread print a traceback.
  (tmp_path / 'checkpoints' / '3.orbax-checkpoint-tmp' / 'state').mkdir(parents=True)
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=8',
             JAX_PLATFORMS='cpu')
  done = subprocess.run(
      ['timeout', '-s', 'KILL', '300', sys.executable, '-m', 'pixssl_jax.main', '--config',
       'configs/finetune.py:tiny', '--workdir', str(tmp_path), '--config.mode=evaluate'],
      cwd=REPO, env=env, capture_output=True, text=True)
  assert done.returncode == 2, done.stderr[-3000:]
  assert done.stderr.strip().splitlines() == [
      f'error: no checkpoint in {tmp_path / "checkpoints"}: fine-tune first (same command with '
      '--config.mode=finetune)']
