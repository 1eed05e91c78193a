"""Medical Segmentation Decathlon and nnU-Net raw folders: `imagesTr/`, `labelsTr/`,
`imagesTs/` (unlabelled) and `dataset.json` (label names, listed cases).

nnU-Net v2's `dataset.json` maps names to values and tags each image with a channel
(`liver_001_0000.nii.gz`); both are read. Cases listed in `dataset.json` come first, then the
files of the folders.
"""
import os

from pixssl_jax.data import nifti_io
from pixssl_jax.data import raw_cases
from pixssl_jax.data.layouts import registry
from pixssl_jax.data.raw_cases import CaseError
from pixssl_jax.data.raw_cases import RawCase


def case_id_fn(image_stems, label_stems):
  """Case id of an image stem: nnU-Net's channel suffix stripped where the folder uses one.

  nnU-Net's raw format tags every image with a channel (imagesTr/liver_001_0000.nii.gz <->
  labelsTr/liver_001.nii.gz). A plain MSD folder may have a case that merely ends in _0000
  (case_0000, case_0001, ...): there the name is kept, or case_0000 would become 'case'.
  """
  image_stems, label_stems = list(image_stems), set(label_stems)
  tagged = bool(image_stems) and all(
      s.endswith('_0000') and s not in label_stems for s in image_stems)
  return (lambda stem: stem[:-5] if stem.endswith('_0000') else stem) if tagged else (
      lambda stem: stem)


def detect(root: str) -> bool:
  return (os.path.isdir(os.path.join(root, 'imagesTr'))
          or os.path.isdir(os.path.join(root, 'imagesTs'))
          or os.path.exists(os.path.join(root, 'dataset.json')))


def _stem(path: str) -> str:
  return nifti_io.strip_nifti_suffix(os.path.basename(path))


def _add_listed(root: str, meta: dict, cases: dict, errors: list) -> None:
  """The cases that dataset.json lists under "training" (labelled) and "test"."""
  listed = [(e, True) for e in meta.get('training', [])]
  listed += [({'image': e} if isinstance(e, str) else e, False) for e in meta.get('test', [])]
  listed_case_id = case_id_fn([_stem(e['image']) for e, _ in listed], [
      _stem(e['label']) for e, labelled in listed if labelled and e.get('label')])
  for entry, labelled in listed:
    image = os.path.normpath(os.path.join(root, entry['image']))
    label = entry.get('label') if labelled else None
    label = os.path.normpath(os.path.join(root, label)) if label else None
    missing = [p for p in (image, label) if p and not os.path.exists(p)]
    if missing:
      errors.append(CaseError(missing[0], 'listed in dataset.json but the file is missing'))
      continue
    raw_cases.add_case(cases, RawCase(listed_case_id(_stem(image)), image, label), errors)


def find(root: str, cases: dict, errors: list) -> registry.Found:
  json_path = os.path.join(root, 'dataset.json')
  meta = raw_cases.read_dataset_json(json_path) if os.path.exists(json_path) else {}
  label_names = (raw_cases.label_names_from_json(meta['labels'], json_path)
                 if 'labels' in meta else None)
  _add_listed(root, meta, cases, errors)
  for images_sub, labels_sub in (('imagesTr', 'labelsTr'), ('imagesTs', None)):
    images_dir = os.path.join(root, images_sub)
    if not os.path.isdir(images_dir):
      continue
    labels_dir = os.path.join(root, labels_sub) if labels_sub else None
    labels = (raw_cases.nifti_files(labels_dir, errors)
              if labels_dir and os.path.isdir(labels_dir) else {})
    images = raw_cases.nifti_files(images_dir, errors)
    case_id = case_id_fn(images, labels)
    raw_cases.pair(images, labels, cases, errors, label_key=case_id, case_id=case_id)
  return registry.Found(label_names=label_names, where=os.path.join(root, 'imagesTr'))


LAYOUT = registry.register(registry.Layout(
    name='msd', expected='imagesTr/ (+ labelsTr/, dataset.json) (MSD)', detect=detect,
    find=find))
