"""NSVQ: nearest codes, noise substitution, gradients, code-grid CNNs, the official decode reshape."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lapa_jax.models import nsvq

DIM, QUANT, CODES = 16, 4, 8


class Jitted(nsvq.NSVQ):
  """NSVQ whose `apply` is jitted: eager applies dispatch every small op and are slow."""

  def apply(self, *args, **kwargs):
    return _jitted_apply(self, *args, **kwargs)


def _jitted_apply(module, variables, *args, train=None, method=None, rngs=None):
  kwargs = {} if train is None else {'train': train}
  call = lambda v, r, *a: nsvq.NSVQ.apply(module, v, *a, method=method, rngs=r, **kwargs)
  return jax.jit(call)(variables, rngs, *args)


def make(code_seq_len=4, scrambled_decode=False):
  module = Jitted(DIM, QUANT, CODES, code_seq_len, scrambled_decode=scrambled_decode)
  grid = {1: 8, 2: 8, 4: 8, 16: 16, 64: 16, 256: 32}[code_seq_len]
  first = jax.random.normal(jax.random.key(0), (3, grid, grid, DIM))
  last = jax.random.normal(jax.random.key(1), (3, grid, grid, DIM))
  params = nn.unbox(jax.jit(lambda r: module.init({'params': r}, first, last, train=False))(jax.random.key(2)))
  return module, params, first, last


@pytest.mark.parametrize('code_seq_len', sorted(nsvq.CODE_GRID_CNNS))
def test_code_grid_cnn_gives_code_seq_len_codes(code_seq_len):
  module = nsvq.NSVQ(DIM, QUANT, CODES, code_seq_len)
  grid = {1: 8, 2: 8, 4: 8, 16: 16, 64: 16, 256: 32}[code_seq_len]
  frames = jax.ShapeDtypeStruct((3, grid, grid, DIM), jnp.float32)
  params = jax.eval_shape(lambda f: module.init(jax.random.key(0), f, f, train=False), frames)  # shapes only
  context, indices, aux = jax.eval_shape(lambda p, f: module.apply(p, f, f, train=False), params, frames)
  assert context.shape == (3, code_seq_len, DIM)
  assert indices.shape == (3, code_seq_len) and indices.dtype == jnp.int32
  assert aux['latents'].shape == (3, code_seq_len, QUANT) and aux['code_counts'].shape == (CODES,)


def test_code_grid_mismatch_is_an_error():
  with pytest.raises(ValueError, match='code_seq_len=4 does not fit a 16x16 patch grid'):
    nsvq.code_grid_shape(4, 16, 16)
  with pytest.raises(ValueError, match='expected one of'):
    nsvq.code_grid_shape(3, 8, 8)


def test_latent_action_is_difference_of_frame_codes():
  module, params, first, last = make()
  latent = module.apply(params, first, last, method=module.latent_action)
  assert np.allclose(module.apply(params, first, first, method=module.latent_action), 0.0)
  swapped = module.apply(params, last, first, method=module.latent_action)
  np.testing.assert_allclose(swapped, -latent, atol=1e-6)


def test_nearest_codes_match_brute_force_and_count_every_assignment():
  module, params, first, last = make()
  latent = module.apply(params, first, last, method=module.latent_action)
  codebook = params['params']['codebook']
  distances = np.linalg.norm(np.asarray(latent)[:, :, None] - np.asarray(codebook)[None, None], axis=-1)
  _, indices, aux = module.apply(params, first, last, train=False)
  np.testing.assert_array_equal(indices, distances.argmin(-1))
  # Duplicates count once per assignment (the official counter counted once per batch).
  np.testing.assert_array_equal(aux['code_counts'], np.bincount(np.asarray(indices).ravel(), minlength=CODES))


def test_noise_substitution_has_the_quantization_error_norm():
  module, params, first, last = make()
  latent = module.apply(params, first, last, method=module.latent_action)
  codebook = params['params']['codebook']
  indices = module.apply(params, latent, method=module.nearest_codes)
  error_norm = np.linalg.norm(np.asarray(latent - codebook[indices]), axis=-1)

  captured = {}

  def capture_decode(module_, vectors):
    captured['vectors'] = vectors
    return vectors

  with nn.intercept_methods(lambda f, args, kwargs, ctx: capture_decode(ctx.module, *args)
                            if ctx.method_name == 'decode' else f(*args, **kwargs)):
    nsvq.NSVQ.apply(module, params, first, last, train=True, rngs={'noise': jax.random.key(5)})  # eager: no tracers
  noisy = np.asarray(captured['vectors'])
  substituted = np.linalg.norm(noisy - np.asarray(latent), axis=-1)
  # ||q - d|| = ||d - c|| + eps * ||r||; eps = 1e-12 is invisible in float32.
  np.testing.assert_allclose(substituted, error_norm, rtol=1e-5)
  assert not np.allclose(noisy, codebook[indices])  # the code itself is never used in training


def test_gradients_reach_encoder_and_only_the_chosen_codes():
  module, params, first, last = make()

  def loss(params, first):
    context, _, _ = module.apply(params, first, last, train=True, rngs={'noise': jax.random.key(3)})
    return jnp.sum(context ** 2)

  grads_params, grads_first = jax.grad(loss, argnums=(0, 1))(params, first)
  _, indices, _ = module.apply(params, first, last, train=False)
  codebook_grad = np.asarray(grads_params['params']['codebook'])
  used = np.zeros(CODES, bool)
  used[np.asarray(indices).ravel()] = True
  assert np.all(np.abs(codebook_grad[~used]) == 0)
  assert np.all(np.abs(codebook_grad[used]).sum(-1) > 0)
  assert float(jnp.abs(grads_first).sum()) > 0
  assert all(np.isfinite(leaf).all() for leaf in jax.tree.leaves(grads_params))


def test_gradient_is_finite_when_the_latent_equals_a_code():
  module, params, first, last = make()
  latent = module.apply(params, first, last, method=module.latent_action)
  codebook = params['params']['codebook'].at[:].set(latent[0, 0])  # every code sits exactly on d[0, 0]
  params = {'params': {**params['params'], 'codebook': codebook}}
  grads = jax.grad(lambda p: jnp.sum(module.apply(p, first, last, train=True, rngs={'noise': jax.random.key(0)})[0]))(params)
  assert all(np.isfinite(leaf).all() for leaf in jax.tree.leaves(grads))


def test_official_decode_reshape_mixes_codes():
  plain, params, _, _ = make(scrambled_decode=False)
  scrambled = nsvq.NSVQ(DIM, QUANT, CODES, 4, scrambled_decode=True)
  vectors = jnp.arange(2 * 4 * QUANT, dtype=jnp.float32).reshape(2, 4, QUANT)
  captured = []
  interceptor = lambda f, args, kwargs, ctx: (captured.append(args[0]), f(*args, **kwargs))[1] \
      if ctx.method_name == '__call__' and isinstance(ctx.module, nn.Dense) else f(*args, **kwargs)
  with nn.intercept_methods(interceptor):  # eager applies, so the captured inputs are concrete
    nsvq.NSVQ.apply(scrambled, params, vectors, method=scrambled.decode)
    nsvq.NSVQ.apply(plain, params, vectors, method=plain.decode)
  scrambled_in, plain_in = np.asarray(captured[0]), np.asarray(captured[1])
  np.testing.assert_array_equal(plain_in, vectors)
  # Official decode token n', element q' holds flat element q' * code_seq_len + n' of the (n, q) codes.
  flat = np.asarray(vectors).reshape(2, -1)
  for n_out in range(4):
    for q_out in range(QUANT):
      assert scrambled_in[1, n_out, q_out] == flat[1, q_out * 4 + n_out]


def test_perplexity():
  assert float(nsvq.perplexity(jnp.full((8,), 5.0))) == pytest.approx(8.0, rel=1e-5)
  assert float(nsvq.perplexity(jnp.array([9.0, 0, 0, 0]))) == pytest.approx(1.0, rel=1e-5)
  assert float(nsvq.perplexity(jnp.array([3.0, 3.0, 0, 0]))) == pytest.approx(2.0, rel=1e-5)
