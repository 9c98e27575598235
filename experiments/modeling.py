"""Config -> Haiku model: preprocessor (`config.input_name`, `config.input`)
followed by a classifier (`config.model_name`, `config.model`).

Each config section is passed 1:1 as keyword arguments to one constructor, so
a misspelt field fails at construction with the constructor's own error.

Every model is built with `hk.transform_with_state` (see `build_model`): the
ResNet and PointNet++ baselines keep BatchNorm moving statistics as Haiku
state; for every other model the state is simply empty.
"""

from __future__ import annotations

from typing import Any, Callable

import haiku as hk
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

import perceiver
from experiments import precision
from perceiver import pointnet2
from perceiver import resnet
from perceiver import transformer
from perceiver import vit

PREPROCESSORS: dict[str, Callable[..., hk.Module]] = {
    'image': perceiver.ImagePreprocessor,
    'audio': perceiver.AudioPreprocessor,
    'spectrogram': perceiver.SpectrogramPreprocessor,
    'video': perceiver.VideoPreprocessor,
    'points': perceiver.PointCloudPreprocessor,
    # Inputs of the baselines (perceiver/transformer.py).
    'downsampled_image': transformer.DownsampledImagePreprocessor,
    'point_grid': transformer.PointGridPreprocessor,
    # The input as it arrives (PointNet++ reads raw xyz [B, P, 3]).
    'none': lambda: (lambda inputs: inputs),
}

MODELS: dict[str, Callable[..., hk.Module]] = {
    'perceiver': perceiver.Perceiver,
    # The baselines of the paper's tables (configs/baselines.py).
    'resnet': resnet.ResNet,
    'vit': vit.ViT,
    'transformer': transformer.Transformer,
    'pointnet2': pointnet2.PointNet2,
}

# Models whose forward can also return cross-attention maps (paper Fig. 3).
ATTENTION_MODELS = frozenset({'perceiver'})


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


def build_model(config: ml_collections.ConfigDict) -> hk.TransformedWithState:
  """The config's model as `hk.transform_with_state(forward)`, for every model.

  Contract (with state, so that BatchNorm works; the Perceiver, ViT and
  Transformer have an empty state {}):

    params, state = model.init(rng, inputs, is_training=True)
    logits, state = model.apply(params, state, rng, inputs, is_training=...)
    (logits, attention), state = model.apply(..., return_attention=True)

  inputs: [B, *config.input_shape] (a dict of such for multimodal inputs).
  logits: [B, K]. attention: the list of cross-attention logits, each
  [B, H, N, M]; Perceivers only (`ATTENTION_MODELS`), others raise ValueError.
  state: BatchNorm moving statistics (ResNets, PointNet++), {} otherwise. In training
  carry the returned state into the next step; with is_training=False it is
  returned unchanged. init works with either is_training.
  rng: may be None, except in training for models with dropout (the ViT with
  dropout_rate > 0, PointNet++), which draw their dropout masks from it.
  """
  if config.model_name not in MODELS:
    raise ValueError(f'Unknown model_name {config.model_name!r}; known: '
                     f'{sorted(MODELS)}.')
  input_name = config.input_name
  input_kwargs = _kwargs(config.input)
  model_name = config.model_name
  model_cls = MODELS[model_name]
  model_kwargs = _kwargs(config.model)
  # experiments/precision.py: e.g. 'bf16' computes the Perceiver in bfloat16
  # with float32 parameters and logits; preprocessors stay float32.
  mixed_precision = config.get('mixed_precision')
  if mixed_precision is not None and model_name != 'perceiver':
    raise ValueError(f'mixed_precision={mixed_precision!r} is only '
                     f'implemented for the perceiver, not {model_name!r}.')
  precision.get_policy(mixed_precision)  # fails early on an unknown name

  def forward(inputs, *, is_training: bool, return_attention: bool = False):
    x = make_preprocessor(input_name, input_kwargs)(inputs)
    model = model_cls(**model_kwargs)
    with precision.policy_scope(model_cls, mixed_precision):
      if return_attention:
        if model_name not in ATTENTION_MODELS:
          raise ValueError(f'return_attention is only available for '
                           f'{sorted(ATTENTION_MODELS)}, not {model_name!r}.')
        return model(x, is_training=is_training, return_attention=True)
      return model(x, is_training=is_training)

  return hk.transform_with_state(forward)


def build_counting_model(config: ml_collections.ConfigDict
                         ) -> hk.TransformedWithState:
  """The config's model as the FLOP count reads it: the paper's math on the
  plain Haiku path (model.cpu_kernels=False where the model has the switch),
  so that the count does not depend on which kernels compute it. Same
  parameters as `build_model(config)`."""
  if 'cpu_kernels' not in config.model:
    return build_model(config)
  config = ml_collections.ConfigDict(config.to_dict())
  config.model.cpu_kernels = False
  return build_model(config)


def example_inputs(config: ml_collections.ConfigDict, batch_size: int = 1):
  """Zero-size-free stand-ins ([B, *config.input_shape]) for init and tracing."""
  shape = config.input_shape
  if isinstance(shape, (dict, ml_collections.ConfigDict)):
    return {k: jax.ShapeDtypeStruct((batch_size,) + tuple(v), jnp.float32)
            for k, v in shape.items()}
  return jax.ShapeDtypeStruct((batch_size,) + tuple(shape), jnp.float32)


def variable_shapes(config: ml_collections.ConfigDict):
  """(params, state) shapes of the config's model, computing nothing."""
  model = build_model(config)
  init = lambda rng, x: model.init(rng, x, is_training=True)
  return jax.eval_shape(init, jax.random.key(0), example_inputs(config))


def param_shapes(config: ml_collections.ConfigDict):
  """Parameter shapes of the config's model, without computing anything."""
  return variable_shapes(config)[0]


def count_params(params) -> int:
  return int(sum(np.prod(p.shape) for p in jax.tree.leaves(params)))
