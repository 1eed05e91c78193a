"""What `prepare` finds in a raw folder, and the file pairing every layout shares.

A layout module (`pixssl_jax/data/layouts/`) fills a {case id: `RawCase`} dict and a list of
`CaseError`s with the helpers here: `nifti_files` lists a folder, `pair_folders` matches image
and label files by name, `add_case` refuses a case id given twice.
"""
import dataclasses
import json
import os

from pixssl_jax.data import nifti_io

# Re-exported: callers catch `CaseError` for any bad case or folder.
CaseError = nifti_io.CaseError


class PrepareError(CaseError):
  """The run as a whole cannot proceed (bad folder, nothing usable, existing store)."""


@dataclasses.dataclass(frozen=True)
class RawCase:
  case_id: str
  image: str
  label: str | None


@dataclasses.dataclass
class RawDataset:
  """The cases found in a raw folder.

  Attributes:
    root: absolute raw folder.
    layout: the name of the layout that read it ('msd', 'btcv', 'folders', 'images', or a
      registered one).
    cases: cases to preprocess, sorted by id.
    label_names: {value: name} from dataset.json (or BTCV's standard names), else None.
    errors: cases already known to be bad (missing listed files, non-NIfTI names, ...).
  """
  root: str
  layout: str
  cases: list[RawCase]
  label_names: dict[int, str] | None
  errors: list[CaseError]


def local_path(path) -> str | None:
  """A path as `prepare` uses it: local ones absolute with `~` expanded; URLs and None kept."""
  if path is None:
    return None
  path = os.fspath(path)
  if '://' in path:
    return path
  return os.path.abspath(os.path.expanduser(path))


def nifti_files(folder: str, errors: list[CaseError]) -> dict[str, str | None]:
  """{file stem: path} of the NIfTI files in `folder`; other visible files become errors.

  A stem given by two files (`a.nii` and `a.nii.gz`) maps to None, with an error naming both:
  nothing says which one is the case, so the case is skipped.
  """
  out = {}
  for name in sorted(os.listdir(folder)):
    path = os.path.join(folder, name)
    # Hidden files include the '._*' resource forks that macOS leaves in MSD archives.
    if name.startswith('.') or os.path.isdir(path):
      continue
    if not nifti_io.is_nifti_name(name):
      errors.append(CaseError(path, 'not a NIfTI file name (expected .nii or .nii.gz)'))
      continue
    stem = nifti_io.strip_nifti_suffix(name)
    if stem in out:
      if out[stem] is not None:
        errors.append(CaseError(out[stem], f'case id {stem!r} is also given by {path}; '
                                'remove or rename one of the two files'))
      out[stem] = None
      continue
    out[stem] = path
  return out


def add_case(cases: dict[str, RawCase], case: RawCase, errors: list[CaseError]) -> None:
  """Adds `case`, or records an error if its id is taken."""
  if case.case_id in cases:
    errors.append(CaseError(case.image, f'case id {case.case_id!r} is already used by '
                            f'{cases[case.case_id].image}'))
  else:
    cases[case.case_id] = case


def pair(images: dict[str, str], labels: dict[str, str], cases: dict[str, RawCase],
         errors: list[CaseError], label_key=lambda key: key, case_id=lambda key: key) -> None:
  """Adds a case per image, with the label whose key is `label_key(image key)` if any.

  Labels that match no image become errors.
  """
  used = set()
  for key, image in images.items():
    cid = case_id(key)
    used.add(label_key(key))
    if image is None or (label_key(key) in labels and labels[label_key(key)] is None):
      # Two files give this image or label (error already recorded): skip the whole case,
      # also where dataset.json listed one of the two.
      cases.pop(cid, None)
      continue
    if cid in cases and cases[cid].image == image:
      continue
    add_case(cases, RawCase(cid, image, labels.get(label_key(key))), errors)
  for key, label in labels.items():
    if (label is not None and key not in used
        and not any(c.label == label for c in cases.values())):
      errors.append(CaseError(label, 'label has no image with a matching file name'))


def pair_folders(folders, cases: dict[str, RawCase], errors: list[CaseError],
                 label_key=lambda key: key) -> None:
  """Pairs the files of each (image folder, label folder or None) by file name.

  A missing label folder means unlabelled images; a missing image folder stops the run.
  """
  for image_dir, label_dir in folders:
    if not os.path.isdir(image_dir):
      raise PrepareError(image_dir, 'image folder does not exist')
    labels = (nifti_files(label_dir, errors)
              if label_dir and os.path.isdir(label_dir) else {})
    pair(nifti_files(image_dir, errors), labels, cases, errors, label_key=label_key)


def label_names_from_json(labels, path: str) -> dict[int, str]:
  """{value: name} from a dataset.json "labels" entry; `path` names the file in errors."""
  try:
    # MSD maps "value" -> name; nnU-Net v2 maps name -> value.
    return {int(v) if isinstance(v, int) else int(k): str(k if isinstance(v, int) else v)
            for k, v in labels.items()}
  except (AttributeError, TypeError, ValueError) as e:
    raise PrepareError(path, f'"labels" must map class numbers to names ({e})') from e


def read_dataset_json(path: str) -> dict:
  """The JSON object in `path`; PrepareError if it does not read as one."""
  try:
    with open(path) as f:
      meta = json.load(f)
  except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
    raise PrepareError(path, f'not a readable JSON file ({e})') from e
  if not isinstance(meta, dict):
    raise PrepareError(path, 'expected a JSON object')
  return meta
