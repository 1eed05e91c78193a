"""What the pre-training and fine-tuning loops share: the data dir, config.json, step keys, the
one jit of a train step, and the per-step finish (wait, non-finite check, log)."""

import functools
import json
import math
from typing import Any, Callable

import jax
import ml_collections
import optax
from etils import epath
from flax import linen as nn

from pixssl_jax import xla_options
from pixssl_jax.data import default_dataset
from pixssl_jax.train import mesh as mesh_lib
from pixssl_jax.train import metrics_writer

Metrics = dict[str, jax.Array]


def resolve_data_dir(data_cfg: ml_collections.ConfigDict) -> str:
  """The prepared store to read: the configured one, or the embedded phantom dataset."""
  if data_cfg.data_dir:
    return data_cfg.data_dir
  return default_dataset.ensure_phantom_store(
      cache_root=data_cfg.cache_dir, num_cases=data_cfg.num_phantoms,
      seed=data_cfg.phantom_seed, shape_scale=data_cfg.phantom_shape_scale,
      spacing=tuple(data_cfg.phantom_spacing), family=data_cfg.phantom_family)


def write_config(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Saves the run's full config as `config.json` (temp name, then rename)."""
  path = epath.Path(workdir) / 'config.json'
  tmp = path.parent / f'.{path.name}.tmp'
  tmp.write_text(json.dumps(json.loads(config.to_json_best_effort()), indent=2, sort_keys=True))
  tmp.replace(path)


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
