"""The training loop that pre-training and fine-tuning share, and what it is made of: step keys,
the one jit of a train step, the per-step finish (wait, non-finite check, log), and `run`:
resume position, data stream, stop requests, periodic saves and the final one."""

import functools
import math
from typing import Any, Callable

import jax
import ml_collections
import optax
from flax import linen as nn

from pixssl_jax import xla_options
# A run's config and store are read below train/; the loops use them under these names.
from pixssl_jax.rundir.config_io import resolve_data_dir  # pylint: disable=unused-import
from pixssl_jax.rundir.config_io import write_config  # pylint: disable=unused-import
from pixssl_jax.train import checkpointing
from pixssl_jax.train import mesh as mesh_lib
from pixssl_jax.train import metrics_writer
from pixssl_jax.train import preemption
from pixssl_jax.train import save_errors

Metrics = dict[str, jax.Array]


def step_key(seed: int, step: jax.Array) -> jax.Array:
  """The randomness of one step: a function of (seed, step) only, so resumes replay it."""
  return jax.random.fold_in(jax.random.PRNGKey(seed), step)


def jit_train_step(step_fn: Callable, model: nn.Module, tx: optax.GradientTransformation,
                   config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh
                   ) -> Callable[[Any, Any], tuple[Any, Metrics]]:
  """`step_fn` jitted once: state replicated and donated, batch sharded over 'data'.

  `step_fn(state, batch, *, model, tx, config) -> (state, metrics)` is `pretrain.train_step`
  or `finetune.train_step`.
  """
  replicated = mesh_lib.replicated(mesh)
  return jax.jit(
      functools.partial(step_fn, model=model, tx=tx, config=config),
      in_shardings=(replicated, mesh_lib.batch_sharded(mesh)),
      out_shardings=(replicated, replicated),
      donate_argnums=(0,), compiler_options=xla_options.compiler_options())


def finish_step(pending, writer: metrics_writer.MetricsWriter, config: ml_collections.ConfigDict,
                hint: str = 'check the input data') -> None:
  """Waits for the step in flight, stops on a non-finite loss, logs it; returns None.

  `pending` is `(step, metrics)` or None. Blocking on the previous step before dispatching the
  next keeps one step in flight: more than that deadlocks collectives on simulated CPU devices
  (docs/pitfalls.md). Used by the pre-training and fine-tuning loops: `pending = finish_step(...)`.
  """
  if pending is None:
    return None
  step, metrics = pending
  loss = float(metrics['loss'])
  if not math.isfinite(loss):
    raise FloatingPointError(f'Non-finite loss {loss} at step {step}; stopping. Lower '
                             f'config.optim.learning_rate or {hint}.')
  if (step + 1) % config.log_every == 0 or step + 1 == config.num_steps:
    writer.write_scalars(step + 1, {k: float(v) for k, v in jax.device_get(metrics).items()})
  return None


def run(state, start_step: int, *, config: ml_collections.ConfigDict, jitted_step: Callable,
        data_iter, mesh: jax.sharding.Mesh, manager, writer: metrics_writer.MetricsWriter,
        save_every: int, save: Callable[[int, Any], None], print_fn=print,
        before_step: Callable[[int, Any, Any], None] | None = None,
        hint: str = 'check the input data'):
  """Trains from `start_step` to `config.num_steps`; returns the last state.

  Every `save_every` steps, and after the last step, `save(step, state)` runs (a checkpoint,
  with a validation first where the caller wants one). A stop request (SIGINT, SIGTERM, a
  preemption) saves a plain checkpoint at the next step boundary and returns. One step stays
  in flight (`finish_step`); the next batch is read while it runs.

  Args:
    state: the state at `start_step` (fresh or restored).
    start_step: the number of steps already done.
    config: uses `num_steps` and `log_every`.
    jitted_step: `(state, global batch) -> (state, metrics)` (`jit_train_step`).
    data_iter: this process's batches, positioned at `start_step`.
    mesh: the data mesh the batches are sharded over.
    manager: the checkpoint manager (stop saves, and the final wait for async saves).
    writer: logs the steps' metrics.
    save_every: the cadence of `save`.
    save: `(step, state) -> None`, called with no step in flight.
    print_fn: progress lines.
    before_step: `(step, state, global batch) -> None` before each step (logging images).
    hint: what to check when the loss is not finite.
  """
  stop_requested = preemption.StopRequest(manager)
  pending = None  # (step, metrics) of the step in flight.
  try:
    for step in range(start_step, config.num_steps):
      if step > start_step and stop_requested(step):
        finish_step(pending, writer, config, hint)
        checkpointing.save(manager, step, state, data_iter, force=True)
        save_errors.wait(manager)
        print_fn(f'Stop requested ({stop_requested.reason}): saved step {step}, exiting.')
        return state
      if step > start_step and step % save_every == 0:
        pending = finish_step(pending, writer, config, hint)
        save(step, state)
      batch = mesh_lib.global_batch(next(data_iter), mesh)  # Overlaps the step in flight.
      pending = finish_step(pending, writer, config, hint)
      if before_step is not None:
        before_step(step, state, batch)
      state, metrics = jitted_step(state, batch)
      pending = (step, metrics)
    finish_step(pending, writer, config, hint)
    if start_step < config.num_steps:  # The periodic saves all came before the last steps.
      save(config.num_steps, state)
  finally:
    try:
      save_errors.wait(manager)
    finally:
      stop_requested.close()
      writer.close()
  return state

