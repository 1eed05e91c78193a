"""Checkpoint retention: the last K plus the best, and atomicity of an interrupted save."""

import json

import jax.numpy as jnp
import pytest

from pixssl_jax.train import checkpointing


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
