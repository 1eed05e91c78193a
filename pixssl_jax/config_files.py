"""The config files (`configs/<name>.py`) and their presets, wherever the package lives.

In a clone they are the repository's `configs/`; an installed package ships the same files as
`pixssl_jax/configs/` (pyproject.toml), so `--config configs/pretrain.py:demo` also works from
any directory: a `--config` path that does not exist there is looked up by its file name among
these (`resolve`). `python -m pixssl_jax.main --config ...` loads them through
`pixssl_jax.config_loading`; tests, benchmarks and notebooks use `load`.
"""

import importlib.util
import os
import pathlib
import types

import ml_collections

_HERE = pathlib.Path(__file__).resolve().parent
NAMES = ('pretrain', 'finetune')
# The fields both config files share (`shared_fields`), beside them; not a config.
SHARED = 'common'


def config_dir() -> pathlib.Path:
  """The repository's `configs/` in a clone, else the copy installed inside the package."""
  for folder in (_HERE.parent / 'configs', _HERE / 'configs'):
    if (folder / 'pretrain.py').is_file():
      return folder
  raise FileNotFoundError(f'no configs/ folder beside {_HERE} nor inside it: reinstall '
                          'pixssl_jax (pip install .)')


CONFIG_DIR = config_dir()


def resolve(path: str) -> str:
  """`path` if it is a file, else the shipped config file of the same name, else `path`.

  'configs/pretrain.py', 'pretrain.py' and 'pretrain' all name the shipped pre-training
  config when no such file exists in the current directory.
  """
  if os.path.isfile(path):
    return path
  name = os.path.basename(path)
  name = name[:-3] if name.endswith('.py') else name
  shipped = CONFIG_DIR / f'{name}.py'
  return str(shipped) if name in NAMES and shipped.is_file() else path


def exec_file(path: str | os.PathLike) -> types.ModuleType:
  """The Python file at `path`, executed as a module of its own.

  Config files are loaded by path, not imported (a user's copy may live anywhere), so a config
  file reaches the fields it shares with its sibling through `shared_fields(__file__)`.
  """
  path = pathlib.Path(path)
  spec = importlib.util.spec_from_file_location(f'pixssl_jax_config_{path.stem}', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def shared_fields(config_file: str) -> types.ModuleType:
  """The `common.py` beside `config_file`: the blocks both config files share."""
  return exec_file(pathlib.Path(config_file).with_name(f'{SHARED}.py'))


def load(name: str, preset: str | None = None) -> ml_collections.ConfigDict:
  """`configs/{name}.py`'s `get_config(preset)`, e.g. `load('finetune', 'tiny')`."""
  path = CONFIG_DIR / f'{name}.py'
  if not path.exists():
    raise FileNotFoundError(f'{path}: no such config file')
  return exec_file(path).get_config(preset)
