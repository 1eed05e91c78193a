r"""Fine-tuning, linear-probe and evaluation configs for pixssl_jax.

Fine-tune a pre-trained U-Net on 10% of the labels, then evaluate on the test split:

  python -m pixssl_jax.main --config configs/finetune.py:demo --workdir runs/demo_ft \
      --config.pretrained_workdir=runs/demo
  python -m pixssl_jax.main --config configs/finetune.py:demo --workdir runs/demo_ft \
      --config.pretrained_workdir=runs/demo --config.mode=evaluate

The same network from random weights: `--config.init=scratch` (no pretrained_workdir needed).
A dense linear probe of the frozen pre-trained features: `--config.linear_probe=True`.

Presets (match the pre-training preset of the same name, whose U-Net they load):
  tiny     seconds, tiny phantoms; used by the tests.
  demo     2-D 128x128 axial slices of the embedded phantom dataset: about 7 minutes on 2 CPU
           cores, then about 1 for `evaluate` (mean test Dice about 76%, docs/BENCHMARKS.md).
  btcv_3d  3-D 96^3 patches from a prepared store (--config.data.data_dir=...).

The data fields mean what they mean in configs/pretrain.py; `data` must name the same store
(or phantom settings) as pre-training, since the seeded splits come from it.
"""

import ml_collections
from ml_collections import config_dict

from pixssl_jax import config_files


# Config files are loaded by path; their shared blocks come from the common.py beside them.
common = config_files.shared_fields(__file__)


def _data_config() -> ml_collections.ConfigDict:
  data = ml_collections.ConfigDict()
  data.ndim = 2  # 2: axial slices; 3: 3-D patches.
  data.patch_size = (128, 128)  # Crop size in voxels, one per spatial axis (ndim of them).
  data.foreground_prob = 0.67  # Crops centred on a labelled voxel [default: nnU-Net's 1/3 bg].
  # Random flips swap left and right: with lateral labels (kidney_left/right, spleen vs liver)
  # they teach the network that either side is either organ. Off by default [default].
  data.flip = False
  # Crop resize, (low, high) crop side / patch side, log-uniform, about the crop's centre (no
  # rotation, no mirroring); (1.0, 1.0): crops taken as they are [default].
  data.scale_range = (1.0, 1.0)
  # Intensity augmentation of the crops; the fields mean what they mean in configs/pretrain.py.
  # Off by default [default]; enabled=True turns it on.
  data.intensity = ml_collections.ConfigDict()
  data.intensity.enabled = False  # True: augment the crops' intensities.
  return data


def _model_config() -> ml_collections.ConfigDict:
  model = ml_collections.ConfigDict()
  # Decoder level the 1x1 head reads; None: 0 (full resolution) when fine-tuning, the
  # pre-training's pixel_level for a linear probe (the level the pre-training loss compared).
  model.head_level = config_dict.placeholder(int)
  model.head_dropout = 0.1  # Before the head; > 0 makes MC-dropout uncertainty possible.
  return model


def _optim_config() -> ml_collections.ConfigDict:
  optim = ml_collections.ConfigDict()
  optim.name = 'adamw'  # 'adamw' | 'lars'.
  optim.learning_rate = 1e-3  # Peak rate of the head, for the global batch.
  optim.warmup_steps = 20  # Linear warm-up, then cosine decay to 0 at num_steps.
  optim.weight_decay = 1e-4  # AdamW's decoupled decay (or LARS's), on kernels only.
  optim.grad_clip = 1.0  # Global-norm clipping; 0 disables.
  # The backbone's rate is learning_rate times this; the head's is learning_rate. Below 1 a
  # fine-tuning moves pre-trained weights less (docs/evaluation.md, learning rates).
  optim.backbone_lr_scale = 1.0
  # Head warm-up: the backbone is held for this many first steps while the new head adapts to
  # its features, then trains on its own warm-up and cosine over the remaining steps; 0: off.
  optim.head_warmup_steps = 0
  # Remedies for a fine-tuning that distorts the features it starts from (docs/evaluation.md,
  # the fine-tuning recipe), the same for every init, scratch included; each off by default.
  # L2-SP: alpha / 2 * ||w - w0||^2 over the backbone, w0 its weights at step 0; 0: off.
  optim.l2_sp = 0.0
  # Layer-wise rate decay: each U-Net block's rate times layer_decay ** (its depth from the
  # head along the U, the input block deepest); 1: off.
  optim.layer_decay = 1.0
  # LP-FT: the head alone for this many first steps (its own clip, warm-up and cosine), then
  # every parameter from a fresh optimizer over the remaining steps; 0: off.
  optim.linear_probe_steps = 0
  return optim


