r"""A PyTorch port of the PixSSL network and pre-training step: the speed baseline.

  pip install -r requirements-bench.txt   # benchmark-only: CI never installs torch
  PYTHONPATH=. python benchmarks/torch_reference.py --check [--preset tiny|demo|tiny3d]

Same network (U-Net with GroupNorm, stride-2 conv down-sampling, 2x2(x2) transposed-conv
up-sampling, batch-normed global MLP heads, pixel projector, context stabilizer with K MC
dropout samples) and same step (symmetric BYOL global loss, transform-matched pixel loss,
'exp' uncertainty weighting, VICReg terms on the pixel projections, global-norm clipping,
AdamW on the warm-up + cosine schedule, cosine-momentum EMA teacher), with the weights copied
from the Flax params. Torch uses its
native NC(D)HW layout; the heads after the pixel projector run channels last like the JAX code.
Only what the pre-training loss reads is computed (decoder levels finer than `pixel_level` are
not built: XLA drops them from the JAX step too).

`--check` runs one step of both on the same inputs and weights, feeding torch the JAX dropout
masks, and prints the largest differences of loss, metrics, gradients and updated parameters.
`benchmarks/train_step.py` imports `TorchPretrainStep` to time it against the JAX step.
"""

import argparse
import copy
import math

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

# Constants of the Flax code (flax.linen defaults and pixssl_jax.losses).
_GN_EPS = 1e-6  # nn.GroupNorm / nn.LayerNorm epsilon in Flax.
_BATCH_NORM_EPS = 1e-5  # models.heads.BatchStatsNorm.
_NORM_EPS = 1e-6  # losses.global_consistency._NORM_EPS.
_BOUNDARY_TOL = 1e-3  # losses.pixel_matching._BOUNDARY_TOL.
_NEGATIVE_SLOPE = 0.01


def _conv(ndim):
  return nn.Conv2d if ndim == 2 else nn.Conv3d


class ConvBlock(nn.Module):
  """Two conv3x3(x3) -> GroupNorm -> LeakyReLU layers; the first may have stride 2."""

  def __init__(self, cin, cout, ndim, groups, stride):
    super().__init__()
    self.ndim, self.stride = ndim, stride
    # XLA's 'SAME' for a stride-2 3-wide kernel on an even size pads (0, 1), not (1, 1).
    self.conv0 = _conv(ndim)(cin, cout, 3, stride=stride, padding=1 if stride == 1 else 0)
    self.norm0 = nn.GroupNorm(groups, cout, eps=_GN_EPS)
    self.conv1 = _conv(ndim)(cout, cout, 3, padding=1)
    self.norm1 = nn.GroupNorm(groups, cout, eps=_GN_EPS)

  def forward(self, x):
    if self.stride != 1:
      x = F.pad(x, (0, 1) * self.ndim)
    x = F.leaky_relu(self.norm0(self.conv0(x)), _NEGATIVE_SLOPE)
    return F.leaky_relu(self.norm1(self.conv1(x)), _NEGATIVE_SLOPE)


class UNet(nn.Module):
  """The encoder and the decoder levels down to `lowest_level` (what pre-training reads)."""

  def __init__(self, ndim, features, groups, lowest_level):
    super().__init__()
    self.levels, self.lowest = len(features), lowest_level
    cin = 1
    for level, width in enumerate(features):
      self.add_module(f'enc{level}', ConvBlock(cin, width, ndim, groups, 1 if level == 0 else 2))
      cin = width
    up = nn.ConvTranspose2d if ndim == 2 else nn.ConvTranspose3d
    for level in range(self.levels - 2, lowest_level - 1, -1):
      self.add_module(f'up{level}', up(features[level + 1], features[level], 2, stride=2))
      self.add_module(f'dec{level}', ConvBlock(2 * features[level], features[level], ndim, groups,
                                               1))

  def forward(self, x):
    skips = []
    for level in range(self.levels):
      x = getattr(self, f'enc{level}')(x)
      skips.append(x)
    bottleneck = x
    for level in range(self.levels - 2, self.lowest - 1, -1):
      x = torch.cat([getattr(self, f'up{level}')(x), skips[level]], dim=1)
      x = getattr(self, f'dec{level}')(x)
    return bottleneck, x


