"""The networks of a run, built from its config, with parameters from its checkpoints.

A pre-training run's network is the `PixSSLModel` (student and EMA teacher); a fine-tuning
run's is the `SegmentationModel`. Both are rebuilt from `config.json` alone, and their
parameters restored onto one device whatever topology wrote the checkpoint.
"""

from typing import Any

import jax
import ml_collections

from pixssl_jax import objective
from pixssl_jax.models import pixssl
from pixssl_jax.models import segmentation
from pixssl_jax.rundir import checkpoints
from pixssl_jax.rundir import config_io

# The fields of `model` that fix the backbone's parameter shapes: a fine-tuning takes them
# from its pre-training run (or weights file), since strict loading needs the same.
BACKBONE_FIELDS = ('features', 'num_groups')


def _sample_shape(config: ml_collections.ConfigDict) -> tuple[int, ...]:
  return (1, *config.data.patch_size, 1)


def pixssl_model(config: ml_collections.ConfigDict) -> pixssl.PixSSLModel:
  """The pre-training network of a pre-training config."""
  try:
    return pixssl.build_model(config.model, config.data.ndim,
                              **objective.model_heads(config.method))
  except ValueError as e:
    raise config_io.ConfigError(f'config.{e}') from None


def segmentation_model(config: ml_collections.ConfigDict,
                       num_classes: int) -> segmentation.SegmentationModel:
  """The segmentation network of a fine-tuning config with `num_classes` classes."""
  try:
    return segmentation.build_segmentation_model(config.model, config.data.ndim, num_classes)
  except ValueError as e:
    if isinstance(e, config_io.ConfigError):
      raise
    raise config_io.ConfigError(f'config.{e}') from None


def abstract_params(model, config: ml_collections.ConfigDict) -> Any:
  """Shapes and dtypes of `model`'s params for the config's patch size, computing nothing."""
  key = jax.random.key(0, impl='rbg')
  if isinstance(model, segmentation.SegmentationModel):
    init = lambda: segmentation.init_segmentation_params(model, key, _sample_shape(config))
  else:
    init = lambda: pixssl.init_params(model, key, _sample_shape(config))
  return jax.eval_shape(init)


def restore_student_params(workdir: str, step: int | None = None, *,
                           what: str = 'config.pretrained_workdir',
                           choose: str = '--config.pretrained_step'
                           ) -> tuple[Any, int, ml_collections.ConfigDict]:
  """A pre-training run's student params (host numpy arrays), their step, and its config.

  Args:
    workdir: a pre-training workdir; nothing in it is created, moved or deleted.
    step: the checkpoint step, restored or a ConfigError; None takes the latest that restores
      (a newer one that does not is named in a warning line on stderr and left in place).
    what: how the user named the workdir, for errors.
    choose: how the user picks a step, for errors.
  """
  config = config_io.read_config(workdir, modes=('pretrain',), what=what)
  manager = checkpoints.open_reader(checkpoints.checkpoint_dir(workdir))
  try:
    steps = manager.all_steps()
    if not steps:
      raise config_io.ConfigError(
          f'{what}: no checkpoint in {checkpoints.checkpoint_dir(workdir)}')
    if step is not None and step not in steps:
      raise config_io.ConfigError(f'{choose}={step}: no such checkpoint in '
                                  f'{checkpoints.checkpoint_dir(workdir)} (have {sorted(steps)})')
    # Only the student params are read: the teacher and the optimizer moments (three more
    # copies of the network) stay on disk.
    params, step = checkpoints.restore_params(
        manager, abstract_params(pixssl_model(config), config), step, choose=choose,
        advice='re-run the pre-training (in a fresh workdir, or after deleting the damaged '
               'step folders)')
  finally:
    manager.close()
  return jax.device_get(params), step, config


def restore_segmentation_params(workdir: str, config: ml_collections.ConfigDict,
                                model: segmentation.SegmentationModel, which='best', *,
                                field: str = 'config.eval.checkpoint',
                                device: jax.Device | None = None,
                                **choose_kwargs) -> tuple[Any, int]:
  """A fine-tuning run's params at `which` ('best', 'last', a step) on one device, and the step.

  A named step does not fall back: scoring another checkpoint than asked would mislead.
  """
  # Read-only: neither creates, cleans nor deletes checkpoints.
  manager = checkpoints.open_reader(checkpoints.checkpoint_dir(workdir))
  try:
    step = checkpoints.choose_step(manager, which, field=field, **choose_kwargs)
    params, _ = checkpoints.restore_params(manager, abstract_params(model, config), step,
                                           device=device, choose=f'--{field}=STEP')
  finally:
    manager.close()
  return params, step
