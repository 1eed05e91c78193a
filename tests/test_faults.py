"""Faults a hostile but fair user meets: config typos, two writers, refused runs, a full disk.

What each must give: one `error:` line on stderr and the exit code of docs/running.md (2: refused
before anything was written; 1: a fault while running), and a workdir that a refused run left
as it was (or absent) and that a failed save left resumable.
"""

import errno
import json
import os
import pathlib
import re
import subprocess
import sys
import time

import numpy as np
import pytest

from pixssl_jax import config_loading
from pixssl_jax import workdir_lock

REPO = pathlib.Path(__file__).resolve().parents[1]
TINY_PRETRAIN = 'configs/pretrain.py:tiny'
TINY_FINETUNE = 'configs/finetune.py:tiny'
# A wrapper that runs main with every checkpoint save of step 6 failing as a full disk does.
ENOSPC_AT_STEP_6 = '''
import errno, runpy, sys
import orbax.checkpoint as ocp
_save = ocp.CheckpointManager.save
def save(self, step, *args, **kwargs):
  if step == 6:
    (self.directory / '6.orbax-checkpoint-tmp').mkdir(parents=True, exist_ok=True)
    raise OSError(errno.ENOSPC, 'No space left on device')
  return _save(self, step, *args, **kwargs)
ocp.CheckpointManager.save = save
sys.argv = ['pixssl_jax.main'] + sys.argv[1:]
runpy.run_module('pixssl_jax.main', run_name='__main__', alter_sys=True)
'''


def _env():
  return dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=8',
              JAX_PLATFORMS='cpu')


def main_command(workdir, *overrides, config=TINY_PRETRAIN, module=('-m', 'pixssl_jax.main')):
  return ['timeout', '-s', 'KILL', '600', sys.executable, *module, '--config', config,
          '--workdir', str(workdir), *overrides]


def run_main(workdir, *overrides, **kwargs):
  return subprocess.run(main_command(workdir, *overrides, **kwargs), cwd=REPO, env=_env(),
                        capture_output=True, text=True)


def snapshot(folder: pathlib.Path) -> dict[str, bytes]:
  """Every file under `folder` with its bytes (folders as None)."""
  return {str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else None)
          for p in sorted(folder.rglob('*'))}


def assert_one_error_line(result, code, *fragments):
  lines = result.stderr.strip().splitlines()
  assert result.returncode == code, result.stderr[-3000:]
  assert len(lines) == 1 and lines[0].startswith('error: '), result.stderr[-3000:]
  for fragment in fragments:
    assert fragment in lines[0], lines[0]


# ---- Config loading ----

@pytest.mark.parametrize('args,fragments', [
    (('--config', TINY_PRETRAIN, '--config.foo=1'), ('--config.foo', 'no such field')),
    (('--config', TINY_PRETRAIN, '--config.patch_sise=3'),
     ('--config.patch_sise', 'closest: config.batch_size, config.data.patch_size')),
    (('--config', 'configs/pretrain.py:nosuchpreset'),
     ("unknown preset 'nosuchpreset'", 'configs/pretrain.py', 'tiny, demo, btcv_3d')),
    (('--config', 'configs/pretrain.py:tinyy'), ('closest: tiny',)),
    (('--config', 'nosuchfile.py'), ('nosuchfile.py: no such config file',)),
    (('--config', 'configs/pretrian.py'), ('closest: configs/pretrain.py',)),
    (('--config', TINY_PRETRAIN, '--config.data.patch_size=(32,x)'),
     ('--config.data.patch_size=(32,x)', 'cannot be parsed')),
    (('--config', TINY_PRETRAIN, '--config.model.features=(8,16,x)'),
     ('--config.model.features=(8,16,x)',)),
    (('--config', TINY_PRETRAIN, "--config.model.features=(8,16,'x')"),
     ('--config.model.features', "item 2 ('x') is not a int")),
    (('--config', TINY_PRETRAIN, '--config.num_steps=ten'), ('expected an integer',)),
])
def test_config_loading_errors_are_one_line_and_exit_2(tmp_path, args, fragments):
  workdir = tmp_path / 'run'
  result = subprocess.run(
      ['timeout', '-s', 'KILL', '120', sys.executable, '-m', 'pixssl_jax.main', *args,
       '--workdir', str(workdir)], cwd=REPO, env=_env(), capture_output=True, text=True)
  assert_one_error_line(result, 2, *fragments)
  assert not workdir.exists()


