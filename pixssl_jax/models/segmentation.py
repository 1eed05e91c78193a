"""The downstream segmentation network: the pre-training U-Net plus a new 1x1 head.

Parameter tree: `{'backbone': <UNet params>, 'seg_head': {'kernel', 'bias'}}`. The backbone is
named as in `PixSSLModel`, so pre-trained weights load by path (`train/load_pretrained.py`).

The head reads the decoder level `head_level` (0: full resolution, the fine-tuning default).
A dense linear probe reads the level the pre-training loss compared, `pixel_level` (finer
levels are trained only through the pixel projector's hypercolumn, `model.pixel_hypercolumn`,
and not at all without it), and its logits are upsampled
bilinearly to the input size: a 1x1 classifier commutes with linear upsampling, so this equals
classifying upsampled features at a fraction of the cost.

Dropout before the head (`head_dropout`) gives the MC-dropout uncertainty at evaluation: the
backbone runs once and only the cheap head is sampled K times.
"""

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from pixssl_jax.models.layers import FLAX, LayerSet, layer_set
from pixssl_jax.models.pixssl import _DTYPES
from pixssl_jax.models.unet import UNet


class SegmentationModel(nn.Module):
  """U-Net backbone + dropout + 1x1(x1) classifier, channels last.

  Attributes:
    ndim: spatial dimensions (2 or 3).
    num_classes: output classes including background.
    features: U-Net widths per level, finest first.
    num_groups: GroupNorm groups.
    dtype: compute dtype; logits are float32.
    head_level: decoder level the head reads (stride `2**head_level`).
    head_dropout: dropout rate before the head (0 disables MC-dropout uncertainty).
    layers: the U-Net's layer set (`layers.py`).
  """
  ndim: int
  num_classes: int
  features: Sequence[int] = (16, 32, 64, 128)
  num_groups: int = 8
  dtype: Any = jnp.float32
  head_level: int = 0
  head_dropout: float = 0.1
  layers: LayerSet = FLAX

  def setup(self):
    self.backbone = UNet(self.ndim, tuple(self.features), self.num_groups, self.dtype,
                         layers=self.layers)
    self.dropout = nn.Dropout(self.head_dropout)
    self.seg_head = nn.Dense(self.num_classes, dtype=jnp.float32, param_dtype=jnp.float32)

  def __call__(self, x: jnp.ndarray, deterministic: bool = True) -> jnp.ndarray:
    """Logits `[B, *P, num_classes]` float32 for inputs `[B, *P, 1]`."""
    return self.head(self.features_of(x), x.shape[1:-1], deterministic)

  def features_of(self, x: jnp.ndarray) -> jnp.ndarray:
    """The decoder features the head reads, `[B, *P / 2**head_level, features[head_level]]`."""
    _, decoder = self.backbone(x)
    return decoder[self.head_level]

  def head(self, features: jnp.ndarray, spatial: Sequence[int],
           deterministic: bool = True) -> jnp.ndarray:
    """Dropout + 1x1 classifier on `features_of`, upsampled to `spatial` (float32 logits).

    With `deterministic=False` the 'dropout' rng is used (training and MC sampling).
    """
    y = self.dropout(features.astype(jnp.float32), deterministic=deterministic)
    logits = self.seg_head(y)
    if tuple(logits.shape[1:-1]) != tuple(spatial):
      logits = jax.image.resize(logits, (logits.shape[0], *spatial, logits.shape[-1]),
                                'linear')
    return logits


def build_segmentation_model(model_cfg: ml_collections.ConfigDict, ndim: int,
                             num_classes: int) -> SegmentationModel:
  """Builds the model from the fine-tuning config's `model:` subtree, checking every field."""
  if model_cfg.dtype not in _DTYPES:
    raise ValueError(f'model.dtype must be one of {sorted(_DTYPES)}, got {model_cfg.dtype!r}')
  features = tuple(int(f) for f in model_cfg.features)
  if not features:
    raise ValueError('model.features must list at least one level width')
  for i, width in enumerate(features):
    if width % int(model_cfg.num_groups):
      raise ValueError(f'model.features[{i}]={width} is not divisible by '
                       f'model.num_groups={model_cfg.num_groups}')
  if not 0 <= int(model_cfg.head_level) < len(features):
    raise ValueError(f'model.head_level={model_cfg.head_level} must be in '
                     f'[0, {len(features) - 1}] for features={features}')
  if not 0.0 <= float(model_cfg.head_dropout) < 1.0:
    raise ValueError(f'model.head_dropout={model_cfg.head_dropout} must be in [0, 1)')
  layers = layer_set(model_cfg.layers)
  if num_classes < 2:
    raise ValueError(f'a segmentation needs at least 2 classes (background + one), got '
                     f'{num_classes}')
  return SegmentationModel(
      ndim=int(ndim), num_classes=int(num_classes), features=features,
      num_groups=int(model_cfg.num_groups), dtype=_DTYPES[model_cfg.dtype],
      head_level=int(model_cfg.head_level), head_dropout=float(model_cfg.head_dropout),
      layers=layers)


def init_segmentation_params(model: SegmentationModel, rng: jax.Array,
                             sample_shape: Sequence[int]) -> Any:
  """All parameters for inputs of `sample_shape = (B, *P, 1)`; traceable (eval_shape, jit)."""
  x = jnp.zeros(tuple(int(s) for s in sample_shape), jnp.float32)
  return model.init({'params': rng}, x)['params']
