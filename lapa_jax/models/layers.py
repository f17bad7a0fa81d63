"""Building blocks of the C-ViViT latent action quantizer (Flax linen, logically partitioned).

Every block works on video tokens laid out as `(batch, time, height, width, embed)`; a transformer
attends either over the patch grid of each frame (`space`) or over the frames of each patch
position (`time`). Numerics follow the official PyTorch blocks (LayerNorm eps 1e-5, exact GELU,
cosine-similarity attention with learned per-dimension scales and logit scale 8) so that released
weights give the same outputs; `official_quirks` reproduces the released code's deviations from the
model the paper describes (see reference/official_lapa.md §1.3, §1.11).
"""

from __future__ import annotations

from typing import Any

import einops
import flax.linen as nn
import jax
import jax.numpy as jnp

LAYER_NORM_EPSILON = 1e-5  # PyTorch's default; Flax's is 1e-6.
ATTENTION_LOGIT_SCALE = 8.0  # fixed temperature of the cosine-similarity attention.
L2_NORM_EPSILON = 1e-12  # torch.nn.functional.normalize's eps.
LEAKY_RELU_SLOPE = 0.1

Dtype = Any
VIDEO_AXES = ('batch', None, None, None, 'embed')


def partitioned(init, names):
  return nn.with_logical_partitioning(init, names)


def torch_default_init(in_axis=-2, out_axis=-1, batch_axis=()):
  """U(-1/sqrt(fan_in), 1/sqrt(fan_in)), PyTorch's Linear/Conv default, which the official recipe was tuned with."""
  return nn.initializers.variance_scaling(1 / 3, 'fan_in', 'uniform', in_axis=in_axis, out_axis=out_axis,
                                          batch_axis=batch_axis)


class Projection(nn.Module):
  """A bias-less linear map contracting the last `input_axes` axes of x into `features` axes.

  Like nn.DenseGeneral, but the kernel is created in its full shape, so its logical axis names
  (`names`, one per kernel axis) apply as given under a mesh.
  """
  features: tuple[int, ...]
  names: tuple[str | None, ...]
  input_axes: int = 1
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    input_shape = x.shape[x.ndim - self.input_axes:]
    in_axis = tuple(range(self.input_axes))
    out_axis = tuple(range(self.input_axes, self.input_axes + len(self.features)))
    kernel = self.param('kernel', partitioned(torch_default_init(in_axis, out_axis), self.names),
                        (*input_shape, *self.features), jnp.float32)
    contract = (tuple(range(x.ndim - self.input_axes, x.ndim)), in_axis)
    return jax.lax.dot_general(x.astype(self.dtype), kernel.astype(self.dtype), (contract, ((), ())))


def layer_norm(name: str, *, use_bias: bool, axis_name: str | None = 'embed', dtype: Dtype = jnp.float32):
  """LayerNorm with PyTorch's epsilon; `use_bias=False` is the official bias-less (beta = 0) norm."""
  return nn.LayerNorm(
      epsilon=LAYER_NORM_EPSILON, use_bias=use_bias, dtype=dtype, param_dtype=jnp.float32, name=name,
      scale_init=partitioned(nn.initializers.ones, (axis_name,)),
      bias_init=partitioned(nn.initializers.zeros, (axis_name,)))


def l2_normalize(x: jax.Array) -> jax.Array:
  """x / max(||x||, eps) over the last axis, computed in float32."""
  x = x.astype(jnp.float32)
  squared_norm = jnp.sum(jnp.square(x), axis=-1, keepdims=True)
  return x * jax.lax.rsqrt(jnp.maximum(squared_norm, L2_NORM_EPSILON ** 2))


class ContinuousPositionBias(nn.Module):
  """SwinV2 continuous position bias over a 2-D patch grid: `(heads, grid_len, grid_len)`.

  An MLP maps the log-spaced relative offset of two patches to one logit bias per head. It is
  evaluated on the `(2h-1)(2w-1)` distinct offsets and gathered into the full table, which gives
  the same values as evaluating it on all `(hw)^2` pairs at a fraction of the cost.
  """
  heads: int
  hidden_dim: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, grid_height: int, grid_width: int) -> jax.Array:
    offsets_h = jnp.arange(-(grid_height - 1), grid_height)
    offsets_w = jnp.arange(-(grid_width - 1), grid_width)
    offsets = jnp.stack(jnp.meshgrid(offsets_h, offsets_w, indexing='ij'), axis=-1).astype(jnp.float32)
    offsets = jnp.sign(offsets) * jnp.log1p(jnp.abs(offsets))  # (2h-1, 2w-1, 2)

    dense = lambda features, names, name: nn.Dense(
        features, dtype=self.dtype, param_dtype=jnp.float32, name=name,
        kernel_init=partitioned(torch_default_init(), names),
        bias_init=partitioned(nn.initializers.zeros, names[-1:]))
    hidden = nn.leaky_relu(dense(self.hidden_dim, (None, 'mlp'), 'hidden_0')(offsets), LEAKY_RELU_SLOPE)
    hidden = nn.leaky_relu(dense(self.hidden_dim, ('mlp', 'embed'), 'hidden_1')(hidden), LEAKY_RELU_SLOPE)
    bias_per_offset = dense(self.heads, ('embed', 'heads'), 'to_heads')(hidden).astype(jnp.float32)

    # Patch i at (hi, wi) and patch j at (hj, wj) use the offset (hi - hj, wi - wj).
    rows, cols = jnp.meshgrid(jnp.arange(grid_height), jnp.arange(grid_width), indexing='ij')
    rows, cols = rows.reshape(-1), cols.reshape(-1)
    delta_h = rows[:, None] - rows[None, :] + grid_height - 1
    delta_w = cols[:, None] - cols[None, :] + grid_width - 1
    return einops.rearrange(bias_per_offset[delta_h, delta_w], 'i j heads -> heads i j')


