"""The PyTorch reference of benchmarks/ computes the JAX step's loss (skipped without torch).

torch is a benchmark-only dependency (requirements-bench.txt); CI does not install it.
"""

import pytest

pytest.importorskip('torch')

from benchmarks import torch_reference  # noqa: E402  pylint: disable=g-import-not-at-top


def test_torch_reference_matches_the_jax_step():
  diffs = torch_reference.check('tiny')
  assert diffs['loss'] < 1e-5 and diffs['metrics'] < 1e-5, diffs
  # Gradients: JAX against float64 torch tightly; float32 torch differs at leaky-ReLU kinks
  # where rounding flips the sign of a near-zero input (see torch_reference.check).
  assert diffs['grads_vs_float64'] < 1e-4 * max(1.0, diffs['grad_max']), diffs
  assert diffs['torch_grads_vs_float64'] < 0.05 * diffs['grad_max'], diffs
  # Adam normalises updates, so a tiny gradient of another sign moves a weight by up to 2 lr.
  assert diffs['params'] <= 2.5 * diffs['lr'], diffs
  assert diffs['ema_params'] < 1e-5, diffs
