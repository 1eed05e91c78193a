"""One migration step for the `config.json` of runs written before a config field existed.

Where a run's own config is read back (a pre-trained backbone, an evaluation, a run opened for
analysis), `upgrade` fills in every field added since, with the value that reproduces how that
run behaved. Everything else reads config fields directly: no defaults for missing fields are
scattered through the code.
"""

import ml_collections

from pixssl_jax import config_files
from pixssl_jax.data import default_dataset
from pixssl_jax.rundir import config_fields

_PRETRAIN, _FINETUNE = 'pretrain', 'finetune'


def _finetune_intensity_off() -> ml_collections.ConfigDict:
  block = config_files.load(_FINETUNE).data.intensity
  block.enabled = False
  return block


# (dotted field, the value runs written before it existed behaved as, or a function making it;
# the config files it is in).
ADDED_FIELDS = (
    ('data.phantom_spacing', default_dataset.DEFAULT_SPACING, (_PRETRAIN, _FINETUNE)),
    ('data.phantom_family', 'basic', (_PRETRAIN, _FINETUNE)),
    ('model.layers', 'auto', (_PRETRAIN, _FINETUNE)),
    ('model.pixel_hypercolumn', False, (_PRETRAIN,)),
    ('model.pixel_norm', 'group', (_PRETRAIN,)),
    ('method.weighting_scale', 'absolute', (_PRETRAIN,)),
    ('method.lambda_calibration', 0.0, (_PRETRAIN,)),
    ('method.lambda_restoration', 0.0, (_PRETRAIN,)),
    ('method.restoration_loss', 'l2', (_PRETRAIN,)),
    ('optim.ema_final_init_share', 0.0, (_PRETRAIN,)),
    ('optim.backbone_lr_scale', 1.0, (_FINETUNE,)),
    ('optim.head_warmup_steps', 0, (_FINETUNE,)),
    ('optim.l2_sp', 0.0, (_FINETUNE,)),
    ('optim.layer_decay', 1.0, (_FINETUNE,)),
    ('optim.linear_probe_steps', 0, (_FINETUNE,)),
    ('label_count', 0, (_FINETUNE,)),
    ('label_slices', 0, (_FINETUNE,)),
    ('init_file', None, (_FINETUNE,)),
    ('data.intensity.remap_prob', 0.0, (_PRETRAIN,)),
    ('data.intensity.remap_nonmonotone_prob', 0.5, (_PRETRAIN,)),
    ('data.mask_ratio', 0.0, (_PRETRAIN,)),
    ('data.mask_patch', 8, (_PRETRAIN,)),
    ('data.scale_range', (1.0, 1.0), (_FINETUNE,)),
    # Fine-tuning had no intensity augmentation: the block, switched off (its other fields
    # are then never read).
    ('data.intensity', _finetune_intensity_off, (_FINETUNE,)),
)



def config_file_of(config: ml_collections.ConfigDict) -> str:
  """'pretrain' or 'finetune': which config file `config` came from (by its `mode`)."""
  return _PRETRAIN if config.get('mode', _PRETRAIN) == _PRETRAIN else _FINETUNE


def upgrade(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """A copy of a run's config with every field added since it was written.

  The absolute uncertainty weighting kept its temperature in `method.tau` before
  `method.tau_absolute` existed; it moves there.
  """
  config = ml_collections.ConfigDict(config.to_dict())
  kind = config_file_of(config)
  method = config.get('method')
  if kind == _PRETRAIN and method is not None and 'tau_absolute' not in method:
    method.tau_absolute = method.tau
  for path, value, files in ADDED_FIELDS:
    if kind not in files:
      continue
    parent, _, leaf = path.rpartition('.')
    node = config_fields.field_at(config, parent) if parent else config
    if node is not config_fields.MISSING and leaf not in node:
      node[leaf] = value() if callable(value) else value
  return config
