"""The VLA model: LAPA token layout, heads only at targets, losses, constrained generation, sharding."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lapa_jax import sharding
from lapa_jax.data import sequences
from lapa_jax.data.sequences import ACTION, LATENT, TEXT, VISION
from lapa_jax.models import vla
from lapa_jax.train.step import TrainState, init_train_state, make_train_step

CODEBOOK = 134  # tiny vision vocabulary 136 = 134 codes + eof + eov
VISION_TOKENS = 16
LENGTH = 176


@functools.lru_cache(maxsize=None)
def _model(action_vocab_size=0):
  """(model, params): N(0, 0.02) matrices and unit norms drawn with numpy from the abstract init,
  because compiling the scanned init takes seconds (the sharding test runs the real one)."""
  model = vla.VLA(vla.vla_config('tiny', action_vocab_size=action_vocab_size))
  abstract = nn.unbox(jax.eval_shape(lambda rng: vla.init_params(model, rng), jax.random.key(0)))
  rng = np.random.RandomState(0)

  def draw(path, leaf):
    is_norm = any('norm' in str(key) or 'ln_f' in str(key) for key in path)
    return jnp.asarray(np.ones(leaf.shape) if is_norm else rng.normal(0, 0.02, leaf.shape), jnp.float32)

  return model, jax.tree.map_with_path(draw, abstract)


def _examples(count, seed=0, **kwargs):
  rng = np.random.RandomState(seed)
  tokenizer = sequences.ByteTokenizer()
  examples = []
  for i in range(count):
    fields = {'latent': rng.randint(0, 8, 4), **kwargs}
    examples.append(sequences.vla_sequence(tokenizer, f'push the block {i}', rng.randint(0, CODEBOOK, VISION_TOKENS),
                                           codebook_size=CODEBOOK, **fields))
  return examples


def _batch(count, seed=0, **kwargs):
  return jax.tree.map(jnp.asarray, sequences.pad_batch(_examples(count, seed, **kwargs), LENGTH))


# ----------------------------------------------------------------------------------- token layout

def test_lapa_sequence_layout():
  tokenizer = sequences.ByteTokenizer()
  codes = np.arange(VISION_TOKENS)
  example = sequences.vla_sequence(tokenizer, 'open the drawer', codes, codebook_size=CODEBOOK,
                                   latent=[2, 0, 7, 2])
  full_ids = np.concatenate([example['tokens'], example['targets'][-1:]])
  full_modality = np.concatenate([example['modality'], example['target_modality'][-1:]])
  assert full_ids[:2].tolist() == [tokenizer.bos_id, tokenizer.bos_id] and full_ids[-1] == tokenizer.eos_id
  text = tokenizer.decode(full_ids[full_modality == TEXT])
  assert text.startswith('You are a helpful assistant. USER: What action should the robot take to '
                         '`open the drawer` ASSISTANT:<vision></vision><delta></delta>')
  assert full_ids[full_modality == VISION].tolist() == list(codes) + [CODEBOOK + 1]  # codes, then <eov>
  assert full_ids[full_modality == LATENT].tolist() == [2, 0, 7, 2]
  # Loss on everything after the image: <delta> markers, the 4 codes, </delta> and </s>.
  targets_with_loss = example['targets'][example['loss_mask'] > 0]
  assert tokenizer.decode(targets_with_loss[example['target_modality'][example['loss_mask'] > 0] == TEXT]) == \
      '<delta></delta>'
  assert (example['target_modality'][example['loss_mask'] > 0] == LATENT).sum() == 4
  assert targets_with_loss[-1] == tokenizer.eos_id
  prompt = sequences.generation_prompt(tokenizer, 'open the drawer', codes, codebook_size=CODEBOOK)
  assert example['tokens'][:len(prompt['tokens'])].tolist() == prompt['tokens'].tolist()
  assert example['target_modality'][len(prompt['tokens']) - 1] == LATENT  # the next token is a latent code
  with pytest.raises(ValueError, match='vision codes'):
    sequences.vla_sequence(tokenizer, 'x', [CODEBOOK], codebook_size=CODEBOOK)


def test_pad_batch_left_and_right():
  examples = _examples(2)
  examples[1] = {k: v[:-5] for k, v in examples[1].items()}
  right = sequences.pad_batch(examples, LENGTH)
  left = sequences.pad_batch(examples, LENGTH, left=True)
  size = len(examples[1]['tokens'])
  assert right['attention_mask'][1].tolist() == [1] * size + [0] * (LENGTH - size)
  assert left['attention_mask'][1].tolist() == [0] * (LENGTH - size) + [1] * size
  assert left['tokens'][1, -size:].tolist() == examples[1]['tokens'].tolist()
  with pytest.raises(ValueError, match='more than the sequence length'):
    sequences.pad_batch(examples, 10)


def test_byte_and_sentencepiece_tokenizers(tmp_path):
  byte = sequences.load_tokenizer('bytes')
  assert byte.decode(byte.encode('pick up the mug ☕')) == 'pick up the mug ☕'
  assert min(byte.encode('\x00')) == 3 and byte.vocab_size == 259
  sentencepiece = pytest.importorskip('sentencepiece')
  corpus = tmp_path / 'corpus.txt'
  corpus.write_text('\n'.join(f'What action should the robot take to pick up the {thing} number {i}'
                              for i in range(200) for thing in ('mug', 'red block', 'drawer')))
  sentencepiece.SentencePieceTrainer.train(
      input=str(corpus), model_prefix=str(tmp_path / 'tok'), vocab_size=60, model_type='bpe',
      unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2)
  tokenizer = sequences.load_tokenizer(str(tmp_path / 'tok.model'))
  assert (tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id, tokenizer.vocab_size) == (0, 1, 2, 60)
  ids = tokenizer.encode('pick up the mug')
  assert tokenizer.decode(ids) == 'pick up the mug' and min(ids) > 2
  with pytest.raises(FileNotFoundError, match='tokenizer.model'):
    sequences.load_tokenizer(str(tmp_path / 'missing.model'))


# ----------------------------------------------------------------------------------- loss

def _all_shapes(jaxpr):
  """Shapes of every value computed anywhere in a jaxpr, sub-jaxprs (scan, remat, pjit) included."""
  shapes = []
  for equation in jaxpr.eqns:
    shapes += [tuple(v.aval.shape) for v in equation.outvars if hasattr(v.aval, 'shape')]
    for param in equation.params.values():
      for sub in (param if isinstance(param, (list, tuple)) else [param]):
        if isinstance(sub, jax.extend.core.ClosedJaxpr):
          shapes += _all_shapes(sub.jaxpr)
        elif isinstance(sub, jax.extend.core.Jaxpr):
          shapes += _all_shapes(sub)
  return shapes


def test_heads_run_only_at_target_positions():
  """Neither the loss nor its gradient builds any (batch, length, vocab) logits: every array with a
  vocabulary axis has the per-modality target count in place of the sequence length."""
  model, params = _model()
  batch = _batch(2)
  loss_grad = jax.value_and_grad(lambda p: vla.vla_loss(model, p, batch), has_aux=True)
  shapes = _all_shapes(jax.make_jaxpr(loss_grad)(params).jaxpr)
  config = model.config
  hidden = config.llama.hidden_size
  # Arrays with a vocabulary axis but no hidden axis are logits (or their gradients / softmax).
  text_logits = [s for s in shapes if config.llama.vocab_size in s and hidden not in s]
  assert (2, 32, config.llama.vocab_size) in text_logits  # text targets, at most 32 per sequence
  assert all(LENGTH not in s for s in text_logits), [s for s in text_logits if LENGTH in s]
  assert (2, 4, config.latent_vocab_size) in shapes  # the 4 latent targets of each sequence
  assert not [s for s in shapes if config.vision_vocab_size in s and hidden not in s]  # vision has no loss


def _full_logits(model, params, batch, modality):
  hidden, _ = model.apply({'params': params}, batch['tokens'], batch['modality'], batch['attention_mask'])
  return model.apply({'params': params}, hidden, modality, method=vla.VLA.head)


def test_losses_equal_cross_entropy_over_masked_targets():
  model, params = _model()
  batch = _batch(3)
  loss, metrics = jax.jit(lambda p, b: vla.vla_loss(model, p, b))(params, batch)
  for modality, name in ((LATENT, 'latent'), (TEXT, 'text')):
    logits = np.asarray(jax.jit(_full_logits, static_argnums=(0, 3))(model, params, batch, modality))
    mask = (np.asarray(batch['loss_mask']) > 0) & (np.asarray(batch['target_modality']) == modality)
    log_probs = jax.nn.log_softmax(logits[mask], axis=-1)
    expected = -np.mean(np.take_along_axis(np.asarray(log_probs), np.asarray(batch['targets'])[mask][:, None], 1))
    np.testing.assert_allclose(metrics[f'{name}_loss'], expected, rtol=1e-5)
  np.testing.assert_allclose(loss, 0.99 * metrics['latent_loss'] + 0.01 * metrics['text_loss'], rtol=1e-6)
  # Unlike the official mask, latent positions never count as text targets.
  assert int((np.asarray(batch['loss_mask']) > 0).sum()) == 3 * (4 + 16)
  assert float(metrics['text_dropped_targets']) == 0


def test_target_positions_report_overflow():
  mask = jnp.asarray([[0, 1, 1, 0, 1], [0, 0, 0, 0, 0]], bool)
  positions, valid, dropped = vla.target_positions(mask, 2)
  assert positions.tolist() == [[1, 2], [0, 0]]
  assert valid.tolist() == [[True, True], [False, False]]
  assert dropped.tolist() == [1, 0]


def test_action_finetuning_loss_uses_action_head():
  model, params = _model(action_vocab_size=16)
  assert params['action_head']['kernel'].shape == (64, 16)
  assert params['transformer']['ate']['embedding'].shape == (16, 64)
  batch = _batch(2, latent=None, action=np.arange(7))
  config = vla.LossConfig(weights=((ACTION, 1.0),))
  loss, metrics = jax.jit(lambda p, b: vla.vla_loss(model, p, b, config))(params, batch)
  assert np.isfinite(float(loss)) and float(loss) == float(metrics['action_loss'])


# ----------------------------------------------------------------------------------- generation

def _prompts(count, seed):
  rng = np.random.RandomState(seed)
  tokenizer = sequences.ByteTokenizer()
  prompts = [sequences.generation_prompt(tokenizer, 'push' + ' the block' * (i % 3), rng.randint(0, CODEBOOK, 16),
                                         codebook_size=CODEBOOK) for i in range(count)]
  return jax.tree.map(jnp.asarray, sequences.pad_batch(prompts, LENGTH, left=True))


@functools.lru_cache(maxsize=None)
def _generator(model, **kwargs):
  return jax.jit(functools.partial(vla.generate, model, **kwargs))


def _generate(model, params, prompt, **kwargs):
  run = _generator(model, **kwargs)
  return np.asarray(run(params, prompt['tokens'], prompt['modality'], prompt['attention_mask'], jax.random.key(3)))


def test_greedy_generation_with_cache_equals_recomputing_and_never_stops_at_code_2():
  model, params = _model()
  # Weights 5x the init scale make the codes depend on the prompt (at 0.02 every row decodes alike).
  params = jax.tree.map(lambda x: x * 5.0 if x.ndim >= 2 else x, params)
  prompt = _prompts(8, seed=1)
  generated = _generate(model, params, prompt, target=LATENT, num_tokens=4)
  assert generated.shape == (8, 4) and generated.min() >= 0 and generated.max() < 8

  @jax.jit
  def next_code(tokens, modality, mask):
    hidden, _ = model.apply({'params': params}, tokens, modality, mask)
    return jnp.argmax(model.apply({'params': params}, hidden[:, -1], LATENT, method=vla.VLA.head), axis=-1)

  tokens, modality, mask = prompt['tokens'], prompt['modality'], prompt['attention_mask']
  reference = []
  for _ in range(4):
    code = next_code(tokens, modality, mask)
    reference.append(np.asarray(code))
    tokens = jnp.concatenate([tokens, code[:, None].astype(jnp.int32)], axis=1)
    modality = jnp.concatenate([modality, jnp.full((8, 1), LATENT, jnp.int32)], axis=1)
    mask = jnp.concatenate([mask, jnp.ones((8, 1), mask.dtype)], axis=1)
  np.testing.assert_array_equal(generated, np.stack(reference, axis=1))
  # The case the official decoder corrupts ([.., 2, 0, 0]): a 2 followed by other codes.
  assert any(2 in row[:-1].tolist() and any(row[row.tolist().index(2) + 1:]) for row in generated), generated


def test_sampling_top_k_and_temperature():
  model, params = _model()
  prompt = _prompts(8, seed=2)
  greedy = _generate(model, params, prompt, target=LATENT, num_tokens=4)
  np.testing.assert_array_equal(_generate(model, params, prompt, target=LATENT, num_tokens=4, temperature=1.0,
                                          top_k=1), greedy)
  sampled = _generate(model, params, prompt, target=LATENT, num_tokens=4, temperature=5.0, top_k=3)
  assert sampled.shape == (8, 4) and sampled.min() >= 0 and sampled.max() < 8
  logits = jnp.asarray([[0.0, 5.0, 4.0, -1.0]] * 2000)
  draws = np.asarray(vla.sample_token(logits, jax.random.key(0), temperature=1.0, top_k=2))
  assert set(draws.tolist()) == {1, 2}  # only the top 2 can be drawn
  assert 0.65 < (draws == 1).mean() < 0.8  # softmax([5, 4])[0] = 0.73


# ----------------------------------------------------------------------------------- sharding

@functools.lru_cache(maxsize=None)
def _train_on_mesh(mesh_dim, devices, steps=2):
  model, _ = _model()
  optimizer = optax.adamw(1e-3, b2=0.95, eps=1e-6, weight_decay=0.01)
  mesh = sharding.make_mesh(mesh_dim, devices)

  def init_variables(rng):
    return {'params': vla.init_params(model, rng), 'model_state': {}}

  # The params' logical annotations give the shardings; values come from `_model` (the same on every
  # mesh) rather than a compiled sharded init, which would only add seconds.
  with sharding.use_mesh(mesh):
    abstract = jax.eval_shape(lambda: init_train_state(init_variables, optimizer, seed=0))
    shardings = nn.unbox(sharding.logical_to_shardings(abstract, mesh))
  params = jax.tree.map(np.array, _model()[1])  # copies: steps donate
  state = jax.device_put(TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params),
                                    model_state={}, rng=jax.random.PRNGKey(0)), shardings)
  step = make_train_step(vla.make_loss_fn(model), optimizer)
  losses = []
  with sharding.use_mesh(mesh):
    jitted = jax.jit(step, out_shardings=(shardings, sharding.replicated(mesh)), donate_argnums=(0,))
    for index in range(steps):
      batch = sharding.global_batch(mesh, sequences.pad_batch(_examples(8, seed=index), LENGTH))
      state, metrics = jitted(state, batch)
      losses.append(float(metrics['loss']))
  return losses, jax.tree.map(np.asarray, state.params), state.params


@pytest.mark.parametrize('mesh_dim', ['1,8,1', '2,2,2'])
def test_sharded_train_step_matches_one_device(mesh_dim):
  assert len(jax.devices()) == 8
  reference_losses, reference_params, _ = _train_on_mesh('1,1,1', tuple(jax.devices()[:1]))
  losses, params, sharded = _train_on_mesh(mesh_dim, tuple(jax.devices()))
  np.testing.assert_allclose(losses, reference_losses, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=2e-6), params, reference_params)
  # The state really is distributed: e.g. wq is split over fsdp (and tp).
  wq = sharded['transformer']['h']['scan_decoder']['attention']['wq']['kernel']
  assert wq.addressable_shards[0].data.shape[1] < wq.shape[1]
