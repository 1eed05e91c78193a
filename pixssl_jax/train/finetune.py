"""Fine-tuning: labelled crops, Dice + CE, validation on whole volumes, best/last checkpoints.

Also runs the dense linear probe (`config.linear_probe`): the same loop with the backbone
frozen and the 1x1 head on the pre-trained decoder level. Sections: the derived config, the
label split and the model (shared with `pixssl_jax.evaluation.evaluate`); the state and its
optimizer; the pure `train_step`; validation and the loop, `train_and_evaluate`.
"""

import math
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from pixssl_jax import config_files
from pixssl_jax import paths
from pixssl_jax import weights_file
from pixssl_jax.data import case_store
from pixssl_jax.data import pipeline
from pixssl_jax.evaluation import inference
from pixssl_jax.evaluation import metrics as metrics_lib
from pixssl_jax.losses import segmentation as seg_losses
from pixssl_jax.models import segmentation
from pixssl_jax.rundir import config_io
from pixssl_jax.rundir import networks
from pixssl_jax.rundir import run_record
from pixssl_jax.train import checkpointing
from pixssl_jax.train import config_checks
from pixssl_jax.train import finetune_recipe
from pixssl_jax.train import load_pretrained
from pixssl_jax.train import loop
from pixssl_jax.train import mesh as mesh_lib
from pixssl_jax.train import metrics_writer
from pixssl_jax.train import optimizers

# label_fraction -> the seeded split `prepare` wrote (docs/data.md); others are drawn from
# train_100 with the run's seed.
FRACTION_SPLITS = {0.1: 'train_10', 1.0: 'train_100'}
BEST_METRIC = 'val_dice'
_HINT = 'check the labels'


# ---- Config, labelled cases and the model ----

