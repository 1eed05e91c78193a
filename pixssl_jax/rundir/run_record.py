"""What a fine-tuning run records for prediction: the store's preprocessing and its classes.

Fine-tuning writes `WORKDIR/run.json` beside `config.json`:

    {"format_version": 1,
     "preprocessing": {"orientation": "RAS", "spacing": [1.5, 1.5, 2.0],
                       "hu_window": [-175.0, 250.0]},
     "label_names": {"0": "background", "1": "liver", ...},
     "num_classes": 7,
     "data_dir": "/path/to/the/store"}

With it and `config.json` a run is self-contained: prediction reads neither the store nor the
raw data. A run fine-tuned before the file existed is described from its store instead, which
must then still be where `config.json` says.
"""

from collections.abc import Mapping

import ml_collections
from etils import epath

from pixssl_jax.data import case_store
from pixssl_jax.rundir import config_io

RECORD_FILE = 'run.json'
FORMAT_VERSION = 1
# The orientation `prepare` gives every stored volume (nibabel's closest canonical, docs/design.md).
ORIENTATION = 'RAS'


def describe(store: case_store.CaseStore) -> dict:
  """The record of a fine-tuning run on `store` (see the module docstring)."""
  names = store.label_names
  return {
      'format_version': FORMAT_VERSION,
      'preprocessing': {'orientation': ORIENTATION, 'spacing': list(store.spacing),
                        'hu_window': list(store.hu_window)},
      'label_names': {str(k): v for k, v in sorted(names.items())},
      'num_classes': len(names),
      'data_dir': store.data_dir,
  }


def write(workdir: str, store: case_store.CaseStore) -> None:
  """Writes `WORKDIR/run.json` for `store` (temp name, then rename)."""
  config_io.write_json(epath.Path(workdir) / RECORD_FILE, describe(store))


def _checked(record: Mapping, path) -> dict:
  try:
    prep = record['preprocessing']
    spacing = [float(s) for s in prep['spacing']]
    window = [float(h) for h in prep['hu_window']]
    names = {int(k): str(v) for k, v in record['label_names'].items()}
    orientation = prep['orientation']
  except (KeyError, TypeError, ValueError, AttributeError) as e:
    raise config_io.ConfigError(f'{path}: not a run record ({type(e).__name__}: {e})') from None
  if orientation != ORIENTATION or len(spacing) != 3 or min(spacing) <= 0 or len(window) != 2:
    raise config_io.ConfigError(f'{path}: preprocessing {dict(prep)} is not RAS with 3 '
                                'positive spacings and a (low, high) HU window')
  return {'spacing': tuple(spacing), 'hu_window': tuple(window), 'label_names': names,
          'num_classes': len(names), 'orientation': orientation}


def read(workdir: str, config: ml_collections.ConfigDict) -> dict:
  """The run's record as `{spacing, hu_window, label_names, num_classes, orientation}`.

  Args:
    workdir: a fine-tuning run.
    config: its config (from `config_io.read_config`), for runs without `run.json`.

  Raises:
    ConfigError: the record does not read, or (no record) the run's store is gone.
  """
  import json  # pylint: disable=g-import-not-at-top
  path = epath.Path(workdir) / RECORD_FILE
  if path.exists():
    try:
      return _checked(json.loads(path.read_text()), path)
    except json.JSONDecodeError as e:
      raise config_io.ConfigError(f'{path}: not valid JSON ({e})') from None
  data_dir = config_io.resolve_data_dir(config.data)
  if not (epath.Path(data_dir) / 'store.json').exists():
    raise config_io.ConfigError(
        f'{workdir}: no {RECORD_FILE} and its store {data_dir} is gone; the preprocessing '
        'and the class names of the run are unknown')
  return _checked(describe(case_store.CaseStore(data_dir)), data_dir)
