"""The CPU compiler options are used where this jaxlib accepts them, and skipped otherwise."""

import jax
import jax.numpy as jnp

from pixssl_jax import xla_options


def test_cpu_options_accepted_by_this_jaxlib():
  # This jaxlib (requirements.txt) accepts them: the speed-up of docs/performance.md applies.
  xla_options.compiler_options.cache_clear()
  options = xla_options.compiler_options()
  assert options == {'xla_cpu_experimental_ynn_fusion_type': 'LIBRARY_FUSION_TYPE_REDUCE'}
  x = jnp.ones((4, 8))
  assert jax.jit(jnp.sum, compiler_options=options)(x) == 32.0


def test_unknown_option_falls_back_to_defaults(monkeypatch, caplog):
  monkeypatch.setattr(xla_options, '_CPU_OPTIONS', {'xla_cpu_no_such_option': 'x'})
  xla_options.compiler_options.cache_clear()
  try:
    assert xla_options.compiler_options() is None
  finally:
    xla_options.compiler_options.cache_clear()
  assert 'xla_cpu_no_such_option' in caplog.text
