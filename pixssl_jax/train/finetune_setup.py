"""What fine-tuning and evaluation share: config checks, the label split, the model, the states."""

import json
import math

import jax
import ml_collections
import numpy as np
from etils import epath

from pixssl_jax.data import case_store
from pixssl_jax.data import splits as splits_lib
from pixssl_jax.models import segmentation
from pixssl_jax.train import config_checks
from pixssl_jax.train import finetune_step
from pixssl_jax.train import mesh as mesh_lib
from pixssl_jax.train import pretrained

MODES = ('finetune', 'evaluate')
INITS = ('pretrained', 'scratch')
# label_fraction -> the seeded split `prepare` wrote (docs/data.md); others are drawn from
# train_100 with the run's seed.
FRACTION_SPLITS = {0.1: 'train_10', 1.0: 'train_100'}


def resolve(config: ml_collections.ConfigDict, workdir: str) -> ml_collections.ConfigDict:
  """A copy with the derived fields filled in: `model.head_level` (see configs/finetune.py).

  Evaluation takes it from the fine-tuning run's `config.json`, so it scores the network that
  was trained whatever the pre-training workdir holds now.
  """
  config = ml_collections.ConfigDict(config.to_dict())  # Unlocked copy; the caller's is kept.
  if config.model.head_level is None:
    level = 0
    written = epath.Path(workdir) / 'config.json'
    if config.mode == 'evaluate' and written.exists():
      level = json.loads(written.read_text())['model']['head_level']
    elif config.linear_probe and config.init == 'pretrained' and config.pretrained_workdir:
      level = pretrained.read_pretrain_config(config.pretrained_workdir).model.pixel_level
    config.model.head_level = int(level)
  return config


def config_problems(config: ml_collections.ConfigDict, *, device_count: int,
                    process_count: int) -> list[str]:
  """One message per inconsistency in a fine-tuning config (empty if none)."""
  problems = config_checks.data_and_batch_problems(config, device_count=device_count,
                                                   process_count=process_count)
  model = config.model
  if config.mode not in MODES:
    problems.append(f'config.mode={config.mode!r}: choose one of {MODES}.')
  if config.init not in INITS:
    problems.append(f'config.init={config.init!r}: choose one of {INITS}.')
  if config.mode == 'finetune' and config.init == 'pretrained' and not config.pretrained_workdir:
    problems.append("config.pretrained_workdir is not set: pass the pre-training workdir, or "
                    "--config.init=scratch to train from random weights.")
  if config.load not in pretrained.PARTS:
    problems.append(f'config.load={config.load!r}: choose one of {sorted(pretrained.PARTS)}.')
  if config.label_slices > 0 and config.data.ndim != 2:
    problems.append(f'config.label_slices={config.label_slices} needs 2-D crops '
                    f'(config.data.ndim=2): a 3-D crop would take the unlabelled slices '
                    'between them for background.')
  if config.loss.dice_weight == 0 and config.loss.ce_weight == 0:
    problems.append('config.loss: dice_weight and ce_weight are both 0; nothing to learn.')
  if model.dtype not in ('float32', 'bfloat16'):
    problems.append(f"config.model.dtype={model.dtype!r}: choose one of ('float32', "
                    "'bfloat16').")
  if model.head_level is not None and not 0 <= model.head_level < len(model.features):
    problems.append(f'config.model.head_level={model.head_level}: must be in '
                    f'[0, {len(model.features) - 1}] for {len(model.features)} U-Net levels.')
  if config.pretrained_step is not None and config.pretrained_step < 0:
    problems.append(f'config.pretrained_step={config.pretrained_step}: must be >= 0.')
  if config.eval.split not in splits_lib.SPLIT_NAMES:
    problems.append(f'config.eval.split={config.eval.split!r}: choose one of '
                    f'{splits_lib.SPLIT_NAMES}.')
  checkpoint = str(config.eval.checkpoint)
  if checkpoint not in ('best', 'last') and not checkpoint.isdigit():
    problems.append(f"config.eval.checkpoint={config.eval.checkpoint!r}: use 'best', 'last' or "
                    'a step number.')
  if config.eval.uncertainty and model.head_dropout <= 0:
    problems.append('config.eval.uncertainty needs config.model.head_dropout > 0 '
                    '(MC dropout samples the head).')
  if config.eval.uncertainty and config.eval.mc_samples < 2:
    problems.append(f'config.eval.mc_samples={config.eval.mc_samples}: must be >= 2.')
  return problems


def validate(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Raises ConfigError listing every problem with `config` and `workdir`."""
  problems = config_problems(config, device_count=jax.device_count(),
                             process_count=jax.process_count())
  problems += config_checks.data_dir_problems(config.data)
  if problems:
    raise config_checks.ConfigError('Invalid config:\n  - ' + '\n  - '.join(problems))
  config_checks.check_workdir_writable(workdir)


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
  try:
    return segmentation.build_segmentation_model(config.model, config.data.ndim,
                                                 num_classes(store))
  except ValueError as e:
    if isinstance(e, config_checks.ConfigError):
      raise
    raise config_checks.ConfigError(f'config.{e}') from None


def _sample_shape(config) -> tuple[int, ...]:
  return (1, *config.data.patch_size, 1)


def abstract_state(model, tx, config) -> finetune_step.SegState:
  """Shapes and replicated shardings of the fine-tuning state (a restore target)."""
  return mesh_lib.abstract_replicated(lambda: finetune_step.create_state(
      segmentation.init_segmentation_params(model, jax.random.key(0, impl='rbg'),
                                            _sample_shape(config)), tx), mesh_lib.make_data_mesh())


def initial_state(model, tx, config, mesh, print_fn=print) -> finetune_step.SegState:
  """Step-0 state: random init, then the pre-trained backbone merged in (strictly)."""
  params = jax.jit(segmentation.init_segmentation_params, static_argnums=(0, 2))(
      model, jax.random.key(config.seed, impl='rbg'), _sample_shape(config))
  if config.init == 'pretrained':
    source, step = pretrained.restore_student_params(config.pretrained_workdir,
                                                     config.pretrained_step)
    params, loaded = pretrained.merge_backbone(jax.device_get(params), source, part=config.load,
                                               skip=tuple(config.skip_params))
    print_fn(f'Loaded {len(loaded)} pre-trained {config.load} tensors from '
             f'{config.pretrained_workdir} (step {step})'
             + (f'; left at random init: {list(config.skip_params)}' if config.skip_params
                else ''))
  else:
    print_fn('Training from scratch (random initialisation).')
  return jax.jit(lambda p: finetune_step.create_state(p, tx),
                 out_shardings=mesh_lib.replicated(mesh))(params)
