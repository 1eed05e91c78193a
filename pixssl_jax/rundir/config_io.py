"""A run's `config.json` (written at its start, read back by every later job) and overrides.

`config.json` is the config file plus the command-line overrides of the run that wrote it.
Jobs that read a run (evaluation, prediction, export, a fine-tuning from it) start from that
record, upgraded to today's fields (`config_upgrade`), and apply only what the user states.
"""

import json
from collections.abc import Mapping, Sequence
from typing import Any

import ml_collections
from etils import epath

from pixssl_jax.data import default_dataset
from pixssl_jax.data import splits as splits_lib
from pixssl_jax.rundir import config_upgrade
from pixssl_jax.rundir.config_fields import MISSING
from pixssl_jax.rundir.config_fields import field_at

CONFIG_FILE = 'config.json'


class ConfigError(ValueError):
  """The config or the workdir cannot run; the message lists every problem found."""


def write_config(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Saves the run's full config as `config.json` (temp name, then rename)."""
  write_json(epath.Path(workdir) / CONFIG_FILE,
             json.loads(config.to_json_best_effort()))


def write_json(path: epath.Path, payload: Mapping) -> None:
  """`payload` as indented JSON at `path`, under a temporary name first, then renamed."""
  path = epath.Path(path)
  tmp = path.parent / f'.{path.name}.tmp'
  tmp.write_text(json.dumps(payload, indent=2, sort_keys=True))
  tmp.replace(path)


def read_config(workdir, *, modes: Sequence[str] | None = None,
                what: str = '--workdir') -> ml_collections.ConfigDict:
  """The config a run wrote into `workdir`, upgraded to today's fields.

  Args:
    workdir: the run directory.
    modes: the `mode`s accepted (e.g. ('pretrain',)); None accepts any.
    what: how the user named the workdir, for errors (a flag or a config field).

  Raises:
    ConfigError: no such workdir or `config.json`, invalid JSON, or another mode.
  """
  path = epath.Path(workdir) / CONFIG_FILE
  if not epath.Path(workdir).exists():
    raise ConfigError(f'{what} {workdir}: no such run directory')
  try:
    config = ml_collections.ConfigDict(json.loads(path.read_text()))
  except FileNotFoundError:
    raise ConfigError(f'{what} {workdir}: no {CONFIG_FILE}; is it a pixssl_jax workdir? '
                      '(python -m pixssl_jax.main writes it when a run starts)') from None
  except json.JSONDecodeError as e:
    raise ConfigError(f'{path}: not valid JSON ({e})') from None
  if modes is not None and config.get('mode') not in modes:
    raise ConfigError(f"{what} {workdir}: {path} is from a {config.get('mode')!r} run, "
                      f'not {" or ".join(repr(m) for m in modes)}')
  return config_upgrade.upgrade(config)


def resolve_data_dir(data_cfg: ml_collections.ConfigDict) -> str:
  """The prepared store to read: the configured one, or the embedded phantom dataset."""
  if data_cfg.data_dir:
    return data_cfg.data_dir
  return default_dataset.ensure_phantom_store(
      cache_root=data_cfg.cache_dir, num_cases=data_cfg.num_phantoms,
      seed=data_cfg.phantom_seed, shape_scale=data_cfg.phantom_shape_scale,
      spacing=tuple(data_cfg.phantom_spacing), family=data_cfg.phantom_family)


def flat_fields(config: ml_collections.ConfigDict | Mapping, prefix: str = '') -> dict:
  """`{'a.b': value}` for every leaf field of `config`."""
  out = {}
  for key, value in config.items():
    name = f'{prefix}{key}'
    if isinstance(value, (ml_collections.ConfigDict, dict)):
      out.update(flat_fields(value, name + '.'))
    else:
      out[name] = value
  return out


def _same(a, b) -> bool:
  norm = lambda v: list(v) if isinstance(v, tuple) else v
  return norm(a) == norm(b)


def stated_fields(config: ml_collections.ConfigDict,
                  defaults: ml_collections.ConfigDict | None) -> dict:
  """The fields of `config` that differ from `defaults`: what its command line stated.

  A config is its preset plus the command-line overrides, so comparing it with the preset
  alone finds the overrides (an override equal to the preset's value is not seen, and needs
  no carrying). `defaults` None (a config from no known preset) states every field.
  """
  fields = flat_fields(config)
  if defaults is None:
    return fields
  base = flat_fields(defaults)
  return {k: v for k, v in fields.items() if k not in base or not _same(v, base[k])}


def apply_overrides(config: ml_collections.ConfigDict, overrides: Mapping[str, Any],
                    ) -> ml_collections.ConfigDict:
  """An unlocked copy of `config` with each dotted field of `overrides` set.

  Raises:
    ConfigError: an override names a field the config does not have.
  """
  config = ml_collections.ConfigDict(config.to_dict())
  unknown = [k for k in overrides if field_at(config, k) is MISSING]
  if unknown:
    raise ConfigError(f'unknown config field(s) {unknown} for this run (see --list)')
  for path, value in overrides.items():
    *parents, leaf = path.split('.')
    node = config
    for name in parents:
      node = node[name]
    old = node[leaf]
    if isinstance(old, list) and isinstance(value, tuple):
      value = list(value)
    try:
      node[leaf] = value
    except TypeError as e:
      raise ConfigError(f'config.{path}={value!r}: {e}') from None
  return config


def eval_problems(config: ml_collections.ConfigDict) -> list[str]:
  """One message per bad `eval.*` field of a fine-tuning config (for evaluation and checks)."""
  problems = []
  if config.eval.split not in splits_lib.SPLIT_NAMES:
    problems.append(f'config.eval.split={config.eval.split!r}: choose one of '
                    f'{splits_lib.SPLIT_NAMES}.')
  checkpoint = str(config.eval.checkpoint)
  if checkpoint not in ('best', 'last') and not checkpoint.isdigit():
    problems.append(f"config.eval.checkpoint={config.eval.checkpoint!r}: use 'best', 'last' or "
                    'a step number.')
  if config.eval.uncertainty and config.model.head_dropout <= 0:
    problems.append('config.eval.uncertainty needs config.model.head_dropout > 0 '
                    '(MC dropout samples the head).')
  if config.eval.uncertainty and config.eval.mc_samples < 2:
    problems.append(f'config.eval.mc_samples={config.eval.mc_samples}: must be >= 2.')
  return problems