def _preset_defaults(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict | None:
  try:
    return config_files.load('finetune', config.get('preset'))
  except (ValueError, FileNotFoundError):
    return None  # Not a preset of configs/finetune.py: every field counts as stated.


def _source_model(config: ml_collections.ConfigDict) -> tuple[str, Any] | None:
  """(where, model fields) of the backbone a fine-tuning starts from; None from scratch."""
  if config.init == 'pretrained' and config.pretrained_workdir:
    source = load_pretrained.read_pretrain_config(config.pretrained_workdir)
    return f'the pre-training run {config.pretrained_workdir}', source.model
  if config.init == 'file' and config.get('init_file'):
    try:
      _, meta = weights_file.load(config.init_file)
    except weights_file.WeightsFileError as e:
      raise config_checks.ConfigError(f'config.init_file: {e}') from None
    return f'the weights file {config.init_file}', ml_collections.ConfigDict(meta['model'])
  return None


def resolve(config: ml_collections.ConfigDict, workdir: str) -> ml_collections.ConfigDict:
  """A copy with the derived fields filled in: the backbone's fields and `model.head_level`.

  The backbone's shape fields (`rundir.networks.BACKBONE_FIELDS`) come from the run or file it
  starts from, unless the command line states them (they differ from the preset's); a stated
  value that differs is kept, and strict loading then names every mis-shaped tensor.
  `model.head_level` None is 0, or for a linear probe the pre-training's `pixel_level`.
  """
  del workdir  # The fine-tuning's own workdir adds nothing; kept for callers' symmetry.
  config = ml_collections.ConfigDict(config.to_dict())  # Unlocked copy; the caller's is kept.
  source = _source_model(config)
  if source is not None:
    stated = config_io.stated_fields(config, _preset_defaults(config))
    for field in networks.BACKBONE_FIELDS:
      if f'model.{field}' not in stated and field in source[1]:
        config.model[field] = source[1][field]
  if config.model.head_level is None:
    level = 0
    if config.linear_probe and source is not None and 'pixel_level' in source[1]:
      level = source[1].pixel_level
    config.model.head_level = int(level)
  return config


def label_split(store: case_store.CaseStore, fraction: float, seed: int,
                count: int = 0) -> tuple[str, list[str]]:
  """(description, case ids) of the labelled training cases.

  Drawn subsets are a prefix of one seeded permutation of train_100, so for one seed a
  smaller count is a subset of a larger one (1 case within 2 within 4).

  Args:
    store: the case store.
    fraction: `config.label_fraction`, used when `count` is 0: 0.1 and 1.0 are the splits
      `prepare` wrote (`FRACTION_SPLITS`), other values a seeded subset of train_100.
    seed: the fine-tuning seed, which draws the subsets.
    count: `config.label_count`: > 0 draws this many train_100 cases (all of them when
      train_100 has no more); 0 uses `fraction`.
  """
  pool = store.split('train_100')
  order = np.random.default_rng([seed, 7]).permutation(len(pool))
  if count:
    if count < 0:
      raise config_checks.ConfigError(f'config.label_count={count}: must be >= 0.')
    count = min(int(count), len(pool))
  else:
    for value, name in FRACTION_SPLITS.items():
      if math.isclose(fraction, value):
        return f'split {name!r}', store.split(name)
    count = max(1, int(round(fraction * len(pool))))
  return (f'{count} of the {len(pool)} train_100 cases (seed {seed})',
          sorted(pool[i] for i in order[:count]))


def num_classes(store: case_store.CaseStore) -> int:
  """The label classes of `store` (background included); a clear error for unlabelled stores."""
  names = store.label_names
  if not store.split('train_100'):
    raise config_checks.ConfigError(
        f'{store.data_dir}: the store has no labelled case (it was prepared from images '
        'only); fine-tuning needs labels: prepare a folder with labels (docs/data.md)')
  if len(names) < 2:
    raise config_checks.ConfigError(
        f'{store.data_dir}: the store names {len(names)} label class(es); a segmentation '
        'needs background and at least one organ')
  if sorted(names) != list(range(len(names))):
    raise config_checks.ConfigError(
        f'{store.data_dir}: label values {sorted(names)} are not 0..K-1; re-run prepare with '
        'consecutive labels')
  return len(names)


def build_model(config: ml_collections.ConfigDict,
                store: case_store.CaseStore) -> segmentation.SegmentationModel:
  return networks.segmentation_model(config, num_classes(store))


# ---- Fine-tuning state ----

@flax.struct.dataclass
class SegState:
  """Everything a fine-tuning step updates; checkpointed as one pytree.

  `start_backbone` is the backbone at step 0 (pre-trained, or the random initialisation from
  scratch), never updated: L2-SP pulls towards it and the distance moved is measured from it.
  In the checkpoint, so a resumed run has the same start whatever happened to its source.
  """
  step: jax.Array
  params: Any
  opt_state: Any
  start_backbone: Any


def make_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """The pre-training optimizer family for the head and the backbone.

  With `linear_probe` only the head is updated. Otherwise `_all_parameters` trains everything,
  after a linear probe of `optim.linear_probe_steps` steps when that is > 0 (LP-FT:
  `finetune_recipe.linear_probe_then_finetune`).
  """
  if config.linear_probe:
    tx = optimizers.make_optimizer(config.optim, config.num_steps)
    labels = lambda params: {k: 'frozen' if k == 'backbone' else 'trained' for k in params}
    return optax.multi_transform({'trained': tx, 'frozen': optax.set_to_zero()}, labels)
  probe = int(config.optim.linear_probe_steps)
  tx = _all_parameters(config, config.num_steps - probe)
  return finetune_recipe.linear_probe_then_finetune(config.optim, tx, probe) if probe else tx


def _all_parameters(config: ml_collections.ConfigDict,
                    num_steps: int) -> optax.GradientTransformation:
  """The optimizer of every parameter over `num_steps` steps.

  The backbone trains at `optim.backbone_lr_scale` times the head's rate (the same optimizer,
  its own moments), and with `optim.head_warmup_steps` = N it is held for the first N steps
  while the new head adapts, then runs its own warm-up and cosine over the remaining steps.
  `optim.layer_decay` then scales each backbone block's updates by its factor
  (`finetune_recipe.block_depth`). Scale 1, N = 0 and decay 1 is one optimizer over all
  parameters, the optimizer state of fine-tuning runs written before the fields existed.
  """
  scale = float(config.optim.backbone_lr_scale)
  held = int(config.optim.head_warmup_steps)
  decay = float(config.optim.layer_decay)
  if scale == 1.0 and held == 0:
    tx = optimizers.make_optimizer(config.optim, num_steps)
  else:
    # One global-norm clip over all gradients, as at scale 1; then a rate per group.
    unclipped = config.optim.copy_and_resolve_references()
    unclipped.grad_clip = 0.0
    backbone = unclipped.copy_and_resolve_references()
    backbone.learning_rate = unclipped.learning_rate * scale
    if scale > 0 and held < num_steps:
      backbone_tx = optimizers.make_optimizer(backbone, num_steps - held)
      backbone_tx = optimizers.delayed(backbone_tx, held) if held else backbone_tx
    else:
      backbone_tx = optax.set_to_zero()
    groups = {'head': optimizers.make_optimizer(unclipped, num_steps), 'backbone': backbone_tx}
    labels = lambda params: {k: 'backbone' if k == 'backbone' else 'head' for k in params}
    tx = optax.multi_transform(groups, labels)
    if config.optim.grad_clip > 0:
      tx = optax.chain(optax.clip_by_global_norm(config.optim.grad_clip), tx)
  if decay != 1.0:
    # model.head_level None is level 0 when every parameter trains (`resolve`).
    tx = optax.chain(tx, finetune_recipe.scale_by_layer_decay(
        decay, len(config.model.features), int(config.model.head_level or 0)))
  return tx


def create_state(params: Any, tx: optax.GradientTransformation) -> SegState:
  return SegState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                  start_backbone=params['backbone'])


