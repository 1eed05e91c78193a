"""Checks made before the first step, so a bad config or workdir fails with a clear message.

Every problem found is reported at once, each naming the config field, instead of a stack trace
from deep inside JAX minutes into the run.
"""

import uuid

import ml_collections
from etils import epath

from pixssl_jax.losses import WEIGHTING_FORMS
from pixssl_jax.models import pixssl
from pixssl_jax.train.objective import MATCH_MODES


class ConfigError(ValueError):
  """The config or the workdir cannot run; the message lists every problem found."""


def data_and_batch_problems(config: ml_collections.ConfigDict, *, device_count: int,
                            process_count: int, positive_fields: tuple[str, ...]) -> list[str]:
  """Problems any training config can have: patch shape vs U-Net depth, batch vs devices and
  processes, counters that must be >= 1. Shared by pre-training and fine-tuning."""
  problems = []
  data, model = config.data, config.model
  if data.ndim not in (2, 3):
    problems.append(f'config.data.ndim={data.ndim}: must be 2 (axial slices) or 3 (patches).')
  if len(data.patch_size) != data.ndim:
    problems.append(f'config.data.patch_size={tuple(data.patch_size)} has {len(data.patch_size)} '
                    f'axes but config.data.ndim={data.ndim}.')
  levels = len(model.features)
  factor = 2 ** (levels - 1)
  if any(p % factor for p in data.patch_size):
    problems.append(f'config.data.patch_size={tuple(data.patch_size)}: every axis must be '
                    f'divisible by {factor}, the U-Net down-sampling factor of {levels} levels '
                    f'(config.model.features={tuple(model.features)}).')
  if config.batch_size % device_count:
    problems.append(f'config.batch_size={config.batch_size} is not divisible by the '
                    f'{device_count} devices of the data mesh.')
  if config.batch_size % process_count:
    problems.append(f'config.batch_size={config.batch_size} is not divisible by the '
                    f'{process_count} processes.')
  for field in positive_fields:
    if config[field] < 1:
      problems.append(f'config.{field}={config[field]}: must be >= 1.')
  return problems


def pretrain_config_problems(config: ml_collections.ConfigDict, *, device_count: int,
                             process_count: int) -> list[str]:
  """Returns one message per inconsistency in a pre-training config (empty if none)."""
  problems = data_and_batch_problems(
      config, device_count=device_count, process_count=process_count,
      positive_fields=('num_steps', 'checkpoint_every', 'log_every', 'keep_checkpoints'))
  data, model, method = config.data, config.model, config.method
  if data.ndim in (2, 3):
    try:
      pixssl.build_model(model, data.ndim)  # The model checks its own fields.
    except ValueError as e:
      problems.append(f'config.{e}.')
  if method.weighting not in WEIGHTING_FORMS:
    problems.append(f'config.method.weighting={method.weighting!r}: choose one of '
                    f'{WEIGHTING_FORMS}.')
  if method.match not in MATCH_MODES:
    problems.append(f'config.method.match={method.match!r}: choose one of {MATCH_MODES}.')
  if method.mc_samples < 1:
    problems.append(f'config.method.mc_samples={method.mc_samples}: must be >= 1.')
  if not (method.use_global or method.use_pixel):
    problems.append('config.method: use_global and use_pixel are both False; nothing to learn.')
  if config.image_every < 0:
    problems.append(f'config.image_every={config.image_every}: must be >= 0 (0 disables).')
  return problems


def check_workdir_writable(workdir: str) -> None:
  """Creates `workdir` if needed and proves it writable with a probe file."""
  path = epath.Path(workdir)
  probe = path / f'.write_probe_{uuid.uuid4().hex}'
  try:
    path.mkdir(parents=True, exist_ok=True)
    probe.write_text('ok')
    probe.unlink()
  except OSError as e:
    raise ConfigError(f'--workdir {workdir}: not writable ({e.strerror or e}).') from e


def validate_pretrain(config: ml_collections.ConfigDict, workdir: str, *, device_count: int,
                      process_count: int) -> None:
  """Raises ConfigError listing every problem with `config` and `workdir`."""
  if config.mode != 'pretrain':
    raise ConfigError(f"config.mode={config.mode!r}: this entry point runs 'pretrain'.")
  problems = pretrain_config_problems(config, device_count=device_count,
                                      process_count=process_count)
  if problems:
    raise ConfigError('Invalid config:\n  - ' + '\n  - '.join(problems))
  check_workdir_writable(workdir)
