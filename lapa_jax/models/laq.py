"""The latent action quantizer (LAQ): a C-ViViT encoder, NSVQ, and a cross-attending decoder.

    video (batch, 2, image, image, channels) in [0, 1]: frames x_t and x_{t+H}
      -> patch embedding of each frame (LayerNorm -> Dense -> LayerNorm)   (batch, 2, grid, grid, embed)
      -> encoder: spatial transformer (continuous position bias), then temporal transformer
      -> NSVQ: latent action d = z(x_{t+H}) - z(x_t), nearest code per position  (batch, code_seq_len)
      -> decoder: queries = stop-gradient patch embeddings of x_t, cross-attending to the projected
         codes; spatial transformer with the same position bias; Dense to pixels
      -> reconstruction of x_{t+H} (batch, image, image, channels), or with `predict_change` the
         change x_{t+H} - x_t, added to x_t

`variant='lapa'` is the model the paper describes: causal temporal attention (x_t's stream never
sees x_{t+H}), correct PEG and code layouts, self-attention keys/values from the normalised input.
`variant='official'` reproduces the released PyTorch code exactly (reference §1.3, §1.6, §1.11) so
its weights give the same codes: bidirectional temporal attention, the temporal PEG reshape, the
NSVQ decode reshape and keys/values from the un-normalised input.

`predict_change=True` (not in the paper) has the decoder predict x_{t+H} - x_t instead of x_{t+H}.
Where the action moves a few pixels of a static scene (the built-in world), a decoder that must
first learn to redraw x_t settles on a blurred copy that ignores the codes, and the encoder then
gets no gradient to put the action in them; predicting the change makes the change, which the
codes describe, all the decoder has to learn.
"""

from __future__ import annotations

from typing import Any

import einops
import flax.linen as nn
import jax
import jax.numpy as jnp

from lapa_jax.models.layers import (ContinuousPositionBias, Transformer, VIDEO_AXES, layer_norm, partitioned,
                                    torch_default_init)
from lapa_jax.models.nsvq import NSVQ, code_grid_shape

VARIANTS = ('lapa', 'official')
DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}
MODEL_FIELDS = ('dim', 'quant_dim', 'codebook_size', 'image_size', 'patch_size', 'spatial_depth', 'temporal_depth',
                'decoder_depth', 'heads', 'head_dim', 'channels', 'code_seq_len', 'ff_mult', 'variant', 'remat')
OPTIONAL_FIELDS = {'predict_change': False}  # absent from the configs of runs made before the field existed


def from_config(model_config, dtype: str = 'float32') -> 'LatentActionQuantizer':
  """The model of a config's `model` group with compute dtype `dtype` ('float32' | 'bfloat16')."""
  if dtype not in DTYPES:
    raise ValueError(f'config field dtype: expected one of {tuple(DTYPES)}, got {dtype!r}')
  missing = [name for name in MODEL_FIELDS if name not in model_config]
  if missing:
    raise KeyError(f'config group model: missing field(s) {", ".join(missing)}')
  optional = {name: model_config.get(name, default) for name, default in OPTIONAL_FIELDS.items()}
  return LatentActionQuantizer(**{name: model_config[name] for name in MODEL_FIELDS}, **optional,
                               dtype=DTYPES[dtype])


