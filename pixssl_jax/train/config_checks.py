"""Checks made before the first step, so a bad config or workdir fails with a clear message.

Every problem found is reported at once, each naming the config field, instead of a stack trace
from deep inside JAX minutes into the run. Pre-training calls `validate_pretrain`, fine-tuning
and evaluation `validate_finetune`.
"""

import json
import math
import uuid
from collections.abc import Callable
from typing import Any

import jax
import ml_collections
from etils import epath

from pixssl_jax.data import default_dataset
from pixssl_jax.objective import registry as loss_terms
from pixssl_jax.models import layers
from pixssl_jax.models import pixssl
from pixssl_jax.rundir import config_io
from pixssl_jax.rundir.config_fields import MISSING
from pixssl_jax.rundir.config_fields import field_at
from pixssl_jax.rundir.config_io import ConfigError
from pixssl_jax.train import load_pretrained


OPTIMIZERS = ('adamw', 'lars')
FINETUNE_MODES = ('finetune', 'evaluate')  # The modes of configs/finetune.py.
INITS = ('pretrained', 'scratch', 'file')


def _number(lo: float | None = None, hi: float | None = None, *, lo_open: bool = False,
            hi_open: bool = False) -> tuple[Callable[[Any], bool], str]:
  """A finite-number check for [lo, hi] (open ends as asked) and how it reads in a message."""
  def ok(value):
    if isinstance(value, bool) or not isinstance(value, (int, float)):
      return False
    if not math.isfinite(value):
      return False
    if lo is not None and (value <= lo if lo_open else value < lo):
      return False
    return hi is None or (value < hi if hi_open else value <= hi)
  if hi is None:
    text = f'must be {">" if lo_open else ">="} {lo:g}'
  else:
    text = (f'must be in {"(" if lo_open else "["}{lo:g}, {hi:g}{")" if hi_open else "]"}')
  return ok, text


def _pair(lo: float, *, lo_open: bool) -> tuple[Callable[[Any], bool], str]:
  """A (low, high) pair with lo < / <= low <= high."""
  is_number, _ = _number(lo, lo_open=lo_open)
  def ok(value):
    return (isinstance(value, (tuple, list)) and len(value) == 2
            and all(is_number(v) for v in value) and value[0] <= value[1])
  return ok, f'must be (low, high) with {lo:g} {"<" if lo_open else "<="} low <= high'


def _choice(options: tuple[str, ...]) -> tuple[Callable[[Any], bool], str]:
  return (lambda value: value in options), f'choose one of {options}'


_PROBABILITY = _number(0.0, 1.0)
_FRACTION = _number(0.0, 1.0, hi_open=True)
_NON_NEGATIVE = _number(0.0)
_POSITIVE = _number(0.0, lo_open=True)
_AT_LEAST_ONE = _number(1)

