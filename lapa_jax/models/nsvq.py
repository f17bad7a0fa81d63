"""NSVQ: vector quantization of the latent action with noise substitution (Vali & Bäckström, 2022).

The encoder features of x_t and x_{t+H} are projected to the quantizer width, reduced by a small CNN
from the patch grid to `code_seq_len` vectors each, and the latent action is their difference
d = z(x_{t+H}) - z(x_t). Each of the `code_seq_len` vectors of d is assigned its nearest codebook
entry. In training, the quantization error is replaced by a random vector of the same norm,
d + (||d - c|| / ||r|| + eps) r, so gradients reach the encoder through d and the codebook through
the norm, with no straight-through estimator and no commitment loss.
"""

from __future__ import annotations

from typing import Any

import einops
import flax.linen as nn
import jax
import jax.numpy as jnp

from lapa_jax.models.layers import partitioned, torch_default_init

NOISE_EPSILON = 1e-12  # added after the norm ratio, as in the official code.

# code_seq_len -> the CNN that reduces the patch grid to that many codes: one
# ((kernel_height, kernel_width), stride, padding) per convolution, with a ReLU between them.
# The grids they expect: 1, 2, 4 from 8x8 patches; 16, 64 from 16x16; 256 from 32x32.
CODE_GRID_CNNS = {
    1: (((3, 3), 2, 1), ((4, 4), 1, 0)),
    2: (((3, 3), 2, 1), ((3, 4), 1, 0)),
    4: (((3, 3), 2, 1), ((3, 3), 1, 0)),
    16: (((3, 3), 2, 1), ((3, 3), 2, 1)),
    64: (((3, 3), 2, 1),),
    256: (((3, 3), 2, 1),),
}


def code_grid_shape(code_seq_len: int, grid_height: int, grid_width: int) -> tuple[int, int]:
  """The (height, width) of the code grid the CNN makes from a patch grid; errors if it is not code_seq_len."""
  if code_seq_len not in CODE_GRID_CNNS:
    raise ValueError(f'model.code_seq_len={code_seq_len}: expected one of {sorted(CODE_GRID_CNNS)}')
  height, width = grid_height, grid_width
  for (kernel_h, kernel_w), stride, padding in CODE_GRID_CNNS[code_seq_len]:
    height = (height + 2 * padding - kernel_h) // stride + 1
    width = (width + 2 * padding - kernel_w) // stride + 1
  if height < 1 or width < 1 or height * width != code_seq_len:
    raise ValueError(f'model.code_seq_len={code_seq_len} does not fit a {grid_height}x{grid_width} patch grid '
                     '(image_size / patch_size must be 8 for 1, 2 or 4 codes, 16 for 16 or 64, 32 for 256)')
  return height, width


def safe_norm(x: jax.Array) -> jax.Array:
  """Euclidean norm over the last axis whose gradient stays finite at 0."""
  return jnp.sqrt(jnp.maximum(jnp.sum(jnp.square(x), axis=-1, keepdims=True), jnp.finfo(jnp.float32).tiny))


def squared_distances(vectors: jax.Array, codebook: jax.Array) -> jax.Array:
  """||v||^2 - 2 v.c + ||c||^2 (the official formula, so near-ties resolve the same way): (..., codebook_size)."""
  return (jnp.sum(jnp.square(vectors), axis=-1, keepdims=True)
          - 2 * jnp.einsum('...q,kq->...k', vectors, codebook)
          + jnp.sum(jnp.square(codebook), axis=-1))


def perplexity(code_counts: jax.Array) -> jax.Array:
  """exp(entropy) of the code distribution given by assignment counts (codebook_size,)."""
  probs = code_counts / jnp.maximum(jnp.sum(code_counts), 1)
  return jnp.exp(-jnp.sum(probs * jnp.log(probs + NOISE_EPSILON)))


