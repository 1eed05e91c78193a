"""The PixSSL model: U-Net backbone with global and pixel branches and the context stabilizer.

The teacher is not a separate module: it is a second params pytree (the EMA of the whole
student tree) applied with the same `PixSSLModel`. The teacher calls `__call__` with
`with_predictor=False` and never calls `stabilize`; the predictor and stabilizer parameters in
its tree are simply unused.

With `pixel_hypercolumn` (the config default) the pixel projector reads every decoder level
from 0 to `pixel_level`, the finer ones average-pooled onto the `pixel_level` grid, so the pixel
loss trains the full-resolution decoder the segmentation head reads, while matching, the
stabilizer and its K samples stay on the coarse grid. Without it, decoder levels finer than
`pixel_level` feed no pre-training loss and keep their initial values (under jit XLA drops
their computation); fine-tuning trains them. `init_params` initialises the whole U-Net either
way, so the fine-tuning code finds it.
"""

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from pixssl_jax.models.heads import ContextStabilizer, MLPHead, PixelProjector
from pixssl_jax.models.layers import FLAX, LayerSet, layer_set
from pixssl_jax.models.unet import UNet

_DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}


class PixSSLModel(nn.Module):
  """Student/teacher network for pixel-global SSL.

  Attributes:
    ndim: spatial dimensions (2 or 3).
    features: U-Net widths per level, finest first.
    num_groups: GroupNorm groups (U-Net and pixel projector).
    dtype: compute dtype; parameters are float32, head outputs float32.
    proj_hidden: hidden width of the global projector/predictor and the pixel projector.
    proj_dim: global projection width `D`.
    pixel_level: decoder level feeding the pixel branch (stride `2**pixel_level`).
    pixel_hypercolumn: the pixel projector also reads decoder levels `0 .. pixel_level - 1`,
      each average-pooled onto the `pixel_level` grid and concatenated over channels.
    pixel_proj_dim: pixel projection width `Cp`.
    stabilizer_hidden: hidden width of the context stabilizer.
    stabilizer_dropout: dropout rate inside the stabilizer (0 disables MC dropout).
    head_norm: norm of the global MLP heads, 'batch' (BYOL) or 'layer'.
    pixel_norm: norm of the pixel projector, 'group' (per sample) or 'batch'.
    layers: the layer set of the U-Net and the pixel projector (`layers.py`).
    restoration_head: a 1x1 head on decoder level 0 predicting each voxel's intensity, for
      the restoration loss term; absent otherwise, so other runs keep their parameter tree.

  Runs build it from a config with `build_model`; the defaults here are configs/pretrain.py's
  demo values (tests/test_models.py checks they agree).
  """
  ndim: int
  features: Sequence[int] = (16, 32, 64, 128)
  num_groups: int = 8
  dtype: Any = jnp.float32
  proj_hidden: int = 256
  proj_dim: int = 128
  pixel_level: int = 2
  pixel_hypercolumn: bool = True
  pixel_proj_dim: int = 64
  stabilizer_hidden: int = 64
  stabilizer_dropout: float = 0.1
  head_norm: str = 'batch'
  pixel_norm: str = 'group'
  layers: LayerSet = FLAX
  restoration_head: bool = False

  @property
  def downsampling_factor(self) -> int:
    """Patch sizes must be divisible by this (the U-Net bottleneck stride)."""
    return 2 ** (len(self.features) - 1)

  @property
  def pixel_stride(self) -> int:
    """Stride of the pixel features: `G = P / pixel_stride`."""
    return 2 ** self.pixel_level

  def setup(self):
    _validate(self)
    self.backbone = UNet(self.ndim, tuple(self.features), self.num_groups, self.dtype,
                         layers=self.layers)
    self.projector = MLPHead(self.proj_hidden, self.proj_dim, self.dtype, self.head_norm,
                             output_bias=self.head_norm != 'batch')
    self.predictor = MLPHead(self.proj_hidden, self.proj_dim, self.dtype, self.head_norm)
    self.pixel_projector = PixelProjector(self.proj_hidden, self.pixel_proj_dim, self.num_groups,
                                          self.dtype, self.pixel_norm, layers=self.layers)
    self.stabilizer = ContextStabilizer(self.stabilizer_hidden, self.pixel_proj_dim,
                                        self.stabilizer_dropout, self.dtype)
    if self.restoration_head:
      self.restorer = nn.Dense(1, dtype=self.dtype, param_dtype=jnp.float32)

  def __call__(self, x: jnp.ndarray, with_predictor: bool = True) -> dict[str, jnp.ndarray]:
    """Global and pixel projections of a batch of views.

    Args:
      x: `[B, *P, 1]` views; `P` divisible by `downsampling_factor`.
      with_predictor: run the global predictor (the student does, the teacher does not).

    Returns:
      dict with float32 `global_proj [B, D]`, `global_pred [B, D]` (only if
      `with_predictor`), `pixel_proj [B, *G, Cp]` with `G = P / 2**pixel_level`, and with
      `restoration_head` `restoration [B, *P, 1]`.
    """
    bottleneck, decoder = self.backbone(x)
    spatial_axes = tuple(range(1, self.ndim + 1))
    pooled = jnp.mean(bottleneck.astype(jnp.float32), axis=spatial_axes)
    out = {'global_proj': self.projector(pooled.astype(self.dtype))}
    if with_predictor:
      out['global_pred'] = self.predictor(out['global_proj'].astype(self.dtype))
    out['pixel_proj'] = self.pixel_projector(self.pixel_features(decoder))
    if self.restoration_head:
      out['restoration'] = self.restorer(decoder[0]).astype(jnp.float32)
    return out

  def pixel_features(self, decoder: Sequence[jnp.ndarray]) -> jnp.ndarray:
    """The pixel projector's input on the `pixel_level` grid.

    Args:
      decoder: the U-Net's decoder features, `decoder[l]` of shape `[B, *P / 2**l, features[l]]`.

    Returns:
      `[B, *G, C]`: `decoder[pixel_level]`, with `pixel_hypercolumn` preceded on the channel
      axis by the finer levels average-pooled onto the same grid (`C = sum(features[:L + 1])`).
    """
    coarse = decoder[self.pixel_level]
    if not self.pixel_hypercolumn:
      return coarse
    parts = [_average_pool(decoder[level], 2 ** (self.pixel_level - level))
             for level in range(self.pixel_level)]
    return jnp.concatenate(parts + [coarse], axis=-1)

  def stabilize(self, pixel_proj: jnp.ndarray, deterministic: bool) -> jnp.ndarray:
    """Context stabilizer on already computed pixel projections.

    Args:
      pixel_proj: `[B, *G, Cp]` student pixel projections.
      deterministic: disable dropout; otherwise the 'dropout' rng is used.

    Returns:
      `[B, *G, Cp]` float32 predictions of the teacher's pixel projections.
    """
    return self.stabilizer(pixel_proj.astype(self.dtype), deterministic=deterministic)

  def stabilizer_hidden_layer(self, pixel_proj: jnp.ndarray) -> jnp.ndarray:
    """The stabilizer's hidden layer before dropout, `[B, *G, stabilizer_hidden]`."""
    return self.stabilizer.hidden(pixel_proj.astype(self.dtype))

  def stabilizer_output(self, hidden: jnp.ndarray) -> jnp.ndarray:
    """The stabilizer's affine last layer on `[..., stabilizer_hidden]`, float32."""
    return self.stabilizer.output(hidden)

  def init_all(self, x: jnp.ndarray) -> dict[str, jnp.ndarray]:
    """Touches every submodule (for `init`): forward pass plus a deterministic stabilizer."""
    out = self(x)
    out['stabilized'] = self.stabilize(out['pixel_proj'], deterministic=True)
    return out