class BatchStatsNorm(nn.Module):
  """Per-feature normalisation over the batch, learned scale and bias, no running state."""

  def __init__(self, features):
    super().__init__()
    self.weight = nn.Parameter(torch.ones(features))
    self.bias = nn.Parameter(torch.zeros(features))

  def forward(self, x):
    mean = x.mean(0, keepdim=True)
    var = (x - mean).square().mean(0, keepdim=True)
    return (x - mean) * torch.rsqrt(var + _BATCH_NORM_EPS) * self.weight + self.bias


class MLPHead(nn.Module):
  """Dense -> batch norm -> ReLU -> Dense (BYOL projector / predictor)."""

  def __init__(self, cin, hidden, out, output_bias):
    super().__init__()
    self.dense0 = nn.Linear(cin, hidden, bias=False)
    self.norm = BatchStatsNorm(hidden)
    self.dense1 = nn.Linear(hidden, out, bias=output_bias)

  def forward(self, x):
    return self.dense1(F.relu(self.norm(self.dense0(x))))


class PixelProjector(nn.Module):
  """1x1 conv -> GroupNorm -> ReLU -> 1x1 conv, NC(D)HW in, channels last out."""

  def __init__(self, ndim, cin, hidden, out, groups):
    super().__init__()
    self.conv0 = _conv(ndim)(cin, hidden, 1)
    self.norm = nn.GroupNorm(groups, hidden, eps=_GN_EPS)
    self.conv1 = _conv(ndim)(hidden, out, 1)

  def forward(self, x):
    y = self.conv1(F.relu(self.norm(self.conv0(x))))
    return torch.movedim(y, 1, -1)


class Stabilizer(nn.Module):
  """Dense -> LayerNorm -> ReLU -> (dropout) -> Dense, channels last."""

  def __init__(self, cin, hidden, out):
    super().__init__()
    self.conv0 = nn.Linear(cin, hidden)
    self.norm = nn.LayerNorm(hidden, eps=_GN_EPS)
    self.conv1 = nn.Linear(hidden, out)

  def hidden(self, x):
    return F.relu(self.norm(self.conv0(x)))


class PixSSL(nn.Module):
  """Student/teacher network; parameter names mirror the Flax tree."""

  def __init__(self, flax_model):
    super().__init__()
    m = flax_model
    self.ndim = m.ndim
    self.backbone = UNet(m.ndim, tuple(m.features), m.num_groups, m.pixel_level)
    if m.head_norm != 'batch':
      raise NotImplementedError("the reference ports head_norm='batch' only")
    self.projector = MLPHead(m.features[-1], m.proj_hidden, m.proj_dim, output_bias=False)
    self.predictor = MLPHead(m.proj_dim, m.proj_hidden, m.proj_dim, output_bias=True)
    self.pixel_projector = PixelProjector(m.ndim, m.features[m.pixel_level], m.proj_hidden,
                                          m.pixel_proj_dim, m.num_groups)
    self.stabilizer = Stabilizer(m.pixel_proj_dim, m.stabilizer_hidden, m.pixel_proj_dim)

  def forward(self, x, with_predictor=True):
    bottleneck, pixel_features = self.backbone(x)
    out = {'global_proj': self.projector(bottleneck.mean(dim=tuple(range(2, 2 + self.ndim))))}
    if with_predictor:
      out['global_pred'] = self.predictor(out['global_proj'])
    out['pixel_proj'] = self.pixel_projector(pixel_features)
    return out


# ----------------------------------------------------------------------------------------------
# Weights: Flax layout <-> torch layout.


def _flatten(tree, prefix=()):
  for key, value in tree.items():
    if isinstance(value, dict) or hasattr(value, 'items'):
      yield from _flatten(value, prefix + (key,))
    else:
      yield prefix + (key,), value


