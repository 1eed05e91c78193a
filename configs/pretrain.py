r"""Pre-training configs for pixssl_jax.

Run a preset with:

  python -m pixssl_jax.main --config configs/pretrain.py:demo --workdir runs/demo

Presets (the part after the colon):
  tiny     a few-second 2-D run on tiny phantoms, used by the tests.
  demo     the default: 2-D 128x128 axial slices of the embedded phantom dataset, on a CPU (its
           wall time: docs/BENCHMARKS.md, "Pre-training demo, end to end").
  btcv_3d  3-D 96^3 patches from a local prepared store:
             --config.data.data_dir=/path/to/store (see README "Preparing a real dataset").
  tpu_pod  btcv_3d at pod scale: the global batch spread over all chips, bf16 compute, fp32 params.

Every field can be overridden on the command line (`--config.num_steps=50`,
`--config.method.weighting=kendall`); unknown keys are an error. Fields marked [paper] are fixed
by Zhang & Zhang (arXiv 2210.00646); the rest are our defaults (see ../docs/method.md).
"""

import ml_collections

from pixssl_jax import config_files


# Config files are loaded by path; their shared blocks come from the common.py beside them.
common = config_files.shared_fields(__file__)


def _data_config() -> ml_collections.ConfigDict:
  """How the two views are made (the store and loader fields: configs/common.py)."""
  data = ml_collections.ConfigDict()
  data.ndim = 2  # 2: axial slices; 3: 3-D patches.
  data.patch_size = (128, 128)  # View size in voxels, one per spatial axis (ndim of them).
  # Spatial augmentation [default]: overlapping random crops, resized.
  data.region_scale = 2.0  # The region both views come from: region_scale * patch, per axis.
  data.min_overlap = 0.3  # Least fraction of each view's voxels that the other view also shows.
  data.scale_range = (0.7, 1.4)  # Crop side / patch side (log-uniform), resized to the patch.
  # No flips, no axial quarter turns: both swap left and right (kidney_left/right, liver and
  # spleen sides), as fine-tuning's flips would; True, True restore the natural-image views.
  data.flip = False
  data.rot90 = False  # Random axial quarter turns; off for the reason above.
  data.min_body_fraction = 0.05  # 2-D: draw slices with at least this fraction of body voxels.
  # Intensity augmentation [default], applied independently to each view.
  data.intensity = ml_collections.ConfigDict()
  data.intensity.enabled = True  # False: views are only windowed, never augmented.
  # Student masking: this share of the cubes of mask_patch voxels per side of each view is
  # hidden from the student (the teacher sees the whole view); 0: off.
  data.mask_ratio = 0.0
  data.mask_patch = 8  # Side of a masking cube, voxels.
  return data


def _model_config() -> ml_collections.ConfigDict:
  """The heads (the backbone's fields: configs/common.py)."""
  model = ml_collections.ConfigDict()
  model.proj_hidden = 256  # Global projector/predictor MLP [default: BYOL shape, smaller].
  model.proj_dim = 128  # Output size of the global projector and predictor.
  # Norm of the global MLP heads: 'batch' (statistics over the global batch, as BYOL; under jit
  # this is sharding-independent) or 'layer' (per sample; collapses the global branch early).
  model.head_norm = 'batch'
  # Norm inside the pixel projector: 'group' (per sample) or 'batch' (over the batch and all
  # positions, as PixPro). See docs/BENCHMARKS.md, low-label benchmark, for why it matters.
  model.pixel_norm = 'group'
  model.pixel_level = 2  # Decoder level of the pixel features: stride 2**pixel_level.
  # The pixel projector also reads the finer decoder levels, average-pooled onto that grid, so
  # pre-training trains the full-resolution decoder the segmentation head reads; False: level
  # pixel_level only (levels below it then keep their initial weights).
  model.pixel_hypercolumn = True
  model.pixel_proj_dim = 64  # Channels of the pixel projection (and the stabilizer's output).
  model.stabilizer_hidden = 64  # Context stabilizer: 1x1-conv MLP with dropout [default].
  model.stabilizer_dropout = 0.1  # The stabilizer's MC-dropout rate; 0: no uncertainty.
  return model


