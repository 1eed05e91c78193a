"""The default dataset: synthetic CT phantoms, generated and prepared once, then reused.

`ensure_phantom_store()` returns the path of a prepared store under
`CACHE_ROOT/phantoms-v2-n{num_cases}-s{seed}[-x{scale}][-sp{spacing}]/store` (`CACHE_ROOT` is
`$PIXSSL_CACHE` or `~/.cache/pixssl_jax`) for the 'basic' phantom family, and under
`CACHE_ROOT/phantoms-{family}-{version}-n...` for another family (`PHANTOM_FAMILIES`). The first
call generates the phantoms (`phantoms.generate_dataset`) into `raw/` beside it and runs
`prepare_dataset`, all inside a private temporary folder that is renamed into place at the end.
Two processes starting at once both build; the first rename wins and the other discards its
copy and uses the winner's.
"""
import os
import shutil
import time
import uuid

from pixssl_jax.data import case_store
from pixssl_jax.data import prepare

# Bump when the phantom generator or the preprocessing changes what a store contains (v2: the
# `pretrain` split leaves out the val and test cases).
PHANTOM_VERSION = 'v2'
# Frozen generator version of each phantom family; it names the family's stores, so a cached
# store is never reused for what another generator version would write.
# Equal to `phantoms_clinical.GENERATOR_VERSION` (a test checks it), written out so that
# opening an existing store never imports the generator.
PHANTOM_FAMILIES = {'basic': PHANTOM_VERSION, 'clinical': 'v1'}
# The store grid of `prepare_dataset`'s default, in mm (x, y, z).
DEFAULT_SPACING = (1.5, 1.5, 2.0)


def phantom_store_dir(cache_root=None, num_cases: int = 24, seed: int = 0,
                      shape_scale: float = 1.0, spacing=DEFAULT_SPACING,
                      family: str = 'basic') -> str:
  """Folder holding `raw/` and `store/` for these phantom settings."""
  if family not in PHANTOM_FAMILIES:
    raise ValueError(f'phantom family must be one of {sorted(PHANTOM_FAMILIES)}, got {family!r}')
  root = os.fspath(cache_root) if cache_root is not None else case_store.default_cache_root()
  # The basic family's stores are named by the version alone, as they always were.
  prefix = '' if family == 'basic' else f'{family}-'
  name = f'phantoms-{prefix}{PHANTOM_FAMILIES[family]}-n{num_cases}-s{seed}'
  if shape_scale != 1.0:
    name += f'-x{shape_scale:g}'
  if tuple(float(v) for v in spacing) != DEFAULT_SPACING:
    name += '-sp' + '_'.join(f'{float(v):g}' for v in spacing)
  return os.path.join(os.path.abspath(root), name)


def ensure_phantom_store(cache_root=None, num_cases: int = 24, seed: int = 0,
                         shape_scale: float = 1.0, verbose: bool = True,
                         spacing=DEFAULT_SPACING, family: str = 'basic') -> str:
  """Returns a prepared phantom store, generating and preparing it on first use.

  Args:
    cache_root: folder for generated datasets; None -> `$PIXSSL_CACHE` or
      `~/.cache/pixssl_jax`.
    num_cases: number of phantom cases.
    seed: seed of the phantom generator and of the splits.
    shape_scale: phantom volume size factor (1.0 is the generator's default size).
    verbose: print short progress lines.
    spacing: the store grid in mm (x, y, z); coarser grids make smaller volumes (the benchmark
      and the tiny test presets use them to keep whole-volume inference cheap).
    family: phantom family, 'basic' or 'clinical' (`phantoms.FAMILIES`).

  Returns:
    Path of the store folder (open it with `CaseStore`).
  """
  final = phantom_store_dir(cache_root, num_cases, seed, shape_scale, spacing, family)
  store = os.path.join(final, 'store')
  if os.path.exists(os.path.join(store, 'store.json')):
    return store
  # Imported here so that opening an existing store never imports the generator.
  from pixssl_jax.data import phantoms  # pylint: disable=g-import-not-at-top

  parent = os.path.dirname(final)
  os.makedirs(parent, exist_ok=True)
  tmp = os.path.join(parent, f'.{os.path.basename(final)}.tmp-{os.getpid()}-'
                             f'{uuid.uuid4().hex[:8]}')
  start = time.time()
  try:
    if verbose:
      print(f'pixssl_jax: generating {num_cases} {family} phantom CT cases (seed {seed}) into '
            f'{final} (first use only, about a minute)...', flush=True)
    raw = phantoms.generate_dataset(os.path.join(tmp, 'raw'), num_cases, seed=seed,
                                    shape_scale=shape_scale, family=family)
    if verbose:
      print(f'pixssl_jax: generated in {time.time() - start:.0f} s; preparing the store...',
            flush=True)
    summary = prepare.prepare_dataset(raw, os.path.join(tmp, 'store'), seed=seed,
                                      spacing=spacing, strict=True, verbose=False)
    try:
      os.rename(tmp, final)
    except OSError:
      # Another process finished first (rename onto a non-empty folder fails); use its store.
      if not os.path.exists(os.path.join(store, 'store.json')):
        raise
      if verbose:
        print(f'pixssl_jax: another process built {final} first; using it', flush=True)
      return store
    if verbose:
      print(f'pixssl_jax: phantom store ready ({len(summary.written)} cases, '
            f'{time.time() - start:.0f} s): {store}', flush=True)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  return store