# Every numeric or enumerated field with a valid range, for both config files (a field a file
# does not have is skipped). Shapes, divisibility and cross-field rules are checked below.
FIELD_RANGES = {
    'seed': _NON_NEGATIVE,
    'num_steps': _AT_LEAST_ONE,
    'batch_size': _AT_LEAST_ONE,
    'log_every': _AT_LEAST_ONE,
    'checkpoint_every': _AT_LEAST_ONE,
    'keep_checkpoints': _AT_LEAST_ONE,
    'eval_every': _AT_LEAST_ONE,
    'image_every': _number(0),
    'label_fraction': _number(0.0, 1.0, lo_open=True),
    'label_count': _number(0),
    'label_slices': _number(0),
    'data.num_phantoms': _number(5),  # One case each for train, val and test, two for train_10.
    'data.phantom_seed': _NON_NEGATIVE,
    'data.phantom_shape_scale': _POSITIVE,
    'data.phantom_family': _choice(tuple(default_dataset.PHANTOM_FAMILIES)),
    'data.region_scale': _number(1.0),
    'data.min_overlap': _PROBABILITY,
    'data.scale_range': _pair(0.0, lo_open=True),
    'data.min_body_fraction': _FRACTION,
    'data.foreground_prob': _PROBABILITY,
    'data.intensity.prob': _PROBABILITY,
    'data.intensity.window_jitter': _FRACTION,
    'data.intensity.remap_prob': _PROBABILITY,
    'data.intensity.remap_nonmonotone_prob': _PROBABILITY,
    'data.mask_ratio': _FRACTION,
    'data.mask_patch': _AT_LEAST_ONE,
    'data.intensity.brightness': _NON_NEGATIVE,
    'data.intensity.contrast': _FRACTION,
    'data.intensity.gamma': _NON_NEGATIVE,  # Log-uniform in [1/(1+g), 1+g].
    'data.intensity.noise_std': _NON_NEGATIVE,
    'data.intensity.blur_sigma': _pair(0.0, lo_open=False),
    'data.worker_count': _number(0),
    'data.read_threads': _AT_LEAST_ONE,
    'data.prefetch_buffer_size': _AT_LEAST_ONE,
    'model.num_groups': _AT_LEAST_ONE,
    'model.proj_hidden': _AT_LEAST_ONE,
    'model.proj_dim': _AT_LEAST_ONE,
    'model.pixel_proj_dim': _AT_LEAST_ONE,
    'model.stabilizer_hidden': _AT_LEAST_ONE,
    'model.stabilizer_dropout': _FRACTION,
    'model.head_dropout': _FRACTION,
    'model.layers': _choice(layers.NAMES),
    'method.mc_samples': _AT_LEAST_ONE,
    **{f'method.{field}': _choice(forms) for field, forms in loss_terms.METHOD_CHOICES.items()},
    'method.tau': _POSITIVE,
    'method.tau_absolute': _POSITIVE,
    'method.threshold_keep_start': _number(0.0, 1.0, lo_open=True),
    'method.threshold_keep_end': _number(0.0, 1.0, lo_open=True),
    'method.kendall_eps': _POSITIVE,
    'method.threshold_start': _POSITIVE,
    'method.threshold_end': _POSITIVE,
    'method.lambda_global': _NON_NEGATIVE,
    'method.lambda_pixel': _NON_NEGATIVE,
    'method.lambda_variance': _NON_NEGATIVE,
    'method.lambda_covariance': _NON_NEGATIVE,
    'method.lambda_calibration': _NON_NEGATIVE,
    'method.lambda_restoration': _NON_NEGATIVE,
    'method.match_distance': _POSITIVE,
    'optim.name': _choice(OPTIMIZERS),
    'optim.learning_rate': _POSITIVE,
    'optim.warmup_steps': _number(0),
    'optim.weight_decay': _NON_NEGATIVE,
    'optim.grad_clip': _NON_NEGATIVE,
    'optim.ema_momentum': _FRACTION,
    'optim.ema_final_init_share': _FRACTION,  # 0: m0 = ema_momentum whatever the run length.
    'optim.backbone_lr_scale': _NON_NEGATIVE,  # 0: the backbone is not updated.
    'optim.head_warmup_steps': _NON_NEGATIVE,
    'optim.l2_sp': _NON_NEGATIVE,
    'optim.layer_decay': _number(0.0, 1.0, lo_open=True),  # 1: every block at the head's rate.
    'optim.linear_probe_steps': _number(0),
    'loss.dice_weight': _NON_NEGATIVE,
    'loss.ce_weight': _NON_NEGATIVE,
    'eval.overlap': _FRACTION,
    'eval.batch_size': _AT_LEAST_ONE,
    'eval.mc_samples': _AT_LEAST_ONE,
    'eval.val_max_cases': _number(0),
}

def range_problems(config: ml_collections.ConfigDict) -> list[str]:
  """One message per field of `FIELD_RANGES` whose value is out of its range."""
  problems = []
  for path, (ok, rule) in FIELD_RANGES.items():
    value = field_at(config, path)
    if value is not MISSING and not ok(value):
      problems.append(f'config.{path}={value!r}: {rule}.')
  spacing = field_at(config, 'data.phantom_spacing')
  if spacing is not MISSING and not (len(spacing) == 3 and all(
      _POSITIVE[0](v) for v in spacing)):
    problems.append(f'config.data.phantom_spacing={tuple(spacing)}: must be three spacings > 0 '
                    '(mm).')
  return problems


