"""Remedies for a fine-tuning that distorts the features it starts from, as config fields.

Each applies to every arm alike (from scratch the start is the random initialisation), and each
is off at its default, where the fine-tuning is exactly the plain one:

- L2-SP (Li et al. 2018), `optim.l2_sp` = alpha: the objective gains
  `alpha / 2 * ||w - w0||^2` over every backbone parameter, `w0` the backbone the fine-tuning
  started from (`SegState.start_backbone`, checkpointed with the state, so a resumed run pulls
  towards the same point).
- Layer-wise learning-rate decay, `optim.layer_decay` = d: each U-Net block's updates are
  scaled by `d ** depth`, its depth counted from the head along the U (`block_depth`).
- LP-FT (Kumar et al. 2022), `optim.linear_probe_steps` = N: a linear probe of N steps (the
  head alone, on its own clip, warm-up and cosine), then a fresh fine-tuning of everything
  over the remaining steps (`linear_probe_then_finetune`).
- How far the backbone moved, `relative_distance`: `||w - w0|| / ||w0||`, logged at each
  validation.
"""

import re
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax

from pixssl_jax.train import optimizers

_BLOCK = re.compile(r'(enc|up|dec)(\d+)')


def block_depth(block: str, num_levels: int, head_level: int) -> int:
  """Blocks between a backbone block's output and the head, along the U's forward order.

  The head reads decoder level `h = head_level`; with `L = num_levels`:
  `up{l}` and `dec{l}` (l >= h) are at depth `l - h + 1`, the bottleneck `enc{L-1}` at
  `L - h`, and `enc{l}` at `2L - 1 - l - h`, so the input block `enc0` is deepest. The forward
  order, not the shortest path through a skip connection, because the blocks near the input
  hold the most generic features, as the first layers of a plain network do. Decoder levels
  finer than `h`, which the head does not read, are at depth 0.

  Args:
    block: the backbone's top-level parameter name ('enc2', 'up0', 'dec1').
    num_levels: U-Net levels, `len(model.features)`.
    head_level: the decoder level the head reads, `model.head_level`.

  Raises:
    ValueError: a block name outside the U-Net's.
  """
  match = _BLOCK.fullmatch(block)
  if match is None or int(match.group(2)) >= num_levels:
    raise ValueError(f'layer decay: no depth for backbone block {block!r} of a {num_levels}-'
                     'level U-Net')
  kind, level = match.group(1), int(match.group(2))
  if kind == 'enc':
    return 2 * num_levels - 1 - level - head_level
  return level - head_level + 1 if level >= head_level else 0


def layer_decay_factors(params: Any, decay: float, num_levels: int, head_level: int) -> Any:
  """`decay ** block_depth` for every leaf under `backbone/<block>/`, 1 for the head's."""
  def factor(path, _):
    names = [getattr(key, 'key', None) for key in path]
    if names[0] != 'backbone':
      return 1.0
    return float(decay) ** block_depth(names[1], num_levels, head_level)
  return jax.tree_util.tree_map_with_path(factor, params)


def scale_by_layer_decay(decay: float, num_levels: int,
                         head_level: int) -> optax.GradientTransformation:
  """Multiplies each leaf's update by its `layer_decay_factors` entry (a per-block rate).

  Placed after the optimizer, so with AdamW it scales the rate of the Adam step and of the
  weight decay alike, as a per-block learning rate would.
  """
  def scale(updates, params=None):
    del params  # The factors follow from the updates' own paths.
    factors = layer_decay_factors(updates, decay, num_levels, head_level)
    return jax.tree.map(lambda u, f: u * jnp.asarray(f, u.dtype), updates, factors)
  return optax.stateless(scale)


def l2_sp_penalty(backbone: Any, start: Any, alpha: float) -> jax.Array:
  """`alpha / 2 * ||backbone - start||^2`, summed over every backbone parameter."""
  squares = jax.tree.map(lambda w, w0: jnp.sum(jnp.square(w - w0)), backbone, start)
  return 0.5 * alpha * sum(jax.tree.leaves(squares))


def relative_distance(backbone: Any, start: Any) -> jax.Array:
  """`||backbone - start|| / ||start||` over all backbone parameters together."""
  moved = optax.tree.norm(jax.tree.map(jnp.subtract, backbone, start))
  return moved / optax.tree.norm(start)


def head_only(optim_cfg: ml_collections.ConfigDict,
              num_steps: int) -> optax.GradientTransformation:
  """The linear-probe stage: `optim_cfg`'s optimizer over the head alone, backbone held.

  The clip and Adam's moments see only the head's gradients, as in a probe trained apart.
  """
  labels = lambda params: {k: 'held' if k == 'backbone' else 'head' for k in params}
  return optax.multi_transform({'head': optimizers.make_optimizer(optim_cfg, num_steps),
                                'held': optax.set_to_zero()}, labels)


def linear_probe_then_finetune(optim_cfg: ml_collections.ConfigDict, finetune_tx,
                               probe_steps: int) -> optax.GradientTransformation:
  """LP-FT: `head_only` for `probe_steps` steps (warm-up and cosine over them), then
  `finetune_tx` (built for the remaining steps) from a fresh state, its schedule starting then.
  """
  return optimizers.two_stage(head_only(optim_cfg, probe_steps), finetune_tx, probe_steps)


def head_schedule(optim_cfg: ml_collections.ConfigDict, num_steps: int,
                  probe_steps: int) -> optax.Schedule:
  """The head's learning rate at each step (what the step logs as `lr`)."""
  full = optimizers.learning_rate_schedule(optim_cfg, num_steps)
  if not probe_steps:
    return full
  probe = optimizers.learning_rate_schedule(optim_cfg, probe_steps)
  rest = optimizers.learning_rate_schedule(optim_cfg, num_steps - probe_steps)
  return lambda step: jnp.where(step < probe_steps, probe(step), rest(step - probe_steps))
