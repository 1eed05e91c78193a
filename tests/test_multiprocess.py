"""Another topology computes the same pre-training, within what float32 rounding allows.

What the project promises across topologies (docs/design.md, "Exactness across topologies"): a
resume on the same topology is bit-exact; a run on another device or process count is the same
computation with its cross-device sums in another order, so it agrees within float32 rounding.

These runs use LARS, not the default AdamW. Adam divides each gradient by its own magnitude,
so a weight whose gradient is within rounding of zero moves a whole learning-rate step one way
on one topology and the other way on another; how many weights do so depends on the CPU's
summation order (AVX2 against AVX-512), and a tolerance on the losses after a few Adam steps is
then a measurement of one machine, not a bound. LARS scales each layer's gradient by one norm,
so a rounding difference stays a rounding difference and the bounds below hold on any x86-64
CPU. What the tests check, the sharded batch, the cross-process sums, each process's share of
the data, checkpoints across topologies and the repositioned data stream, is the same code for
either optimizer.

A real sharding fault changes which examples a step sees: `tests/sharding_bug_main.py` makes
both processes read shard 0, and the last test shows the same check failing on it.
"""

import json
import os
import pathlib
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from pixssl_jax.models import pixssl
from pixssl_jax.train import checkpointing
from pixssl_jax.train import mesh as mesh_lib
from pixssl_jax.train import optimizers
from pixssl_jax.train import pretrain
from tests.helpers import load_config

REPO = pathlib.Path(__file__).resolve().parents[1]
OPTIMIZER = 'lars'
OVERRIDES = ('--config.num_steps=3', '--config.checkpoint_every=10', '--config.seed=5',
             f'--config.optim.name={OPTIMIZER}')
CORRECT, WITH_SHARDING_BUG = 'pixssl_jax.main', 'tests.sharding_bug_main'

# float32 has a unit roundoff of 2**-24 (6e-8). A loss is a few reductions (means over the
# batch, batch-norm statistics of the projectors) whose order the topology changes; reordering
# a sum of n terms moves it by at most about n roundoffs relative, with n <= 8 devices, and
# the small weight differences this leaves add a few more. 2**-14 (6e-5) allows for 1000
# roundoffs; a fault that changes the examples moves the loss by ten times that or more.
LOSS_RTOL = 2.0 ** -14
# A weight is stored with a roundoff of 2**-24 relative, and three LARS steps (each at most
# lr x trust coefficient = 1e-6 of the weight) add far less: 16 roundoffs of the mean weight.
WEIGHT_RTOL = 2.0 ** -20


FINETUNE = ('--config', 'configs/finetune.py:tiny', '--config.init=scratch',
            '--config.eval_every=100', '--config.log_every=1', '--config.eval.val_max_cases=1',
            f'--config.optim.name={OPTIMIZER}', '--config.seed=5')


def main_command(workdir, *extra, module=CORRECT):
  config = () if '--config' in extra else ('--config', 'configs/pretrain.py:tiny', *OVERRIDES)
  return [sys.executable, '-m', module, *config, '--workdir', str(workdir), *extra]


def environment(devices):
  return dict(os.environ, XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}',
              JAX_PLATFORMS='cpu')


def free_port():
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def start(workdir, devices, processes=1, *extra, module=CORRECT):
  """Starts one run of `processes` local processes with `devices` CPU devices each."""
  distributed = []
  address = f'127.0.0.1:{free_port()}'
  procs = []
  for i in range(processes):
    if processes > 1:
      distributed = ['--coordinator_address', address, '--num_processes', str(processes),
                     '--process_id', str(i)]
    procs.append(subprocess.Popen(
        ['timeout', '-s', 'KILL', '400',  # SIGKILL: jax.distributed processes ignore SIGTERM.
         *main_command(workdir, *distributed, *extra, module=module)],
        cwd=REPO, env=environment(devices), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True))
  return procs


def finish(procs):
  outputs = [p.communicate() for p in procs]
  for p, (_, err) in zip(procs, outputs):
    assert p.returncode == 0, err[-3000:]
  return [out for out, _ in outputs]


def losses(workdir):
  lines = (workdir / 'metrics.jsonl').read_text().splitlines()
  return {r['step']: r['train/loss'] for r in map(json.loads, lines) if 'train/loss' in r}


def relative_gap(run, reference, steps):
  a, b = losses(run), losses(reference)
  return max(abs(a[s] - b[s]) / abs(b[s]) for s in steps)


def restore_params_on_one_device(workdir):
  """Restores a checkpoint onto a 1-device mesh, whatever topology wrote it."""
  config = load_config('tiny')
  mesh = mesh_lib.make_data_mesh(jax.devices()[:1])
  model = pixssl.build_model(config.model, config.data.ndim)
  config.optim.name = OPTIMIZER
  tx = optimizers.make_optimizer(config.optim, 3)
  template = pretrain.abstract_train_state(model, tx, config, mesh)
  manager = checkpointing.make_manager(str(workdir), keep=3)
  return checkpointing.restore_latest(manager, template, None)


