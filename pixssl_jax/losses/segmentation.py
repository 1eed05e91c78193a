"""Supervised segmentation losses: soft Dice + cross-entropy (nnU-Net's sum)."""

import jax
import jax.numpy as jnp
import optax


def soft_dice_loss(logits: jax.Array, labels: jax.Array, *, smooth: float = 1e-5) -> jax.Array:
  """1 - mean over foreground classes of the batch soft Dice.

  Batch Dice (nnU-Net's default for small batches): intersections and sums are taken over the
  whole batch, so a crop without an organ does not produce a 0/0 Dice for it. Classes absent
  from the batch and not predicted contribute (0 + s) / (0 + s) = 1, i.e. no loss.

  Args:
    logits: `[B, *P, K]` float32.
    labels: `[B, *P]` integer class indices in `[0, K)`.
    smooth: added to numerator and denominator.

  Returns:
    Scalar loss in [0, 1].
  """
  probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
  onehot = jax.nn.one_hot(labels, logits.shape[-1], dtype=jnp.float32)
  axes = tuple(range(logits.ndim - 1))
  intersection = jnp.sum(probs * onehot, axis=axes)
  total = jnp.sum(probs, axis=axes) + jnp.sum(onehot, axis=axes)
  dice = (2.0 * intersection + smooth) / (total + smooth)
  return 1.0 - jnp.mean(dice[1:])  # Background excluded, as nnU-Net.


def cross_entropy_loss(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Mean voxel-wise softmax cross-entropy."""
  return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(
      logits.astype(jnp.float32), labels))


def segmentation_loss(logits: jax.Array, labels: jax.Array, *, dice_weight: float = 1.0,
                      ce_weight: float = 1.0) -> tuple[jax.Array, dict[str, jax.Array]]:
  """`dice_weight * soft Dice + ce_weight * CE` and both terms as metrics."""
  dice = soft_dice_loss(logits, labels)
  ce = cross_entropy_loss(logits, labels)
  loss = dice_weight * dice + ce_weight * ce
  return loss, {'loss': loss, 'dice_loss': dice, 'ce_loss': ce}