class NSVQ(nn.Module):
  """Latent action quantizer. Codebook param path: `codebook` (codebook_size, quant_dim)."""
  dim: int
  quant_dim: int
  codebook_size: int
  code_seq_len: int
  scrambled_decode: bool = False  # the official decode reshape (reference §1.6)
  dtype: Any = jnp.float32

  def setup(self):
    self.codebook = self.param('codebook', partitioned(nn.initializers.normal(1.0), ('codebook', 'quant')),
                               (self.codebook_size, self.quant_dim), jnp.float32)
    self.project_in = nn.Dense(
        self.quant_dim, dtype=self.dtype, param_dtype=jnp.float32,
        kernel_init=partitioned(torch_default_init(), ('embed', 'quant')),
        bias_init=partitioned(nn.initializers.zeros, ('quant',)))
    self.project_out = nn.Dense(
        self.dim, dtype=self.dtype, param_dtype=jnp.float32,
        kernel_init=partitioned(torch_default_init(), ('quant', 'embed')),
        bias_init=partitioned(nn.initializers.zeros, ('embed',)))
    self.convs = [
        nn.Conv(self.quant_dim, kernel, strides=stride, padding=((padding, padding), (padding, padding)),
                dtype=self.dtype, param_dtype=jnp.float32,
                kernel_init=partitioned(torch_default_init((0, 1, 2), 3), (None, None, 'quant', 'quant_out')),
                bias_init=partitioned(nn.initializers.zeros, ('quant_out',)))
        for kernel, stride, padding in CODE_GRID_CNNS[self.code_seq_len]]

  def latent_action(self, first: jax.Array, last: jax.Array) -> jax.Array:
    """Encoder features of x_t and x_{t+H} (batch, height, width, embed) -> d (batch, code_seq_len, quant)."""
    code_grid_shape(self.code_seq_len, *first.shape[1:3])
    features = self.project_in(jnp.concatenate([first, last], axis=0))  # both frames in one pass
    for index, conv in enumerate(self.convs):
      features = conv(nn.relu(features) if index else features)
    z_first, z_last = jnp.split(einops.rearrange(features, 'b h w q -> b (h w) q').astype(jnp.float32), 2)
    return z_last - z_first

  def nearest_codes(self, latent: jax.Array) -> jax.Array:
    """(batch, code_seq_len, quant) -> code indices (batch, code_seq_len) int32."""
    return jnp.argmin(squared_distances(latent, self.codebook), axis=-1).astype(jnp.int32)

  def decode(self, vectors: jax.Array) -> jax.Array:
    """Quantized vectors (batch, code_seq_len, quant) -> decoder context (batch, code_seq_len, embed)."""
    batch, length, width = vectors.shape
    if self.scrambled_decode:
      vectors = vectors.reshape(batch, width, length).transpose(0, 2, 1)
    return self.project_out(vectors.astype(self.dtype))

  def decode_codes(self, indices: jax.Array) -> jax.Array:
    """Code indices (batch, code_seq_len) -> decoder context (batch, code_seq_len, embed)."""
    return self.decode(self.codebook[indices])

  def __call__(self, first: jax.Array, last: jax.Array, *, train: bool) -> tuple[jax.Array, jax.Array, dict]:
    """Returns (decoder context (batch, code_seq_len, embed), indices (batch, code_seq_len), aux).

    train=True substitutes noise for the quantization error (needs the 'noise' rng); otherwise the
    nearest code itself is used. aux: 'code_counts' (codebook_size,) counts assignments in the batch;
    'latents' (batch, code_seq_len, quant) are the latent actions d (dead-code revival draws on them).
    """
    latent = self.latent_action(first, last)
    indices = self.nearest_codes(latent)
    nearest = self.codebook[indices]
    if train:
      noise = jax.random.normal(self.make_rng('noise'), latent.shape, jnp.float32)
      quantized = latent + (safe_norm(latent - nearest) / safe_norm(noise) + NOISE_EPSILON) * noise
    else:
      quantized = nearest
    code_counts = jnp.sum(jax.nn.one_hot(indices, self.codebook_size, dtype=jnp.float32), axis=(0, 1))
    return self.decode(quantized), indices, {'code_counts': code_counts, 'latents': latent}
