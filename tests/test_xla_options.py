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


def _conv(x, w):
  return 2 * jax.lax.conv_general_dilated(x, w, (1, 1), 'SAME',
                                          dimension_numbers=('NHWC', 'HWIO', 'NHWC'))


def _conv_in_library_fusion(hlo: str) -> bool:
  return any(line.lstrip().startswith('%ynn_fusion') and 'conv_general_dilated' in line
             for line in hlo.splitlines())


def test_jit_helper_compiles_with_the_options_at_first_call():
  # Module-level jitted functions (analysis.features) get the options too: XLA's default
  # hands this convolution to YNNPACK, the options keep it in XLA's own (faster) one.
  xla_options.compiler_options.cache_clear()
  x, w = jnp.ones((16, 64, 64, 32)), jnp.ones((3, 3, 32, 32))  # YNNPACK takes large ones.
  assert _conv_in_library_fusion(jax.jit(_conv).lower(x, w).compile().as_text())
  helper = xla_options.jit(_conv)
  assert not _conv_in_library_fusion(helper.lower(x, w).compile().as_text())
  assert helper.__name__ == '_conv'
  assert jnp.array_equal(helper(x, w), jax.jit(_conv)(x, w))
