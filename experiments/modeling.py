"""Config -> Haiku model: preprocessor (`config.input_name`, `config.input`)
followed by a classifier (`config.model_name`, `config.model`).

Each config section is passed 1:1 as keyword arguments to one constructor, so
a misspelt field fails at construction with the constructor's own error.
"""

from __future__ import annotations

from typing import Any, Callable

import haiku as hk
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

import perceiver

PREPROCESSORS: dict[str, Callable[..., hk.Module]] = {
    'image': perceiver.ImagePreprocessor,
    'audio': perceiver.AudioPreprocessor,
    'spectrogram': perceiver.SpectrogramPreprocessor,
    'video': perceiver.VideoPreprocessor,
    'points': perceiver.PointCloudPreprocessor,
}

MODELS: dict[str, Callable[..., hk.Module]] = {
    'perceiver': perceiver.Perceiver,
}


def _kwargs(section) -> dict[str, Any]:
  return section.to_dict() if hasattr(section, 'to_dict') else dict(section)


def make_preprocessor(name: str, kwargs: dict[str, Any]) -> hk.Module:
  """Builds the preprocessor `name`; 'audio_video' fuses two of them."""
  if name == 'audio_video':
    kwargs = dict(kwargs)
    audio_name = kwargs.pop('audio_name', 'audio')
    return perceiver.MultimodalPreprocessor(
        audio=make_preprocessor(audio_name, kwargs.pop('audio')),
        video=make_preprocessor('video', kwargs.pop('video')), **kwargs)
  if name not in PREPROCESSORS:
    raise ValueError(f'Unknown input_name {name!r}; known: '
                     f'{sorted(PREPROCESSORS) + ["audio_video"]}.')
  return PREPROCESSORS[name](**kwargs)


def build_model(config: ml_collections.ConfigDict) -> hk.Transformed:
  """The config's model as `hk.transform(forward)`.

  forward(inputs, *, is_training, return_attention=False) -> logits [B, K]
  (and the cross-attention logits with return_attention, Perceivers only).
  """
  if config.model_name not in MODELS:
    raise ValueError(f'Unknown model_name {config.model_name!r}; known: '
                     f'{sorted(MODELS)}.')
  input_name = config.input_name
  input_kwargs = _kwargs(config.input)
  model_cls = MODELS[config.model_name]
  model_kwargs = _kwargs(config.model)

  def forward(inputs, *, is_training: bool, return_attention: bool = False):
    x = make_preprocessor(input_name, input_kwargs)(inputs)
    model = model_cls(**model_kwargs)
    if return_attention:
      return model(x, is_training=is_training, return_attention=True)
    return model(x, is_training=is_training)

  return hk.transform(forward)


def example_inputs(config: ml_collections.ConfigDict, batch_size: int = 1):
  """Zero-size-free stand-ins ([B, *config.input_shape]) for init and tracing."""
  shape = config.input_shape
  if isinstance(shape, (dict, ml_collections.ConfigDict)):
    return {k: jax.ShapeDtypeStruct((batch_size,) + tuple(v), jnp.float32)
            for k, v in shape.items()}
  return jax.ShapeDtypeStruct((batch_size,) + tuple(shape), jnp.float32)


def param_shapes(config: ml_collections.ConfigDict):
  """Parameter shapes of the config's model, without computing anything."""
  model = build_model(config)
  init = lambda rng, x: model.init(rng, x, is_training=True)
  return jax.eval_shape(init, jax.random.key(0), example_inputs(config))


def count_params(params) -> int:
  return int(sum(np.prod(p.shape) for p in jax.tree.leaves(params)))
