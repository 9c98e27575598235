"""Evaluation metrics: top-k accuracy (on device) and mAP (on the host).

Shapes: B batch, C clips per example, K classes, N evaluation examples.

Scores of an example with several clips are the mean over its clips of the
per-clip class probabilities (softmax for single-label, sigmoid for
multi-label data). Every sum is weighted by the batch mask, so the padding of
the last evaluation batch counts nowhere.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def clip_scores(logits: jax.Array, *, multi_label: bool) -> jax.Array:
  """Per-clip logits [B, C, K] -> averaged class probabilities [B, K]."""
  probs = jax.nn.sigmoid(logits) if multi_label else jax.nn.softmax(logits)
  return jnp.mean(probs, axis=1)  # [B, K]


def probability_cross_entropy(scores: jax.Array, labels: jax.Array, *,
                              multi_label: bool) -> jax.Array:
  """Per-example loss [B] of averaged probabilities [B, K] (several clips):
  -log p(label) (softmax) or binary cross-entropy summed over K."""
  eps = 1e-7
  probs = jnp.clip(scores, eps, 1 - eps)  # [B, K]
  if jnp.issubdtype(labels.dtype, jnp.integer):
    labels = jax.nn.one_hot(labels, scores.shape[-1])  # [B, K]
  if multi_label:
    return -jnp.sum(labels * jnp.log(probs) +
                    (1 - labels) * jnp.log(1 - probs), axis=-1)
  return -jnp.sum(labels * jnp.log(probs), axis=-1)


def topk_correct(scores: jax.Array, labels: jax.Array, k: int) -> jax.Array:
  """1.0 where a true class is among the k best scores, per example ([B]).

  labels: int ids [B], or float [B, K] (any class with label > 0.5 counts
  as true; for one-hot labels this is the usual top-k accuracy).
  """
  k = min(k, scores.shape[-1])
  _, top = jax.lax.top_k(scores, k)  # [B, k]
  if jnp.issubdtype(labels.dtype, jnp.integer):
    hits = top == labels[:, None]  # [B, k]
  else:
    hits = jnp.take_along_axis(labels > 0.5, top, axis=-1)  # [B, k]
  return jnp.any(hits, axis=-1).astype(jnp.float32)  # [B]


def masked_sums(scores: jax.Array, labels: jax.Array, mask: jax.Array,
                per_example_loss: jax.Array) -> dict[str, jax.Array]:
  """Sums over the kept examples of one batch: top1, top5, loss, count."""
  weights = mask.astype(jnp.float32)  # [B]
  return {
      'top1': jnp.sum(topk_correct(scores, labels, 1) * weights),
      'top5': jnp.sum(topk_correct(scores, labels, 5) * weights),
      'loss': jnp.sum(per_example_loss * weights),
      'count': jnp.sum(weights),
  }


def average_precision(scores: np.ndarray, positives: np.ndarray) -> float:
  """AP of one class: scores [N], positives bool [N] (at least one True).

  AP = sum over distinct score thresholds of (R_n - R_{n-1}) P_n, ties
  resolved as one threshold (the definition scikit-learn uses).
  """
  order = np.argsort(-scores, kind='stable')
  scores, positives = scores[order], positives[order]
  last_of_tie = np.r_[np.nonzero(np.diff(scores))[0], len(scores) - 1]
  true_pos = np.cumsum(positives)[last_of_tie]
  precision = true_pos / (last_of_tie + 1)
  recall = true_pos / true_pos[-1]
  return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def mean_average_precision(scores: np.ndarray, labels: np.ndarray) -> float:
  """mAP: AP per class over examples, averaged over classes that have at
  least one positive example. scores, labels [N, K] (labels > 0.5 true)."""
  positives = labels > 0.5  # [N, K]
  aps = [average_precision(scores[:, k], positives[:, k])
         for k in range(scores.shape[1]) if positives[:, k].any()]
  return float(np.mean(aps)) if aps else float('nan')


def finalize(sums: dict[str, float]) -> dict[str, float]:
  """Sums over the evaluation split -> means (num_examples = the count)."""
  count = max(float(sums['count']), 1.0)
  return {'top1': float(sums['top1']) / count,
          'top5': float(sums['top5']) / count,
          'loss': float(sums['loss']) / count,
          'num_examples': int(round(float(sums['count'])))}
