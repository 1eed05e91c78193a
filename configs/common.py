"""Config fields that pre-training and fine-tuning share, written once for both files.

configs/pretrain.py and configs/finetune.py load this file from their own folder (it is not a
config of its own). A fine-tuning reads the pre-training run's store and loads its U-Net
strictly, so the store, the backbone and the loader fields must have the same defaults in both
files, and the `tiny` presets must name the same phantom store.
"""

import ml_collections
from ml_collections import config_dict


def set_store_fields(config: ml_collections.ConfigDict) -> None:
  """The data store: a prepared one, or the phantom dataset and its generator's settings."""
  # A prepared store (`python -m pixssl_jax.data.prepare`); None means the embedded phantom
  # dataset, generated and prepared into `cache_dir` on first use.
  config.data.data_dir = config_dict.placeholder(str)
  # None -> $PIXSSL_CACHE or ~/.cache/pixssl_jax.
  config.data.cache_dir = config_dict.placeholder(str)
  config.data.num_phantoms = 24  # Cases in the phantom dataset (data_dir None).
  config.data.phantom_seed = 0  # Seed of the phantom generator and of the phantom store's splits.
  # Phantom size factor (3: clinical in-plane grids; docs/data.md).
  config.data.phantom_shape_scale = 1.0
  config.data.phantom_spacing = (1.5, 1.5, 2.0)  # Store grid of the phantom dataset, mm (x, y, z).
  # 'basic' (pixssl_jax.data.phantoms) or 'clinical' (contrast phases, lesions, distractors;
  # pixssl_jax.data.phantoms_clinical).
  config.data.phantom_family = 'basic'


def set_tiny_store(config: ml_collections.ConfigDict) -> None:
  """The `tiny` presets' phantom store: 6 small cases on a coarse grid."""
  config.data.num_phantoms = 6
  config.data.phantom_shape_scale = 0.4
  config.data.phantom_spacing = (6.0, 6.0, 8.0)  # About 62 x 62 x 31 voxels per volume.


def set_loader_fields(config: ml_collections.ConfigDict) -> None:
  """The input pipeline's resources (grain)."""
  # grain worker processes; 0 (in the main process) is fastest on small hosts; use 8+ on
  # accelerator hosts.
  config.data.worker_count = 0
  config.data.read_threads = 2  # grain read threads per worker.
  config.data.prefetch_buffer_size = 4  # grain read-ahead buffer, in records.


def set_intensity_fields(config: ml_collections.ConfigDict) -> None:
  """The intensity augmentation's settings (`data.intensity.enabled` is each file's own)."""
  config.data.intensity.prob = 0.5  # Probability of each augmentation, independently.
  # HU window centre and width moved by up to this x width.
  config.data.intensity.window_jitter = 0.1
  # Random Bezier remap of the windowed intensities (Models Genesis' non-linear transform);
  # a non-monotone curve reorders tissue intensities, as contrast phases do. 0: off.
  config.data.intensity.remap_prob = 0.0
  config.data.intensity.remap_nonmonotone_prob = 0.5  # Share of the remaps that are non-monotone.
  config.data.intensity.brightness = 0.1  # Added offset, uniform in +-this (windowed [0, 1] units).
  config.data.intensity.contrast = 0.2  # Deviation from the mean scaled by 1 +- this (uniform).
  config.data.intensity.gamma = 0.3  # x ** g, log g uniform in +-log(1 + gamma).
  config.data.intensity.noise_std = 0.03  # Gaussian noise, its std uniform in [0, noise_std].
  config.data.intensity.blur_sigma = (0.5, 1.0)  # Gaussian blur sigma range, voxels.


def set_backbone_fields(config: ml_collections.ConfigDict) -> None:
  """The U-Net backbone; a fine-tuning's must equal its pre-training run's (strict loading)."""
  config.model.features = (16, 32, 64, 128)  # Channels per U-Net level; len = number of levels.
  config.model.num_groups = 8  # GroupNorm groups [default: no batch statistics].
  config.model.dtype = 'float32'  # Compute dtype; parameters are always float32.
  config.model.layers = 'auto'  # Layer set: 'flax', 'cpu' (XLA:CPU forms), 'auto' (cpu on CPU).
