"""The LWM VQGAN tokenizer: LWM's param layout, code shapes and ranges, quantizer, training pass."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from lapa_jax.models import vqgan


def test_lwm_preset_layout_and_token_grid():
  """The LWM config gives LWM's param names and shapes, and 256x256 -> 16x16 codes of 8192 (eval_shape only)."""
  config = vqgan.vqgan_config('lwm')
  model = vqgan.VQGAN(config)
  images = jax.ShapeDtypeStruct((2, 256, 256, 3), jnp.float32)
  params = jax.eval_shape(lambda x: model.init(jax.random.key(0), x), images)['params']
  flat = {k: v.shape for k, v in traverse_util.flatten_dict(params, sep='/').items()}
  expected = {
      'encoder/Conv_0/kernel': (3, 3, 3, 128),
      'encoder/DownsamplingBlock_0/ResnetBlock_0/Conv_0/kernel': (3, 3, 128, 128),
      'encoder/DownsamplingBlock_0/ResnetBlock_0/GroupNorm_1/scale': (128,),
      'encoder/DownsamplingBlock_0/Downsample_0/Conv_0/kernel': (3, 3, 128, 128),
      'encoder/DownsamplingBlock_1/ResnetBlock_0/Conv_2/kernel': (1, 1, 128, 256),  # width change shortcut
      'encoder/DownsamplingBlock_4/ResnetBlock_1/Conv_1/kernel': (3, 3, 768, 768),
      'encoder/MidBlock_0/ResnetBlock_1/Conv_0/kernel': (3, 3, 768, 768),
      'encoder/GroupNorm_0/scale': (768,),
      'encoder/Conv_1/kernel': (3, 3, 768, 64),
      'quant_conv/kernel': (1, 1, 64, 64),
      'quantize/embeddings': (8192, 64),
      'post_quant_conv/kernel': (1, 1, 64, 64),
      'decoder/Conv_0/kernel': (3, 3, 64, 768),
      'decoder/UpsamplingBlock_0/ResnetBlock_2/Conv_1/kernel': (3, 3, 768, 768),  # level 4 comes first
      'decoder/UpsamplingBlock_0/Upsample_0/Conv_0/kernel': (3, 3, 768, 768),
      'decoder/UpsamplingBlock_4/ResnetBlock_0/Conv_2/kernel': (1, 1, 256, 128),
      'decoder/Conv_1/kernel': (3, 3, 128, 3),
  }
  for name, shape in expected.items():
    assert flat.get(name) == shape, name
  assert not [k for k in flat if 'DownsamplingBlock_4/Downsample' in k or 'UpsamplingBlock_4/Upsample' in k]
  # Encoder 33 convs (2 + 20 in ResnetBlocks + 3 shortcuts + 4 downsamples + 4 mid), decoder 43.
  assert sum(k.endswith('/kernel') for k in flat if 'Conv' in k) == 76
  codes = jax.eval_shape(lambda p, x: model.apply({'params': p}, x, method=vqgan.VQGAN.encode), params, images)
  assert codes.shape == (2, 16, 16) and codes.dtype == jnp.int32 and config.tokens_per_image == 256


@functools.lru_cache(maxsize=None)
def _tiny():
  """Params drawn with numpy in the init's shapes (compiling the init of ~100 conv tensors takes
  longer than every test here): He-scaled conv kernels, unit norm scales, a U(-1/K, 1/K) codebook."""
  config = vqgan.vqgan_config('tiny')
  model = vqgan.VQGAN(config)
  abstract = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 16, 16, 3)))['params']
  rng = np.random.RandomState(0)

  def draw(path, leaf):
    name = str(path[-1].key)
    if name == 'kernel':
      value = rng.normal(0, np.sqrt(1 / np.prod(leaf.shape[:-1])), leaf.shape)
    elif name == 'scale':
      value = np.ones(leaf.shape)
    elif name == 'embeddings':
      value = rng.uniform(-1 / leaf.shape[0], 1 / leaf.shape[0], leaf.shape)
    else:
      value = np.zeros(leaf.shape)
    return jnp.asarray(value, jnp.float32)

  return config, model, jax.tree.map_with_path(draw, abstract)


def _images(shape, seed=0):
  return jnp.asarray(np.random.RandomState(seed).uniform(0, 1, shape), jnp.float32)


def test_encode_decode_shapes_and_ranges():
  config, model, params = _tiny()
  encode = jax.jit(lambda x: model.apply({'params': params}, x, method=vqgan.VQGAN.encode))
  decode = jax.jit(lambda c: model.apply({'params': params}, c, method=vqgan.VQGAN.decode))
  codes = encode(_images((2, 16, 16, 3)))
  assert codes.shape == (2, 8, 8) and 0 <= int(codes.min()) and int(codes.max()) < config.codebook_size
  video = jax.ShapeDtypeStruct((1, 3, 16, 16, 3), jnp.float32)  # (batch, time, ...) like LWM's video input
  assert jax.eval_shape(encode, video).shape == (1, 3, 8, 8)
  images = decode(codes)
  assert images.shape == (2, 16, 16, 3) and 0.0 <= float(images.min()) and float(images.max()) <= 1.0
  with pytest.raises(ValueError, match='expected images'):
    model.apply({'params': params}, jnp.zeros((1, 32, 32, 3)), method=vqgan.VQGAN.encode)


def test_codes_are_nearest_codebook_entries():
  _, model, params = _tiny()
  images = _images((2, 16, 16, 3), seed=1)
  latents = model.apply({'params': params}, images, method=lambda m, x: m._latents(x))
  codes = model.apply({'params': params}, images, method=vqgan.VQGAN.encode)
  codebook = np.asarray(params['quantize']['embeddings'], np.float64)
  distances = ((np.asarray(latents, np.float64)[..., None, :] - codebook) ** 2).sum(-1)
  np.testing.assert_array_equal(codes, distances.argmin(-1))


def test_training_pass_straight_through_gradients():
  _, model, params = _tiny()
  images = _images((2, 16, 16, 3), seed=2)

  def loss(p):
    reconstruction, _, losses = model.apply({'params': p}, images)
    return jnp.mean((reconstruction - images) ** 2) + losses['codebook_loss'] + losses['commitment_loss']

  grads = jax.jit(jax.grad(loss))(params)
  assert float(jnp.abs(grads['encoder']['Conv_0']['kernel']).max()) > 0  # through the quantizer
  assert float(jnp.abs(grads['quantize']['embeddings']).max()) > 0  # the codebook loss
  assert float(jnp.abs(grads['decoder']['Conv_1']['kernel']).max()) > 0
