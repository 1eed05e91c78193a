"""BTCV (Synapse multi-organ): `img/imgNNNN.nii.gz` with `label/labelNNNN.nii.gz`, or the
same under `Training/` with unlabelled `Testing/img/` beside it.

The 13 standard organ names apply unless a `dataset.json` names the classes.
"""
import os

from pixssl_jax.data import raw_cases
from pixssl_jax.data.layouts import registry

# Standard BTCV (Synapse multi-organ) classes; used when a BTCV folder has no dataset.json.
LABEL_NAMES = {
    0: 'background', 1: 'spleen', 2: 'right_kidney', 3: 'left_kidney', 4: 'gallbladder',
    5: 'esophagus', 6: 'liver', 7: 'stomach', 8: 'aorta', 9: 'inferior_vena_cava',
    10: 'portal_and_splenic_vein', 11: 'pancreas', 12: 'right_adrenal_gland',
    13: 'left_adrenal_gland'}


def detect(root: str) -> bool:
  return (os.path.isdir(os.path.join(root, 'img'))
          or os.path.isdir(os.path.join(root, 'Training', 'img')))


def _label_key(image_key: str) -> str:
  """img0001 <-> label0001."""
  return 'label' + image_key[3:] if image_key.startswith('img') else image_key


def find(root: str, cases: dict, errors: list) -> registry.Found:
  training = os.path.join(root, 'Training')
  base = training if os.path.isdir(os.path.join(training, 'img')) else root
  folders = [(os.path.join(base, 'img'), os.path.join(base, 'label'))]
  if os.path.isdir(os.path.join(root, 'Testing', 'img')):
    folders.append((os.path.join(root, 'Testing', 'img'), None))
  label_names = LABEL_NAMES
  json_path = os.path.join(root, 'dataset.json')
  if os.path.exists(json_path):
    meta = raw_cases.read_dataset_json(json_path)
    if 'labels' in meta:
      label_names = raw_cases.label_names_from_json(meta['labels'], json_path)
  raw_cases.pair_folders(folders, cases, errors, label_key=_label_key)
  return registry.Found(label_names=label_names, where=folders[0][0])


LAYOUT = registry.register(registry.Layout(
    name='btcv', expected='img/ + label/ (BTCV)', detect=detect, find=find))
