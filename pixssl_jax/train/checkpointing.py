"""Orbax checkpoints of the train state together with the data iterator's position.

A checkpoint at step k holds: the TrainState after k steps (student, teacher, optimizer, step),
the grain iterator state after k batches, and a small JSON item (`meta`) with the process count
the iterator state belongs to. Randomness is folded from (seed, step), so nothing else is
needed to replay a run exactly.
"""

from typing import Any

import grain
import jax
import orbax.checkpoint as ocp
from orbax.checkpoint.checkpoint_managers import preservation_policy
from etils import epath


def checkpoint_dir(workdir: str) -> epath.Path:
  return epath.Path(workdir) / 'checkpoints'


def make_manager(workdir: str, *, keep: int, best_metric: str | None = None,
                 best_mode: str = 'max', async_save: bool = True) -> ocp.CheckpointManager:
  """A manager over `WORKDIR/checkpoints` keeping the last `keep` checkpoints (plus the best).

  Saves are asynchronous (the loop only waits for the device-to-host copy) and atomic: Orbax
  writes into a temporary directory and renames it when complete, so a crash mid-save leaves the
  previous checkpoint as the latest usable one.

  Args:
    workdir: the run directory.
    keep: how many of the latest checkpoints to keep.
    best_metric: if set, the checkpoint with the best value of this metric (passed to `save`)
      is kept too, however old.
    best_mode: 'max' or 'min', what "best" means for `best_metric`.
    async_save: write in a background thread.
  """
  policy = preservation_policy.LatestN(keep)
  if best_metric is not None:
    if best_mode not in ('max', 'min'):
      raise ValueError(f"best_mode must be 'max' or 'min', got {best_mode!r}")
    policy = preservation_policy.AnyPreservationPolicy([policy, preservation_policy.BestN(
        get_metric_fn=lambda metrics: metrics[best_metric], reverse=best_mode == 'min', n=1,
        keep_checkpoints_without_metrics=False)])
  options = ocp.CheckpointManagerOptions(
      create=True, enable_async_checkpointing=async_save, cleanup_tmp_directories=True,
      preservation_policy=policy)
  return ocp.CheckpointManager(checkpoint_dir(workdir), options=options,
                               item_names=('state', 'data', 'meta'))


def save(manager: ocp.CheckpointManager, step: int, state: Any, data_iterator: Any,
         *, force: bool = False, metrics: dict[str, float] | None = None) -> bool:
  """Saves state, iterator position and metadata as step `step` (all processes call this).

  `metrics` (host floats) are what a manager with `best_metric` ranks checkpoints by; they
  are kept in the `meta` item too (`saved_metrics`).
  """
  args = ocp.args.Composite(
      state=ocp.args.StandardSave(state),
      data=grain.checkpoint.CheckpointSave(data_iterator),
      meta=ocp.args.JsonSave({'step': int(step), 'process_count': jax.process_count(),
                              'metrics': metrics}))
  return manager.save(step, args=args, force=force, metrics=metrics)


def saved_metrics(manager: ocp.CheckpointManager, step: int) -> dict[str, float] | None:
  """The `metrics` given to `save` for `step` (None if none were).

  Read from the checkpoint's own `meta` item: the manager only reports metrics when built
  with a `best_fn`, which the preservation policy does not need.
  """
  meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))['meta']
  return meta.get('metrics')


def abstract_like(state: Any) -> Any:
  """Shape/dtype/sharding placeholders: restoring onto them reshards to today's devices."""
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)


def restore_latest(manager: ocp.CheckpointManager, state_template: Any,
                   data_iterator: Any | None, step: int | None = None
                   ) -> tuple[Any, int, bool] | None:
  """Restores the latest checkpoint (or `step`), if any.

  Args:
    manager: from `make_manager`.
    state_template: a state (or abstract state) with today's shardings; the checkpoint is
      restored into these shardings whatever topology wrote it.
    data_iterator: the freshly built grain iterator; its position is restored in place when the
      checkpoint was written by the same number of processes. None restores the model only.
    step: restore this step instead of the latest.

  Returns:
    None when there is no checkpoint; else (state, step, data_restored).
  """
  step = manager.latest_step() if step is None else step
  if step is None:
    return None
  meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))['meta']
  # Grain iterator state is per process count (PITFALLS): on another topology only the model
  # state comes back and the caller rebuilds the data stream.
  restore_data = (data_iterator is not None
                  and meta.get('process_count') == jax.process_count())
  items = {'state': ocp.args.StandardRestore(abstract_like(state_template))}
  if restore_data:
    items['data'] = grain.checkpoint.CheckpointRestore(data_iterator)
  restored = manager.restore(step, args=ocp.args.Composite(**items))
  return restored['state'], step, restore_data
