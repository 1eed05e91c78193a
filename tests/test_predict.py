"""Prediction of scans never prepared (orientations, spacings, types, a broken file, evaluate's
labels), and the weights exported from the same runs and read back."""

import json
import os
import shutil
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest

from pixssl_jax import config_files
from pixssl_jax import export_weights
from pixssl_jax import predict
from pixssl_jax import weights_file
from pixssl_jax import workdir_lock
from pixssl_jax.data import case_store
from pixssl_jax.evaluation import evaluate
from pixssl_jax.evaluation import inference
from pixssl_jax.rundir import config_io
from pixssl_jax.rundir import networks
from pixssl_jax.train import finetune
from pixssl_jax.train import pretrain
from tests.helpers import damage, REPO, load_config


@pytest.fixture(scope='module')
def finetuned(tmp_path_factory):
  pretrained = tmp_path_factory.mktemp('pretrain')
  pretrain.train(load_config('tiny'), str(pretrained), print_fn=lambda _: None)
  workdir = tmp_path_factory.mktemp('finetune')
  config = config_files.load('finetune', 'tiny')
  config.pretrained_workdir = str(pretrained)
  finetune.train_and_evaluate(config, str(workdir), print_fn=lambda _: None)
  store = case_store.CaseStore(config_io.resolve_data_dir(config.data))
  return workdir, store, pretrained


def _save(path, data, affine, dtype=np.float32, slope=None, inter=None, qform_only=False):
  img = nib.Nifti1Image(np.asarray(data), affine)
  img.set_data_dtype(dtype)
  if qform_only:
    img.set_sform(None, code=0)
    img.set_qform(affine, code=1)
  if slope is not None:
    img.header.set_slope_inter(slope, inter)
  nib.save(img, str(path))


def _scans(store, folder):
  """Variants of one raw test case; returns the test case id and its verbatim copy's name."""
  case_id = store.split('test')[0]
  raw = nib.load(os.path.join(store.raw_dir, store.meta(case_id)['image_file']))
  ras = nib.as_closest_canonical(raw)
  hu, affine = ras.get_fdata(dtype=np.float32), ras.affine
  suffix = '.nii.gz' if raw.get_filename().endswith('.nii.gz') else '.nii'
  shutil.copy(raw.get_filename(), folder / f'verbatim{suffix}')
  _save(folder / 'ras.nii.gz', hu, affine)
  lps = affine @ np.array([[-1, 0, 0, hu.shape[0] - 1], [0, -1, 0, hu.shape[1] - 1],
                           [0, 0, 1, 0], [0, 0, 0, 1]], np.float64)
  _save(folder / 'lps.nii', hu[::-1, ::-1], lps)
  angle = np.deg2rad(12.0)
  rotation = np.eye(4)
  rotation[:2, :2] = [[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]]
  _save(folder / 'oblique.nii.gz', hu, rotation @ affine, qform_only=True)
  aniso = affine.copy()
  aniso[:3, :3] = affine[:3, :3] @ np.diag([0.7, 1.3, 2.5])
  _save(folder / 'anisotropic.nii.gz', hu, aniso)
  stored = np.round((hu + 1024.0) / 2.0).astype(np.int16)  # HU = 2 * stored - 1024.
  _save(folder / 'int16_scaled.nii.gz', stored, affine, dtype=np.int16, slope=2.0, inter=-1024.0)
  (folder / 'broken.nii.gz').write_bytes((folder / 'ras.nii.gz').read_bytes()[:300])
  return case_id, os.path.basename(next(folder.glob('verbatim*')))


