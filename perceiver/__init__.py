"""Perceiver (Jaegle et al., ICML 2021) as Haiku modules."""

from perceiver.attention import CrossAttention, MLP, SelfAttention, attend
from perceiver.byte_array import FactoredByteArray, as_dense
from perceiver.chunked_attention import chunked_attend
from perceiver.model import LatentTransformer, Perceiver
from perceiver.position_encoding import fourier_features, linear_positions, LearnedPositionEncoding
from perceiver.preprocessors import (AudioPreprocessor, ImagePreprocessor, MultimodalPreprocessor,
                                     PointCloudPreprocessor, SpectrogramPreprocessor,
                                     VideoPreprocessor, fixed_permutation)
