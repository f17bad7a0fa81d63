"""The LAQ model: shapes, logical axes, masks, the causal `lapa` encoder, layers against references."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lapa_jax.models import laq, layers

TINY = dict(dim=16, quant_dim=4, codebook_size=8, image_size=16, patch_size=2, spatial_depth=1, temporal_depth=1,
            decoder_depth=1, heads=2, head_dim=8, code_seq_len=4)


class Built:
  """One model per variant, initialised once, with jitted entry points (compiling is the slow part)."""

  def __init__(self, variant):
    self.model = laq.LatentActionQuantizer(**TINY, variant=variant)
    self.video = jax.random.uniform(jax.random.key(0), (3, 2, 16, 16, 3))
    self.boxed = jax.jit(self.model.init)({'params': jax.random.key(1)}, self.video)
    self.params = nn.unbox(self.boxed)
    model = self.model
    self.forward = jax.jit(model.apply)
    self.train_forward = jax.jit(lambda p, v, rng: model.apply(p, v, train=True, rngs={'noise': rng}))
    self.decode_codes = jax.jit(lambda p, frame, codes: model.apply(p, frame, codes, method=model.decode_codes))
    self.codes = jax.jit(lambda p, v: model.apply(p, v, method=model.codes))
    self.first_stream = jax.jit(lambda p, v: model.apply(p, v, method=lambda m, v: m.encode(m.embed_patches(v))[0]))


@pytest.fixture(scope='module', params=['lapa', 'official'])
def built(request):
  return Built(request.param)


def test_shapes_and_code_range(built):
  params, video = built.params, built.video
  out = built.forward(params, video)
  assert out['recon'].shape == (3, 16, 16, 3) and out['recon'].dtype == jnp.float32
  assert out['indices'].shape == (3, 4)
  assert np.all((np.asarray(out['indices']) >= 0) & (np.asarray(out['indices']) < 8))
  assert float(out['code_counts'].sum()) == 12
  np.testing.assert_array_equal(built.codes(params, video), out['indices'])


def test_every_param_has_logical_names_of_its_rank(built):
  leaves = jax.tree.leaves(built.boxed['params'], is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
  assert leaves
  for leaf in leaves:
    assert isinstance(leaf, nn.LogicallyPartitioned)
    assert len(leaf.names) == leaf.value.ndim, (leaf.names, leaf.value.shape)


def test_bad_video_shape_is_an_error(built):
  with pytest.raises(ValueError, match=r'video: expected shape \(batch, 2, 16, 16, 3\)'):
    built.forward(built.params, built.video[:, :, :8])


def test_lapa_encoder_is_causal_in_time_and_official_is_not(built):
  video = built.video
  changed = video.at[:, 1].set(jax.random.uniform(jax.random.key(9), video[:, 1].shape))
  same = np.allclose(built.first_stream(built.params, video), built.first_stream(built.params, changed), atol=1e-6)
  assert same == (built.model.variant == 'lapa')


def test_decoder_sees_only_x_t_and_the_codes(built):
  params, video = built.params, built.video
  out = built.forward(params, video)
  np.testing.assert_allclose(built.decode_codes(params, video[:, 0], out['indices']), out['recon'], atol=1e-5)
  other = built.decode_codes(params, video[:, 0], (out['indices'] + 1) % 8)
  assert not np.allclose(other, out['recon'], atol=1e-4)


def test_training_noise_depends_on_the_rng_only(built):
  run = lambda seed: built.train_forward(built.params, built.video, jax.random.key(seed))['recon']
  np.testing.assert_array_equal(run(0), run(0))
  assert not np.allclose(run(0), run(1))


def test_predict_change_adds_the_decoder_output_to_x_t(built):
  """The same params predict x_{t+H} directly or as x_t + the decoder's output, in training, labelling
  and decode_codes alike; the codes do not depend on it."""
  params, video = built.params, built.video
  change = laq.LatentActionQuantizer(**TINY, variant=built.model.variant, predict_change=True)
  direct, residual = built.forward(params, video), jax.jit(change.apply)(params, video)
  np.testing.assert_allclose(residual['recon'], direct['recon'] + video[:, 0], atol=1e-5)
  np.testing.assert_array_equal(residual['indices'], direct['indices'])
  decoded = change.apply(params, video[:, 0], direct['indices'], method=change.decode_codes)
  np.testing.assert_allclose(decoded, residual['recon'], atol=1e-5)


def test_configs_without_predict_change_still_load():
  """Runs saved before the field existed have no model.predict_change in their config.json."""
  config = dict(TINY, channels=3, ff_mult=4.0, variant='lapa', remat=False)
  assert laq.from_config(config).predict_change is False
  assert laq.from_config({**config, 'predict_change': True}).predict_change is True


def test_remat_keeps_the_gradient():
  layer = lambda remat: layers.Transformer(1, 'space', heads=2, head_dim=8, ff_hidden_dim=16, remat=remat)
  x = jax.random.normal(jax.random.key(0), (2, 1, 4, 4, 16))
  params = nn.unbox(layer(False).init(jax.random.key(1), x))
  grad = lambda remat: jax.jit(jax.grad(lambda p: jnp.sum(layer(remat).apply(p, x) ** 2)))(params)
  for a, b in zip(jax.tree.leaves(grad(False)), jax.tree.leaves(grad(True))):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_bfloat16_compute_keeps_float32_params_and_outputs(built):
  params, video = built.params, built.video
  bf16 = laq.LatentActionQuantizer(**TINY, variant=built.model.variant, dtype=jnp.bfloat16)
  out = jax.jit(bf16.apply)(params, video)
  assert out['recon'].dtype == jnp.float32
  np.testing.assert_allclose(out['recon'], built.forward(params, video)['recon'], atol=0.1)


def test_depthwise_causal_conv_matches_a_grouped_convolution():
  x = jax.random.normal(jax.random.key(0), (2, 2, 4, 5, 3))
  kernel = jax.random.normal(jax.random.key(1), (3, 3, 3, 3))

  def reference(x, kernel):
    padded = jnp.pad(x, ((0, 0), (2, 0), (1, 1), (1, 1), (0, 0)))
    return jax.lax.conv_general_dilated(padded, kernel[..., None, :], (1, 1, 1), 'VALID',
                                        dimension_numbers=('NDHWC', 'DHWIO', 'NDHWC'), feature_group_count=3)

  for time in (1, 2):
    xt = x[:, :time]
    np.testing.assert_allclose(jax.jit(layers.depthwise_causal_conv)(xt, kernel), reference(xt, kernel), atol=1e-5)
    cotangent = jax.random.normal(jax.random.key(2), xt.shape)
    vjp = lambda f: jax.jit(lambda x, k, c: jax.vjp(f, x, k)[1](c))(xt, kernel, cotangent)
    ours, theirs = vjp(layers.depthwise_causal_conv), vjp(reference)
    for a, b in zip(ours, theirs):
      np.testing.assert_allclose(a, b, atol=1e-4)


def test_position_bias_equals_the_mlp_on_every_pair():
  module = layers.ContinuousPositionBias(heads=3, hidden_dim=8)
  params = module.init(jax.random.key(0), 3, 4)
  table = jax.jit(module.apply, static_argnums=(1, 2))(params, 3, 4)
  assert table.shape == (3, 12, 12)
  grid = np.stack(np.meshgrid(np.arange(3), np.arange(4), indexing='ij'), -1).reshape(-1, 2)
  rel = (grid[:, None] - grid[None]).astype(np.float32)
  rel = np.sign(rel) * np.log1p(np.abs(rel))
  p = nn.unbox(params)['params']
  h = jax.nn.leaky_relu(rel @ p['hidden_0']['kernel'] + p['hidden_0']['bias'], 0.1)
  h = jax.nn.leaky_relu(h @ p['hidden_1']['kernel'] + p['hidden_1']['bias'], 0.1)
  direct = np.moveaxis(h @ p['to_heads']['kernel'] + p['to_heads']['bias'], -1, 0)
  np.testing.assert_allclose(table, direct, atol=1e-5)


def test_attention_masks():
  q = jax.random.normal(jax.random.key(0), (2, 3, 5, 2, 4))  # (batch, time, positions, heads, head_dim)
  k, v = q * 0.5, q + 1.0
  attend = jax.jit(lambda q, k, v: layers.time_attention(q, k, v, causal=True))
  out = attend(q, k, v)
  changed = attend(q, k.at[:, 2].add(3.0), v.at[:, 2].add(3.0))
  np.testing.assert_allclose(out[:, :2], changed[:, :2], atol=1e-6)  # frames 0, 1 never see frame 2
  assert not np.allclose(out[:, 2], changed[:, 2])
  # The time path is ordinary softmax attention along that axis.
  sequences = lambda t: jnp.moveaxis(t, 2, 1).reshape(10, 3, 2, 4)
  reference = jax.jit(lambda q, k, v: layers.sequence_attention(q, k, v, causal=True))(
      sequences(q), sequences(k), sequences(v))
  np.testing.assert_allclose(sequences(out), reference, atol=1e-5)


def test_cross_attention_null_keys_let_queries_ignore_the_context():
  attention = layers.Attention(heads=2, head_dim=4, num_null_kv=2)
  x = jax.random.normal(jax.random.key(0), (2, 6, 8))
  context = jax.random.normal(jax.random.key(1), (2, 3, 8))
  params = nn.unbox(jax.jit(attention.init)(jax.random.key(2), x, context=context))
  assert params['params']['null_keys'].shape == (2, 2, 4)
  # With keys that never match, only the null values are read: the output ignores the context.
  p = jax.tree.map(lambda a: a, params)
  p['params']['key_value']['kernel'] = p['params']['key_value']['kernel'].at[:, 0].set(0.0)
  p['params']['null_keys'] = jnp.ones_like(p['params']['null_keys']) * 10
  p['params']['query']['kernel'] = jnp.ones_like(p['params']['query']['kernel'])
  apply = jax.jit(attention.apply)
  a = apply(p, x, context=context)
  b = apply(p, x, context=context * 3 + 1)
  assert a.shape == x.shape
  assert np.max(np.abs(a - b)) < 0.05 * np.max(np.abs(a))
