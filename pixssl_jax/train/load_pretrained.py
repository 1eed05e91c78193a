"""Strict loading of a pre-trained student U-Net into the segmentation network.

The pre-training workdir holds `config.json` and Orbax checkpoints of the whole pre-training
state. The student's params are restored onto an abstract target built from that config
(`rundir.networks`; Orbax needs one to restore on any topology), and the student's `backbone`
subtree is copied into the segmentation params by path. Loading is strict: every parameter of the chosen part (encoder, or encoder and
decoder) must exist on both sides with the same shape, unless the config names it in
`skip_params`; the run stops with every problem listed by name otherwise. The pre-training
heads (projector, predictor, pixel projector, stabilizer) are not part of the backbone and are
left behind on purpose.
"""

import re
from collections.abc import Mapping, Sequence
from typing import Any

import ml_collections
import numpy as np
from flax import traverse_util

from pixssl_jax.rundir import config_io
from pixssl_jax.rundir import networks

# Which U-Net modules each `init` part loads: encoder levels are enc<l>; the decoder is the
# transposed convolutions up<l> and the blocks dec<l>.
PARTS = {
    'encoder': re.compile(r'^backbone/enc\d+/'),
    'encoder_decoder': re.compile(r'^backbone/(enc|dec|up)\d+/'),
}


def read_pretrain_config(workdir: str) -> ml_collections.ConfigDict:
  """The `config.json` a pre-training run wrote into `workdir`, upgraded to today's fields."""
  return config_io.read_config(workdir, modes=('pretrain',), what='config.pretrained_workdir')


def restore_student_params(workdir: str, step: int | None = None) -> tuple[Any, int]:
  """The student params of a pre-training checkpoint, as host numpy arrays, and its step.

  Args:
    workdir: a pre-training workdir.
    step: the checkpoint step, restored or a ConfigError; None takes the latest that restores
      (a newer one that does not is named in a warning line on stderr and left in place).
  """
  params, step, _ = networks.restore_student_params(workdir, step)
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
    raise config_io.ConfigError(
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
    raise config_io.ConfigError(
        f'cannot load the pre-trained {part} strictly ({len(problems)} problem(s)):\n  '
        + '\n  '.join(problems)
        + '\nMatch config.model to the pre-training run, or list what to leave at random '
        "initialisation in config.skip_params (e.g. --config.skip_params=\"('backbone/dec0',)\").")
  flat = _flat(target)
  for k, v in have.items():
    flat[k] = np.asarray(v, np.asarray(flat[k]).dtype)
  params = traverse_util.unflatten_dict({tuple(k.split('/')): v for k, v in flat.items()})
  return params, sorted(have)
