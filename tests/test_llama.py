"""The LWM LLaMA decoder: layout and sharding of params, RoPE, masks, KV cache, remat, dtypes."""

import functools
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from jax.sharding import PartitionSpec as P

from lapa_jax import sharding
from lapa_jax.models import llama

# LWM's regex partition rules (vision_llama.py / delta_llama.py, scan axis 0) with its `sp` axis
# dropped, as lapa_jax meshes have none: the oracle every logical annotation must reproduce.
LWM_RULES = (
    (r'transformer/(wte|vte)/embedding', P('tp', 'fsdp')),
    (r'transformer/(dte|ate)/embedding', P(None, 'fsdp')),
    (r'attention/(wq|wk|wv)/kernel', P(None, 'fsdp', 'tp')),
    (r'attention/wo/kernel', P(None, 'tp', 'fsdp')),
    (r'feed_forward/w(1|3)/kernel', P(None, 'fsdp', 'tp')),
    (r'feed_forward/w2/kernel', P(None, 'tp', 'fsdp')),
    (r'(attention_norm|ffn_norm)/kernel', P(None, None)),
    (r'ln_f/kernel', P(None)),
    (r'(lm_head|vision_head)/kernel', P('fsdp', 'tp')),
    (r'(delta_head|action_head)/kernel', P('fsdp', None)),
)


def _tiny(**overrides):
  return llama.llama_config('tiny', **overrides)


@functools.lru_cache(maxsize=None)
def _params(config, seed=0):
  """(model, params): N(0, 0.02) matrices and unit norms drawn with numpy in the shapes of the init
  (compiling the scanned init takes seconds); built once per config."""
  model = llama.LLaMAForCausalLM(config)
  abstract = jax.eval_shape(lambda: nn.unbox(model.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))['params']))
  rng = np.random.RandomState(seed)

  def draw(path, leaf):
    is_norm = any('norm' in str(key) or 'ln_f' in str(key) for key in path)
    return jnp.asarray(np.ones(leaf.shape) if is_norm else rng.normal(0, 0.02, leaf.shape), jnp.float32)

  return model, jax.tree.map_with_path(draw, abstract)


def test_init_draws_from_the_lwm_distribution():
  config = _tiny()
  model = llama.LLaMAForCausalLM(config)
  params = nn.unbox(jax.jit(lambda rng: model.init(rng, jnp.zeros((1, 4), jnp.int32)))(jax.random.key(0)))['params']
  wq = np.asarray(params['transformer']['h']['scan_decoder']['attention']['wq']['kernel'])
  assert abs(wq.std() - config.initializer_range) < 0.002
  assert not np.allclose(wq[0], wq[1])  # each scanned layer gets its own draw
  np.testing.assert_array_equal(params['transformer']['ln_f']['kernel'], np.ones(config.hidden_size))


def _forward(model):
  """Jitted `(params, tokens, mask=None, positions=None, segment_ids=None) -> logits`: compiling once
  is much faster than running the scanned model op by op."""
  return jax.jit(lambda params, *args: model.apply({'params': params}, *args)[0])


def _tokens(shape, vocab, seed=0):
  return jnp.asarray(np.random.RandomState(seed).randint(3, vocab, shape), jnp.int32)


def _normalize(spec):
  """PartitionSpec without trailing Nones, so P('tp', None) equals P('tp')."""
  entries = list(spec)
  while entries and entries[-1] is None:
    entries.pop()
  return tuple(entries)