def test_overrides_keep_the_field_types():
  config = config_loading.load(TINY_PRETRAIN, [
      ('num_steps', '7'), ('optim.learning_rate', '1'), ('data.patch_size', '64,64'),
      ('method.use_pixel', 'False'), ('data.data_dir', '/x y'), ('data.flip', None)])
  assert config.num_steps == 7 and isinstance(config.optim.learning_rate, float)
  assert config.data.patch_size == (64, 64) and config.method.use_pixel is False
  assert config.data.data_dir == '/x y' and config.data.flip is True
  with pytest.raises(AttributeError):
    config.new_field = 1  # Locked, as ml_collections' config flags lock it.


def test_split_overrides_takes_both_forms_and_leaves_the_rest():
  rest, overrides = config_loading.split_overrides(
      ['prog', '--config', 'c.py', '--config.a=1', '--config.b', '2', '--config.c',
       '--workdir=w'])
  assert rest == ['prog', '--config', 'c.py', '--workdir=w']
  assert overrides == [('a', '1'), ('b', '2'), ('c', None)]


# ---- The workdir lock ----

def _hold_lock_in_child(workdir):
  """A child process holding the lock of `workdir` until its stdin closes."""
  code = ('import sys; from pixssl_jax import workdir_lock\n'
          f'fd, _ = workdir_lock.acquire({str(workdir)!r}, print)\n'
          'print("held", flush=True); sys.stdin.read()')
  child = subprocess.Popen([sys.executable, '-c', code], cwd=REPO, stdin=subprocess.PIPE,
                           stdout=subprocess.PIPE, text=True)
  assert child.stdout.readline().strip() == 'held'
  return child


def test_a_held_lock_refuses_naming_host_and_pid(tmp_path):
  child = _hold_lock_in_child(tmp_path)
  try:
    with pytest.raises(workdir_lock.WorkdirLocked, match=rf'pid {child.pid}, since'):
      with workdir_lock.held(str(tmp_path)):
        pass
  finally:
    child.stdin.close()
    child.wait()
  with workdir_lock.held(str(tmp_path)):  # A lock whose holder is gone is free.
    pass
  assert list(tmp_path.iterdir()) == []


def test_a_stale_lock_is_taken_over_with_a_warning(tmp_path):
  dead = subprocess.run([sys.executable, '-c', 'import os; print(os.getpid())'],
                        capture_output=True, text=True)
  (tmp_path / workdir_lock.LOCK_NAME).write_text(json.dumps(
      {'host': 'some-host', 'pid': int(dead.stdout), 'since': '2026-01-01 00:00:00'}))
  warnings = []
  with workdir_lock.held(str(tmp_path), warn=warnings.append):
    record = json.loads((tmp_path / workdir_lock.LOCK_NAME).read_text())
    assert record['pid'] == os.getpid()
  assert len(warnings) == 1 and f'pid {int(dead.stdout)}' in warnings[0]
  assert 'taking it over' in warnings[0]
  assert not (tmp_path / workdir_lock.LOCK_NAME).exists()


def test_the_lock_removes_the_folders_it_made_unless_written(tmp_path):
  with workdir_lock.held(str(tmp_path / 'a' / 'b')):
    assert (tmp_path / 'a' / 'b' / workdir_lock.LOCK_NAME).exists()
  assert not (tmp_path / 'a').exists()
  with workdir_lock.held(str(tmp_path / 'c')):
    (tmp_path / 'c' / 'config.json').write_text('{}')
  assert sorted(p.name for p in (tmp_path / 'c').iterdir()) == ['config.json']


def test_a_full_disk_at_the_lock_leaves_no_file(tmp_path, monkeypatch):
  def no_space(fd, data):
    raise OSError(errno.ENOSPC, 'No space left on device')
  monkeypatch.setattr(workdir_lock.os, 'write', no_space)
  with pytest.raises(workdir_lock.WorkdirLocked, match='not writable .No space left'):
    with workdir_lock.held(str(tmp_path / 'run')):
      pass
  assert list(tmp_path.iterdir()) == []


