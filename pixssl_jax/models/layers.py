"""The layer set the models are built from, chosen by the config field `model.layers`.

The models take their layer constructors as an attribute (Flax `examples/imagenet`'s
`conv: ModuleDef = nn.Conv`). Both sets create the same parameter tree (names, shapes, dtypes,
initialisers) and compute the same function up to float rounding, so a checkpoint does not
depend on the set that wrote it:
- `FLAX`: `nn.Conv`, `nn.ConvTranspose`, `nn.GroupNorm`, `nn.Dense`.
- `CPU`: the forms XLA:CPU runs faster (`cpu_layers/`; each module says why).
The MC-dropout masks are not part of a set: `heads.dropout_scale` draws them the same way for
both.
"""

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from pixssl_jax.models.cpu_layers import conv_ops
from pixssl_jax.models.cpu_layers import dense
from pixssl_jax.models.cpu_layers import group_norm

ModuleDef = Any

# The values of `model.layers`; 'auto' is 'cpu' when JAX's default backend is the CPU, else 'flax'.
NAMES = ('auto', 'flax', 'cpu')


@dataclasses.dataclass(frozen=True)
class LayerSet:
  """Module constructors, each called with the arguments of the Flax layer it stands for.

  Attributes:
    name: 'flax' or 'cpu'.
    conv: `nn.Conv` (padding 'SAME', one int stride).
    conv_transpose: `nn.ConvTranspose` (kernel 2, stride 2, padding 'SAME').
    dense: `nn.Dense`.
    group_norm: `nn.GroupNorm(num_groups)`, computed in and returning float32.
    conv_norm: `(conv, norm, x) -> norm(conv(x))` for a `conv` or `dense` module followed by a
      `group_norm` module, float32.
  """
  name: str
  conv: ModuleDef
  conv_transpose: ModuleDef
  dense: ModuleDef
  group_norm: ModuleDef
  conv_norm: Callable[[nn.Module, nn.Module, jnp.ndarray], jnp.ndarray]


def _conv_norm(conv, norm, x):
  return norm(conv(x).astype(jnp.float32))


def _conv_norm_folded(conv, norm, x):
  """The conv's bias goes into the norm's statistics, not onto the activations (group_norm.py)."""
  y, bias = conv(x, defer_bias=True)
  return norm(y, bias)


FLAX = LayerSet(
    name='flax', conv=nn.Conv, conv_transpose=nn.ConvTranspose, dense=nn.Dense,
    group_norm=functools.partial(nn.GroupNorm, dtype=jnp.float32, param_dtype=jnp.float32),
    conv_norm=_conv_norm)

CPU = LayerSet(
    name='cpu', conv=conv_ops.Conv, conv_transpose=conv_ops.ConvTranspose2x, dense=dense.Dense,
    group_norm=group_norm.GroupNorm, conv_norm=_conv_norm_folded)


def layer_set(name: str) -> LayerSet:
  """The set named by `model.layers`: 'auto', 'flax' or 'cpu'."""
  if name == 'auto':
    name = 'cpu' if jax.default_backend() == 'cpu' else 'flax'
  sets = {'flax': FLAX, 'cpu': CPU}
  if name not in sets:
    raise ValueError(f'model.layers={name!r}: choose one of {NAMES}')
  return sets[name]