class LatentActionQuantizer(nn.Module):
  dim: int
  quant_dim: int
  codebook_size: int
  image_size: int
  patch_size: int
  spatial_depth: int
  temporal_depth: int
  decoder_depth: int
  heads: int
  head_dim: int
  channels: int = 3
  code_seq_len: int = 4
  ff_mult: float = 4.0
  variant: str = 'lapa'
  predict_change: bool = False
  remat: bool = False
  dtype: Any = jnp.float32

  def setup(self):
    if self.variant not in VARIANTS:
      raise ValueError(f'model.variant={self.variant!r}: expected one of {VARIANTS}')
    if self.image_size % self.patch_size:
      raise ValueError(f'model.image_size={self.image_size} is not a multiple of model.patch_size={self.patch_size}')
    code_grid_shape(self.code_seq_len, self.grid_size, self.grid_size)
    official = self.variant == 'official'
    patch_dim = self.channels * self.patch_size ** 2
    dense = lambda features, names, name: nn.Dense(
        features, dtype=self.dtype, param_dtype=jnp.float32, name=name,
        kernel_init=partitioned(torch_default_init(), names),
        bias_init=partitioned(nn.initializers.zeros, names[-1:]))

    self.patch_norm_in = layer_norm('patch_norm_in', use_bias=True, axis_name='patch', dtype=self.dtype)
    self.patch_dense = dense(self.dim, ('patch', 'embed'), 'patch_dense')
    self.patch_norm_out = layer_norm('patch_norm_out', use_bias=True, dtype=self.dtype)
    self.position_bias = ContinuousPositionBias(self.heads, self.dim, dtype=self.dtype)
    transformer = lambda depth, axis, **kw: Transformer(
        depth, axis, self.heads, self.head_dim, int(self.ff_mult * 2 / 3 * self.dim),
        official_quirks=official, remat=self.remat, dtype=self.dtype, **kw)
    self.encoder_space = transformer(self.spatial_depth, 'space')
    self.encoder_time = transformer(self.temporal_depth, 'time', causal=not official)
    self.quantizer = NSVQ(self.dim, self.quant_dim, self.codebook_size, self.code_seq_len,
                          scrambled_decode=official, dtype=self.dtype)
    self.decoder = transformer(self.decoder_depth, 'space', cross_attention=True)
    self.to_pixels = dense(patch_dim, ('embed', 'patch'), 'to_pixels')

  @property
  def grid_size(self) -> int:
    return self.image_size // self.patch_size

  def embed_patches(self, frames: jax.Array) -> jax.Array:
    """(batch, time, image, image, channels) -> (batch, time, grid, grid, embed)."""
    # Patch vectors are ordered (channel, row, column), as in the official model.
    patches = einops.rearrange(frames.astype(self.dtype), 'b t (h p1) (w p2) c -> b t h w (c p1 p2)',
                               p1=self.patch_size, p2=self.patch_size)
    tokens = self.patch_norm_out(self.patch_dense(self.patch_norm_in(patches)))
    return nn.with_logical_constraint(tokens, VIDEO_AXES)

  def _check_video(self, video: jax.Array) -> None:
    expected = (2, self.image_size, self.image_size, self.channels)
    if video.ndim != 5 or tuple(video.shape[1:]) != expected:
      raise ValueError(f'video: expected shape (batch, {", ".join(map(str, expected))}), got {video.shape}')

  def encode(self, tokens: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Patch tokens of both frames (batch, 2, grid, grid, embed) -> per-frame features (batch, grid, grid, embed)."""
    tokens = self.encoder_space(tokens, bias=self.position_bias(self.grid_size, self.grid_size))
    tokens = self.encoder_time(tokens)
    return tokens[:, 0], tokens[:, 1]

  def decode(self, first_frame: jax.Array, first_tokens: jax.Array, context: jax.Array) -> jax.Array:
    """x_t (batch, image, image, channels) and its patch tokens (batch, 1, grid, grid, embed) + code context
    (batch, code_seq_len, embed) -> the x_{t+H} guess (batch, image, image, channels)."""
    queries = jax.lax.stop_gradient(first_tokens)
    out = self.decoder(queries, bias=self.position_bias(self.grid_size, self.grid_size), context=context)
    pixels = self.to_pixels(out[:, 0]).astype(jnp.float32)
    pixels = einops.rearrange(pixels, 'b h w (c p1 p2) -> b (h p1) (w p2) c', p1=self.patch_size, p2=self.patch_size)
    return pixels + first_frame.astype(jnp.float32) if self.predict_change else pixels

  def __call__(self, video: jax.Array, *, train: bool = False) -> dict[str, jax.Array]:
    """video (batch, 2, image, image, channels) in [0, 1] -> {'recon' (batch, image, image, channels),
    'indices' (batch, code_seq_len) int32, 'code_counts' (codebook_size,), 'latents' (batch, code_seq_len, quant)}.

    train=True uses noise substitution (needs the 'noise' rng); otherwise the nearest codes decode.
    """
    self._check_video(video)
    tokens = self.embed_patches(video)
    first, last = self.encode(tokens)
    context, indices, aux = self.quantizer(first, last, train=train)
    return {'recon': self.decode(video[:, 0], tokens[:, :1], context), 'indices': indices, **aux}

  def codes(self, video: jax.Array) -> jax.Array:
    """Labelling: video (batch, 2, image, image, channels) -> nearest code indices (batch, code_seq_len)."""
    self._check_video(video)
    first, last = self.encode(self.embed_patches(video))
    return self.quantizer.nearest_codes(self.quantizer.latent_action(first, last))

  def decode_codes(self, first_frame: jax.Array, indices: jax.Array) -> jax.Array:
    """What the given codes do to x_t: (batch, image, image, channels) + (batch, code_seq_len) -> x_{t+H} guess."""
    tokens = self.embed_patches(first_frame[:, None])
    return self.decode(first_frame, tokens, self.quantizer.decode_codes(indices))
