"""How `python -m pixssl_jax.main` decides whether and how to call jax.distributed.initialize."""

import pytest
from absl import app

from pixssl_jax import main

ENV_VARS = ('JAX_COORDINATOR_ADDRESS', 'JAX_NUM_PROCESSES', 'JAX_PROCESS_ID', 'SLURM_NTASKS',
            'SLURM_PROCID', 'TPU_WORKER_HOSTNAMES')


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch):
  for name in ENV_VARS:
    monkeypatch.delenv(name, raising=False)


def test_single_process_needs_no_initialisation():
  assert main._distributed_settings() is None


def test_explicit_environment_variables(monkeypatch):
  monkeypatch.setenv('JAX_COORDINATOR_ADDRESS', '10.0.0.1:1234')
  monkeypatch.setenv('JAX_NUM_PROCESSES', '4')
  monkeypatch.setenv('JAX_PROCESS_ID', '3')
  assert main._distributed_settings() == dict(coordinator_address='10.0.0.1:1234',
                                              num_processes=4, process_id=3)


def test_missing_process_id_is_a_usage_error(monkeypatch):
  monkeypatch.setenv('JAX_COORDINATOR_ADDRESS', '10.0.0.1:1234')
  monkeypatch.setenv('JAX_NUM_PROCESSES', '2')
  with pytest.raises(app.UsageError, match='--process_id'):
    main._distributed_settings()


@pytest.mark.parametrize('name,value', [('SLURM_NTASKS', '2'),
                                        ('TPU_WORKER_HOSTNAMES', 'w0,w1,w2,w3')])
def test_cluster_environments_let_jax_detect_the_rest(monkeypatch, name, value):
  monkeypatch.setenv(name, value)
  assert main._distributed_settings() == {}


def test_one_task_under_slurm_or_one_tpu_host_is_single_process(monkeypatch):
  monkeypatch.setenv('SLURM_NTASKS', '1')
  monkeypatch.setenv('TPU_WORKER_HOSTNAMES', 'w0')
  assert main._distributed_settings() is None
