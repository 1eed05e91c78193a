"""The config of a command-line run: `--config FILE[:PRESET]` plus `--config.FIELD=VALUE`.

Every problem is a `ConfigLoadError` whose message is one line naming the file or the field,
with the closest valid names where there are any, so `pixssl_jax.main` can stop with exit code
2 before anything is written. Values are parsed by the type of the field they replace: a tuple
of ints stays a tuple of ints or is refused, never stored as the string the user typed.
"""

import ast
import difflib
import glob
import os
from typing import Any

import ml_collections

from pixssl_jax import config_files

_PREFIXES = ('--config.', '-config.')
_TRUE, _FALSE = ('true', '1', 'yes'), ('false', '0', 'no')


class ConfigLoadError(ValueError):
  """The config file, its preset or an override cannot be loaded; the message is one line."""


def _closest(name: str, options: list[str]) -> str:
  """'; closest: a, b' for the options difflib finds near `name`, else ''."""
  found = difflib.get_close_matches(name, options, n=3, cutoff=0.6)
  return f'; closest: {", ".join(found)}' if found else ''


def split_overrides(argv: list[str]) -> tuple[list[str], list[tuple[str, str | None]]]:
  """Takes the `--config.FIELD=VALUE` (or `--config.FIELD VALUE`) arguments out of `argv`.

  Returns:
    (the other arguments, for absl; [(dotted field, raw value or None)] in order). A value of
    None is a bare `--config.FIELD` at the end or before another option (a boolean switch).
  """
  rest, overrides = [], []
  i = 0
  while i < len(argv):
    arg = argv[i]
    if arg == '--':  # absl passes everything after it on as positional arguments.
      rest += argv[i:]
      break
    prefix = next((p for p in _PREFIXES if arg.startswith(p)), None)
    if prefix is None:
      rest.append(arg)
    elif '=' in arg:
      field, value = arg[len(prefix):].split('=', 1)
      overrides.append((field, value))
    elif i + 1 < len(argv) and not argv[i + 1].startswith('-'):
      overrides.append((arg[len(prefix):], argv[i + 1]))
      i += 1
    else:
      overrides.append((arg[len(prefix):], None))
    i += 1
  return rest, overrides


def _preset_names(path: str) -> list[str]:
  """The string constants a config file compares `preset` with (its presets), in file order."""
  try:
    tree = ast.parse(open(path, encoding='utf-8').read())
  except (OSError, SyntaxError, ValueError):
    return []
  names = []
  for node in ast.walk(tree):
    if isinstance(node, ast.Compare) and isinstance(node.left, ast.Name) \
        and node.left.id == 'preset':
      for const in ast.walk(node):
        if isinstance(const, ast.Constant) and isinstance(const.value, str) \
            and const.value not in names:
          names.append(const.value)
  return names


def _missing_file_error(path: str) -> ConfigLoadError:
  folder = os.path.dirname(path) or '.'
  found = glob.glob(os.path.join(folder, '*.py')) + glob.glob(os.path.join('configs', '*.py'))
  options = list(dict.fromkeys(os.path.normpath(p) for p in found))
  configs = sorted(p for p in options if p.startswith('configs')
                   and os.path.basename(p) != f'{config_files.SHARED}.py')
  listed = f' (config files here: {", ".join(configs)})' if configs else ''
  return ConfigLoadError(f'--config {path}: no such config file'
                         f'{_closest(os.path.normpath(path), options)}{listed}')


def load_file(spec: str) -> ml_collections.ConfigDict:
  """`get_config(PRESET)` of the config file in `spec` ('configs/pretrain.py:demo')."""
  path, _, preset = spec.partition(':')
  path = config_files.resolve(path)  # The shipped presets, from any directory.
  if not os.path.isfile(path):
    raise _missing_file_error(path)
  try:
    module = config_files.exec_file(path)
  except Exception as e:  # pylint: disable=broad-except
    # Whatever the file raises (a syntax error, a failed import) is a file that cannot load.
    raise ConfigLoadError(f'--config {path}: cannot be loaded ({type(e).__name__}: '
                          f'{str(e).splitlines()[0] if str(e) else ""})') from None
  if not callable(getattr(module, 'get_config', None)):
    raise ConfigLoadError(f'--config {path}: the file has no get_config(preset) function')
  presets = _preset_names(path)
  if preset and presets and preset not in presets:
    raise ConfigLoadError(f'--config {spec}: unknown preset {preset!r} of {path}'
                          f'{_closest(preset, presets)} (presets: {", ".join(presets)})')
  try:
    return module.get_config(preset or None)
  except ValueError as e:  # The file's own refusal of the preset.
    raise ConfigLoadError(f'--config {spec}: {str(e).splitlines()[0]}') from None