def data_dir_problems(data_cfg: ml_collections.ConfigDict) -> list[str]:
  """`data.data_dir`, when set, must be a store `prepare` wrote (its `store.json` exists)."""
  if not data_cfg.data_dir:
    return []
  path = epath.Path(data_cfg.data_dir)
  if not path.exists():
    return [f'config.data.data_dir={data_cfg.data_dir}: no such folder; make a store with '
            'python -m pixssl_jax.data.prepare --raw_dir RAW --data_dir STORE.']
  if not (path / 'store.json').exists():
    return [f'config.data.data_dir={data_cfg.data_dir}: not a prepared store (no store.json); '
            'make one with python -m pixssl_jax.data.prepare --raw_dir RAW --data_dir STORE.']
  try:
    version = json.loads((path / 'store.json').read_text()).get('format_version')
  except (OSError, ValueError, AttributeError) as e:  # ValueError: not JSON.
    return [f'config.data.data_dir={data_cfg.data_dir}: its store.json does not read '
            f'({type(e).__name__}); re-run python -m pixssl_jax.data.prepare.']
  if version is None:
    return [f'config.data.data_dir={data_cfg.data_dir}: its store.json has no format_version, '
            'so prepare did not write it; re-run python -m pixssl_jax.data.prepare.']
  return []


def data_and_batch_problems(config: ml_collections.ConfigDict, *, device_count: int,
                            process_count: int) -> list[str]:
  """Problems any training config can have: fields out of range, patch shape vs U-Net depth,
  batch vs devices and processes. Shared by pre-training and fine-tuning."""
  problems = range_problems(config)
  data, model = config.data, config.model
  if data.ndim not in (2, 3):
    problems.append(f'config.data.ndim={data.ndim}: must be 2 (axial slices) or 3 (patches).')
  if len(data.patch_size) != data.ndim:
    problems.append(f'config.data.patch_size={tuple(data.patch_size)} has {len(data.patch_size)} '
                    f'axes but config.data.ndim={data.ndim}.')
  levels = len(model.features)
  factor = 2 ** (levels - 1)
  if any(p < 1 for p in data.patch_size):
    problems.append(f'config.data.patch_size={tuple(data.patch_size)}: every axis must be >= 1.')
  elif any(p % factor for p in data.patch_size):
    problems.append(f'config.data.patch_size={tuple(data.patch_size)}: every axis must be '
                    f'divisible by {factor}, the U-Net down-sampling factor of {levels} levels '
                    f'(config.model.features={tuple(model.features)}).')
  if config.batch_size >= 1 and config.batch_size % device_count:
    problems.append(f'config.batch_size={config.batch_size} is not divisible by the '
                    f'{device_count} devices of the data mesh.')
  if config.batch_size >= 1 and config.batch_size % process_count:
    problems.append(f'config.batch_size={config.batch_size} is not divisible by the '
                    f'{process_count} processes.')
  return problems


def pretrain_config_problems(config: ml_collections.ConfigDict, *, device_count: int,
                             process_count: int) -> list[str]:
  """Returns one message per inconsistency in a pre-training config (empty if none)."""
  problems = data_and_batch_problems(config, device_count=device_count,
                                     process_count=process_count)
  data, model, method = config.data, config.model, config.method
  # The model checks its own fields; skipped when a range check already named one of them.
  if data.ndim in (2, 3) and not any(p.startswith('config.model.') for p in problems):
    try:
      pixssl.build_model(model, data.ndim)
    except ValueError as e:
      problems.append(f'config.{e}.')
  for low, high in (('threshold_start', 'threshold_end'),
                    ('threshold_keep_start', 'threshold_keep_end')):
    if low in method and method[high] < method[low]:
      problems.append(f'config.method.{high}={method[high]} is below '
                      f'config.method.{low}={method[low]}.')
  nothing = loss_terms.nothing_to_learn(method)
  if nothing:
    problems.append(nothing)
  # Restoring views the student sees whole is the identity: the term needs hidden cells.
  if float(method.lambda_restoration) > 0 and data.mask_ratio <= 0:
    problems.append(f'config.method.lambda_restoration={method.lambda_restoration} needs '
                    'config.data.mask_ratio > 0 (the cells the student must restore).')
  return problems