def _sample_shape(config) -> tuple[int, ...]:
  return (1, *config.data.patch_size, 1)


def abstract_state(model, tx, config) -> SegState:
  """Shapes and replicated shardings of the fine-tuning state (a restore target)."""
  return mesh_lib.abstract_replicated(lambda: create_state(
      segmentation.init_segmentation_params(model, jax.random.key(0, impl='rbg'),
                                            _sample_shape(config)), tx), mesh_lib.make_data_mesh())


def initial_state(model, tx, config, mesh, print_fn=print) -> SegState:
  """Step-0 state: random init, then the pre-trained backbone merged in (strictly)."""
  params = jax.jit(segmentation.init_segmentation_params, static_argnums=(0, 2))(
      model, jax.random.key(config.seed, impl='rbg'), _sample_shape(config))
  if config.init in ('pretrained', 'file'):
    if config.init == 'pretrained':
      source, step = load_pretrained.restore_student_params(config.pretrained_workdir,
                                                            config.pretrained_step)
      origin = f'{config.pretrained_workdir} (step {step})'
    else:
      source, meta = weights_file.load(config.init_file)
      origin = (f'{config.init_file} (step {meta["source"]["step"]} of '
                f'{meta["source"]["workdir"]})')
    params, loaded = load_pretrained.merge_backbone(jax.device_get(params), source,
                                                    part=config.load,
                                                    skip=tuple(config.skip_params))
    print_fn(f'Loaded {len(loaded)} pre-trained {config.load} tensors from {origin}'
             + (f'; left at random init: {list(config.skip_params)}' if config.skip_params
                else ''))
  else:
    print_fn('Training from scratch (random initialisation).')
  return jax.jit(lambda p: create_state(p, tx),
                 out_shardings=mesh_lib.replicated(mesh))(params)


# ---- The jitted step ----

