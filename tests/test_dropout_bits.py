"""The MC-dropout masks' random bits (models/dropout_bits.py): the statistics dropout relies on.

The keys are fixed, so each check is deterministic; the bounds are 6 standard deviations of
the statistic under true randomness, so a sound generator passes them with certainty and a
broken one (a counter without the hash, a seed that does not reach the bits, correlated keys)
fails them by orders of magnitude.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pixssl_jax.models import dropout_bits
from pixssl_jax.models.heads import dropout_scale

SHAPE = (4, 32, 32, 64)  # 262,144 words, a stabilizer-sized mask.


def _bytes(key, shape=SHAPE):
  return np.asarray(jax.lax.bitcast_convert_type(dropout_bits.hashed_bits(key, shape),
                                                 jnp.uint8)).reshape(-1)


def _corr(a, b):
  return float(np.corrcoef(a.astype(np.float64), b.astype(np.float64))[0, 1])


def test_bits_are_deterministic_uint32_of_the_shape_and_differ_between_keys():
  a = dropout_bits.hashed_bits(jax.random.key(0), (3, 5, 7))
  assert a.shape == (3, 5, 7) and a.dtype == jnp.uint32
  np.testing.assert_array_equal(a, dropout_bits.hashed_bits(jax.random.key(0), (3, 5, 7)))
  b = dropout_bits.hashed_bits(jax.random.key(1), (3, 5, 7))
  assert np.mean(np.asarray(a) == np.asarray(b)) < 0.05
  # Distinct positions never share a word for one key (the hash is a bijection of the index).
  assert len(np.unique(np.asarray(a))) == a.size


@pytest.mark.parametrize('seed', [0, 1, 2])
def test_bytes_are_uniform(seed):
  draws = _bytes(jax.random.key(seed))
  counts = np.bincount(draws, minlength=256)
  expected = draws.size / 256
  chi2 = float(np.sum((counts - expected) ** 2 / expected))
  # chi^2 with 255 degrees of freedom: mean 255, standard deviation sqrt(510) = 22.6. Too
  # uniform fails too (an unhashed counter gives nearly 0).
  assert 255 - 6 * 22.6 < chi2 < 255 + 6 * 22.6, chi2


def test_every_bit_is_balanced():
  words = np.asarray(dropout_bits.hashed_bits(jax.random.key(3), SHAPE)).reshape(-1)
  bits = (words[:, None] >> np.arange(32, dtype=np.uint32)) & 1
  sigma = 0.5 / np.sqrt(words.size)
  np.testing.assert_array_less(np.abs(bits.mean(0) - 0.5), 6 * sigma)


def test_neighbouring_draws_and_keys_are_uncorrelated():
  key = jax.random.key(4)
  draws = _bytes(key)
  bound = 6 / np.sqrt(draws.size)
  # Bytes of one word (neighbouring channels of a mask) and of consecutive words (pixels).
  assert abs(_corr(draws[:-1], draws[1:])) < bound
  assert abs(_corr(draws[:-4], draws[4:])) < bound
  # Neighbouring rows of the spatial grid (positions 64 words apart).
  assert abs(_corr(draws[:-256], draws[256:])) < bound
  # The K samples' keys, as objective.stabilized_prediction splits them.
  keys = jax.random.split(key, 8)
  per_key = [_bytes(k) for k in keys]
  for i in range(1, 8):
    assert abs(_corr(per_key[0], per_key[i])) < bound


def test_dropout_scale_drops_at_the_rate_independently():
  rate = 0.1
  threshold = round(rate * 256)  # 26: the rate in steps of 1/256.
  scale = np.asarray(dropout_scale((16, 32, 32, 64), rate, jax.random.key(5)))
  dropped = scale == 0
  p = threshold / 256
  sigma = np.sqrt(p * (1 - p) / dropped.size)
  assert abs(dropped.mean() - p) < 6 * sigma
  np.testing.assert_allclose(np.unique(scale), [0.0, 256 / (256 - threshold)], rtol=1e-6)
  # Inverted dropout keeps the expected activation.
  assert abs(scale.mean() - 1.0) < 6 * sigma * 256 / (256 - threshold)
  # Two neighbouring channels (bytes of one word) and two neighbouring pixels are dropped
  # together at the rate p^2 of independent draws.
  for both in (dropped[..., :-1] & dropped[..., 1:], dropped[:, :, :-1] & dropped[:, :, 1:]):
    sigma2 = np.sqrt(p * p * (1 - p * p) / both.size)
    assert abs(both.mean() - p * p) < 6 * sigma2


def test_bits_do_not_depend_on_the_sharding():
  mesh = jax.make_mesh((8,), ('data',))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('data'))
  key = jax.random.key(6)
  single = dropout_bits.hashed_bits(key, (16, 8, 8, 16))
  sharded = jax.jit(lambda k: dropout_bits.hashed_bits(k, (16, 8, 8, 16)),
                    out_shardings=sharding)(key)
  assert len(sharded.sharding.device_set) == 8
  np.testing.assert_array_equal(np.asarray(sharded), np.asarray(single))


def test_too_many_elements_is_an_error_naming_the_shape():
  with pytest.raises(ValueError, match=r'\(65536, 65537\).*2\^32'):
    dropout_bits.hashed_bits(jax.random.key(0), (65536, 65537))
