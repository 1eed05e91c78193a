"""Fine-tune and evaluate end to end on the tiny presets: files, grids, metrics, CLI errors."""

import csv
import json
import os
import subprocess
import sys

import jax
import nibabel as nib
import numpy as np
import pytest

from pixssl_jax import config_files
from pixssl_jax.data import case_store
from pixssl_jax.evaluation import evaluate
from pixssl_jax.evaluation import inference
from pixssl_jax.train import finetune
from pixssl_jax.train import load_pretrained
from pixssl_jax.train import loop
from pixssl_jax.train import pretrain
from tests.helpers import REPO, load_config


def finetune_config(**overrides):
  config = config_files.load('finetune', 'tiny')
  for key, value in overrides.items():
    config[key] = value
  return config


@pytest.fixture(scope='module')
def pretrained_dir(tmp_path_factory):
  workdir = tmp_path_factory.mktemp('pretrain')
  pretrain.train(load_config('tiny'), str(workdir), print_fn=lambda _: None)
  return workdir


@pytest.fixture(scope='module')
def finetuned(pretrained_dir, tmp_path_factory):
  workdir = tmp_path_factory.mktemp('finetune')
  lines = []
  config = finetune_config(pretrained_workdir=str(pretrained_dir))
  state = finetune.train_and_evaluate(config, str(workdir), print_fn=lines.append)
  return workdir, config, state, lines


def test_finetune_loads_the_backbone_validates_and_keeps_checkpoints(finetuned, pretrained_dir):
  workdir, _, _, lines = finetuned
  assert any(line.startswith('Loaded 44 pre-trained encoder_decoder tensors') for line in lines)
  assert lines[-1].startswith('val at step 6 | Dice ')
  records = [json.loads(line) for line in (workdir / 'metrics.jsonl').read_text().splitlines()]
  val = [r for r in records if 'val/dice' in r]
  assert [r['step'] for r in val] == [3, 6]
  assert all(0.0 <= r['val/dice'] <= 1.0 and r['val/hd95'] > 0 for r in val)
  steps = sorted(int(p.name) for p in (workdir / 'checkpoints').iterdir() if p.name.isdigit())
  assert steps == [3, 6]
  written = json.loads((workdir / 'config.json').read_text())
  assert written['mode'] == 'finetune' and written['model']['head_level'] == 0


def test_evaluate_writes_predictions_on_the_original_grid_and_metrics(finetuned):
  workdir, config, _, lines = finetuned
  config = finetune_config(pretrained_workdir=config.pretrained_workdir, mode='evaluate')
  config.eval.uncertainty = True
  summary = evaluate.evaluate(config, str(workdir), print_fn=lines.append)
  store = case_store.CaseStore(loop.resolve_data_dir(config.data))
  test_ids = store.split('test')
  for case_id in test_ids:
    raw = nib.load(os.path.join(store.raw_dir, store.meta(case_id)['image_file']))
    pred = nib.load(workdir / 'predictions' / f'{case_id}.nii.gz')
    assert pred.shape == raw.shape
    np.testing.assert_allclose(pred.affine, raw.affine, atol=1e-4)
    assert set(np.unique(np.asarray(pred.dataobj))) <= set(store.label_names)
    uncertainty = np.asarray(nib.load(
        workdir / 'predictions' / f'{case_id}_uncertainty.nii.gz').dataobj)
    assert uncertainty.shape == raw.shape and 0.0 <= uncertainty.min() <= uncertainty.max() <= 1.0
  with open(workdir / 'metrics.csv') as f:
    table = list(csv.DictReader(f))
  organs = [name for value, name in sorted(store.label_names.items()) if value]
  assert [row['organ'] for row in table] == organs + ['mean']
  info = json.loads((workdir / 'metrics.json').read_text())['info']
  assert info['grid'] == ['original'] and info['split'] == 'test'
  assert summary[-1]['organ'] == 'mean' and summary[-1]['n'] == len(test_ids)