def train_step(state: SegState, batch: dict[str, jax.Array], *,
               model: segmentation.SegmentationModel, tx: optax.GradientTransformation,
               config: ml_collections.ConfigDict) -> tuple[SegState, dict[str, jax.Array]]:
  """One optimizer step on a labelled batch (`image [B, *P, 1]`, `label [B, *P]`)."""
  def loss_fn(params):
    if config.linear_probe:
      # No backward pass through the frozen backbone at all, not just zero updates.
      params = dict(params, backbone=jax.lax.stop_gradient(params['backbone']))
    logits = model.apply({'params': params}, batch['image'], deterministic=False,
                         rngs={'dropout': loop.step_key(config.seed, state.step)})
    loss, metrics = seg_losses.segmentation_loss(logits, batch['label'],
                                                 dice_weight=config.loss.dice_weight,
                                                 ce_weight=config.loss.ce_weight)
    if config.optim.l2_sp:  # `loss` stays the segmentation loss, comparable across recipes.
      penalty = finetune_recipe.l2_sp_penalty(params['backbone'], state.start_backbone,
                                              config.optim.l2_sp)
      loss, metrics = loss + penalty, dict(metrics, l2_sp=penalty)
    return loss, metrics

  (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  schedule = finetune_recipe.head_schedule(config.optim, config.num_steps,
                                           int(config.optim.linear_probe_steps))
  metrics = dict(metrics, grad_norm=optax.tree.norm(grads), lr=schedule(state.step))
  return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics


# ---- Validation and the loop ----

def validation_scores(scorer: inference.VolumeScorer, params, store: case_store.CaseStore,
                      split: str, max_cases: int = 0) -> tuple[list[dict], list[dict]]:
  """Per-case rows and summary of `split` on the store grid (every process scores all)."""
  params = inference.local_copy(params)
  rows = []
  for i, example in enumerate(pipeline.volume_iterator(store, split)):
    if max_cases and i >= max_cases:
      break
    labels, _ = scorer.predict(params, example['image'])
    rows += metrics_lib.case_rows(example['case_id'], metrics_lib.case_metrics(
        labels, example['label'], store.spacing, store.label_names))
  return rows, metrics_lib.summarize(rows)


def _loader(store, config, train_ids, first_batch=0):
  # Every label fraction is a subset of train_100; the source's repr digests the exact ids.
  return iter(pipeline.finetune_loader(
      store, config.data, split='train_100', case_ids=train_ids,
      batch_size=config.batch_size // jax.process_count(), seed=config.seed,
      shard_index=jax.process_index(), shard_count=jax.process_count(),
      label_slices=config.label_slices, first_batch=first_batch))


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       print_fn=print) -> SegState:
  """Fine-tunes (or resumes) in `workdir`; validates every `eval_every` steps and at the end.

  Returns:
    The final state. `WORKDIR/checkpoints` keeps the latest `keep_checkpoints` and the one
    with the best validation Dice (`--config.mode=evaluate` uses the best by default).
  """
  config, workdir = paths.with_absolute_paths(config), paths.absolute(workdir)
  config_checks.validate_finetune(config, workdir)
  config = resolve(config, workdir)
  store = case_store.CaseStore(loop.resolve_data_dir(config.data))
  model = build_model(config, store)
  is_chief = jax.process_index() == 0
  mesh = mesh_lib.make_data_mesh()
  tx = make_optimizer(config)
  described, train_ids = label_split(store, config.label_fraction, config.seed,
                                     count=config.label_count)
  print_fn(f'Fine-tuning on {len(train_ids)} labelled case(s) ({described}, label_fraction '
           f'{config.label_fraction}); validating on {len(store.split("val"))} case(s)'
           + ('; linear probe: backbone frozen, head on decoder level '
              f'{config.model.head_level}' if config.linear_probe else ''))
  data_iter = _loader(store, config, train_ids)

  # Read only until the last check that can refuse the run (a checkpoint that does not
  # restore, a pre-trained backbone that does not fit): a refused run writes nothing.
  reader = checkpointing.open_reader(checkpointing.checkpoint_dir(workdir))
  try:
    restored = checkpointing.restore_latest(
        reader, abstract_state(model, tx, config), data_iter)
  finally:
    reader.close()
  if restored is None:
    state, start_step = initial_state(model, tx, config, mesh, print_fn), 0
  else:
    state, start_step, data_restored = restored
    if not data_restored:
      # Another process count wrote the checkpoint: its iterator state does not apply, but the
      # global stream is the same for any process count, so it starts at this step's batch.
      data_iter = _loader(store, config, train_ids, first_batch=start_step)
    print_fn(f'Resumed from step {start_step} in {workdir}'
             + ('' if data_restored else ' (on another process count: data stream '
                                         'repositioned to this step)'))
  manager = checkpointing.make_manager(workdir, keep=config.keep_checkpoints,
                                       best_metric=BEST_METRIC)
  if is_chief:
    loop.write_config(config, workdir)
    run_record.write(workdir, store)  # What prediction needs without the store.

  jitted_step = loop.jit_train_step(train_step, model, tx, config, mesh)
  scorer = inference.VolumeScorer(model, config)
  writer = metrics_writer.MetricsWriter(
      workdir, num_steps=config.num_steps,
      voxels_per_step=config.batch_size * math.prod(config.data.patch_size), enabled=is_chief,
      print_fn=print_fn)

  moved_fn = jax.jit(finetune_recipe.relative_distance)

  def validate_and_save(step, state):
    _, summary = validation_scores(scorer, state.params, store, 'val',
                                   config.eval.val_max_cases)
    scores = metrics_lib.mean_scores(summary)
    moved = float(moved_fn(state.params['backbone'], state.start_backbone))
    writer.write_scalars(step, dict(scores, backbone_moved=moved), prefix='val')
    checkpointing.save(manager, step, state, data_iter, force=True,
                       metrics={BEST_METRIC: scores['dice'], 'backbone_moved': moved})

  return loop.run(state, start_step, config=config, jitted_step=jitted_step,
                  data_iter=data_iter, mesh=mesh, manager=manager, writer=writer,
                  save_every=config.eval_every, save=validate_and_save, print_fn=print_fn,
                  hint=_HINT)
