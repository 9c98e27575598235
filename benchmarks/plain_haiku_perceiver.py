r"""The main job's Fashion-MNIST Perceiver written plainly in Haiku: the
"plain implementation of the same size" that issue 6's 3x target is set
against, timed on the same machine as this project's model.

  python -m benchmarks.plain_haiku_perceiver            # the plain model
  python -m launch.benchmark --config=configs/fashion_mnist.py   # this project

The plain model is what a Haiku user would write from the paper: the byte
array materialised as [B, M, C] (pixels concatenated with their Fourier
features), hk.LayerNorm and hk.Linear, hk.MultiHeadAttention for the cross-
and self-attends, autodiff gradients, no custom layouts. It has the same
shapes, parameters (83,596), weight sharing, loss and optimizer (LAMB with
clipping, from configs/fashion_mnist.py) as the main job's model, and it is
timed the same way (jit with donation, rounds of back-to-back steps, the
median round). Prints the parameter count, step time and examples/s.
"""

from __future__ import annotations

from absl import app
from absl import flags
import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import optax

from configs import fashion_mnist
from experiments import host_memory
from experiments import optimizers
from launch import benchmark
from perceiver import position_encoding

_BATCH = flags.DEFINE_integer('batch_size', None, 'Default: the config\'s.')
_ITERATIONS = flags.DEFINE_integer('iterations', 10, 'Timed steps per round.')
_ROUNDS = flags.DEFINE_integer('rounds', 3, 'Timed rounds (median reported).')
_HOST_MEMORY = host_memory.define_flag()


def _mlp(x):
  d = x.shape[-1]
  h = hk.LayerNorm(-1, True, True, name='layer_norm')(x)
  h = jax.nn.gelu(hk.Linear(d, name='hidden')(h))
  return hk.Linear(d, name='output')(h)


def _attention(heads, key_size, value_size, model_size):
  return hk.MultiHeadAttention(
      num_heads=heads, key_size=key_size, value_size=value_size,
      model_size=model_size, w_init=hk.initializers.VarianceScaling(1.0),
      name='attention')


class CrossAttend(hk.Module):

  def __call__(self, z, x):
    d, c = z.shape[-1], x.shape[-1]
    q = hk.LayerNorm(-1, True, True, name='query_layer_norm')(z)
    kv = hk.LayerNorm(-1, True, True, name='input_layer_norm')(x)
    z = z + _attention(1, min(c, d), min(c, d), d)(q, kv, kv)
    return z + hk.to_module(_mlp)(name='mlp')(z)


class SelfAttend(hk.Module):

  def __init__(self, heads, name=None):
    super().__init__(name=name)
    self._heads = heads

  def __call__(self, z):
    d = z.shape[-1]
    h = hk.LayerNorm(-1, True, True, name='layer_norm')(z)
    z = z + _attention(self._heads, d // self._heads, d // self._heads, d)(
        h, h, h)
    return z + hk.to_module(_mlp)(name='mlp')(z)


def plain_perceiver(images, model, inputs):
  """Logits [B, K] of images [B, 28, 28, 1]."""
  b, h, w, c = images.shape
  positions = position_encoding.linear_positions((h, w)).reshape(h * w, 2)
  features = position_encoding.fourier_features(
      positions, num_bands=inputs.num_bands,
      max_resolution=inputs.max_resolution)  # [M, P]
  x = jnp.concatenate([images.reshape(b, h * w, c), jnp.broadcast_to(
      jnp.asarray(features), (b,) + features.shape)], axis=-1)  # [B, M, C]
  latents = hk.get_parameter(
      'latents', [model.num_latents, model.latent_channels],
      init=hk.initializers.TruncatedNormal(0.02))
  z = jnp.broadcast_to(latents, (b,) + latents.shape)
  first, shared = CrossAttend(name='cross_attend_first'), CrossAttend(
      name='cross_attend_shared')
  layers = [SelfAttend(model.num_self_heads, name=f'self_attend_{i}')
            for i in range(model.num_self_attends_per_block)]
  for block in range(model.num_blocks):
    z = (first if block == 0 else shared)(z, x)
    for layer in layers:
      z = layer(z)
  return hk.Linear(model.num_classes, name='head')(z.mean(axis=1))


def main(argv):
  del argv
  retained = host_memory.configure(_HOST_MEMORY.value)  # Before JAX starts.
  config = fashion_mnist.get_config()
  batch = _BATCH.value or config.batch_size
  forward = hk.transform(lambda x: plain_perceiver(x, config.model,
                                                   config.input))
  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.normal(size=(batch,) + config.input_shape),
                       jnp.float32)
  labels = jnp.asarray(rng.integers(0, config.model.num_classes, batch))
  params = forward.init(jax.random.key(0), images)
  num_params = sum(p.size for p in jax.tree.leaves(params))
  optimizer = optimizers.make_optimizer(
      schedule=lambda step: config.optimizer.lr, **config.optimizer.to_dict())
  opt_state = optimizer.init(params)

  def train_step(params, opt_state, images, labels):
    def loss_fn(p):
      logits = forward.apply(p, None, images)
      targets = optax.smooth_labels(
          jax.nn.one_hot(labels, config.model.num_classes),
          config.label_smoothing)
      return optax.softmax_cross_entropy(logits, targets).mean()
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  step = jax.jit(train_step, donate_argnums=(0, 1))
  carry = [params, opt_state]

  def one_step():
    carry[0], carry[1], loss = step(carry[0], carry[1], images, labels)
    return loss

  seconds, best = benchmark.time_rounds(
      one_step, iterations=_ITERATIONS.value, rounds=_ROUNDS.value)
  print(f'plain Haiku Perceiver, main-job size: {num_params:,} parameters; '
        f'freed host memory {"retained" if retained else "returned to the OS"}'
        f'\ntrain step (batch {batch}): {seconds * 1e3:.2f} ms '
        f'(median of {_ROUNDS.value} rounds of {_ITERATIONS.value}; best '
        f'{best * 1e3:.2f} ms)\nexamples/s: {batch / seconds:.1f}',
        flush=True)


if __name__ == '__main__':
  app.run(main)