def test_7b_param_layout_names_and_shardings_match_lwm():
  """eval_shape of the 7B preset: LWM param names and shapes, and LWM's partition specs from our
  logical rules (no memory is allocated)."""
  config = llama.llama_config('7b')
  model = llama.LLaMAForCausalLM(config)
  abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))['params'])
  flat = traverse_util.flatten_dict(nn.unbox(abstract), sep='/')
  assert flat['transformer/wte/embedding'].shape == (32000, 4096)
  assert flat['transformer/h/scan_decoder/attention/wq/kernel'].shape == (32, 4096, 4096)
  assert flat['transformer/h/scan_decoder/feed_forward/w2/kernel'].shape == (32, 11008, 4096)
  assert flat['transformer/h/scan_decoder/attention_norm/kernel'].shape == (32, 4096)
  assert flat['lm_head/kernel'].shape == (4096, 32000)
  count = sum(int(np.prod(v.shape)) for v in flat.values())
  assert count == llama.param_count(config) == 6_738_415_616  # LLaMA-2-7B

  mesh = sharding.make_mesh('1,4,2')
  specs = traverse_util.flatten_dict(nn.get_partition_spec(abstract), sep='/')
  with sharding.use_mesh(mesh):
    mesh_specs = nn.logical_to_mesh(specs, sharding.LOGICAL_RULES)
  for name, spec in mesh_specs.items():
    expected = [s for pattern, s in LWM_RULES if re.search(pattern, name)]
    assert expected, f'no LWM rule for {name}'
    assert _normalize(spec) == _normalize(expected[0]), name


def test_presets_sizes():
  small = llama.llama_config('small')
  assert (small.hidden_size, small.intermediate_size, small.num_layers, small.num_heads, small.vocab_size) == (
      768, 2048, 8, 12, 32000)
  assert 100e6 < llama.param_count(small) < 110e6
  assert llama.llama_config('7b').remat_policy == 'nothing_saveable'
  with pytest.raises(ValueError, match='preset'):
    llama.llama_config('13b')
  with pytest.raises(ValueError, match='remat_policy'):
    llama.llama_config('tiny', remat_policy='everything')


def test_rope_is_interleaved_complex_rotation():
  """LWM applies RoPE as a complex multiply of (x[2i] + i x[2i+1]) by exp(i * pos * theta^(-2i/d))."""
  rng = np.random.RandomState(0)
  x = rng.randn(2, 5, 3, 8).astype(np.float32)
  positions = np.array([[0, 1, 2, 3, 4], [7, 9, 100, 1000, 4095]])
  cos, sin = llama.rope_frequencies(jnp.asarray(positions), 8, 5e7)
  ours = np.asarray(llama.apply_rope(jnp.asarray(x), cos, sin))
  frequencies = 1.0 / (5e7 ** (np.arange(0, 8, 2) / 8))
  rotation = np.exp(1j * positions[..., None] * frequencies)[:, :, None, :]
  complex_x = x[..., 0::2] + 1j * x[..., 1::2]
  expected = complex_x * rotation
  np.testing.assert_allclose(ours[..., 0::2], expected.real, atol=1e-4)  # float32 angles near 4095 rad
  np.testing.assert_allclose(ours[..., 1::2], expected.imag, atol=1e-4)


def test_left_padding_does_not_change_real_positions():
  config = _tiny()
  model, params = _params(config)
  tokens = _tokens((1, 9), config.vocab_size)
  forward = _forward(model)
  reference = forward(params, tokens, jnp.ones_like(tokens))
  padded = jnp.concatenate([jnp.zeros((1, 4), jnp.int32), tokens], axis=1)
  mask = jnp.concatenate([jnp.zeros((1, 4), jnp.int32), jnp.ones((1, 9), jnp.int32)], axis=1)
  logits = forward(params, padded, mask)
  assert np.isfinite(np.asarray(logits)).all()
  np.testing.assert_allclose(logits[:, 4:], reference, rtol=1e-5, atol=1e-5)


