"""benchmarks/device_check.sh --dry-run: the device script runs on CPU and fills its folder.

The dry run covers the wheel check, the device record and the sections of
benchmarks/device_check.py (memory plan, profiler trace, sliding window; the PyTorch section
when torch is installed). train_step.py and gpu_low_label.sh, which the script also calls,
keep their own smoke runs; here they are left out to keep the test near a minute.
"""
import json
import os
import subprocess

import pytest

from tests.helpers import REPO


def test_device_check_dry_run_fills_its_folder(tmp_path):
  sections = 'plan,trace,sliding'
  try:
    import torch  # noqa: F401  pylint: disable=unused-import,g-import-not-at-top
    sections += ',torch'
  except ImportError:
    pass
  env = dict(os.environ, OUT=str(tmp_path), SECTIONS=sections, WHEELS=str(tmp_path / 'none'))
  result = subprocess.run(['bash', str(REPO / 'benchmarks' / 'device_check.sh'), '--dry-run'],
                          env=env, capture_output=True, text=True, timeout=600, check=False)
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
  device = (tmp_path / 'device.txt').read_text()
  assert 'jax' in device and 'backend cpu' in device
  assert json.loads((tmp_path / 'plan.json').read_text()) == {'tiny3d': 2}
  timings = (tmp_path / 'timings.txt').read_text().splitlines()
  assert {line.split(':')[0] for line in timings} >= set(sections.split(',')) - {'torch'}
  assert all('exit 0' in line or 'skipped' in line for line in timings), timings
  assert '| tiny3d |' in (tmp_path / 'plan.txt').read_text()
  trace = (tmp_path / 'trace.txt').read_text()
  assert '| op | ms/step |' in trace and any((tmp_path / 'trace').rglob('*.xplane.pb'))
  assert 'windows/s' in (tmp_path / 'sliding.txt').read_text()


@pytest.mark.parametrize('flag', ['--dry-run'])
def test_device_check_is_valid_bash(flag):
  del flag
  subprocess.run(['bash', '-n', str(REPO / 'benchmarks' / 'device_check.sh')], check=True)
