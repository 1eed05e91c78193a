"""A 2-D / 3-D U-Net backbone in Flax Linen, channels last.

Design choices:
- GroupNorm, never BatchNorm: no batch statistics anywhere, so the output of a sample does not
  depend on how the global batch is sharded across devices, and the EMA teacher needs no
  separate running statistics.
- Down-sampling by a stride-2 3x3(x3) convolution as the first conv of each encoder level
  (nnU-Net practice) rather than max-pooling: it is learnable, keeps every level a single
  "conv block", and its gradient has no arg-max scatter, which is cheap on TPU/GPU.
- Up-sampling by a 2x2(x2) stride-2 transposed convolution followed by skip concatenation.
- The layers come from a layer set (`layers.py`, config field `model.layers`): Flax's own, or
  forms with the same parameters that XLA:CPU runs faster.
- `dtype` is the compute dtype (bfloat16 on TPU); parameters are always float32 and norms
  are computed in float32, because group statistics in bfloat16 lose too many bits.
"""

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from pixssl_jax.models.layers import FLAX, LayerSet

# nnU-Net's activation: a small negative slope keeps units alive early in training.
_NEGATIVE_SLOPE = 0.01


class ConvBlock(nn.Module):
  """Two conv3x3(x3) -> GroupNorm -> LeakyReLU layers; the first may have stride 2.

  Attributes:
    features: output channels.
    ndim: number of spatial dimensions (2 or 3).
    num_groups: GroupNorm groups.
    strides: stride of the first convolution (1, or 2 to down-sample).
    dtype: compute dtype.
    layers: the layer set.
  """
  features: int
  ndim: int
  num_groups: int
  strides: int = 1
  dtype: Any = jnp.float32
  layers: LayerSet = FLAX

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    """Applies the block: `[B, *S, Cin] -> [B, *S / strides, features]`."""
    for i, stride in enumerate((self.strides, 1)):
      conv = self.layers.conv(self.features, (3,) * self.ndim, strides=stride, padding='SAME',
                              dtype=self.dtype, name=f'conv{i}')
      norm = self.layers.group_norm(num_groups=self.num_groups, name=f'norm{i}')
      x = self.layers.conv_norm(conv, norm, x).astype(self.dtype)  # Norm in float32.
      x = nn.leaky_relu(x, _NEGATIVE_SLOPE)
    return x


class UNet(nn.Module):
  """U-Net with `L = len(features)` levels.

  Level `l` runs at stride `2**l`; level `L - 1` is the bottleneck. The decoder mirrors the
  encoder: from the bottleneck, each level up-samples, concatenates the encoder skip of the
  same stride and applies a conv block.

  Attributes:
    ndim: number of spatial dimensions (2 or 3).
    features: channel widths per level, finest first.
    num_groups: GroupNorm groups; every width must be divisible by it.
    dtype: compute dtype (parameters are float32).
    layers: the layer set.
  """
  ndim: int
  features: Sequence[int] = (16, 32, 64, 128)
  num_groups: int = 8
  dtype: Any = jnp.float32
  layers: LayerSet = FLAX

  @property
  def num_levels(self) -> int:
    return len(self.features)

  @property
  def downsampling_factor(self) -> int:
    """Total stride of the bottleneck; patch sizes must be divisible by it."""
    return 2 ** (len(self.features) - 1)

  def _check_input(self, x: jnp.ndarray) -> None:
    if self.ndim not in (2, 3):
      raise ValueError(f'UNet.ndim must be 2 or 3, got {self.ndim}')
    if x.ndim != self.ndim + 2:
      raise ValueError(f'UNet input must be [B, *spatial({self.ndim}), C], got shape {x.shape}')
    bad = [s for s in x.shape[1:-1] if s % self.downsampling_factor]
    if bad:
      raise ValueError(f'UNet input spatial shape {x.shape[1:-1]} must be divisible by the '
                       f'down-sampling factor {self.downsampling_factor} '
                       f'(2**(len(features)-1), features={tuple(self.features)})')
    for width in self.features:
      if width % self.num_groups:
        raise ValueError(f'UNet feature width {width} is not divisible by num_groups='
                         f'{self.num_groups}')

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> tuple[jnp.ndarray, tuple[jnp.ndarray, ...]]:
    """Runs the U-Net.

    Args:
      x: `[B, *S, Cin]` input, every spatial size divisible by `downsampling_factor`.

    Returns:
      `(bottleneck, decoder_features)`: `bottleneck` is `[B, *S / 2**(L-1), features[-1]]`;
      `decoder_features` is a tuple of length `L` where `decoder_features[l]` is
      `[B, *S / 2**l, features[l]]` (stride `2**l`, `l = 0` full resolution). The coarsest
      entry `decoder_features[L-1]` is the bottleneck itself (the decoder's input), so any
      level `0 <= l < L` can feed the pixel branch. All in the compute dtype.
    """
    self._check_input(x)
    x = x.astype(self.dtype)
    skips = []
    for level, width in enumerate(self.features):
      x = ConvBlock(width, self.ndim, self.num_groups, strides=1 if level == 0 else 2,
                    dtype=self.dtype, layers=self.layers, name=f'enc{level}')(x)
      skips.append(x)
    bottleneck = x

    decoder = [None] * self.num_levels
    decoder[-1] = bottleneck
    for level in range(self.num_levels - 2, -1, -1):
      width = self.features[level]
      up = self.layers.conv_transpose(width, (2,) * self.ndim, strides=(2,) * self.ndim,
                                      padding='SAME', dtype=self.dtype, name=f'up{level}')(x)
      x = jnp.concatenate([up, skips[level]], axis=-1)
      x = ConvBlock(width, self.ndim, self.num_groups, strides=1, dtype=self.dtype,
                    layers=self.layers, name=f'dec{level}')(x)
      decoder[level] = x
    return bottleneck, tuple(decoder)