def field_paths(config: ml_collections.ConfigDict, prefix: str = '') -> list[str]:
  """Every leaf field of `config` as a dotted path ('data.patch_size'), in order."""
  paths = []
  for key in config.keys():
    value = config[key]
    if isinstance(value, ml_collections.ConfigDict):
      paths += field_paths(value, f'{prefix}{key}.')
    else:
      paths.append(f'{prefix}{key}')
  return paths


def _unknown_field(field: str, config: ml_collections.ConfigDict) -> ConfigLoadError:
  paths = field_paths(config)
  leaf = field.rsplit('.', 1)[-1]
  near = [p for p in paths if p.rsplit('.', 1)[-1] == leaf]
  near += [p for p in difflib.get_close_matches(field, paths, n=3, cutoff=0.6) if p not in near]
  hint = f'; closest: {", ".join("config." + p for p in near[:3])}' if near else ''
  return ConfigLoadError(f'--config.{field}: no such field in the config{hint}')


def _parse_scalar(raw: str, kind: type) -> Any:
  """`raw` as a `kind` (bool, int, float or str); ValueError with the expected form."""
  if kind is bool:
    if raw.strip().lower() in _TRUE + _FALSE:
      return raw.strip().lower() in _TRUE
    raise ValueError('expected True or False')
  if kind is int:
    try:
      return int(raw)
    except ValueError:
      raise ValueError('expected an integer') from None
  if kind is float:
    try:
      return float(raw)
    except ValueError:
      raise ValueError('expected a number') from None
  if kind is str:
    try:  # A quoted string ('"a b"') loses its quotes; anything else is taken as it is.
      value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
      return raw
    return value if isinstance(value, str) else raw
  raise ValueError(f'cannot set a field of type {kind.__name__} from the command line')


def _item_fits(item: Any, kind: type) -> bool:
  """Whether `item` may be an item of a sequence of `kind` (an int counts as a float)."""
  if isinstance(item, bool) != (kind is bool):
    return False
  return isinstance(item, kind) or (kind is float and isinstance(item, int))


def _parse_sequence(raw: str, current: Any) -> tuple | list:
  """`raw` ('(32, 32)' or '32,32') as a tuple/list whose items have the type of `current`'s."""
  try:
    value = ast.literal_eval(raw)
  except (ValueError, SyntaxError):
    raise ValueError('not a Python literal tuple, e.g. (32, 32)') from None
  if not isinstance(value, (tuple, list)):
    raise ValueError('expected a tuple, e.g. (32, 32)')
  kinds = {type(v) for v in current}
  if len(kinds) == 1:  # Items of one type: keep it (an empty default admits anything).
    kind = kinds.pop()
    for i, item in enumerate(value):
      if not _item_fits(item, kind):
        raise ValueError(f'item {i} ({item!r}) is not a {kind.__name__}')
    value = [kind(v) for v in value]
  return type(current)(value)


def parse_value(raw: str | None, current: Any, kind: type) -> Any:
  """The value of an override for a field holding `current` (of type `kind`)."""
  if raw is None:
    if kind is bool:
      return True
    raise ValueError('no value given (use --config.FIELD=VALUE)')
  if raw.strip() == 'None' and (current is None or kind is type(None)):
    return None
  if isinstance(current, (tuple, list)):
    return _parse_sequence(raw, current)
  if kind is type(None):  # A field left None without a placeholder type: any literal.
    try:
      return ast.literal_eval(raw)
    except (ValueError, SyntaxError):
      return raw
  return _parse_scalar(raw, kind)


def apply_override(config: ml_collections.ConfigDict, field: str, raw: str | None) -> None:
  """Sets the dotted `field` of `config` from its command-line text; ConfigLoadError if not."""
  *parents, leaf = field.split('.')
  node = config
  for name in parents:
    node = node.get(name) if isinstance(node, ml_collections.ConfigDict) else None
    if node is None:
      raise _unknown_field(field, config)
  if not isinstance(node, ml_collections.ConfigDict) or leaf not in node:
    raise _unknown_field(field, config)
  current = node[leaf]
  if isinstance(current, ml_collections.ConfigDict):
    raise ConfigLoadError(f'--config.{field}: a group of fields; set one of them, e.g. '
                          f'--config.{field}.{field_paths(current)[0]}=...')
  try:
    value = parse_value(raw, current, node.get_type(leaf))
    node[leaf] = value  # The config's own type check refuses what parse_value let through.
  except (ValueError, TypeError) as e:
    raise ConfigLoadError(f'--config.{field}={raw}: cannot be parsed '
                          f'(config.{field} is {current!r}): {str(e).splitlines()[0]}') from None


def load(spec: str, overrides: list[tuple[str, str | None]]) -> ml_collections.ConfigDict:
  """The config file of `spec` with `overrides` applied, locked against new fields."""
  config = load_file(spec)
  if not isinstance(config, ml_collections.ConfigDict):
    raise ConfigLoadError(f'--config {spec}: get_config returned a {type(config).__name__}, '
                          'not an ml_collections.ConfigDict')
  for field, raw in overrides:
    apply_override(config, field, raw)
  config.lock()
  return config
