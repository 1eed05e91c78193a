"""Loads a preset from the repository's `configs/<name>.py` as a ConfigDict.

`python -m pixssl_jax.main --config configs/NAME.py:PRESET` does this through
ml_collections' flags; tests, benchmarks and notebooks use this function instead.
"""

import importlib.util
import pathlib

import ml_collections

CONFIG_DIR = pathlib.Path(__file__).resolve().parents[1] / 'configs'


def load(name: str, preset: str | None = None) -> ml_collections.ConfigDict:
  """`configs/{name}.py`'s `get_config(preset)`, e.g. `load('finetune', 'tiny')`."""
  path = CONFIG_DIR / f'{name}.py'
  if not path.exists():
    raise FileNotFoundError(f'{path}: no such config file')
  spec = importlib.util.spec_from_file_location(f'{name}_config', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(preset)
