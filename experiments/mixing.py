"""MixUp and CutMix on the device, inside the jitted train step.

Shapes: B global batch, H, W image size, C channels, K classes.

Each example is mixed with its partner in the reversed batch (example i with
B-1-i) using one ratio lam per batch, as timm does in 'batch' mode:
  MixUp   x = lam x + (1 - lam) x_rev,                    lam ~ Beta(a, a)
  CutMix  a box of area (1 - lam) H W from x_rev pasted,  lam ~ Beta(a, a),
          lam then set to the exact kept area.
With both alphas > 0 one of the two is chosen per batch (CutMix with
probability `switch_prob`). Labels become soft: y = lam y + (1 - lam) y_rev.
The reversal is over the global batch, so the result does not depend on how
the batch is split over devices.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _cutmix_mask(rng: jax.Array, lam: jax.Array, height: int,
                 width: int) -> tuple[jax.Array, jax.Array]:
  """A box mask [H, W] (1 = take the partner) and the kept fraction."""
  cy_rng, cx_rng = jax.random.split(rng)
  cut = jnp.sqrt(1.0 - lam)
  cut_h, cut_w = cut * height, cut * width
  cy = jax.random.uniform(cy_rng, (), maxval=height)
  cx = jax.random.uniform(cx_rng, (), maxval=width)
  y0 = jnp.clip(jnp.round(cy - cut_h / 2), 0, height)
  y1 = jnp.clip(jnp.round(cy + cut_h / 2), 0, height)
  x0 = jnp.clip(jnp.round(cx - cut_w / 2), 0, width)
  x1 = jnp.clip(jnp.round(cx + cut_w / 2), 0, width)
  rows = jnp.arange(height)[:, None]  # [H, 1]
  cols = jnp.arange(width)[None, :]  # [1, W]
  box = (rows >= y0) & (rows < y1) & (cols >= x0) & (cols < x1)  # [H, W]
  kept = 1.0 - (y1 - y0) * (x1 - x0) / (height * width)
  return box, kept


def mix(rng: jax.Array, images: jax.Array, labels: jax.Array, *,
        mixup_alpha: float = 0.0, cutmix_alpha: float = 0.0,
        switch_prob: float = 0.5) -> tuple[jax.Array, jax.Array]:
  """MixUp / CutMix of images [B, H, W, C] and dense labels [B, K].

  Returns the mixed images [B, H, W, C] and soft labels [B, K]. With both
  alphas 0 the inputs come back unchanged.
  """
  if not mixup_alpha and not cutmix_alpha:
    return images, labels
  if images.ndim != 4:
    raise ValueError('MixUp/CutMix expect images [B, H, W, C], got shape '
                     f'{images.shape}.')
  choose_rng, mix_rng, cut_rng, box_rng = jax.random.split(rng, 4)
  partner_images = images[::-1]  # [B, H, W, C]
  partner_labels = labels[::-1]  # [B, K]
  _, height, width, _ = images.shape

  def mixup():
    lam = jax.random.beta(mix_rng, mixup_alpha, mixup_alpha)
    return lam * images + (1 - lam) * partner_images, lam

  def cutmix():
    lam = jax.random.beta(cut_rng, cutmix_alpha, cutmix_alpha)
    box, kept = _cutmix_mask(box_rng, lam, height, width)
    return jnp.where(box[None, :, :, None], partner_images, images), kept

  if mixup_alpha and cutmix_alpha:
    use_cutmix = jax.random.uniform(choose_rng) < switch_prob
    mixed, lam = jax.lax.cond(use_cutmix, cutmix, mixup)
  elif cutmix_alpha:
    mixed, lam = cutmix()
  else:
    mixed, lam = mixup()
  return mixed, lam * labels + (1 - lam) * partner_labels