def _method_config() -> ml_collections.ConfigDict:
  """Loss terms, MC dropout and uncertainty weighting (see ../docs/method.md)."""
  method = ml_collections.ConfigDict()
  method.use_global = True  # Global consistency [paper].
  method.use_pixel = True  # Pixel consistency [paper].
  method.use_stabilizer = True  # Context stabilizer [paper]; False: compare projections directly.
  method.mc_samples = 8  # K dropout samples [default]; 1: no MC dropout, no uncertainty.
  method.weighting = 'exp'  # 'exp' [default] | 'kendall' | 'threshold' | 'none'.
  # The uncertainty u is a channel-mean variance of unit vectors, so 0 <= u <= 1/pixel_proj_dim,
  # and it shrinks several fold during training. 'relative' [default] measures u against the
  # batch (exp, threshold) or against 1/pixel_proj_dim (kendall), so the weighting keeps its
  # strength; 'absolute' uses raw u with tau_absolute and threshold_start/end on u's scale.
  method.weighting_scale = 'relative'  # 'relative' | 'absolute'.
  method.tau = 1.0  # 'exp' relative: w = exp(-clip(z, -3, 3) / tau), z = u standardised.
  method.tau_absolute = 2e-3  # 'exp' absolute: w = exp(-u / tau_absolute).
  method.kendall_eps = 1e-3  # 'kendall': s = log(pixel_proj_dim * u + eps); absolute log(u + eps).
  # 'threshold' relative: keep the most certain fraction of valid pixels, ramped start -> end.
  method.threshold_keep_start = 0.5
  method.threshold_keep_end = 0.9  # The fraction kept at the last step.
  # 'threshold' absolute: keep u < t, t ramped start -> end (UA-MT ramp).
  method.threshold_start = 2e-3
  method.threshold_end = 4e-3  # The threshold at the last step.
  # Uncertainty calibration [ours, off by default]: 1 - Pearson correlation of log u and the
  # rank of the (constant) discrepancy d over the valid pixels, trained into the stabilizer's
  # weights only, so its MC-dropout spread ranks pixels as d does (docs/method.md). 1 makes u
  # predict d on held-out cases, and costs fine-tuned Dice on the low-label benchmark
  # (docs/BENCHMARKS.md); 0: off.
  method.lambda_calibration = 0.0
  method.lambda_global = 1.0  # Weight of the global consistency term.
  method.lambda_pixel = 1.0  # Weight of the pixel consistency term.
  method.match = 'inverse'  # 'inverse' (exact inverse mapping) | 'distance' (PixPro threshold).
  method.match_distance = 0.7  # 'distance': a pair if closer than this many feature-cell diagonals.
  # Anti-collapse [default, not in the paper's abstract]: VICReg's variance hinge and covariance
  # term on the student's pixel projections. Without them the pixel branch collapses to one
  # vector per view (docs/BENCHMARKS.md, low-label benchmark); 0 and 0 switch them off.
  method.lambda_variance = 1.0
  method.lambda_covariance = 0.04  # VICReg's 1 : 25 ratio to the variance term.
  # Masked-image restoration [reference objective, not the paper's]: a 1x1 head on decoder
  # level 0 restores the cells hidden from the student (data.mask_ratio > 0). With use_global
  # and use_pixel False it is the control objective of the low-label benchmark; 0: off.
  method.lambda_restoration = 0.0
  method.restoration_loss = 'l2'  # 'l2' (MAE) | 'l1', over the hidden voxels.
  return method


def _optim_config() -> ml_collections.ConfigDict:
  optim = ml_collections.ConfigDict()
  optim.name = 'adamw'  # 'adamw' | 'lars'.
  optim.learning_rate = 1e-3  # Peak, for the global batch.
  optim.warmup_steps = 20  # Linear warm-up, then cosine decay to 0 at num_steps.
  optim.weight_decay = 1e-4  # AdamW's decoupled decay (or LARS's), on kernels only.
  optim.grad_clip = 1.0  # Global-norm clipping; 0 disables.
  optim.ema_momentum = 0.996  # Teacher momentum m0, cosine-ramped to 1 [default: BYOL].
  # Share of its (random) initialisation the teacher may still hold after the last step: m0 is
  # lowered below ema_momentum for runs too short to reach it; 0: m0 = ema_momentum.
  optim.ema_final_init_share = 1e-3
  return optim


def get_config(preset: str | None = None) -> ml_collections.ConfigDict:
  """Returns the pre-training config for `preset` (default 'demo')."""
  preset = preset or 'demo'
  config = ml_collections.ConfigDict()
  config.mode = 'pretrain'  # The job main runs: this file's configs pre-train.
  config.preset = preset  # The preset's name, kept in config.json.
  config.seed = 0  # Seeds the init, the data stream and every step's random keys.
  config.num_steps = 180  # Optimizer steps; the schedules end here.
  config.batch_size = 8  # Global batch, over all processes and devices.
  config.log_every = 10  # Progress line, TensorBoard and metrics.jsonl every N steps.
  config.checkpoint_every = 50  # A checkpoint every N steps and after the last.
  config.keep_checkpoints = 3  # Newest checkpoints kept.
  config.image_every = 50  # TensorBoard images: both views, overlap, uncertainty; 0 disables.
  config.data = _data_config()
  config.model = _model_config()
  config.method = _method_config()
  config.optim = _optim_config()
  common.set_store_fields(config)
  common.set_loader_fields(config)
  common.set_intensity_fields(config)
  common.set_backbone_fields(config)

  if preset == 'tiny':
    config.num_steps = 4
    config.batch_size = 8
    config.log_every = 1
    config.checkpoint_every = 2
    config.image_every = 2
    common.set_tiny_store(config)
    config.data.patch_size = (32, 32)
    config.model.features = (8, 16, 32)
    config.model.num_groups = 4
    config.model.proj_hidden = 32
    config.model.proj_dim = 16
    config.model.pixel_level = 1
    config.model.pixel_proj_dim = 16
    config.model.stabilizer_hidden = 32
    config.method.mc_samples = 4
    config.optim.warmup_steps = 2
  elif preset == 'demo':
    pass
  elif preset in ('btcv_3d', 'tpu_pod'):
    config.data.ndim = 3
    config.data.patch_size = (96, 96, 96)
    config.model.features = (32, 64, 128, 256)
    config.model.proj_hidden = 1024
    config.model.proj_dim = 256
    config.model.pixel_proj_dim = 128
    config.model.stabilizer_hidden = 256
    config.num_steps = 20_000
    config.batch_size = 8
    config.log_every = 50
    config.checkpoint_every = 1000
    config.image_every = 1000
    config.optim.learning_rate = 2e-4
    config.optim.warmup_steps = 1000
    config.data.worker_count = 8
    if preset == 'tpu_pod':
      config.batch_size = 256  # Global: e.g. 4 per chip on a v5e-64.
      config.model.dtype = 'bfloat16'
      config.optim.learning_rate = 2e-3
      config.data.worker_count = 16
  else:
    raise ValueError(
        f'Unknown preset {preset!r} for configs/pretrain.py; '
        "choose one of 'tiny', 'demo', 'btcv_3d', 'tpu_pod'.")
  return config