def _average_pool(x: jnp.ndarray, factor: int) -> jnp.ndarray:
  """Mean over non-overlapping `factor`-wide blocks of every spatial axis of `[B, *S, C]`.

  Block `j` covers the finer cells `j * factor .. (j + 1) * factor - 1`, whose centres average
  to the centre of the coarse cell `j`: the pooled map lies on the coarse grid exactly. The
  mean is taken in float32 and returned in `x.dtype`.
  """
  if factor == 1:
    return x
  spatial = x.shape[1:-1]
  split = [x.shape[0]]
  for size in spatial:
    split += [size // factor, factor]
  y = x.astype(jnp.float32).reshape(*split, x.shape[-1])
  return jnp.mean(y, axis=tuple(range(2, 2 * len(spatial) + 1, 2))).astype(x.dtype)


def _validate(model: PixSSLModel) -> None:
  """Raises ValueError naming the `model.*` field that is inconsistent."""
  if model.ndim not in (2, 3):
    raise ValueError(f'ndim must be 2 or 3, got {model.ndim}')
  if not model.features:
    raise ValueError('model.features must list at least one level width')
  for i, width in enumerate(model.features):
    if width % model.num_groups:
      raise ValueError(f'model.features[{i}]={width} is not divisible by '
                       f'model.num_groups={model.num_groups}')
  if model.proj_hidden % model.num_groups:
    raise ValueError(f'model.proj_hidden={model.proj_hidden} (pixel projector hidden width) is '
                     f'not divisible by model.num_groups={model.num_groups}')
  if not 0 <= model.pixel_level < len(model.features):
    raise ValueError(f'model.pixel_level={model.pixel_level} must be in '
                     f'[0, {len(model.features) - 1}] for features={tuple(model.features)}')
  if not 0.0 <= model.stabilizer_dropout < 1.0:
    raise ValueError(f'model.stabilizer_dropout={model.stabilizer_dropout} must be in [0, 1)')
  if model.head_norm not in ('batch', 'layer'):
    raise ValueError(f"model.head_norm={model.head_norm!r} must be 'batch' or 'layer'")
  if model.pixel_norm not in ('batch', 'group'):
    raise ValueError(f"model.pixel_norm={model.pixel_norm!r} must be 'batch' or 'group'")


def build_model(model_cfg: ml_collections.ConfigDict, ndim: int,
                restoration_head: bool = False) -> PixSSLModel:
  """Builds the model from the `model:` config subtree (docs/design.md).

  Args:
    model_cfg: fields features, num_groups, dtype ('float32'|'bfloat16'), proj_hidden,
      proj_dim, pixel_level, pixel_hypercolumn, pixel_proj_dim, stabilizer_hidden,
      stabilizer_dropout, head_norm, pixel_norm, layers ('auto'|'flax'|'cpu').
    ndim: 2 or 3 (from `data.ndim`).
    restoration_head: add the restoration term's head (`objective.model_heads` says when).

  Returns:
    A validated `PixSSLModel`.
  """
  if model_cfg.dtype not in _DTYPES:
    raise ValueError(f'model.dtype must be one of {sorted(_DTYPES)}, got {model_cfg.dtype!r}')
  model = PixSSLModel(
      ndim=int(ndim),
      features=tuple(int(f) for f in model_cfg.features),
      num_groups=int(model_cfg.num_groups),
      dtype=_DTYPES[model_cfg.dtype],
      proj_hidden=int(model_cfg.proj_hidden),
      proj_dim=int(model_cfg.proj_dim),
      pixel_level=int(model_cfg.pixel_level),
      pixel_hypercolumn=bool(model_cfg.pixel_hypercolumn),
      pixel_proj_dim=int(model_cfg.pixel_proj_dim),
      stabilizer_hidden=int(model_cfg.stabilizer_hidden),
      stabilizer_dropout=float(model_cfg.stabilizer_dropout),
      head_norm=str(model_cfg.head_norm),
      pixel_norm=str(model_cfg.pixel_norm),
      layers=layer_set(model_cfg.layers),
      restoration_head=bool(restoration_head))
  _validate(model)
  return model


def init_params(model: PixSSLModel, rng: jax.Array, sample_shape: Sequence[int]) -> Any:
  """Initialises ALL parameters (backbone, heads, stabilizer).

  Traceable, so it can run under `jax.eval_shape` or a jit with `out_shardings`.

  Args:
    model: the module.
    rng: PRNG key for the 'params' collection.
    sample_shape: shape of an input batch `(B, *P, 1)`; `B` may be 1 (nothing depends on it).

  Returns:
    The 'params' pytree; apply with `model.apply({'params': params}, x)`.
  """
  sample_shape = tuple(int(s) for s in sample_shape)
  if len(sample_shape) != model.ndim + 2 or sample_shape[-1] != 1:
    raise ValueError(f'sample_shape must be (B, *P, 1) with {model.ndim} spatial dims, '
                     f'got {sample_shape}')
  x = jnp.zeros(sample_shape, jnp.float32)
  variables = model.init({'params': rng}, x, method=PixSSLModel.init_all)
  return variables['params']