def _causal_taps(time: int) -> list[tuple[int, int, int]]:
  """Kernel taps (time, row, column) that can touch data: with causal time padding (2, 0), the
  time taps kt with kt + time <= 2 only ever read zeros."""
  return [(kt, kh, kw) for kt in range(3) if kt + time > 2 for kh in range(3) for kw in range(3)]


def _pad(x: jax.Array, padding) -> jax.Array:
  return jnp.pad(x, ((0, 0), *padding, (0, 0)))


CAUSAL_PADDING = ((2, 0), (1, 1), (1, 1))


@jax.custom_vjp
def depthwise_causal_conv(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """Depthwise 3x3x3 convolution, zero padding (2, 0) in time and (1, 1) in space.

  x: (batch, time, height, width, channels); kernel: (3, 3, 3, channels). Written as a sum of
  shifted, per-channel-scaled copies: on CPU a grouped convolution with one group per channel is
  ~25x slower (forward + backward at the `small` LAQ's shapes). The hand-written gradient reads
  windows of one padded gradient, where autodiff of the slices would pad the gradient once per tap.
  """
  _, time, height, width, _ = x.shape
  padded = _pad(x, CAUSAL_PADDING)
  return sum(padded[:, kt:kt + time, kh:kh + height, kw:kw + width] * kernel[kt, kh, kw]
             for kt, kh, kw in _causal_taps(time))


def _depthwise_causal_conv_fwd(x, kernel):
  return depthwise_causal_conv(x, kernel), (x, kernel)


def _depthwise_causal_conv_bwd(residuals, grad):
  x, kernel = residuals
  _, time, height, width, channels = x.shape
  # d out[t, h, w] / d x[t + 2 - kt, h + 1 - kh, w + 1 - kw] = kernel[kt, kh, kw]: both gradients read
  # the same windows of the gradient padded at the other ends. Reading x unpadded leaves the forward's
  # padded x with one consumer, so XLA fuses the forward's taps into one loop.
  padded_grad = _pad(grad, ((0, 2), (1, 1), (1, 1)))
  window = lambda kt, kh, kw: padded_grad[:, 2 - kt:2 - kt + time, 2 - kh:2 - kh + height, 2 - kw:2 - kw + width]
  taps = _causal_taps(time)
  grad_x = sum(window(*tap) * kernel[tap] for tap in taps)
  per_tap = {tap: jnp.sum(window(*tap) * x, axis=(0, 1, 2, 3)) for tap in taps}
  zeros = jnp.zeros((channels,), grad.dtype)
  grad_kernel = jnp.stack([per_tap.get((kt, kh, kw), zeros) for kt in range(3) for kh in range(3) for kw in range(3)])
  return grad_x, grad_kernel.reshape(kernel.shape).astype(kernel.dtype)


depthwise_causal_conv.defvjp(_depthwise_causal_conv_fwd, _depthwise_causal_conv_bwd)


class PositionGenerator(nn.Module):
  """PEG: a depthwise 3x3x3 convolution over (time, height, width), causal in time.

  `scrambled_time_layout` reproduces the official temporal transformer, whose PEG reinterprets
  tokens stored as `(batch height width) time` as if they were `(batch time height width)`.
  """
  dim: int
  scrambled_time_layout: bool = False
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """x: (batch, time, height, width, embed) -> same shape."""
    kernel = self.param('kernel', partitioned(torch_default_init(in_axis=(0, 1, 2), out_axis=(), batch_axis=(3,)),
                                              (None, None, None, 'embed')), (3, 3, 3, self.dim), jnp.float32)
    bias = self.param('bias', partitioned(nn.initializers.zeros, ('embed',)), (self.dim,), jnp.float32)
    batch, time, height, width, dim = x.shape
    if self.scrambled_time_layout:
      x = einops.rearrange(x, 'b t h w d -> b (h w t) d').reshape(batch, time, height, width, dim)
    out = depthwise_causal_conv(x, kernel.astype(self.dtype)) + bias.astype(self.dtype)
    if self.scrambled_time_layout:
      out = einops.rearrange(out.reshape(batch, height * width * time, dim), 'b (h w t) d -> b t h w d',
                             h=height, w=width)
    return out


def _causal_visible(query_len: int, key_len: int) -> jax.Array:
  """(query_len, key_len) bool: query i sees keys up to its own position (keys aligned at the end)."""
  return jnp.tril(jnp.ones((query_len, key_len), bool), k=key_len - query_len)


def sequence_attention(query, key, value, *, bias=None, causal=False):
  """Softmax attention over sequences: query (batch, q_len, heads, head_dim), key/value (batch, k_len, ...)."""
  logits = jnp.einsum('bqhd,bkhd->bhqk', query, key, preferred_element_type=jnp.float32) * ATTENTION_LOGIT_SCALE
  if bias is not None:
    logits = logits + bias
  if causal:
    logits = jnp.where(_causal_visible(*logits.shape[-2:]), logits, jnp.finfo(jnp.float32).min)
  weights = jax.nn.softmax(logits, axis=-1).astype(value.dtype)
  return jnp.einsum('bhqk,bkhd->bqhd', weights, value)


def time_attention(query, key, value, *, causal=False):
  """Attention along the time axis without moving it: query (batch, q_len, positions, heads,
  head_dim), key/value (batch, k_len, positions, heads, head_dim).

  Time is short (2 frames for the LAQ), so this is written as broadcast products and sums, which
  XLA fuses; as einsums it becomes many tiny batched matmuls and the transposes around them.
  """
  logits = jnp.sum(query[:, :, None].astype(jnp.float32) * key[:, None].astype(jnp.float32), axis=-1)
  logits = logits * ATTENTION_LOGIT_SCALE  # (batch, q_len, k_len, positions, heads)
  if causal:
    visible = _causal_visible(logits.shape[1], logits.shape[2])[None, :, :, None, None]
    logits = jnp.where(visible, logits, jnp.finfo(jnp.float32).min)
  weights = jax.nn.softmax(logits, axis=2)
  return jnp.sum(weights[..., None] * value[:, None].astype(jnp.float32), axis=2).astype(value.dtype)


class Attention(nn.Module):
  """Pre-norm cosine-similarity multi-head attention.

  x is (batch, length, embed), or (batch, time, positions, embed) to attend along time for every
  position independently. Queries and keys are l2-normalised per head, scaled by
  learned per-dimension `query_scale` and `key_scale`, and their dot product is multiplied by 8.
  Cross-attention (a `context` is given) normalises the context and prepends `num_null_kv` learned
  null key/value pairs, so a query can attend to "nothing". `kv_from_unnormalized_input` is the
  official quirk of projecting self-attention keys and values from the input before the LayerNorm.
  """
  heads: int
  head_dim: int
  num_null_kv: int = 0
  causal: bool = False
  kv_from_unnormalized_input: bool = False
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, context: jax.Array | None = None, bias: jax.Array | None = None) -> jax.Array:
    """context: (batch, context_length, embed); bias: (heads, length, length) added to the logits."""
    dim = x.shape[-1]
    normed = layer_norm('norm', use_bias=False, dtype=self.dtype)(x)
    if context is not None:
      kv_input = layer_norm('context_norm', use_bias=False, dtype=self.dtype)(context)
    else:
      kv_input = x if self.kv_from_unnormalized_input else normed
    query = Projection((self.heads, self.head_dim), ('embed', 'heads', 'kv'), dtype=self.dtype, name='query')(normed)
    # Keys and values share their input: one matmul; split (not indexing) keeps the gradient a concatenation.
    key_value = Projection((2, self.heads, self.head_dim), ('embed', None, 'heads', 'kv'), dtype=self.dtype,
                           name='key_value')(kv_input)
    key, value = (part[..., 0, :, :] for part in jnp.split(key_value, 2, axis=-3))

    if self.num_null_kv:
      null_init = partitioned(nn.initializers.normal(1.0), (None, 'heads', 'kv'))
      null_shape = (self.num_null_kv, self.heads, self.head_dim)
      null_keys = self.param('null_keys', null_init, null_shape, jnp.float32).astype(self.dtype)
      null_values = self.param('null_values', null_init, null_shape, jnp.float32).astype(self.dtype)
      batch = key.shape[0]
      key = jnp.concatenate([jnp.broadcast_to(null_keys, (batch, *null_shape)), key], axis=1)
      value = jnp.concatenate([jnp.broadcast_to(null_values, (batch, *null_shape)), value], axis=1)
      if bias is not None:
        bias = jnp.pad(bias, ((0, 0), (0, 0), (self.num_null_kv, 0)))

    scale_init = partitioned(nn.initializers.ones, ('kv',))
    query_scale = self.param('query_scale', scale_init, (self.head_dim,), jnp.float32)
    key_scale = self.param('key_scale', scale_init, (self.head_dim,), jnp.float32)
    query = (l2_normalize(query) * query_scale).astype(self.dtype)
    key = (l2_normalize(key) * key_scale).astype(self.dtype)

    if x.ndim == 3:
      out = sequence_attention(query, key, value, bias=bias, causal=self.causal)
    elif x.ndim == 4 and context is None and bias is None:
      out = time_attention(query, key, value, causal=self.causal)
    else:
      raise ValueError(f'Attention: expected (batch, length, embed), or (batch, length, positions, embed) '
                       f'self-attention without bias; got {x.shape}')
    return Projection((dim,), ('heads', 'kv', 'embed'), input_axes=2, dtype=self.dtype, name='out')(out)


