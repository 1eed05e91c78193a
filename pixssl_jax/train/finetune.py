"""The fine-tuning loop: labelled crops, Dice + CE, validation on whole volumes, best/last ckpts.

Also runs the dense linear probe (`config.linear_probe`): the same loop with the backbone
frozen and the 1x1 head on the pre-trained decoder level.
"""

import math

import jax
import ml_collections

from pixssl_jax import paths
from pixssl_jax.data import case_store
from pixssl_jax.data import pipeline
from pixssl_jax.train import checkpointing
from pixssl_jax.train import evaluate as evaluate_lib
from pixssl_jax.train import finetune_setup
from pixssl_jax.train import finetune_step
from pixssl_jax.train import mesh as mesh_lib
from pixssl_jax.train import metrics_writer
from pixssl_jax.train import preemption
from pixssl_jax.train import pretrain

BEST_METRIC = 'val_dice'
_HINT = 'check the labels'


def _loader(store, config, train_ids):
  # Every label fraction is a subset of train_100; the source's repr digests the exact ids.
  return iter(pipeline.finetune_loader(
      store, config.data, split='train_100', case_ids=train_ids,
      batch_size=config.batch_size // jax.process_count(), seed=config.seed,
      shard_index=jax.process_index(), shard_count=jax.process_count(),
      foreground_prob=config.data.foreground_prob, flip=config.data.flip,
      worker_count=config.data.worker_count, label_slices=config.get('label_slices', 0)))


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       print_fn=print) -> finetune_step.SegState:
  """Fine-tunes (or resumes) in `workdir`; validates every `eval_every` steps and at the end.

  Returns:
    The final state. `WORKDIR/checkpoints` keeps the latest `keep_checkpoints` and the one
    with the best validation Dice (`--config.mode=evaluate` uses the best by default).
  """
  config, workdir = paths.with_absolute_paths(config), paths.absolute(workdir)
  finetune_setup.validate(config, workdir)
  config = finetune_setup.resolve(config, workdir)
  store = case_store.CaseStore(pretrain.resolve_data_dir(config.data))
  model = finetune_setup.build_model(config, store)
  is_chief = jax.process_index() == 0
  if is_chief:
    pretrain.write_config(config, workdir)
  mesh = mesh_lib.make_data_mesh()
  tx = finetune_step.make_optimizer(config)
  described, train_ids = finetune_setup.label_split(store, config.label_fraction, config.seed,
                                                    count=config.get('label_count', 0))
  print_fn(f'Fine-tuning on {len(train_ids)} labelled case(s) ({described}, label_fraction '
           f'{config.label_fraction}); validating on {len(store.split("val"))} case(s)'
           + ('; linear probe: backbone frozen, head on decoder level '
              f'{config.model.head_level}' if config.linear_probe else ''))
  data_iter = _loader(store, config, train_ids)

  manager = checkpointing.make_manager(workdir, keep=config.keep_checkpoints,
                                       best_metric=BEST_METRIC)
  restored = checkpointing.restore_latest(
      manager, finetune_setup.abstract_state(model, tx, config), data_iter)
  if restored is None:
    state, start_step = finetune_setup.initial_state(model, tx, config, mesh, print_fn), 0
  else:
    state, start_step, data_restored = restored
    if not data_restored:
      data_iter = _loader(store, config, train_ids)  # Other process count: a fresh stream.
    print_fn(f'Resumed from step {start_step} in {workdir}')

  train_step = finetune_step.jit_train_step(model, tx, config, mesh)
  scorer = evaluate_lib.VolumeScorer(model, config)
  writer = metrics_writer.MetricsWriter(
      workdir, num_steps=config.num_steps,
      voxels_per_step=config.batch_size * math.prod(config.data.patch_size), enabled=is_chief,
      print_fn=print_fn)

  def validate_and_save(step):
    _, summary = evaluate_lib.validation_scores(scorer, state.params, store, 'val',
                                                config.eval.val_max_cases)
    scores = evaluate_lib.mean_scores(summary)
    writer.write_scalars(step, scores, prefix='val')
    checkpointing.save(manager, step, state, data_iter, force=True,
                       metrics={BEST_METRIC: scores['dice']})

  stop_requested = preemption.StopRequest(manager)
  pending = None
  try:
    for step in range(start_step, config.num_steps):
      if step > start_step and stop_requested(step):
        pretrain.finish_step(pending, writer, config, _HINT)
        checkpointing.save(manager, step, state, data_iter, force=True)  # No val metrics.
        manager.wait_until_finished()
        print_fn(f'Stop requested ({stop_requested.reason}): saved step {step}, exiting.')
        return state
      if step > start_step and step % config.eval_every == 0:
        pending = pretrain.finish_step(pending, writer, config, _HINT)
        validate_and_save(step)
      batch = mesh_lib.global_batch(next(data_iter), mesh)
      pending = pretrain.finish_step(pending, writer, config, _HINT)
      state, metrics = train_step(state, batch)
      pending = (step, metrics)
    pretrain.finish_step(pending, writer, config, _HINT)
    if start_step < config.num_steps:
      validate_and_save(config.num_steps)
  finally:
    manager.wait_until_finished()
    stop_requested.close()
    writer.close()
  return state

