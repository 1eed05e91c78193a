"""Strict loading of a pre-trained student U-Net into the segmentation network.

The pre-training workdir holds `config.json` and Orbax checkpoints of the whole pre-training
state. The state is restored onto an abstract target built from that config (Orbax needs one to
restore on any topology), and the student's `backbone` subtree is copied into the segmentation
params by path. Loading is strict: every parameter of the chosen part (encoder, or encoder and
decoder) must exist on both sides with the same shape, unless the config names it in
`skip_params`; the run stops with every problem listed by name otherwise. The pre-training
heads (projector, predictor, pixel projector, stabilizer) are not part of the backbone and are
left behind on purpose.
"""

import json
import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from flax import traverse_util

from pixssl_jax.models import pixssl
from pixssl_jax.train import checkpointing
from pixssl_jax.train import config_checks
from pixssl_jax.train import config_upgrade
from pixssl_jax.train import mesh as mesh_lib
from pixssl_jax.train import optimizers
from pixssl_jax.train import pretrain

# Which U-Net modules each `init` part loads: encoder levels are enc<l>; the decoder is the
# transposed convolutions up<l> and the blocks dec<l>.
PARTS = {
    'encoder': re.compile(r'^backbone/enc\d+/'),
    'encoder_decoder': re.compile(r'^backbone/(enc|dec|up)\d+/'),
}


def read_pretrain_config(workdir: str) -> ml_collections.ConfigDict:
  """The `config.json` a pre-training run wrote into `workdir`."""
  path = epath.Path(workdir) / 'config.json'
  try:
    config = ml_collections.ConfigDict(json.loads(path.read_text()))
  except FileNotFoundError:
    raise config_checks.ConfigError(
        f'config.pretrained_workdir: {path} does not exist; is {workdir} a pre-training '
        'workdir (python -m pixssl_jax.main --config configs/pretrain.py:...)?') from None
  except json.JSONDecodeError as e:
    raise config_checks.ConfigError(f'{path}: not valid JSON ({e})') from None
  if config.get('mode') != 'pretrain':
    raise config_checks.ConfigError(
        f"config.pretrained_workdir: {path} is from a {config.get('mode')!r} run, not "
        "'pretrain'")
  return config_upgrade.upgrade(config)


def restore_student_params(workdir: str, step: int | None = None) -> tuple[Any, int]:
  """The student params of a pre-training checkpoint, as host numpy arrays, and its step.

  Args:
    workdir: a pre-training workdir.
    step: the checkpoint step, restored or a ConfigError; None takes the latest that restores
      (a newer one that does not is named in a warning line on stderr and left in place).
  """
  config = read_pretrain_config(workdir)
  ckpt_dir = checkpointing.checkpoint_dir(workdir)
  # Read-only: another run's checkpoints; nothing there is created, cleaned, moved or deleted.
  manager = checkpointing.open_reader(ckpt_dir)
  steps = manager.all_steps()
  if not steps:
    raise config_checks.ConfigError(f'config.pretrained_workdir: no checkpoint in {ckpt_dir}')
  if step is not None and step not in steps:
    raise config_checks.ConfigError(
        f'config.pretrained_step={step}: no such checkpoint in {ckpt_dir} (have {sorted(steps)})')
  model = pixssl.build_model(config.model, config.data.ndim)
  tx = optimizers.make_optimizer(config.optim, config.num_steps)
  mesh = mesh_lib.make_data_mesh()
  # Only the student params are read: the teacher and the optimizer moments (three more copies
  # of the network) stay on disk. The same on-disk format as StandardSave, restored partially.
  target = {'params': pretrain.abstract_train_state(model, tx, config, mesh).params}

  def restore(s):
    restored = manager.restore(s, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
        item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
        partial_restore=True)))
    return jax.device_get(restored['state']['params'])

  try:
    if step is None:  # The latest that restores, with a warning for each newer one.
      params, step = checkpointing.newest_restorable(
          manager, restore, set_aside=False,
          advice='re-run the pre-training (in a fresh workdir, or after deleting the '
                 'damaged step folders)')
    else:  # Exactly the step asked for.
      params = checkpointing.restore_exact(manager, restore, step,
                                           choose='--config.pretrained_step')
  finally:
    manager.close()
  return params, step


def _flat(tree: Mapping) -> dict[str, Any]:
  return {'/'.join(k): v for k, v in traverse_util.flatten_dict(dict(tree)).items()}


def _skipped(name: str, skip: Sequence[str]) -> bool:
  return any(name == s or name.startswith(s.rstrip('/') + '/') for s in skip)


def merge_backbone(target: Mapping, source: Mapping, *, part: str,
                   skip: Sequence[str] = ()) -> tuple[Any, list[str]]:
  """Copies the `part` of `source['backbone']` into `target`, strictly.

  Args:
    target: the segmentation params (`{'backbone': ..., 'seg_head': ...}`), freshly initialised.
    source: pre-training student params (`{'backbone': ..., 'projector': ..., ...}`).
    part: 'encoder' or 'encoder_decoder'.
    skip: parameter paths or path prefixes (`'backbone/dec0'`, `'backbone/enc0/conv0/kernel'`)
      that keep their fresh initialisation and are not checked.

  Returns:
    (params, loaded names): `target` with the loaded leaves replaced.

  Raises:
    ConfigError: listing every missing, unexpected and mis-shaped parameter by name.
  """
  if part not in PARTS:
    raise config_checks.ConfigError(
        f'config.load={part!r}: choose one of {sorted(PARTS)}')
  pattern = PARTS[part]
  want = {k: v for k, v in _flat(target).items() if pattern.match(k) and not _skipped(k, skip)}
  have = {k: v for k, v in _flat(source).items() if pattern.match(k) and not _skipped(k, skip)}
  problems = [f'missing in the checkpoint: {k} {tuple(np.shape(want[k]))}'
              for k in sorted(set(want) - set(have))]
  problems += [f'unexpected (in the checkpoint, not in the model): {k} '
               f'{tuple(np.shape(have[k]))}' for k in sorted(set(have) - set(want))]
  problems += [f'shape mismatch: {k} checkpoint {tuple(np.shape(have[k]))} vs model '
               f'{tuple(np.shape(want[k]))}' for k in sorted(set(want) & set(have))
               if np.shape(want[k]) != np.shape(have[k])]
  if problems:
    raise config_checks.ConfigError(
        f'cannot load the pre-trained {part} strictly ({len(problems)} problem(s)):\n  '
        + '\n  '.join(problems)
        + '\nMatch config.model to the pre-training run, or list what to leave at random '
        "initialisation in config.skip_params (e.g. --config.skip_params=\"('backbone/dec0',)\").")
  flat = _flat(target)
  for k, v in have.items():
    flat[k] = np.asarray(v, np.asarray(flat[k]).dtype)
  params = traverse_util.unflatten_dict({tuple(k.split('/')): v for k, v in flat.items()})
  return params, sorted(have)
