"""Images only: NIfTI files directly in the raw folder, no labels (pre-training data).

Tried last, so a folder that also holds a known layout's subfolders is read as that layout.
"""
import os

from pixssl_jax.data import nifti_io
from pixssl_jax.data import raw_cases
from pixssl_jax.data.layouts import registry


def detect(root: str) -> bool:
  return any(nifti_io.is_nifti_name(name) and not name.startswith('.')
             and os.path.isfile(os.path.join(root, name)) for name in os.listdir(root))


def find(root: str, cases: dict, errors: list) -> registry.Found:
  raw_cases.pair_folders([(root, None)], cases, errors)
  return registry.Found(label_names=None, where=root)


LAYOUT = registry.register(registry.Layout(
    name='images', expected='.nii/.nii.gz images in the folder itself (images only)',
    detect=detect, find=find))
