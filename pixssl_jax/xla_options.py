"""XLA compiler options for the heavy jitted functions (train steps, inference, analysis).

Why: on CPU, XLA (jaxlib 0.10) hands convolutions, dots, reductions and elementwise fusions to
the YNNPACK library by default. For this U-Net's shapes its convolutions ran up to 2x slower
than XLA's own (Eigen) ones, while its reductions are fast: compiling the pre-training step
with YNNPACK for reductions only made the demo step 17% and the 3-D 64^3 step 28% faster
(docs/performance.md). The option is per compilation, so it touches nothing else in the
process, and it is only used where this jaxlib accepts it: an unknown option would fail the
compile, so it is tried once on a tiny function first.
"""

import functools
from typing import Callable

from absl import logging
import jax
import jax.numpy as jnp

# Library fusions XLA:CPU may use; everything else is compiled by XLA itself.
_CPU_OPTIONS = {'xla_cpu_experimental_ynn_fusion_type': 'LIBRARY_FUSION_TYPE_REDUCE'}


@functools.cache
def compiler_options() -> dict[str, str] | None:
  """`compiler_options` for `jax.jit` of the train and inference steps (None: XLA's defaults)."""
  if jax.default_backend() != 'cpu':
    return None
  try:
    jax.jit(jnp.sum, compiler_options=_CPU_OPTIONS).lower(jnp.zeros(8)).compile()
  except jax.errors.JaxRuntimeError as error:
    logging.warning('XLA:CPU does not accept %s (%s); using its default library fusions.',
                    _CPU_OPTIONS, error)
    return None
  return dict(_CPU_OPTIONS)


def jit(fun: Callable, **jit_kwargs) -> Callable:
  """`jax.jit(fun, compiler_options=compiler_options(), **jit_kwargs)`, built at the first call.

  For module-level jitted functions (decorators): the options depend on the backend, which
  importing a module must not initialise. The result has `lower` too, like a jitted function.
  """
  get = functools.cache(
      lambda: jax.jit(fun, compiler_options=compiler_options(), **jit_kwargs))

  @functools.wraps(fun)
  def call(*args, **kwargs):
    return get()(*args, **kwargs)

  call.lower = lambda *args, **kwargs: get().lower(*args, **kwargs)
  return call