def flax_to_torch_array(module: nn.Module, leaf: str, value) -> np.ndarray:
  """One Flax leaf in the layout of the torch parameter it maps to."""
  value = np.asarray(value, np.float32)
  if leaf != 'kernel':
    return value  # Biases and norm scales are vectors in both.
  if isinstance(module, nn.Linear):
    return value.T  # [in, out] -> [out, in].
  n = value.ndim - 2
  if isinstance(module, (nn.ConvTranspose2d, nn.ConvTranspose3d)):
    # Flax's ConvTranspose does not flip its kernel (transpose_kernel=False); torch's is the
    # true transpose of a convolution, so the spatial taps are mirrored. [*k, I, O] -> [I, O, *k].
    flipped = value[(slice(None, None, -1),) * n]
    return np.ascontiguousarray(np.transpose(flipped, (n, n + 1, *range(n))))
  if isinstance(module, (nn.Conv2d, nn.Conv3d)):
    if value.ndim == 2:  # A Dense used as a 1x1(x1) conv: [I, O] -> [O, I, 1, 1(, 1)].
      return value.T.reshape(value.shape[1], value.shape[0], *(1,) * (module.weight.ndim - 2))
    return np.ascontiguousarray(np.transpose(value, (n + 1, n, *range(n))))  # [*k,I,O]->[O,I,*k].
  raise TypeError(f'no layout rule for {type(module).__name__}')


def torch_targets(model: PixSSL, flax_params):
  """Yields `(flax path, torch parameter, flax value in torch layout)` for every mapped leaf.

  Flax leaves of decoder levels that pre-training never reads (finer than `pixel_level`) have
  no torch counterpart and are skipped.
  """
  for path, value in _flatten(flax_params):
    module_name, leaf = '.'.join(path[:-1]), path[-1]
    try:
      module = model.get_submodule(module_name)
    except AttributeError:
      level = path[1]
      if path[0] == 'backbone' and level[:2] in ('up', 'de'):
        continue
      raise
    param = getattr(module, 'bias' if leaf == 'bias' else 'weight')
    target = flax_to_torch_array(module, leaf, value)
    if tuple(param.shape) != target.shape:
      raise ValueError(f'{path}: torch {tuple(param.shape)} vs flax {target.shape}')
    yield path, param, target


def load_flax_params(model: PixSSL, flax_params) -> PixSSL:
  """Copies a Flax params tree into the torch model (in place); every torch param is set."""
  seen = set()
  with torch.no_grad():
    for _, param, target in torch_targets(model, flax_params):
      param.copy_(torch.from_numpy(np.array(target)))
      seen.add(id(param))
  missing = [n for n, p in model.named_parameters() if id(p) not in seen]
  if missing:
    raise ValueError(f'torch parameters without a Flax value: {missing}')
  return model


# ----------------------------------------------------------------------------------------------
# The loss and the step.


def l2_normalize(x):
  return x * torch.rsqrt(torch.clamp(x.square().sum(-1, keepdim=True), min=_NORM_EPS ** 2))


def cosine_discrepancy(a, b):
  return 2.0 - 2.0 * (l2_normalize(a) * l2_normalize(b)).sum(-1)


def variance_covariance(features, target_std=1.0, eps=1e-4):
  """`losses.variance_covariance` (VICReg's terms) over all leading positions of `[..., C]`."""
  z = features.reshape(-1, features.shape[-1])
  centred = z - z.mean(0)
  cov = centred.T @ centred / max(z.shape[0] - 1, 1)
  variance = torch.relu(target_std - torch.sqrt(torch.diagonal(cov) + eps)).mean()
  off_diagonal = cov - torch.diag(torch.diagonal(cov))
  return variance, off_diagonal.square().sum() / z.shape[-1]


def dropout_scales(k, hidden_shape, rate, generator=None):
  """K inverted-dropout multipliers from 8-bit draws, as `models.heads.dropout_scale`."""
  threshold = int(round(rate * 256))
  draws = torch.randint(0, 256, (k, *hidden_shape), dtype=torch.uint8, generator=generator)
  return (draws >= threshold).to(torch.float32) * (256.0 / (256 - threshold))