def weights(workdir):
  params = restore_params_on_one_device(workdir)[0].params
  return np.concatenate([np.ravel(x) for x in jax.tree.leaves(jax.device_get(params))])


def weights_within_rounding(run, reference):
  a, b = weights(run), weights(reference)
  return np.abs(a - b).mean() <= WEIGHT_RTOL * np.abs(b).mean()


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
  """Pre-trains 3 steps of `tiny` on three topologies at once, named by what they are."""
  topologies = {'one_process': (8, 1, CORRECT), 'two_processes': (4, 2, CORRECT),
                'sharding_bug': (4, 2, WITH_SHARDING_BUG)}
  workdirs = {name: tmp_path_factory.mktemp(name) for name in topologies}
  started = {name: start(workdirs[name], devices, processes, module=module)
             for name, (devices, processes, module) in topologies.items()}
  outputs = {name: finish(procs) for name, procs in started.items()}
  return workdirs, outputs


def test_two_processes_match_one_process_with_eight_devices(runs):
  workdirs, outputs = runs
  out = outputs['two_processes']
  assert '2 process(es), 8 cpu device(s)' in out[0] and 'step 3/3' in out[0]
  assert 'step ' not in out[1]  # Only process 0 prints progress and writes logs.
  two, one = workdirs['two_processes'], workdirs['one_process']
  assert sorted(losses(two)) == sorted(losses(one)) == [1, 2, 3]
  gap = relative_gap(two, one, [1, 2, 3])
  assert gap <= LOSS_RTOL, gap


def test_multi_process_checkpoint_restores_on_one_device(runs):
  workdirs, _ = runs
  two, one = workdirs['two_processes'], workdirs['one_process']
  assert checkpointing.make_manager(str(two), keep=3).all_steps() == [3]
  _, step, data_restored = restore_params_on_one_device(two)
  assert step == 3 and not data_restored  # Iterator state belongs to 2 processes, not 1.
  assert weights_within_rounding(two, one)


def test_the_checks_catch_a_sharding_bug(runs):
  """Both processes reading shard 0: the checks above fail, the loss by a wide margin."""
  workdirs, _ = runs
  bug, one = workdirs['sharding_bug'], workdirs['one_process']
  assert relative_gap(bug, one, [1]) > 10 * LOSS_RTOL
  assert relative_gap(bug, one, [2, 3]) > 100 * LOSS_RTOL
  assert not weights_within_rounding(bug, one)


def test_resuming_on_another_process_count_continues_exactly(runs):
  """Both runs continue to step 5 on one process of 8 devices, each from its own checkpoint.

  `one_process` restores its own iterator state; `two_processes` (written by 2 processes)
  restores the model and repositions the global data stream. A stream repositioned to the
  wrong batch would feed other examples and fail as the sharding bug does.
  """
  workdirs, _ = runs
  two, one = workdirs['two_processes'], workdirs['one_process']
  started = [start(w, 8, 1, '--config.num_steps=5') for w in (two, one)]
  two_out, one_out = [finish(procs)[0] for procs in started]
  assert 'Resumed from step 3' in two_out and 'data stream repositioned' in two_out
  assert 'repositioned' not in one_out
  gap = relative_gap(two, one, [4, 5])
  assert gap <= LOSS_RTOL, gap


def test_fine_tuning_resumed_on_another_process_count_continues_exactly(tmp_path):
  """Fine-tuning shares the loop: 3 steps on 2 processes, then steps 4-5 on one process.

  Its data stream is repositioned at the step, so steps 4 and 5 see the batches an
  uninterrupted one-process run sees; restarting the stream at batch 0 would feed step 4 the
  examples of step 1 and move its loss far beyond rounding.
  """
  two, one = tmp_path / 'two', tmp_path / 'one'
  # Both stop after 3 steps (the learning-rate schedule spans num_steps, so an uninterrupted
  # 5-step run would follow another schedule), then continue to 5 on one process.
  first = [start(two, 4, 2, *FINETUNE, '--config.num_steps=3'),
           start(one, 8, 1, *FINETUNE, '--config.num_steps=3')]
  for procs in first:
    finish(procs)
  continued = [start(w, 8, 1, *FINETUNE, '--config.num_steps=5') for w in (two, one)]
  resumed, _ = [finish(procs)[0] for procs in continued]
  assert 'Resumed from step 3' in resumed and 'data stream repositioned' in resumed
  assert sorted(losses(two)) == sorted(losses(one)) == [1, 2, 3, 4, 5]
  gap = relative_gap(two, one, [1, 2, 3, 4, 5])
  assert gap <= LOSS_RTOL, gap

