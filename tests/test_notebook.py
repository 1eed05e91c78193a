"""notebooks/analysis.ipynb runs headlessly from a fresh kernel, and is stored without outputs."""

import os
import pathlib

import pytest

nbformat = pytest.importorskip('nbformat', reason='pip install -r requirements-dev.txt')
nbclient = pytest.importorskip('nbclient', reason='pip install -r requirements-dev.txt')

NOTEBOOK = pathlib.Path(__file__).resolve().parents[1] / 'notebooks' / 'analysis.ipynb'


def test_notebook_is_stored_without_outputs():
  notebook = nbformat.read(NOTEBOOK, as_version=4)
  code = [c for c in notebook.cells if c.cell_type == 'code']
  assert code
  for cell in code:
    assert cell.outputs == [] and cell.execution_count is None, cell.source[:80]


def test_notebook_executes_without_errors(tmp_path):
  notebook = nbformat.read(NOTEBOOK, as_version=4)
  # A fresh kernel as a user gets it: one CPU device (not the tests' 8 simulated ones), the
  # short pre-training instead of a given workdir, temporary files under tmp_path.
  env = {k: v for k, v in os.environ.items()
         if k not in ('XLA_FLAGS', 'PIXSSL_DEMO_WORKDIR')}
  env.update(JAX_PLATFORMS='cpu', MPLBACKEND='Agg', TMPDIR=str(tmp_path),
             PIXSSL_NOTEBOOK_STEPS='20')
  client = nbclient.NotebookClient(notebook, timeout=300, kernel_name='python3',
                                   resources={'metadata': {'path': str(NOTEBOOK.parent)}})
  client.execute(env=env)  # Raises CellExecutionError naming the failing cell.

  outputs = [o for c in notebook.cells if c.cell_type == 'code' for o in c.outputs]
  assert not [o for o in outputs if o.output_type == 'error']
  images = [o for o in outputs if 'image/png' in o.get('data', {})]
  assert len(images) >= 8, len(images)  # Curves, labels, 2 PCA, pair, uncertainty, early/late, bars.
  text = ''.join(o.get('text', '') for o in outputs)
  assert 'step 20/20' in text
  assert 'correspondence accuracy' in text and text.count('balanced accuracy') == 3
  assert list(tmp_path.glob('pixssl_notebook_*/checkpoints/20'))
