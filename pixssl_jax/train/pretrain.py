"""The pre-training loop: data, state, the jitted step, checkpoints, logs, preemption."""

import json
import math

import jax
import ml_collections
import numpy as np
from etils import epath

from pixssl_jax import paths
from pixssl_jax.data import case_store
from pixssl_jax.data import default_dataset
from pixssl_jax.data import pipeline
from pixssl_jax.models import pixssl
from pixssl_jax.train import checkpointing
from pixssl_jax.train import config_checks
from pixssl_jax.train import mesh as mesh_lib
from pixssl_jax.train import metrics_writer
from pixssl_jax.train import preemption
from pixssl_jax.train import state as state_lib
from pixssl_jax.train import step as step_lib


def resolve_data_dir(data_cfg: ml_collections.ConfigDict) -> str:
  """The prepared store to read: the configured one, or the embedded phantom dataset."""
  if data_cfg.data_dir:
    return data_cfg.data_dir
  return default_dataset.ensure_phantom_store(
      cache_root=data_cfg.cache_dir, num_cases=data_cfg.num_phantoms,
      seed=data_cfg.phantom_seed, shape_scale=data_cfg.phantom_shape_scale,
      # Configs written before the field existed used the default grid.
      spacing=tuple(data_cfg.get('phantom_spacing', default_dataset.DEFAULT_SPACING)),
      family=data_cfg.get('phantom_family', 'basic'))


def write_config(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Saves the run's full config as `config.json` (temp name, then rename)."""
  path = epath.Path(workdir) / 'config.json'
  tmp = path.parent / f'.{path.name}.tmp'
  tmp.write_text(json.dumps(json.loads(config.to_json_best_effort()), indent=2, sort_keys=True))
  tmp.replace(path)


def _make_data_iterator(store, config: ml_collections.ConfigDict, first_batch: int = 0):
  loader = pipeline.pretrain_loader(
      store, config.data, batch_size=config.batch_size // jax.process_count(),
      seed=config.seed, shard_index=jax.process_index(), shard_count=jax.process_count(),
      worker_count=config.data.worker_count, first_batch=first_batch)
  return iter(loader)


def _axial_slices(maps) -> dict[str, np.ndarray]:
  """`[H, W]` images of `objective.pixel_maps`: 3-D maps show their middle axial slice."""
  maps = jax.device_get(maps)
  return {f'images/{k}': v if v.ndim == 2 else v[..., v.shape[-1] // 2] for k, v in maps.items()}


def finish_step(pending, writer: metrics_writer.MetricsWriter, config: ml_collections.ConfigDict,
                hint: str = 'check the input data') -> None:
  """Waits for the step in flight, stops on a non-finite loss, logs it; returns None.

  `pending` is `(step, metrics)` or None. Blocking on the previous step before dispatching the
  next keeps one step in flight: more than that deadlocks collectives on simulated CPU devices
  (PITFALLS.md). Used by the pre-training and fine-tuning loops: `pending = finish_step(...)`.
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


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       print_fn=print) -> state_lib.TrainState:
  """Pre-trains from scratch or resumes from the latest checkpoint in `workdir`.

  Args:
    config: a config from `configs/pretrain.py` (with overrides); never modified. Relative
      paths in it are taken from the current directory.
    workdir: where `config.json`, `checkpoints/`, `tensorboard/` and `metrics.jsonl` go (a
      local path, relative or absolute, or a gs:// URL).
    print_fn: receives the progress lines (process 0 only).

  Returns:
    The final train state (replicated over the mesh).
  """
  config, workdir = paths.with_absolute_paths(config), paths.absolute(workdir)
  config_checks.validate_pretrain(config, workdir, device_count=jax.device_count(),
                                  process_count=jax.process_count())
  store = case_store.CaseStore(resolve_data_dir(config.data))
  is_chief = jax.process_index() == 0
  if is_chief:
    write_config(config, workdir)
  mesh = mesh_lib.make_data_mesh()

  data_iter = _make_data_iterator(store, config)
  model = pixssl.build_model(config.model, config.data.ndim)
  tx = state_lib.make_optimizer(config.optim, config.num_steps)

  manager = checkpointing.make_manager(workdir, keep=config.keep_checkpoints)
  # Restore onto an abstract state first: initialising parameters only to overwrite them would
  # cost a compile and a pass on every resume.
  restored = checkpointing.restore_latest(
      manager, step_lib.abstract_train_state(model, tx, config, mesh), data_iter)
  if restored is None:
    state, start_step = step_lib.init_train_state(model, tx, config, mesh), 0
  else:
    state, start_step, data_restored = restored
    if not data_restored:
      # Another process count wrote the checkpoint, so its grain iterator state does not
      # apply; the global data stream is the same for any process count, so start it at the
      # batch of this step: the data continue exactly as in an uninterrupted run.
      data_iter = _make_data_iterator(store, config, first_batch=start_step)
    print_fn(f'Resumed from step {start_step} in {workdir}'
             + ('' if data_restored else ' (on another process count: data stream '
                                         'repositioned to this step)'))

  train_step = step_lib.jit_train_step(model, tx, config, mesh)
  make_maps = step_lib.jit_pixel_maps(model, config, mesh)
  voxels_per_step = 2 * config.batch_size * math.prod(config.data.patch_size)
  writer = metrics_writer.MetricsWriter(workdir, num_steps=config.num_steps,
                                        voxels_per_step=voxels_per_step, enabled=is_chief,
                                        print_fn=print_fn)
  stop_requested = preemption.StopRequest(manager)
  pending = None  # (step, metrics) of the step in flight.

  try:
    for step in range(start_step, config.num_steps):
      stop = step > start_step and stop_requested(step)
      if stop or (step > start_step and step % config.checkpoint_every == 0):
        pending = finish_step(pending, writer, config)
        checkpointing.save(manager, step, state, data_iter, force=True)
        if stop:
          manager.wait_until_finished()
          print_fn(f'Stop requested ({stop_requested.reason}): saved step {step}, exiting.')
          return state
      batch = mesh_lib.global_batch(next(data_iter), mesh)  # Overlaps the step in flight.
      pending = finish_step(pending, writer, config)
      if config.image_every and step % config.image_every == 0:
        # Every process runs it (the batch spans them all); process 0 writes.
        writer.write_images(step, _axial_slices(make_maps(state, batch)))
      state, metrics = train_step(state, batch)
      pending = (step, metrics)
    finish_step(pending, writer, config)
    if start_step < config.num_steps:  # The loop's last save was before the final steps.
      checkpointing.save(manager, config.num_steps, state, data_iter, force=True)
  finally:
    manager.wait_until_finished()
    stop_requested.close()
    writer.close()
  return state