def test_predict_writes_each_scan_on_its_own_grid_and_matches_evaluate(finetuned, tmp_path):
  workdir, store, _ = finetuned
  inputs, out = tmp_path / 'in', tmp_path / 'out'
  inputs.mkdir()
  case_id, verbatim = _scans(store, inputs)
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=8',
             JAX_PLATFORMS='cpu')
  done = subprocess.run(
      ['timeout', '-s', 'KILL', '600', sys.executable, '-m', 'pixssl_jax.predict',
       '--workdir', str(workdir), '-i', str(inputs), '-o', str(out)],
      cwd=REPO, env=env, capture_output=True, text=True)
  assert done.returncode == 1, done.stderr[-3000:]
  errors = done.stderr.strip().splitlines()
  assert len(errors) == 1 and errors[0].startswith(f'skipped {inputs / "broken.nii.gz"}: ')
  assert 'ETA' in done.stdout and 'wrote 6 of 7 scan(s)' in done.stdout
  names = json.loads((out / 'labels.json').read_text())
  assert {int(k): v for k, v in names.items()} == store.label_names
  for scan in sorted(inputs.iterdir()):
    if scan.name == 'broken.nii.gz':
      assert not (out / scan.name).exists()
      continue
    source, written = nib.load(scan), nib.load(out / scan.name)
    assert written.shape == source.shape, scan.name
    np.testing.assert_array_equal(written.affine, source.affine, err_msg=scan.name)
    labels = np.asarray(written.dataobj)
    assert labels.dtype == np.uint8 and set(np.unique(labels)) <= set(store.label_names)
  assert not [p for p in out.iterdir() if p.name.startswith('.')]  # No temporary left.

  evaluate.evaluate(None, str(workdir), print_fn=lambda _: None)
  expected = np.asarray(nib.load(workdir / 'predictions' / f'{case_id}.nii.gz').dataobj)
  np.testing.assert_array_equal(np.asarray(nib.load(out / verbatim).dataobj), expected)
  # The same scan in another orientation: the same segmentation, voxel for voxel.
  lps = np.asarray(nib.load(out / 'lps.nii').dataobj)[::-1, ::-1]
  np.testing.assert_array_equal(lps, np.asarray(nib.load(out / 'ras.nii.gz').dataobj))


def test_uncertainty_and_probabilities_and_clear_refusals(finetuned, tmp_path, capsys):
  workdir, store, _ = finetuned
  inputs = tmp_path / 'in'
  inputs.mkdir()
  _scans(store, inputs)
  scan = inputs / 'anisotropic.nii.gz'
  out = tmp_path / 'out'
  assert predict.main(['--workdir', str(workdir), '-i', str(scan), '-o', str(out),
                       '--uncertainty', '--probabilities', '--batch_size', '8',
                       '--checkpoint', 'last']) == 0
  source = nib.load(scan)
  uncertainty = nib.load(out / 'anisotropic_uncertainty.nii.gz')
  np.testing.assert_array_equal(uncertainty.affine, source.affine)
  values = np.asarray(uncertainty.dataobj)
  assert values.shape == source.shape and 0.0 <= values.min() <= values.max() <= 1.0
  with np.load(out / 'anisotropic_probabilities.npz') as saved:
    probabilities = saved['probabilities']
  assert probabilities.dtype == np.float16
  assert probabilities.shape == (*source.shape, len(store.label_names))
  np.testing.assert_allclose(probabilities.astype(np.float32).sum(-1), 1.0, atol=1e-2)
  capsys.readouterr()
  # A run that is not a fine-tuning, an output folder holding the inputs, a missing step.
  assert predict.main(['--workdir', str(tmp_path), '-i', str(scan), '-o', str(out)]) == 2
  assert predict.main(['--workdir', str(workdir), '-i', str(inputs), '-o', str(inputs)]) == 2
  assert predict.main(['--workdir', str(workdir), '-i', str(scan), '-o', str(out),
                       '--checkpoint', '99']) == 2
  errors = capsys.readouterr().err.splitlines()
  assert errors[0].startswith(f'error: --workdir {tmp_path}: no config.json')
  assert 'the output folder holds the input scans' in errors[1]
  assert errors[2].startswith('error: checkpoint=99: no such checkpoint')


def test_a_damaged_checkpoint_is_one_error_line_from_predict_and_evaluate(finetuned, tmp_path):
  # A step named by number on the command line (`--config.eval.checkpoint=6`) is a step.
  workdir, store, _ = finetuned
  copy, inputs = tmp_path / 'run', tmp_path / 'in'
  shutil.copytree(workdir, copy)
  inputs.mkdir()
  _scans(store, inputs)
  step = max(int(p.name) for p in (copy / 'checkpoints').iterdir() if p.name.isdigit())
  damage(copy / 'checkpoints' / str(step), 'truncated_data')
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  for command in (['pixssl_jax.predict', '--workdir', str(copy), '-i', str(inputs / 'ras.nii.gz'),
                   '-o', str(tmp_path / 'out'), '--checkpoint', str(step)],
                  ['pixssl_jax.evaluation.evaluate', '--workdir', str(copy),
                   f'--config.eval.checkpoint={step}']):
    done = subprocess.run(['timeout', '-s', 'KILL', '300', sys.executable, '-m', *command],
                          cwd=REPO, env=env, capture_output=True, text=True)
    assert done.returncode == 2, done.stderr[-3000:]
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr[-3000:]
    assert lines[0].startswith('error: ') and f'step {step}' in lines[0], lines[0]
  assert not (tmp_path / 'out').exists()