def _eval_config() -> ml_collections.ConfigDict:
  ev = ml_collections.ConfigDict()
  ev.split = 'test'  # What --config.mode=evaluate scores.
  ev.checkpoint = 'best'  # 'best' (highest validation Dice) | 'last' | a step number.
  ev.overlap = 0.5  # Sliding-window overlap [paper: 50%].
  ev.gaussian = True  # nnU-Net Gaussian importance weighting.
  ev.batch_size = 16  # Windows per device call.
  ev.uncertainty = False  # Also write the MC-dropout uncertainty map per case.
  ev.mc_samples = 8  # Dropout samples of the uncertainty map.
  ev.export = True  # Write WORKDIR/predictions/<case>.nii.gz on the original grid.
  ev.val_max_cases = 0  # Validation during training: 0 = every 'val' case.
  return ev


def get_config(preset: str | None = None) -> ml_collections.ConfigDict:
  """Returns the fine-tuning config for `preset` (default 'demo')."""
  preset = preset or 'demo'
  config = ml_collections.ConfigDict()
  config.mode = 'finetune'  # 'finetune' | 'evaluate'.
  config.preset = preset  # The preset's name, kept in config.json.
  config.seed = 0  # Seeds the head's init, the label draw, the crops and dropout.
  # 'pretrained' (needs pretrained_workdir) | 'file' (needs init_file) | 'scratch'.
  config.init = 'pretrained'
  config.pretrained_workdir = config_dict.placeholder(str)  # Pre-training run for 'pretrained'.
  # A weights file from python -m pixssl_jax.export_weights (.safetensors or .npz), for init=file.
  config.init_file = config_dict.placeholder(str)
  config.pretrained_step = config_dict.placeholder(int)  # None: the latest checkpoint.
  config.load = 'encoder_decoder'  # 'encoder_decoder' [paper] | 'encoder'.
  # Parameter paths or prefixes left at random initialisation and not checked when loading,
  # e.g. ('backbone/dec0',).
  config.skip_params = ()
  config.linear_probe = False  # Freeze the backbone and train only the 1x1 head.
  config.label_fraction = 0.1  # 0.1 -> split 'train_10', 1.0 -> 'train_100' [paper: both].
  # > 0: this many train_100 cases drawn with `seed` instead of label_fraction (for one seed,
  # smaller counts are subsets of larger ones); 0: use label_fraction.
  config.label_count = 0
  # > 0 (2-D only): of each labelled case only this many axial slices, evenly spaced over its
  # labelled z-range, are used; 0: whole volumes.
  config.label_slices = 0
  # 300 steps learned only liver and vertebrae on the demo (test Dice 26%); 1000 learn all six
  # organs (76%; docs/BENCHMARKS.md), as in the low-label benchmark.
  config.num_steps = 1000
  config.batch_size = 8  # Global batch, over all processes and devices.
  config.log_every = 25  # Progress line, TensorBoard and metrics.jsonl every N steps.
  config.eval_every = 500  # Validation on whole 'val' volumes; a checkpoint each time.
  config.keep_checkpoints = 2  # Latest checkpoints kept, plus the best by validation Dice.
  config.loss = ml_collections.ConfigDict()
  config.loss.dice_weight = 1.0  # Weight of the soft Dice loss.
  config.loss.ce_weight = 1.0  # Weight of the cross-entropy loss.
  config.data = _data_config()
  config.model = _model_config()
  config.optim = _optim_config()
  config.eval = _eval_config()
  common.set_store_fields(config)
  common.set_loader_fields(config)
  common.set_intensity_fields(config)
  common.set_backbone_fields(config)

  if preset == 'tiny':
    config.num_steps = 6
    config.log_every = 2
    config.eval_every = 3
    common.set_tiny_store(config)
    config.data.patch_size = (32, 32)
    config.model.features = (8, 16, 32)
    config.model.num_groups = 4
    config.optim.warmup_steps = 2
    config.eval.batch_size = 32
  elif preset == 'demo':
    # Whole 1.5 mm phantom volumes are about 250 x 250 x 120 voxels: about 1000 windows each on
    # CPU, so validation looks at 2 cases, twice.
    config.eval.val_max_cases = 2
  elif preset == 'btcv_3d':
    config.data.ndim = 3
    config.data.patch_size = (96, 96, 96)
    config.data.worker_count = 8
    config.model.features = (32, 64, 128, 256)
    config.num_steps = 5000
    config.batch_size = 4
    config.log_every = 50
    config.eval_every = 500
    config.optim.learning_rate = 3e-4
    config.optim.warmup_steps = 200
    config.eval.batch_size = 4
  else:
    raise ValueError(f"Unknown preset {preset!r} for configs/finetune.py; choose one of 'tiny', "
                     "'demo', 'btcv_3d'.")
  return config