def test_a_perfect_prediction_scores_near_one_on_the_original_grid(finetuned, monkeypatch):
  """The store label, exported and compared with the raw label file, for RAS and LPS files."""
  workdir, config, _, _ = finetuned
  store = case_store.CaseStore(loop.resolve_data_dir(config.data))
  orientations = {nib.aff2axcodes(nib.load(os.path.join(
      store.raw_dir, store.meta(c)['image_file'])).affine) for c in store.split('pretrain')}
  assert {('R', 'A', 'S'), ('L', 'P', 'S')} <= orientations
  current = {}
  volumes = evaluate.pipeline.volume_iterator

  def recording_volumes(*args, **kwargs):
    for example in volumes(*args, **kwargs):
      current['case_id'] = example['case_id']
      yield example

  monkeypatch.setattr(evaluate.pipeline, 'volume_iterator', recording_volumes)
  monkeypatch.setattr(inference.VolumeScorer, 'predict', lambda self, params, image: (
      np.asarray(store.label(current['case_id']), np.uint8), None))
  config = finetune_config(pretrained_workdir=config.pretrained_workdir, mode='evaluate')
  config.eval.split = 'pretrain'  # The training cases: both orientations are among them.
  config.eval.export = False  # Scored on the original grid all the same, nothing written.
  listing = lambda: sorted((workdir / 'predictions').glob('*'))
  written = listing()
  evaluate.evaluate(config, str(workdir), print_fn=lambda _: None)  # Its best checkpoint.
  assert listing() == written
  assert json.loads((workdir / 'metrics.json').read_text())['info']['grid'] == ['original']
  rows = json.loads((workdir / 'metrics.json').read_text())['cases']
  assert {r['case_id'] for r in rows} == set(store.split('pretrain'))
  # Labels go raw -> 6 mm store grid -> raw: only voxels at organ borders can change.
  for case_id in store.split('pretrain'):
    dices = [r['dice'] for r in rows if r['case_id'] == case_id and r['status'] == 'ok']
    assert len(dices) == 6 and np.mean(dices) > 0.8, (case_id, dices)


def test_linear_probe_trains_only_the_head_on_the_pixel_level(pretrained_dir, tmp_path):
  config = finetune_config(pretrained_workdir=str(pretrained_dir), linear_probe=True,
                           num_steps=3, eval_every=3)
  state = finetune.train_and_evaluate(config, str(tmp_path), print_fn=lambda _: None)
  source, _ = load_pretrained.restore_student_params(str(pretrained_dir))
  params = jax.device_get(state.params)
  jax.tree.map(np.testing.assert_array_equal, params['backbone'], source['backbone'])
  pixel_level = load_config('tiny').model.pixel_level
  assert json.loads((tmp_path / 'config.json').read_text())['model']['head_level'] == pixel_level
  assert params['seg_head']['kernel'].shape == (
      load_config('tiny').model.features[pixel_level], 7)


def run_main(workdir, *overrides):
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=8',
             JAX_PLATFORMS='cpu')
  cmd = [sys.executable, '-m', 'pixssl_jax.main', '--config', 'configs/finetune.py:tiny',
         '--workdir', str(workdir), *overrides]
  return subprocess.run(['timeout', '-s', 'KILL', '600', *cmd], cwd=REPO, env=env,
                        capture_output=True, text=True)


def test_cli_scratch_run_then_errors_are_clear(tmp_path, pretrained_dir):
  scratch = run_main(tmp_path / 'scratch', '--config.init=scratch', '--config.num_steps=2',
                     '--config.eval_every=2')
  assert scratch.returncode == 0, scratch.stderr[-3000:]
  assert 'Training from scratch' in scratch.stdout and 'val at step 2' in scratch.stdout
  no_source = run_main(tmp_path / 'a')
  assert no_source.returncode == 2
  assert 'config.pretrained_workdir is not set' in no_source.stderr
  no_checkpoint = run_main(tmp_path / 'empty', '--config.mode=evaluate')
  assert no_checkpoint.returncode == 2 and 'no checkpoint in' in no_checkpoint.stderr
  mismatch = run_main(tmp_path / 'b', f'--config.pretrained_workdir={pretrained_dir}',
                      '--config.model.features=(8,16,64)')
  assert mismatch.returncode == 2
  assert 'shape mismatch: backbone/enc2/conv0/kernel' in mismatch.stderr
  assert 'Traceback' not in mismatch.stderr