def test_evaluate_command_refuses_a_held_run_and_bad_overrides(finetuned, capsys):
  workdir, _, _ = finetuned
  with workdir_lock.held(str(workdir)):
    assert evaluate.main(['--workdir', str(workdir)]) == 2
  assert f'error: --workdir {workdir} is in use by another run' in capsys.readouterr().err
  assert not (workdir / workdir_lock.LOCK_NAME).exists()
  # Overrides parse as their fields' types, as pixssl-train's do, and name what is wrong.
  assert evaluate.main(['--workdir', str(workdir), '--config.eval.batch_size=many']) == 2
  assert evaluate.main(['--workdir', str(workdir), '--config.eval.batch_sise=8']) == 2
  errors = capsys.readouterr().err.splitlines()
  assert errors[0].startswith('error: --config.eval.batch_size=many: cannot be parsed')
  assert errors[1].startswith('error: --config.eval.batch_sise: no such field')
  assert 'closest: config.eval.batch_size' in errors[1]


@pytest.mark.parametrize('suffix', ['.safetensors', '.npz'])
def test_exported_weights_give_the_same_outputs_and_start_a_fine_tuning(finetuned, tmp_path,
                                                                       suffix):
  workdir, store, pretrained = finetuned
  path, meta = export_weights.export(str(workdir), str(tmp_path / f'seg{suffix}'))
  params, read_meta = weights_file.load(path)
  assert read_meta == meta and meta['kind'] == 'segmentation'
  assert meta['num_classes'] == len(store.label_names) and meta['model']['features'] == [8, 16, 32]
  config = config_io.read_config(str(workdir))
  model = networks.segmentation_model(config, meta['num_classes'])
  restored, step = networks.restore_segmentation_params(str(workdir), config, model, 'best')
  assert step == meta['source']['step']
  image = np.random.default_rng(0).uniform(size=(2, 32, 32, 1)).astype(np.float32)
  probabilities = inference.jit_probabilities(model)
  np.testing.assert_array_equal(np.asarray(probabilities(params, image)),
                                np.asarray(probabilities(restored, image)))

  # A pre-training's backbone, exported, starts a fine-tuning exactly as its workdir does.
  backbone, _ = export_weights.export(str(pretrained), str(tmp_path / f'backbone{suffix}'))
  assert weights_file.load(backbone)[1]['kind'] == 'backbone'
  base = config_files.load('finetune', 'tiny')
  base.model.features, base.model.num_groups = (4, 8, 16), 2  # Taken from the source instead.
  starts = []
  for init in ('pretrained', 'file'):
    config = config_io.apply_overrides(base, {'init': init, 'pretrained_workdir': str(pretrained),
                                              'init_file': backbone})
    config = finetune.resolve(config, str(tmp_path))
    assert tuple(config.model.features) == (4, 8, 16)  # Stated: kept, so loading refuses it.
    config.model.features, config.model.num_groups = (8, 16, 32), 4
    model = finetune.build_model(config, store)
    tx = finetune.make_optimizer(config)
    mesh = finetune.mesh_lib.make_data_mesh()
    starts.append(finetune.initial_state(model, tx, config, mesh, print_fn=lambda _: None))
  for a, b in zip(*(jax_leaves(s.params) for s in starts)):
    np.testing.assert_array_equal(a, b)


def jax_leaves(tree):
  import jax  # pylint: disable=g-import-not-at-top
  return [np.asarray(x) for x in jax.tree.leaves(jax.device_get(tree))]


def test_fine_tuning_takes_the_backbone_fields_from_its_source(finetuned):
  _, _, pretrained = finetuned
  config = config_files.load('finetune', 'demo')  # Widths (16, 32, 64, 128), groups 8.
  config.pretrained_workdir = str(pretrained)
  config = finetune.resolve(config, '/unused')
  assert tuple(config.model.features) == (8, 16, 32) and config.model.num_groups == 4