def check_workdir_writable(workdir: str) -> None:
  """Proves `workdir` writable with a probe file, without creating it.

  A workdir that does not exist yet is judged by the nearest folder above it that does (the
  run creates it only once every check has passed, so a refused run leaves none behind). The
  probe is removed even when writing it fails (a full disk creates the file, then refuses
  its bytes).
  """
  path = epath.Path(workdir)
  if '://' not in workdir:
    while not path.exists() and path.parent != path:
      path = path.parent
    if not path.is_dir():
      raise ConfigError(f'--workdir {workdir}: {path} is not a folder.')
  probe = path / f'.write_probe_{uuid.uuid4().hex}'
  try:
    probe.write_text('ok')
  except OSError as e:
    raise ConfigError(f'--workdir {workdir}: not writable ({e.strerror or e}).') from None
  finally:
    try:
      probe.unlink(missing_ok=True)
    except OSError:
      pass  # Not even removable: the write above has already said why.


def validate_pretrain(config: ml_collections.ConfigDict, workdir: str, *, device_count: int,
                      process_count: int) -> None:
  """Raises ConfigError listing every problem with `config` and `workdir`."""
  if config.mode != 'pretrain':
    raise ConfigError(f"config.mode={config.mode!r}: this entry point runs 'pretrain'.")
  problems = pretrain_config_problems(config, device_count=device_count,
                                      process_count=process_count)
  problems += data_dir_problems(config.data)
  if problems:
    raise ConfigError('Invalid config:\n  - ' + '\n  - '.join(problems))
  check_workdir_writable(workdir)


def finetune_config_problems(config: ml_collections.ConfigDict, *, device_count: int,
                             process_count: int) -> list[str]:
  """One message per inconsistency in a fine-tuning config (empty if none)."""
  problems = data_and_batch_problems(config, device_count=device_count,
                                     process_count=process_count)
  model = config.model
  if config.mode not in FINETUNE_MODES:
    problems.append(f'config.mode={config.mode!r}: choose one of {FINETUNE_MODES}.')
  if config.init not in INITS:
    problems.append(f'config.init={config.init!r}: choose one of {INITS}.')
  if config.mode == 'finetune' and config.init == 'pretrained' and not config.pretrained_workdir:
    problems.append("config.pretrained_workdir is not set: pass the pre-training workdir, or "
                    "--config.init=scratch to train from random weights.")
  if config.mode == 'finetune' and config.init == 'file' and not config.get('init_file'):
    problems.append('config.init=file needs config.init_file: a weights file written by '
                    'python -m pixssl_jax.export_weights (.safetensors or .npz).')
  if config.load not in load_pretrained.PARTS:
    problems.append(f'config.load={config.load!r}: choose one of '
                    f'{sorted(load_pretrained.PARTS)}.')
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
  problems += recipe_problems(config)
  return problems + config_io.eval_problems(config)


def recipe_problems(config: ml_collections.ConfigDict) -> list[str]:
  """Combinations of the recipe fields that contradict each other (empty if none)."""
  optim, problems = config.optim, []
  steps = optim.linear_probe_steps
  if steps and steps >= config.num_steps:
    problems.append(f'config.optim.linear_probe_steps={steps}: must be below '
                    f'config.num_steps={config.num_steps} (a run of only the probe is '
                    'config.linear_probe=True).')
  if steps and optim.head_warmup_steps:
    problems.append(f'config.optim.linear_probe_steps={steps} and head_warmup_steps='
                    f'{optim.head_warmup_steps}: both hold the backbone first; use one.')
  if steps and config.linear_probe:
    problems.append(f'config.optim.linear_probe_steps={steps} with config.linear_probe=True: '
                    'the backbone never trains; set one of them.')
  return problems


def validate_finetune(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Raises ConfigError listing every problem with `config` and `workdir`."""
  problems = finetune_config_problems(config, device_count=jax.device_count(),
                                      process_count=jax.process_count())
  problems += data_dir_problems(config.data)
  if problems:
    raise ConfigError('Invalid config:\n  - ' + '\n  - '.join(problems))
  check_workdir_writable(workdir)
