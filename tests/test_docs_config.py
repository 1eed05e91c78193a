"""docs/config.md lists every config field with its current default, and every preset's changes.

The fields are walked from the loaded configs, so a field added to `configs/pretrain.py` or
`configs/finetune.py`, or a changed default, fails here until the reference says so.
"""

import re

from pixssl_jax import config_files
from pixssl_jax import config_loading
from pixssl_jax.objective import registry
from pixssl_jax.rundir import config_io
from tests.helpers import REPO

DOC = REPO / 'docs' / 'config.md'
# `| `field` | `default` | meaning |`: one row per field.
_FIELD_ROW = re.compile(r'^\| `([a-z_][a-z_.0-9]*)` \| `(.*?)` \| (.*) \|$')
# `| `preset` | `a=1`, `b.c=(1, 2)` |`: the fields a preset changes.
_PRESET_ROW = re.compile(r'^\| `([a-z_0-9]+)` \| (.*) \|$')
_SECTIONS = {'pretrain': '## Pre-training: `configs/pretrain.py`',
             'finetune': '## Fine-tuning and evaluation: `configs/finetune.py`'}


def _section(name: str) -> list[str]:
  """The lines of the reference's section for one config file."""
  text = DOC.read_text()
  assert _SECTIONS[name] in text, _SECTIONS[name]
  part = text.split(_SECTIONS[name], 1)[1]
  return re.split(r'^## ', part, flags=re.M)[0].splitlines()


def _rows(name: str) -> dict[str, tuple[str, str]]:
  rows = {}
  for line in _section(name):
    match = _FIELD_ROW.match(line)
    if match:
      field, default, meaning = match.groups()
      assert field not in rows, f'{name}: {field} listed twice'
      rows[field] = (default, meaning.strip())
  return rows


def _presets(name: str) -> dict[str, str]:
  part = '\n'.join(_section(name)).split('### Presets', 1)[1].split('###', 1)[0]
  out = {}
  for line in part.splitlines():
    match = _PRESET_ROW.match(line)
    if match and match.group(1) != 'preset':
      out[match.group(1)] = match.group(2)
  return out


def test_every_field_is_listed_with_its_default_and_a_meaning():
  for name in config_files.NAMES:
    rows = _rows(name)
    fields = config_io.flat_fields(config_files.load(name))
    missing = sorted(set(fields) - set(rows))
    assert not missing, f'docs/config.md lacks these configs/{name}.py fields: {missing}'
    stale = sorted(set(rows) - set(fields))
    assert not stale, f'docs/config.md lists fields configs/{name}.py does not have: {stale}'
    for field, value in fields.items():
      default, meaning = rows[field]
      assert default == repr(value), (
          f'docs/config.md: configs/{name}.py {field} defaults to {value!r}, the doc says '
          f'{default}')
      assert meaning, f'docs/config.md: configs/{name}.py {field} has no meaning'


def test_every_preset_lists_exactly_the_fields_it_changes():
  for name in config_files.NAMES:
    base = config_io.flat_fields(config_files.load(name))
    listed = _presets(name)
    path = str(config_files.CONFIG_DIR / f'{name}.py')
    presets = config_loading._preset_names(path)  # pylint: disable=protected-access
    assert sorted(listed) == sorted(presets), (name, sorted(listed), presets)
    for preset in presets:
      fields = config_io.flat_fields(config_files.load(name, preset))
      changed = {f'`{k}={v!r}`' for k, v in fields.items()
                 if k != 'preset' and v != base[k]}
      if not changed:  # The default preset: its row says so in words.
        assert '`' not in listed[preset], (name, preset)
        continue
      assert set(re.findall(r'`[^`]*`', listed[preset])) == changed, (
          f'docs/config.md, configs/{name}.py:{preset}: the preset changes '
          f'{", ".join(sorted(changed))}')


def test_the_reference_is_linked_and_not_repeated():
  for doc in ('README.md', 'docs/design.md', 'docs/running.md'):
    assert 'config.md' in (REPO / doc).read_text(), f'{doc} does not link docs/config.md'
  # The old config tree of design.md is gone: one place lists the fields.
  assert 'Config tree' not in (REPO / 'docs' / 'design.md').read_text()


def test_running_md_names_every_pretraining_scalar():
  text = (REPO / 'docs' / 'running.md').read_text()
  missing = [name for name in registry.metric_names() if f'`train/{name}`' not in text]
  assert not missing, f'docs/running.md, section 5, lacks the scalars {missing}'