def test_segment_ids_isolate_packed_sequences():
  config = _tiny()
  model, params = _params(config)
  first, second = _tokens((1, 5), config.vocab_size, 1), _tokens((1, 7), config.vocab_size, 2)
  packed = jnp.concatenate([first, second], axis=1)
  segments = jnp.asarray([[1] * 5 + [2] * 7])
  positions = jnp.asarray([list(range(5)) + list(range(7))])
  logits = jax.jit(lambda p: model.apply({'params': p}, packed, positions=positions, segment_ids=segments)[0])(params)
  forward = _forward(model)
  alone_first, alone_second = forward(params, first), forward(params, second)
  np.testing.assert_allclose(logits[:, :5], alone_first, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(logits[:, 5:], alone_second, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('scan_layers', [True, False])
def test_kv_cache_steps_equal_full_forward(scan_layers):
  model, params = _params(_tiny())
  config = _tiny(scan_layers=scan_layers)
  if not scan_layers:
    model, params = llama.LLaMAForCausalLM(config), llama.unscan_params(params)
  tokens = _tokens((2, 10), config.vocab_size)
  mask = jnp.asarray([[1] * 10, [0, 0, 0] + [1] * 7])
  full = _forward(model)(params, tokens, mask)
  apply = jax.jit(lambda t, m, c: model.apply({'params': params}, t, m, cache=c))
  logits, cache = apply(tokens[:, :6], mask[:, :6], llama.init_cache(config, 2, 10))
  pieces = [logits]
  for column in range(6, 10):
    logits, cache = apply(tokens[:, column:column + 1], mask[:, column:column + 1], cache)
    pieces.append(logits)
  cached = jnp.concatenate(pieces, axis=1)
  np.testing.assert_allclose(cached[0], full[0], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(cached[1, 3:], full[1, 3:], rtol=1e-5, atol=1e-5)
  assert int(cache['index']) == 10 and cache['next_position'].tolist() == [10, 7]


def test_remat_policies_give_identical_gradients():
  tokens = _tokens((2, 8), 512)

  _, params = _params(_tiny())

  def gradients(policy):
    model = llama.LLaMAForCausalLM(_tiny(remat_policy=policy))
    loss = lambda p: jnp.mean(model.apply({'params': p}, tokens)[0] ** 2)
    return jax.jit(jax.grad(loss))(params)

  reference = gradients('none')
  for policy in ('nothing_saveable', 'dots_saveable'):
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), gradients(policy), reference)


def test_bf16_compute_keeps_fp32_params_and_close_logits():
  config = _tiny()
  model, params = _params(config)
  tokens = _tokens((2, 8), config.vocab_size)
  reference = _forward(model)(params, tokens)
  bf16_model = llama.LLaMAForCausalLM(config.replace(dtype='bfloat16'))
  bf16_params = jax.eval_shape(lambda: bf16_model.init(jax.random.key(0), tokens)['params'])
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(nn.unbox(bf16_params)))
  logits = _forward(bf16_model)(params, tokens)
  assert logits.dtype == jnp.float32
  assert float(jnp.abs(logits - reference).max()) < 0.05 * float(jnp.abs(reference).max())


def test_flops_per_token_matches_hand_count():
  config = llama.llama_config('7b')
  counts = llama.flops_per_token(config, 2048, head_vocab=32000 + 8448)
  # jax_recipes.md §4: about 39.85 GFLOP per token for the weights and 1.61 for attention at 2048.
  assert abs(counts['weights'] / 1e9 - 39.85) < 0.05
  assert abs(counts['attention'] / 1e9 - 1.61) < 0.01


def test_unscanned_layers_are_easylm_layout_and_same_model():
  model, params = _params(_tiny())
  config = _tiny(scan_layers=False)
  unscanned_model = llama.LLaMAForCausalLM(config)
  abstract = jax.eval_shape(lambda: unscanned_model.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))['params'])
  names = traverse_util.flatten_dict(nn.get_partition_spec(abstract), sep='/')
  assert names['transformer/h/1/attention/wq/kernel'] == P('embed', 'heads')  # no layers axis
  unscanned = llama.unscan_params(params)
  assert jax.tree.map(jnp.shape, unscanned) == jax.tree.map(jnp.shape, nn.unbox(abstract))
  tokens = _tokens((2, 9), config.vocab_size)
  np.testing.assert_allclose(_forward(unscanned_model)(unscanned, tokens), _forward(model)(params, tokens),
                             rtol=1e-5, atol=1e-6)
  jax.tree.map(np.testing.assert_array_equal, llama.scan_params(unscanned), params)
