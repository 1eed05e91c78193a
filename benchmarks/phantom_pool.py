"""A phantom store with a pool of label-free volumes beside the benchmark's labelled cases.

  python benchmarks/phantom_pool.py --unlabelled 400 [--labelled 40] [--family clinical]

Phantom case i does not depend on how many cases are generated (`phantoms.generate_dataset`),
so generating `labelled + unlabelled` cases and moving the last `unlabelled` images to
`imagesTs/` (their labels deleted) gives the same labelled cases as the benchmark's own store,
hence the same seeded train/val/test splits, plus label-free volumes that `prepare` sends to
the `pretrain` split only: val and test stay outside pre-training. Built once under
`$PIXSSL_CACHE` (or ~/.cache/pixssl_jax) in a temporary folder renamed into place; prints the
generation and preparation times and the disk use.
"""

import argparse
import json
import os
import pathlib
import shutil
import sys
import time
import uuid

# Runnable as `python benchmarks/phantom_pool.py` from anywhere, without PYTHONPATH.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from pixssl_jax.data import case_store  # noqa: E402
from pixssl_jax.data import default_dataset  # noqa: E402
from pixssl_jax.data import phantoms  # noqa: E402
from pixssl_jax.data import prepare  # noqa: E402


def pool_store_dir(labelled: int, unlabelled: int, family: str, seed: int,
                   spacing, cache_root=None) -> pathlib.Path:
  """Where the store for these settings lives (its `store/` subfolder is the store)."""
  base = pathlib.Path(default_dataset.phantom_store_dir(
      cache_root, labelled, seed, 1.0, spacing, family))
  return base.with_name(f'{base.name}-pool{unlabelled}')


def _disk_bytes(path: pathlib.Path) -> int:
  return sum(p.stat().st_size for p in path.rglob('*') if p.is_file())


def _move_to_unlabelled(raw: pathlib.Path, labelled: int) -> int:
  """Moves cases `labelled..` to `imagesTs/` without labels; returns how many moved."""
  meta = json.loads((raw / 'dataset.json').read_text())
  keep, move = meta['training'][:labelled], meta['training'][labelled:]
  (raw / 'imagesTs').mkdir()
  for entry in move:
    image = raw / entry['image']
    image.rename(raw / 'imagesTs' / image.name)
    (raw / entry['label']).unlink()
  meta.update(training=keep, numTraining=len(keep),
              test=[f'./imagesTs/{(raw / e["image"]).name}' for e in move], numTest=len(move))
  (raw / 'dataset.json').write_text(json.dumps(meta, indent=1))
  return len(move)


def ensure_pool_store(labelled: int = 40, unlabelled: int = 400, family: str = 'clinical',
                      seed: int = 0, spacing=(3.0, 3.0, 4.0), cache_root=None) -> str:
  """Returns the path of the pooled store, building it on first use."""
  final = pool_store_dir(labelled, unlabelled, family, seed, spacing, cache_root)
  store = final / 'store'
  if (store / 'store.json').exists():
    return str(store)
  tmp = final.with_name(f'.{final.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}')
  try:
    start = time.perf_counter()
    print(f'Generating {labelled} labelled + {unlabelled} label-free {family} phantoms...',
          flush=True)
    raw = phantoms.generate_dataset(tmp / 'raw', labelled + unlabelled, seed=seed,
                                    family=family)
    generated = time.perf_counter() - start
    _move_to_unlabelled(raw, labelled)
    summary = prepare.prepare_dataset(str(raw), str(tmp / 'store'), seed=seed,
                                      spacing=spacing, strict=True, verbose=False)
    prepared = time.perf_counter() - start - generated
    print(f'Generated in {generated:.0f} s, prepared {len(summary.written)} cases in '
          f'{prepared:.0f} s; raw {_disk_bytes(tmp / "raw") / 1e9:.2f} GB, store '
          f'{_disk_bytes(tmp / "store") / 1e9:.2f} GB', flush=True)
    tmp.rename(final)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  return str(store)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--labelled', type=int, default=40)
  parser.add_argument('--unlabelled', type=int, default=400)
  parser.add_argument('--family', default='clinical', choices=sorted(
      default_dataset.PHANTOM_FAMILIES))
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--spacing', default='3,3,4', help='store grid in mm (x,y,z)')
  args = parser.parse_args(argv)
  spacing = tuple(float(v) for v in args.spacing.split(','))
  store = ensure_pool_store(args.labelled, args.unlabelled, args.family, args.seed, spacing)
  opened = case_store.CaseStore(store)
  print(f'{store}: pretrain {len(opened.split("pretrain"))} volumes, train_100 '
        f'{len(opened.split("train_100"))}, val {len(opened.split("val"))}, test '
        f'{len(opened.split("test"))}')


if __name__ == '__main__':
  main()