def test_a_full_disk_at_the_write_probe_leaves_no_file(tmp_path, monkeypatch):
  from etils import epath
  from pixssl_jax.train import config_checks
  original = epath.Path.write_text

  def half_write(self, *args, **kwargs):
    original(self, '')  # The file is made; its bytes do not fit.
    raise OSError(errno.ENOSPC, 'No space left on device')
  monkeypatch.setattr(epath.Path, 'write_text', half_write)
  with pytest.raises(config_checks.ConfigError, match='No space left'):
    config_checks.check_workdir_writable(str(tmp_path / 'run'))
  assert list(tmp_path.iterdir()) == []


def test_two_pretrainings_on_one_workdir_one_is_refused(tmp_path):
  workdir = tmp_path / 'run'
  # Without the `timeout` wrapper: the pid the line names is python's own.
  command = main_command(workdir, '--config.num_steps=6')[4:]
  runs = [subprocess.Popen(command, cwd=REPO, env=_env(), stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True) for _ in range(2)]
  results = [(run.pid, *run.communicate(timeout=600)) for run in runs]
  results = [(pid, run.returncode, out, err) for run, (pid, out, err) in zip(runs, results)]
  codes = sorted(code for _, code, _, _ in results)
  assert codes == [0, 2], [r[3][-2000:] for r in results]
  refused = next(r for r in results if r[1] == 2)
  lines = refused[3].strip().splitlines()
  assert len(lines) == 1 and 'is in use by another run (host ' in lines[0], refused[3]
  winner_pid = next(r[0] for r in results if r[1] == 0)
  assert f'pid {winner_pid},' in lines[0]
  again = run_main(workdir, '--config.num_steps=8')  # The survivor's checkpoints restore.
  assert again.returncode == 0, again.stderr[-3000:]
  assert 'Resumed from step 6' in again.stdout
  assert not (workdir / workdir_lock.LOCK_NAME).exists()


# ---- Refused runs leave the workdir as it was ----

@pytest.fixture(scope='module')
def pretrained(tmp_path_factory):
  workdir = tmp_path_factory.mktemp('pretrained') / 'run'
  result = run_main(workdir)
  assert result.returncode == 0, result.stderr[-3000:]
  return workdir


def test_a_refused_resume_leaves_the_workdir_byte_identical_and_usable(pretrained, tmp_path):
  before = snapshot(pretrained)
  refused = run_main(pretrained, '--config.model.features=(8,16,64)', '--config.num_steps=6')
  assert refused.returncode == 2, refused.stderr[-3000:]
  assert 'no checkpoint in' in refused.stderr and 'Traceback' not in refused.stderr
  assert snapshot(pretrained) == before
  finetuned = run_main(tmp_path / 'ft', f'--config.pretrained_workdir={pretrained}',
                       '--config.num_steps=2', '--config.eval_every=2', config=TINY_FINETUNE)
  assert finetuned.returncode == 0, finetuned.stderr[-3000:]
  assert 'Loaded' in finetuned.stdout


def test_a_refused_finetuning_leaves_no_workdir(pretrained, tmp_path):
  mismatch = run_main(tmp_path / 'ft', f'--config.pretrained_workdir={pretrained}',
                      '--config.model.features=(8,16,64)', config=TINY_FINETUNE)
  assert mismatch.returncode == 2, mismatch.stderr[-3000:]
  assert mismatch.stderr.startswith('error: cannot load the pre-trained')  # One per tensor.
  assert 'shape mismatch' in mismatch.stderr and 'Traceback' not in mismatch.stderr
  assert not (tmp_path / 'ft').exists()
  existing = tmp_path / 'kept'
  existing.mkdir()
  (existing / 'notes.txt').write_text('mine')
  again = run_main(existing, f'--config.pretrained_workdir={pretrained}',
                   '--config.model.features=(8,16,64)', config=TINY_FINETUNE)
  assert again.returncode == 2
  assert snapshot(existing) == {'notes.txt': b'mine'}