def match_features(feats, t_src, t_dst, stride):
  """Teacher features read where each source cell lands in the destination view.

  As `losses.pixel_matching.match_features`: the cell-to-cell affine, then (bi/tri)linear
  interpolation as a gather of the 2**n corners.
  """
  batch, grid, channels = feats.shape[0], tuple(feats.shape[1:-1]), feats.shape[-1]
  n = len(grid)
  a_dst_inv = torch.linalg.inv(t_dst[:, :, :n])
  rot = a_dst_inv @ t_src[:, :, :n]
  shift = torch.einsum('bij,bj->bi', a_dst_inv, t_src[:, :, n] - t_dst[:, :, n])
  half = (stride - 1) / 2.0
  offset = (half * rot.sum(-1) + shift - half) / stride
  axes = [torch.arange(g, dtype=feats.dtype) for g in grid]
  cells = torch.stack(torch.meshgrid(*axes, indexing='ij'), dim=-1)
  coords = torch.einsum('bij,...j->b...i', rot, cells) + offset.reshape(batch, *(1,) * n, n)
  size = torch.tensor(grid, dtype=feats.dtype)
  valid = ((coords >= -_BOUNDARY_TOL) & (coords <= size - 1.0 + _BOUNDARY_TOL)).all(-1)

  coords = coords.reshape(batch, -1, n)
  coords = torch.minimum(torch.clamp(coords, min=0.0), size - 1.0)
  lo = torch.minimum(torch.clamp(torch.floor(coords), min=0.0), torch.clamp(size - 2.0, min=0.0))
  frac = coords - lo
  lo = lo.to(torch.int64)
  flat = feats.reshape(batch, -1, channels)
  strides = [int(np.prod(grid[k + 1:])) for k in range(n)]
  out = torch.zeros(batch, coords.shape[1], channels, dtype=feats.dtype)
  for corner in np.ndindex(*(2,) * n):
    rows, weight = 0, 1.0
    for k, bit in enumerate(corner):
      rows = rows + torch.clamp(lo[..., k] + bit, max=grid[k] - 1) * strides[k]
      weight = weight * (frac[..., k] if bit else 1.0 - frac[..., k])
    picked = torch.gather(flat, 1, rows[..., None].expand(-1, -1, channels))
    out = out + weight[..., None] * picked
  return out.reshape(batch, *grid, channels), valid


def ema_momentum(step, num_steps, base):
  progress = min(max(step / max(num_steps, 1), 0.0), 1.0)
  return 1.0 - (1.0 - base) * (math.cos(math.pi * progress) + 1.0) / 2.0


