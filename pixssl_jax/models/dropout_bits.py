"""Random bits for the MC-dropout masks: a counter hash keyed by threefry (docs/performance.md).

Why not `jax.random.bits`: threefry runs 20 rounds of add-rotate-xor per pair of words, and
XLA fuses the generator into every consumer of the masks, so the K = 8 stabilizer samples
computed it three times per step (the mean mask, the samples and the mean mask's gradient).
That was about half of what the samples cost on CPU. Dropout needs bits that look independent
across elements and keys, not a cryptographic stream: here each element's word is an integer
hash of its position, offset by two words threefry draws from the key, which costs a few
multiplies and shifts per word and is cheap enough to recompute wherever XLA fuses it.

The hash is Wellons' `lowbias32` (three xor-shifts and two odd multiplies, a bijection of the
32-bit words chosen for low avalanche bias) of `(index * golden + seed0) ^ seed1`. Like
`jax.random.bits`, the result depends only on the key and each element's position, so a mask is
the same on one device or sharded over many, on every backend.
`tests/test_dropout_bits.py` checks the statistics the masks rely on (uniform bytes and bits,
no correlation between neighbouring elements or between the K keys, the drop rate).
"""

import math

import jax
import jax.numpy as jnp

_GOLDEN = 0x9E3779B9  # 2^32 / golden ratio: consecutive indices land far apart.


def hashed_bits(key: jax.Array, shape: tuple[int, ...]) -> jnp.ndarray:
  """Uniform uint32 words of `shape` for `key` (one threefry draw, then one hash per element).

  Args:
    key: PRNG key (typed or raw, any implementation `jax.random.bits` accepts).
    shape: output shape; at most 2^32 elements (each element hashes its flat index).

  Returns:
    uint32 array of `shape`.
  """
  shape = tuple(int(d) for d in shape)
  if math.prod(shape) > 2 ** 32:
    raise ValueError(f'hashed_bits: shape {shape} has more than 2^32 elements, so flat indices '
                     'would repeat (and so would the bits)')
  seed = jax.random.bits(key, (2,), jnp.uint32)
  index = jax.lax.iota(jnp.uint32, math.prod(shape)).reshape(shape)
  x = (index * jnp.uint32(_GOLDEN) + seed[0]) ^ seed[1]
  x = x ^ (x >> 16)
  x = x * jnp.uint32(0x7FEB352D)
  x = x ^ (x >> 15)
  x = x * jnp.uint32(0x846CA68B)
  return x ^ (x >> 16)
