"""What the pre-training and fine-tuning loops share: the data dir, config.json, step keys, the
one jit of a train step, and the per-step finish (wait, non-finite check, log)."""

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
from pixssl_jax.train import mesh as mesh_lib
from pixssl_jax.train import metrics_writer

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