class FeedForward(nn.Module):
  """LayerNorm -> GEGLU (value * gelu(gate), exact GELU) -> Dense back to the model width."""
  hidden_dim: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    dim = x.shape[-1]
    h = layer_norm('norm', use_bias=True, dtype=self.dtype)(x)
    # One kernel for value and gate keeps this a single matmul; axis 1 is (value, gate).
    h = Projection((2, self.hidden_dim), ('embed', None, 'mlp'), dtype=self.dtype, name='wi')(h)
    # split (not indexing): its gradient is a concatenation rather than two padded copies.
    value, gate = jnp.split(h, 2, axis=-2)
    h = (value * nn.gelu(gate, approximate=False))[..., 0, :]
    return Projection((dim,), ('mlp', 'embed'), dtype=self.dtype, name='wo')(h)


class TransformerLayer(nn.Module):
  """PEG, self-attention, optional cross-attention, feed-forward; each pre-norm and residual."""
  axis: str  # 'space' (attend within a frame) or 'time' (attend across frames at a patch position)
  heads: int
  head_dim: int
  ff_hidden_dim: int
  cross_attention: bool = False
  num_null_kv: int = 2
  causal: bool = False
  official_quirks: bool = False
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, bias: jax.Array | None = None, context: jax.Array | None = None) -> jax.Array:
    """x: (batch, time, height, width, embed); context: (batch, context_length, embed)."""
    batch, time, height, width, dim = x.shape
    x = x + PositionGenerator(dim, scrambled_time_layout=self.official_quirks and self.axis == 'time',
                              dtype=self.dtype, name='peg')(x)

    if self.axis == 'space':  # (batch time, height width, embed): free reshapes
      to_sequences = lambda v: v.reshape(batch * time, height * width, dim)
    else:  # (batch, time, height width, embed): attend along time without moving it
      to_sequences = lambda v: v.reshape(batch, time, height * width, dim)
    from_sequences = lambda s: s.reshape(batch, time, height, width, dim)

    attention = lambda name, **kw: Attention(self.heads, self.head_dim, dtype=self.dtype, name=name, **kw)
    x = x + from_sequences(attention('self_attention', causal=self.causal,
                                     kv_from_unnormalized_input=self.official_quirks)(to_sequences(x), bias=bias))
    if self.cross_attention:
      if self.axis != 'space' or time != 1:
        raise ValueError('cross-attention is defined for single-frame spatial layers (the decoder)')
      x = x + from_sequences(attention('cross_attention', num_null_kv=self.num_null_kv)(
          to_sequences(x), context=context))
    x = x + FeedForward(self.ff_hidden_dim, dtype=self.dtype, name='feed_forward')(x)
    return nn.with_logical_constraint(x, VIDEO_AXES)


class Transformer(nn.Module):
  """A stack of `TransformerLayer`s followed by a bias-less LayerNorm."""
  depth: int
  axis: str
  heads: int
  head_dim: int
  ff_hidden_dim: int
  cross_attention: bool = False
  causal: bool = False
  official_quirks: bool = False
  remat: bool = False
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, bias: jax.Array | None = None, context: jax.Array | None = None) -> jax.Array:
    layer_cls = nn.remat(TransformerLayer) if self.remat else TransformerLayer
    for index in range(self.depth):
      x = layer_cls(self.axis, self.heads, self.head_dim, self.ff_hidden_dim,
                    cross_attention=self.cross_attention, causal=self.causal,
                    official_quirks=self.official_quirks, dtype=self.dtype, name=f'layer_{index}')(x, bias, context)
    return layer_norm('norm_out', use_bias=False, dtype=self.dtype)(x)
