"""Any `images/` and `labels/` folders whose files have matching names (labels optional).

The same pairing reads the folders given as `--images_dir`/`--labels_dir`. Without a
dataset.json the classes are named from the label values found.
"""
import os

from pixssl_jax.data import raw_cases
from pixssl_jax.data.layouts import registry


def detect(root: str) -> bool:
  return os.path.isdir(os.path.join(root, 'images'))


def find(root: str, cases: dict, errors: list) -> registry.Found:
  images_dir = os.path.join(root, 'images')
  raw_cases.pair_folders([(images_dir, os.path.join(root, 'labels'))], cases, errors)
  return registry.Found(label_names=None, where=images_dir)


LAYOUT = registry.register(registry.Layout(
    name='folders', expected='images/ + labels/', detect=detect, find=find))
