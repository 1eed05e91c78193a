"""The raw-folder layouts `prepare` reads, and `discover`, which asks each in turn.

A layout is a `Layout`: a name (recorded in `store.json`), a phrase for the refusal message,
`detect(root)` (does this folder look like the layout?) and `find(root, cases, errors)`, which
fills `cases` with `raw_cases.RawCase`s and `errors` with `CaseError`s and returns the label
names it knows. `register` adds one; `discover` uses the first registered layout whose
`detect` accepts the folder, so the order of registration is the order of precedence.
"""
import dataclasses
import os
from collections.abc import Callable

from pixssl_jax.data import raw_cases
from pixssl_jax.data.raw_cases import CaseError
from pixssl_jax.data.raw_cases import PrepareError
from pixssl_jax.data.raw_cases import RawCase
from pixssl_jax.data.raw_cases import RawDataset


@dataclasses.dataclass(frozen=True)
class Found:
  """What a layout's `find` reports besides the cases.

  Attributes:
    label_names: {value: name} the layout knows (dataset.json, standard names), or None to
      name the classes from the label values.
    where: the folder named when no NIfTI image was found.
  """
  label_names: dict[int, str] | None
  where: str


@dataclasses.dataclass(frozen=True)
class Layout:
  """A raw-folder layout.

  Attributes:
    name: recorded as `layout` in `store.json`.
    expected: what the layout looks like, as the refusal of an unknown folder lists it
      ('img/ + label/ (BTCV)').
    detect: root folder -> whether this layout reads it.
    find: (root, cases, errors) -> `Found`; adds `RawCase`s to the {case id: case} dict and
      bad cases to the error list, raises `PrepareError` when the folder cannot be read at all.
  """
  name: str
  expected: str
  detect: Callable[[str], bool]
  find: Callable[[str, dict[str, RawCase], list[CaseError]], Found]


_LAYOUTS: list[Layout] = []


def register(layout: Layout) -> Layout:
  """Adds `layout` after those registered before it (a name already taken is replaced)."""
  for i, known in enumerate(_LAYOUTS):
    if known.name == layout.name:
      _LAYOUTS[i] = layout
      return layout
  _LAYOUTS.append(layout)
  return layout


def unregister(name: str) -> None:
  """Removes the layout called `name` (for tests that register one of their own)."""
  _LAYOUTS[:] = [layout for layout in _LAYOUTS if layout.name != name]


def registered() -> tuple[Layout, ...]:
  """The layouts in order of precedence."""
  return tuple(_LAYOUTS)


def _no_known_layout(root: str) -> PrepareError:
  expected = [layout.expected for layout in _LAYOUTS]
  listing = ', '.join(expected[:-1]) + ' or ' + expected[-1] if len(expected) > 1 else (
      ''.join(expected))
  return PrepareError(root, f'no known layout: expected {listing}')


def _explicit_folders(images_dir: str, labels_dir: str | None, cases, errors) -> Found:
  """`--images_dir` (and `--labels_dir`): the folders the user named, whatever the layout."""
  if labels_dir and not os.path.isdir(labels_dir):
    raise PrepareError(labels_dir, 'label folder does not exist')
  raw_cases.pair_folders([(images_dir, labels_dir)], cases, errors)
  return Found(label_names=None, where=images_dir)


def discover(raw_dir, images_dir=None, labels_dir=None) -> RawDataset:
  """Finds the cases of a raw dataset folder with the first layout that reads it.

  Args:
    raw_dir: raw dataset folder.
    images_dir: explicit image folder, overriding auto-detection; None to auto-detect.
    labels_dir: explicit label folder (with `images_dir`), or None.
    Relative paths are relative to the current directory; `~` is expanded.

  Raises:
    PrepareError: the folder is missing, empty, of no known layout, or has no NIfTI image.
  """
  root, images_dir, labels_dir = (
      raw_cases.local_path(p) for p in (raw_dir, images_dir, labels_dir))
  if not os.path.isdir(root):
    raise PrepareError(root, 'raw folder does not exist (or is not a folder)')
  cases: dict[str, RawCase] = {}
  errors: list[CaseError] = []
  if images_dir is not None:
    name, found = 'folders', _explicit_folders(images_dir, labels_dir, cases, errors)
  elif not os.listdir(root):
    raise PrepareError(root, 'raw folder is empty')
  else:
    layout = next((layout for layout in _LAYOUTS if layout.detect(root)), None)
    if layout is None:
      raise _no_known_layout(root)
    name, found = layout.name, layout.find(root, cases, errors)
  if not cases and not errors:
    raise PrepareError(found.where, 'contains no NIfTI images (.nii or .nii.gz)')
  return RawDataset(root=root, layout=name,
                    cases=sorted(cases.values(), key=lambda c: c.case_id),
                    label_names=found.label_names, errors=errors)
