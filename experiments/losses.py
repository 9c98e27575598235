"""Classification losses, averaged over the examples that `mask` keeps.

Shapes: B batch, K classes. Labels are int class ids [B] or float [B, K]
(soft labels from MixUp/CutMix, or multi-hot labels for multi-label data).
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import optax

LOSSES = ('softmax', 'sigmoid')


def dense_labels(labels: jax.Array, num_classes: int) -> jax.Array:
  """Int ids [B] -> one-hot float [B, K]; float [B, K] passes through."""
  if jnp.issubdtype(labels.dtype, jnp.integer):
    return jax.nn.one_hot(labels, num_classes)  # [B, K]
  return labels.astype(jnp.float32)  # [B, K]


def masked_mean(values: jax.Array, mask: Optional[jax.Array]) -> jax.Array:
  """Mean of [B] values over mask=True (all when mask is None)."""
  if mask is None:
    return jnp.mean(values)
  weights = mask.astype(values.dtype)  # [B]
  return jnp.sum(values * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def softmax_cross_entropy(logits: jax.Array, labels: jax.Array,
                          mask: Optional[jax.Array] = None, *,
                          label_smoothing: float = 0.0) -> jax.Array:
  """Mean softmax cross-entropy; labels [B] ids or [B, K] distributions.

  Label smoothing mixes the targets with the uniform distribution:
  t' = (1 - s) t + s / K.
  """
  num_classes = logits.shape[-1]
  targets = dense_labels(labels, num_classes)  # [B, K]
  if label_smoothing:
    targets = (1.0 - label_smoothing) * targets + label_smoothing / num_classes
  per_example = optax.softmax_cross_entropy(
      logits.astype(jnp.float32), targets)  # [B]
  return masked_mean(per_example, mask)


def sigmoid_cross_entropy(logits: jax.Array, labels: jax.Array,
                          mask: Optional[jax.Array] = None) -> jax.Array:
  """Multi-label loss: binary cross-entropy summed over the K classes
  (chosen: summed, not averaged, over classes), mean over examples."""
  targets = dense_labels(labels, logits.shape[-1])  # [B, K]
  per_class = optax.sigmoid_binary_cross_entropy(
      logits.astype(jnp.float32), targets)  # [B, K]
  return masked_mean(jnp.sum(per_class, axis=-1), mask)


def per_example_loss(name: str, logits: jax.Array,
                     labels: jax.Array) -> jax.Array:
  """Unsmoothed per-example loss [B] of config.loss (for evaluation)."""
  targets = dense_labels(labels, logits.shape[-1])  # [B, K]
  logits = logits.astype(jnp.float32)
  if name == 'softmax':
    return optax.softmax_cross_entropy(logits, targets)  # [B]
  if name == 'sigmoid':
    return jnp.sum(optax.sigmoid_binary_cross_entropy(logits, targets),
                   axis=-1)  # [B]
  raise ValueError(f'Unknown loss {name!r}; known: {LOSSES}.')


def loss_fn(name: str, *, label_smoothing: float = 0.0):
  """(logits, labels, mask) -> scalar loss for config.loss."""
  if name == 'softmax':
    return lambda logits, labels, mask: softmax_cross_entropy(
        logits, labels, mask, label_smoothing=label_smoothing)
  if name == 'sigmoid':
    if label_smoothing:
      raise ValueError('label_smoothing applies to the softmax loss only.')
    return sigmoid_cross_entropy
  raise ValueError(f'Unknown loss {name!r}; known: {LOSSES}.')
