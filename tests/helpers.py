"""Shared test helpers: loading config presets and random pre-training batches."""

import json
import pathlib

import numpy as np

from pixssl_jax import config_files

REPO = pathlib.Path(__file__).resolve().parents[1]


def load_config(preset: str):
  return config_files.load('pretrain', preset)


def random_batch(config, seed=0):
  """Random views related by a known shift and an x-flip (what the loss needs to match)."""
  rng = np.random.default_rng(seed)
  patch = tuple(config.data.patch_size)
  n, b = len(patch), config.batch_size
  views = rng.uniform(size=(2, b, *patch, 1)).astype(np.float32)
  t1 = np.tile(np.concatenate([np.eye(n), np.zeros((n, 1))], 1), (b, 1, 1))
  t2 = t1.copy()
  t2[:, 0, 0] = -1.0  # View 2 is flipped along x and shifted relative to view 1.
  t2[:, 0, n] = patch[0] - 1 + 3.0
  t2[:, 1, n] = -2.0
  return dict(view1=views[0], view2=views[1], transform1=t1.astype(np.float32),
              transform2=t2.astype(np.float32))


def logged_steps(workdir):
  """Steps logged in `workdir/metrics.jsonl` so far (a line still being written is skipped)."""
  path = workdir / 'metrics.jsonl'
  if not path.exists():
    return []
  return [json.loads(l)['step'] for l in path.read_text().splitlines() if l.endswith('}')]


def damage(step_dir, how):
  """Damages a saved step the ways a full disk, a crash or a bad copy do."""
  state = step_dir / 'state'
  if how == 'truncated_data':  # Every array data file cut to half its length.
    for path in state.rglob('d/*'):
      path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])
  elif how == 'missing_manifest':
    (state / 'manifest.ocdbt').unlink()
  elif how == 'empty_metadata':
    (state / '_METADATA').write_text('')
  else:
    raise ValueError(how)