def learning_rates(optim_cfg, num_steps, count):
  """`state.learning_rate_schedule` at steps 0..count-1 (computed once, outside the step)."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from pixssl_jax.train import optimizers  # pylint: disable=g-import-not-at-top
  schedule = optimizers.learning_rate_schedule(optim_cfg, num_steps)
  return [float(schedule(jnp.asarray(i))) for i in range(count)]


class TorchPretrainStep:
  """Student, EMA teacher and AdamW of the PyTorch reference; `step(batch)` is one train step.

  Supports the default method: global + pixel terms, the stabilizer with K MC dropout samples,
  'exp' weighting, 'inverse' matching, AdamW with global-norm clipping.
  """

  def __init__(self, flax_model, config, params, ema_params, lr_steps=64,
               compute_dtype=None):
    """Builds the student and teacher on torch's default device (`torch.set_default_device`).

    `compute_dtype` (e.g. `torch.bfloat16`) runs the forward passes under `torch.autocast`, as
    the JAX model's `model.dtype`; None: float32.
    """
    method, optim = config.method, config.optim
    if not (method.use_global and method.use_pixel and method.use_stabilizer):
      raise NotImplementedError('the reference ports the full method only')
    if method.weighting != 'exp' or method.match != 'inverse' or optim.name != 'adamw':
      raise NotImplementedError("the reference ports weighting='exp', match='inverse', adamw")
    self.config, self.flax_model = config, flax_model
    self.student = load_flax_params(PixSSL(flax_model), params)
    self.teacher = load_flax_params(copy.deepcopy(self.student), ema_params)
    for p in self.teacher.parameters():
      p.requires_grad_(False)
    self.params = list(self.student.parameters())
    decay = [p for p in self.params if p.ndim > 1]  # As state._decay_mask: kernels only.
    other = [p for p in self.params if p.ndim <= 1]
    self.optimizer = torch.optim.AdamW(
        [{'params': decay, 'weight_decay': optim.weight_decay},
         {'params': other, 'weight_decay': 0.0}],
        lr=0.0, betas=(0.9, 0.999), eps=1e-8, fused=True)
    self.lrs = learning_rates(optim, config.num_steps, lr_steps)
    self.step_count = 0
    self.compute_dtype = compute_dtype
    self.generator = torch.Generator(torch.get_default_device()).manual_seed(int(config.seed))

  @staticmethod
  def to_torch_batch(batch):
    """`[B, *P, 1]` channels-last views -> `[B, 1, *P]` tensors; transforms as they are."""
    out = {k: torch.from_numpy(np.ascontiguousarray(np.moveaxis(np.asarray(batch[k]), -1, 1)))
           for k in ('view1', 'view2')}
    out.update({k: torch.from_numpy(np.asarray(batch[k], np.float32))
                for k in ('transform1', 'transform2')})
    return {k: v.to(torch.get_default_device()) for k, v in out.items()}

  def loss(self, batch, scales=None):
    """`objective.pretrain_loss`: returns `(loss, metrics)`; `scales` [K, 2B, *G, H] optional."""
    method, model = self.config.method, self.flax_model
    view1, view2 = batch['view1'], batch['view2']
    b = view1.shape[0]
    views = torch.cat([view1, view2], 0)
    student = self.student(views)
    with torch.no_grad():
      teacher = self.teacher(views, with_predictor=False)

    pred, target = student['global_pred'], teacher['global_proj']
    loss_global = (cosine_discrepancy(pred[:b], target[b:])
                   + cosine_discrepancy(pred[b:], target[:b])).mean() / 2.0
    with torch.no_grad():
      projection_std = l2_normalize(student['global_proj']).std(0, correction=0).mean()

    # Stabilizer: hidden layer once; mean prediction through the mean mask; K samples no-grad.
    stab = self.student.stabilizer
    hidden = stab.hidden(student['pixel_proj'])
    k = int(method.mc_samples)
    if scales is None:
      scales = dropout_scales(k, hidden.shape, model.stabilizer_dropout, self.generator)
    pred_pix = stab.conv1(hidden * scales.mean(0))
    with torch.no_grad():
      samples = l2_normalize(stab.conv1(hidden[None] * scales))
      mean_direction = samples.mean(0)
      second = samples.square().sum(-1).mean(0)
      uncertainty = torch.clamp(second - mean_direction.square().sum(-1), min=0.0)
      uncertainty = uncertainty / samples.shape[-1]

    t1, t2 = batch['transform1'], batch['transform2']
    tpix = teacher['pixel_proj']
    matched, valid = match_features(torch.cat([tpix[b:], tpix[:b]], 0), torch.cat([t1, t2], 0),
                                    torch.cat([t2, t1], 0), model.pixel_stride)
    discrepancy = cosine_discrepancy(pred_pix, matched)
    mask = valid.to(discrepancy.dtype)
    weight = torch.exp(-uncertainty / float(method.tau_absolute)) * mask
    total = weight.sum()
    loss_pixel = torch.where(total > 0, (weight * discrepancy).sum()
                             / torch.where(total > 0, total, 1.0), 0.0)
    loss_variance, loss_covariance = variance_covariance(student['pixel_proj'])
    loss = (float(method.lambda_global) * loss_global + float(method.lambda_pixel) * loss_pixel
            + float(method.lambda_variance) * loss_variance
            + float(method.lambda_covariance) * loss_covariance)
    with torch.no_grad():
      n_valid = mask.sum()
      u_mean = torch.where(n_valid > 0, (uncertainty * mask).sum() / torch.clamp(n_valid, min=1),
                           0.0)
      u_p90 = torch.nan_to_num(torch.nanquantile(
          torch.where(valid, uncertainty, torch.nan).flatten(), 0.9))
    metrics = dict(loss=loss.detach(), loss_global=loss_global.detach(),
                   loss_pixel=loss_pixel.detach(), loss_variance=loss_variance.detach(),
                   loss_covariance=loss_covariance.detach(), uncertainty_mean=u_mean,
                   uncertainty_p90=u_p90, overlap_fraction=mask.mean(),
                   projection_std=projection_std)
    return loss, metrics

  def step(self, batch, scales=None):
    """One optimizer step of the student and one EMA step of the teacher; returns metrics."""
    optim = self.config.optim
    self.optimizer.zero_grad(set_to_none=False)
    with torch.autocast(torch.get_default_device().type, dtype=self.compute_dtype,
                        enabled=self.compute_dtype is not None):
      loss, metrics = self.loss(batch, scales)
    loss.backward()
    grads = [p.grad for p in self.params]
    grad_norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))  # pylint: disable=protected-access
    if optim.grad_clip > 0:
      torch._foreach_mul_(grads, torch.clamp(optim.grad_clip / grad_norm, max=1.0))  # pylint: disable=protected-access
    lr = self.lrs[min(self.step_count, len(self.lrs) - 1)]
    for group in self.optimizer.param_groups:
      group['lr'] = lr
    self.optimizer.step()
    momentum = ema_momentum(self.step_count, self.config.num_steps, optim.ema_momentum)
    with torch.no_grad():
      torch._foreach_lerp_(list(self.teacher.parameters()), self.params, 1.0 - momentum)  # pylint: disable=protected-access
    self.step_count += 1
    return dict(metrics, grad_norm=grad_norm, ema_momentum=momentum, lr=lr)


# ----------------------------------------------------------------------------------------------
# The equivalence check.


def check(preset: str, seed: int = 0) -> dict[str, float]:
  """One JAX step and one torch step from the same weights, inputs and dropout masks.

  Returns:
    Largest absolute differences: `loss`, `metrics` (largest over the metrics), `grads`,
    `params` and `ema_params` after the step; the loss and gradients against torch in float64
    (`*_vs_float64`), and for scale the JAX loss, the largest gradient and the step's rate.
  """
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from benchmarks import train_step as bench  # pylint: disable=g-import-not-at-top
  from pixssl_jax.models import heads  # pylint: disable=g-import-not-at-top
  from pixssl_jax.models import pixssl  # pylint: disable=g-import-not-at-top
  from pixssl_jax.train import loop  # pylint: disable=g-import-not-at-top
  from pixssl_jax.train import mesh as mesh_lib  # pylint: disable=g-import-not-at-top
  from pixssl_jax import objective  # pylint: disable=g-import-not-at-top
  from pixssl_jax.train import optimizers  # pylint: disable=g-import-not-at-top
  from pixssl_jax.train import pretrain  # pylint: disable=g-import-not-at-top

  config = bench.preset_config(preset)
  mesh = mesh_lib.make_data_mesh(jax.devices()[:1])
  model = pixssl.build_model(config.model, config.data.ndim)
  tx = optimizers.make_optimizer(config.optim, config.num_steps)
  state = pretrain.init_train_state(model, tx, config, mesh)
  # Perturb the teacher so student and teacher differ, as they do after the first step.
  leaves, treedef = jax.tree.flatten(state.ema_params)
  noise = jax.random.split(jax.random.PRNGKey(seed + 1), len(leaves))
  ema = jax.tree.unflatten(treedef, [x + 0.01 * jax.random.normal(k, x.shape)
                                     for x, k in zip(leaves, noise)])
  state = state.replace(ema_params=ema)
  batch_np = bench.random_batch(config, np.random.default_rng(seed))
  batch = jax.tree.map(jnp.asarray, batch_np)

  # JAX: loss, metrics and gradients, then the jitted train step itself.
  key = loop.step_key(config.seed, state.step)
  loss_fn = lambda p: objective.pretrain_loss(  # noqa: E731
      p, state.ema_params, batch, key, state.step, model=model, method_cfg=config.method,
      num_steps=config.num_steps)
  (jax_loss, jax_metrics), jax_grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(
      state.params)
  torch_step = TorchPretrainStep(model, config, jax.device_get(state.params),
                                 jax.device_get(state.ema_params))
  new_state, _ = jax.jit(lambda s, x: pretrain.train_step(s, x, model=model, tx=tx,
                                                          config=config))(state, batch)

  # The JAX dropout masks of this step, fed to torch.
  grid = [p // model.pixel_stride for p in config.data.patch_size]
  hidden_shape = (2 * config.batch_size, *grid, model.stabilizer_hidden)
  scales = jax.vmap(lambda k: heads.dropout_scale(hidden_shape, model.stabilizer_dropout, k))(
      jax.random.split(key, int(config.method.mc_samples)))
  scales = torch.from_numpy(np.array(scales))

  tbatch = TorchPretrainStep.to_torch_batch(batch_np)
  jax_grads = jax.device_get(jax_grads)

  def torch_loss_and_grads(dtype):
    """Torch loss and gradients in `dtype`, as `[(flax path, torch grad, JAX grad)]`."""
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
      ref = TorchPretrainStep(model, config, jax.device_get(state.params),
                              jax.device_get(state.ema_params))
      loss, metrics = ref.loss({k: v.to(dtype) for k, v in tbatch.items()}, scales.to(dtype))
      loss.backward()
    finally:
      torch.set_default_dtype(default)
    grads = [(path, param.grad.numpy(), target)
             for path, param, target in torch_targets(ref.student, jax_grads)]
    return loss.detach(), metrics, grads

  # float64 torch is the referee: a float32 rounding difference can flip the sign of a
  # near-zero pre-activation, and at a leaky-ReLU kink that changes one gradient element by
  # (1 - 0.01) of its upstream gradient, in either implementation.
  t_loss, t_metrics, grads32 = torch_loss_and_grads(torch.float32)
  loss64, _, grads64 = torch_loss_and_grads(torch.float64)
  grad_diff = max(float(np.max(np.abs(g - t))) for _, g, t in grads32)
  grad_diff64 = max(float(np.max(np.abs(g - t))) for _, g, t in grads64)
  grad_diff_torch = max(float(np.max(np.abs(a[1] - b[1]))) for a, b in zip(grads32, grads64))
  grad_max = max(float(np.max(np.abs(t))) for _, _, t in grads32)
  # Now the whole step (from the same starting weights: reload them).
  torch_step = TorchPretrainStep(model, config, jax.device_get(state.params),
                                 jax.device_get(state.ema_params))
  torch_step.step(tbatch, scales)

  def param_diff(module, tree):
    return max(float(np.max(np.abs(p.detach().numpy() - t)))
               for _, p, t in torch_targets(module, jax.device_get(tree)))

  return {
      'loss': abs(float(t_loss) - float(jax_loss)),
      'loss_value': float(jax_loss),
      'metrics': max(abs(float(t_metrics[k]) - float(jax_metrics[k])) for k in t_metrics),
      'loss_vs_float64': abs(float(loss64) - float(jax_loss)),
      'grads': grad_diff,
      'grads_vs_float64': grad_diff64,
      'torch_grads_vs_float64': grad_diff_torch,
      'grad_max': grad_max,
      'params': param_diff(torch_step.student, new_state.params),
      'ema_params': param_diff(torch_step.teacher, new_state.ema_params),
      'lr': torch_step.lrs[0],
  }


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--check', action='store_true', help='compare one step with the JAX step')
  parser.add_argument('--preset', default='demo',
                      help='benchmarks/train_step.py preset name (tiny, tiny3d, demo, 3d64, ...)')
  args = parser.parse_args()
  if not args.check:
    parser.error('nothing to do: pass --check (timing lives in benchmarks/train_step.py)')
  diffs = check(args.preset)
  print(f'preset {args.preset}: max |JAX - torch float32| unless named (loss_value: the JAX loss; '
        'grad_max: the largest JAX gradient; lr: the step\'s learning rate)')
  for name, value in diffs.items():
    print(f'  {name}: {value:.3g}')


if __name__ == '__main__':
  main()
