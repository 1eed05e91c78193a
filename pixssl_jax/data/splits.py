"""Seeded experiment splits of a store, written to `STORE/splits.json`.

- `pretrain`: the cases pre-training may see: `train_100` plus every unlabelled case, so no
  `val` or `test` image is seen before evaluation. With `transductive=True`, every case, for
  protocols that pre-train on every available scan (pre-training never reads labels).
- `val`, `test`: disjoint random subsets of the labelled cases.
- `train_100`: the remaining labelled cases.
- `train_10`: a seeded random 10% of `train_100` (at least one case).

The splits depend only on the seed, the fractions and the set of case ids (not on the order
in which cases were found), so re-preparing the same data gives the same splits.
"""
import json
from collections.abc import Iterable, Mapping

from etils import epath
import numpy as np

SPLIT_NAMES = ('pretrain', 'train_100', 'train_10', 'val', 'test')


def check_fractions(val_fraction: float, test_fraction: float,
                    train_subset_fraction: float = 0.1) -> None:
  """Raises ValueError naming the first fraction that is out of range."""
  for name, frac in (('val_fraction', val_fraction), ('test_fraction', test_fraction),
                     ('train_subset_fraction', train_subset_fraction)):
    if not 0.0 <= frac < 1.0:
      raise ValueError(f'{name} must be in [0, 1), got {frac}')
  if val_fraction + test_fraction >= 1.0:
    raise ValueError(f'val_fraction + test_fraction must be < 1, got '
                     f'{val_fraction} + {test_fraction}')


def make_splits(all_ids: Iterable[str], labelled_ids: Iterable[str], *, seed: int = 0,
                val_fraction: float = 0.2, test_fraction: float = 0.2,
                train_subset_fraction: float = 0.1,
                transductive: bool = False) -> dict[str, list[str]]:
  """Computes the splits.

  Args:
    all_ids: every case id in the store.
    labelled_ids: the ids that have a label (a subset of `all_ids`).
    seed: seed of the permutations.
    val_fraction: fraction of labelled cases for `val` (rounded; at least one when the
      fraction is positive and at least 3 labelled cases exist).
    test_fraction: the same for `test`.
    train_subset_fraction: fraction of `train_100` that forms `train_10`.
    transductive: `pretrain` holds every case, `val` and `test` included; by default it
      leaves them out.

  Returns:
    {split name: sorted list of case ids} for every name in `SPLIT_NAMES`.
  """
  all_ids = sorted(set(all_ids))
  labelled = sorted(set(labelled_ids))
  missing = set(labelled) - set(all_ids)
  if missing:
    raise ValueError(f'labelled ids not in the store: {sorted(missing)[:5]}')
  check_fractions(val_fraction, test_fraction, train_subset_fraction)

  n = len(labelled)
  n_val = int(round(val_fraction * n))
  n_test = int(round(test_fraction * n))
  if n >= 3:
    # Tiny datasets still get one case in every split that was asked for.
    n_val = max(n_val, 1 if val_fraction > 0 else 0)
    n_test = max(n_test, 1 if test_fraction > 0 else 0)
  # Training keeps at least one case whenever there is a labelled case at all.
  while n_val + n_test > max(n - 1, 0):
    if n_test >= n_val and n_test > 0:
      n_test -= 1
    else:
      n_val -= 1

  rng = np.random.default_rng(seed)
  order = [labelled[i] for i in rng.permutation(n)]
  val = order[:n_val]
  test = order[n_val:n_val + n_test]
  train_100 = order[n_val + n_test:]
  n_sub = max(1, int(round(train_subset_fraction * len(train_100)))) if train_100 else 0
  # A second, independent draw so train_10 is not just a prefix of the val/test permutation.
  sub_rng = np.random.default_rng([seed, 10])
  train_10 = [train_100[i] for i in sub_rng.permutation(len(train_100))[:n_sub]]
  held_out = set(val) | set(test)
  return {
      'pretrain': all_ids if transductive else [c for c in all_ids if c not in held_out],
      'train_100': sorted(train_100),
      'train_10': sorted(train_10),
      'val': sorted(val),
      'test': sorted(test),
  }


def write_splits(path: epath.PathLike, splits: Mapping[str, list[str]], **provenance) -> None:
  """Writes `splits.json` with the splits and how they were made (seed, fractions, ...)."""
  payload = {'splits': {k: list(v) for k, v in splits.items()}, **provenance}
  epath.Path(path).write_text(json.dumps(payload, indent=1))


def read_splits(path: epath.PathLike) -> dict[str, list[str]]:
  """Reads the `{name: case ids}` mapping from a `splits.json`."""
  path = epath.Path(path)
  try:
    payload = json.loads(path.read_text())
    return {k: list(v) for k, v in payload['splits'].items()}
  except FileNotFoundError as e:
    raise FileNotFoundError(f'{path}: splits file is missing; was the store made by '
                            'pixssl_jax.data.prepare?') from e
  except (KeyError, TypeError, json.JSONDecodeError) as e:
    raise ValueError(f'{path}: not a valid splits file ({e})') from e
