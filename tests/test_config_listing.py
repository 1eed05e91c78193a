"""`--list` and `--help`: every preset and config field with its default, from the files."""

import os
import subprocess
import sys

from pixssl_jax import config_files
from pixssl_jax import config_listing
from pixssl_jax.rundir import config_io
from tests.helpers import REPO


def test_listing_names_every_preset_and_field_with_its_default_and_comment():
  text = config_listing.render()
  assert 'configs/pretrain.py:PRESET    presets: tiny, demo, btcv_3d, tpu_pod' in text
  assert 'configs/finetune.py:PRESET    presets: tiny, demo, btcv_3d' in text
  pretrain, finetune = text.split('--config configs/finetune.py')
  for name, part in (('pretrain', pretrain), ('finetune', finetune)):
    for field, value in config_io.flat_fields(config_files.load(name)).items():
      assert f'  --config.{field}={value!r}' in part, (name, field)
  # Meanings are the comments of the files, on the field's line or above it.
  assert ('--config.data.ndim=2  # 2: axial slices; 3: 3-D patches.' in pretrain)
  assert "--config.eval.checkpoint='best'  # 'best' (highest validation Dice)" in finetune
  assert '--config.init_file=None  # A weights file from python -m pixssl_jax.export_weights' \
      in finetune


def test_list_and_help_flags_print_it():
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  listed = subprocess.run([sys.executable, '-m', 'pixssl_jax.main', '--list'], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=120)
  assert listed.returncode == 0 and listed.stdout.strip() == config_listing.render().strip()
  helped = subprocess.run([sys.executable, '-m', 'pixssl_jax.main', '--help'], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=120)
  assert '--config.method.mc_samples=8' in helped.stdout and '--workdir' in helped.stdout


def test_shared_fields_take_their_meaning_from_configs_common():
  text = config_listing.render()
  pretrain, finetune = text.split('--config configs/finetune.py')
  for part in (pretrain, finetune):
    assert '--config.data.read_threads=2  # grain read threads per worker.' in part
    assert "--config.model.layers='auto'  # Layer set:" in part