def test_an_images_only_store_refuses_finetuning_and_leaves_no_workdir(tmp_path):
  import nibabel as nib
  from pixssl_jax.data import prepare
  raw = tmp_path / 'raw' / 'imagesTr'
  raw.mkdir(parents=True)
  for i in range(6):
    image = np.random.default_rng(i).normal(0, 200, (24, 24, 8)).astype(np.float32)
    nib.save(nib.Nifti1Image(image, np.diag([1.5, 1.5, 2.0, 1.0])), str(raw / f'c{i}.nii.gz'))
  store = tmp_path / 'store'
  assert prepare.main(['--raw_dir', str(raw.parent), '--data_dir', str(store), '--quiet']) == 0
  result = run_main(tmp_path / 'ft', '--config.init=scratch', f'--config.data.data_dir={store}',
                    config=TINY_FINETUNE)
  assert result.returncode == 2, result.stderr[-3000:]
  assert 'no labelled case' in result.stderr and 'Traceback' not in result.stderr
  assert not (tmp_path / 'ft').exists()


# ---- A checkpoint save that fails ----

def _mount_tmpfs(folder: pathlib.Path, size: str) -> bool:
  folder.mkdir(parents=True, exist_ok=True)
  return subprocess.run(['mount', '-t', 'tmpfs', '-o', f'size={size}', 'tmpfs', str(folder)],
                        capture_output=True).returncode == 0


def _check_failed_save_then_resume(workdir, failed, run_again, failed_step=6):
  assert 'could not be saved to' in failed.stderr
  ckpt = workdir / 'checkpoints'
  steps = sorted(int(p.name) for p in ckpt.iterdir())
  # Only intact steps are left (the failed one's folder is removed), the newest just before.
  assert steps and steps[-1] == failed_step - 2, list(ckpt.iterdir())
  assert not (workdir / workdir_lock.LOCK_NAME).exists()
  resumed = run_again()
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert f'Resumed from step {failed_step - 2}' in resumed.stdout


def test_a_full_disk_at_a_save_is_one_line_and_resumes(tmp_path):
  mount = tmp_path / 'disk'
  # 7 MB: a few tiny checkpoints fit, not all 6 of a 12-step run. Which save fails first
  # depends on the sizes of the logs and checkpoints, so the test reads it from the line.
  if not _mount_tmpfs(mount, '7m'):
    pytest.skip('cannot mount a tmpfs here; the simulated ENOSPC test covers the path')
  try:
    workdir = mount / 'run'
    overrides = ('--config.num_steps=12', '--config.image_every=0')
    failed = run_main(workdir, *overrides)
    step = int(re.search(r'checkpoint step (\d+) could not be saved', failed.stderr).group(1))
    assert 4 <= step <= 12 and step % 2 == 0, failed.stderr[-2000:]
    assert_one_error_line(failed, 1, str(workdir / 'checkpoints' / str(step)),
                          'No space left on device',
                          f'a resume will continue from step {step - 2}')

    def resume():
      subprocess.run(['mount', '-o', 'remount,size=64m', str(mount)], check=True)
      return run_main(workdir, *overrides)
    _check_failed_save_then_resume(workdir, failed, resume, failed_step=step)
  finally:
    subprocess.run(['umount', str(mount)], capture_output=True)


def test_a_simulated_enospc_at_a_save_is_one_line_and_resumes(tmp_path):
  workdir = tmp_path / 'run'
  overrides = ('--config.num_steps=8', '--config.image_every=0')
  failed = run_main(workdir, *overrides, module=('-c', ENOSPC_AT_STEP_6))
  assert_one_error_line(failed, 1, 'checkpoint step 6', str(workdir / 'checkpoints' / '6'),
                        'No space left on device [errno 28]',
                        'a resume will continue from step 4, the newest intact checkpoint')
  _check_failed_save_then_resume(workdir, failed, lambda: run_main(workdir, *overrides))


def test_failed_save_reason_reads_the_tensorstore_os_code():
  from pixssl_jax.train import save_errors
  error = ValueError('RESOURCE_EXHAUSTED: Error writing "x" in OCDBT database at local file '
                     '"/w/checkpoints/8.orbax-checkpoint-tmp/state": Failed to write 5 bytes '
                     "to file 8: No space left on device [os_error_code='28']")
  assert save_errors.reason(error) == 'No space left on device [errno 28]'
  assert save_errors.reason(PermissionError(errno.EACCES, 'denied')).startswith(
      'Permission denied')
  assert save_errors.reason(RuntimeError('disk on fire\nmore')) == 'RuntimeError: disk on fire'
