"""`pixssl-train --list` (and `--help`): every preset and config field, from the config files.

Presets are the names a file's `get_config` compares `preset` with; fields and their defaults
come from `get_config()` itself; a field's meaning is the comment on its line in the file (or in
the shared `configs/common.py` that sets it), or the comment block just above it. Nothing here
is written twice: a new field or preset appears in the listing as soon as it is in its file.
"""

import ast
import pathlib
import re

from pixssl_jax import config_files
from pixssl_jax.rundir import config_io

# `config.a.b = ...` (or `data.a = ...` inside a helper that builds `config.data`), a comment.
_ASSIGN = re.compile(r'^\s*([a-z_]+)\.([a-z_.0-9]+)\s*=\s*[^=]')


def _prefixes(tree: ast.Module) -> dict[str, str]:
  """{helper function name: the config section it builds} ('_data_config' -> 'data')."""
  out = {}
  for node in ast.walk(tree):
    if (isinstance(node, ast.Assign) and isinstance(node.value, ast.Call)
        and isinstance(node.value.func, ast.Name) and len(node.targets) == 1
        and isinstance(node.targets[0], ast.Attribute)):
      out[node.value.func.id] = node.targets[0].attr
  return out


def meanings(path: str) -> dict[str, str]:
  """{dotted field: its comment} of one config file and the shared fields it sets.

  The shared fields are those of `common.py` beside it (config_files.SHARED), whose helpers
  assign `config.<section>.<field>`; the file's own comment wins where both have one.
  """
  out = _file_meanings(path)
  shared = pathlib.Path(path).with_name(f'{config_files.SHARED}.py')
  if shared.is_file():
    for name, text in _file_meanings(str(shared)).items():
      out.setdefault(name, text)
  return out


def _file_meanings(path: str) -> dict[str, str]:
  """{dotted field: its comment} of one file (the first assignment of each field)."""
  source = open(path, encoding='utf-8').read()
  tree = ast.parse(source)
  sections = _prefixes(tree)
  lines = source.splitlines()
  out = {}
  for function in (n for n in tree.body if isinstance(n, ast.FunctionDef)):
    section = sections.get(function.name)
    above = []
    indent = function.body[0].col_offset
    for number in range(function.body[0].lineno - 1, function.end_lineno):
      line = lines[number]
      stripped = line.strip()
      if stripped.startswith('#'):
        above.append(stripped.lstrip('# '))
        continue
      match = _ASSIGN.match(line)
      # Only the defaults, at the function's top level: a preset's branch sets other values.
      if match and len(line) - len(line.lstrip()) == indent and 'ConfigDict()' not in line:
        var, field = match.groups()
        name = field if var == 'config' or section is None else f'{section}.{field}'
        comment = line.split('#', 1)[1].strip() if '#' in line else ''
        text = ' '.join(above + [comment]).strip()
        if text:
          out.setdefault(name, text)
      above = []
  return out


def _presets(path: str) -> list[str]:
  from pixssl_jax import config_loading  # pylint: disable=g-import-not-at-top
  return config_loading._preset_names(path)  # pylint: disable=protected-access


def render() -> str:
  """The listing of every config file: presets, then each field with default and meaning."""
  out = []
  for name in config_files.NAMES:
    path = str(config_files.CONFIG_DIR / f'{name}.py')
    config = config_files.load(name)
    notes = meanings(path)
    out.append(f'--config configs/{name}.py:PRESET    presets: {", ".join(_presets(path))} '
               f'(default {config.preset})')
    for field, value in sorted(config_io.flat_fields(config).items()):
      meaning = notes.get(field, '')
      out.append(f'  --config.{field}={value!r}' + (f'  # {meaning}' if meaning else ''))
    out.append('')
  return '\n'.join(out)
