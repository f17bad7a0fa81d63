"""Logit parity with Hugging Face transformers' LLaMA (PyTorch, CPU, float32) after import.

A tiny `LlamaForCausalLM` with random weights is saved in HF format by transformers itself; the
importer reads it (undoing HF's rotate-half q/k permutation), and our model must reproduce HF's
logits on left-padded random tokens, and the same logits when decoding token by token with the KV
cache. Skipped when torch or transformers is not installed.
"""

import numpy as np
import pytest

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from lapa_jax.convert import hf_llama  # noqa: E402
from lapa_jax.models import llama  # noqa: E402

VOCAB, LENGTH, BATCH = 96, 12, 3
PAD_LENGTHS = (0, 3, 5)  # left padding per row


@pytest.fixture(scope='module')
def hf_model(tmp_path_factory):
  torch.manual_seed(0)
  config = transformers.LlamaConfig(
      vocab_size=VOCAB, hidden_size=64, intermediate_size=112, num_hidden_layers=2, num_attention_heads=4,
      num_key_value_heads=4, rms_norm_eps=1e-6, rope_theta=500.0, max_position_embeddings=64,
      tie_word_embeddings=False)
  model = transformers.LlamaForCausalLM(config).eval()
  with torch.no_grad():  # HF's 0.02 init gives near-uniform logits; larger weights make the test sharper.
    for parameter in model.parameters():
      if parameter.ndim == 2:
        parameter.normal_(0.0, 0.2)
      else:
        parameter.uniform_(0.5, 1.5)
  directory = tmp_path_factory.mktemp('hf_llama')
  model.save_pretrained(directory)
  return model, str(directory)


def _inputs():
  rng = np.random.RandomState(0)
  tokens = rng.randint(3, VOCAB, (BATCH, LENGTH))
  mask = np.ones((BATCH, LENGTH), np.int64)
  for row, pad in enumerate(PAD_LENGTHS):
    mask[row, :pad] = 0
    tokens[row, :pad] = 0
  positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
  return tokens, mask, positions


def _hf_logits(model, tokens, mask, positions):
  with torch.no_grad():
    out = model(input_ids=torch.from_numpy(tokens), attention_mask=torch.from_numpy(mask),
                position_ids=torch.from_numpy(positions))
  return out.logits.numpy()


def _relative_error(ours, reference, mask):
  valid = mask.astype(bool)
  return float(np.abs(ours[valid] - reference[valid]).max() / np.abs(reference[valid]).max())


def test_logits_match_hf_with_left_padding(hf_model):
  model, directory = hf_model
  config, params, filled = hf_llama.import_hf(directory)
  assert not filled and config.rope_theta == 500.0
  tokens, mask, positions = _inputs()
  reference = _hf_logits(model, tokens, mask, positions)
  ours, _ = llama.LLaMAForCausalLM(config).apply({'params': params}, jnp.asarray(tokens), jnp.asarray(mask))
  error = _relative_error(np.asarray(ours), reference, mask)
  print(f'HF parity: max relative logit error {error:.2e}')
  assert error <= 1e-4


def test_rope_permutation_is_what_makes_it_match(hf_model):
  """Without undoing HF's q/k permutation the logits are far off: the test above can fail."""
  model, directory = hf_model
  config, params, _ = hf_llama.import_hf(directory, permute_rope=False)
  tokens, mask, positions = _inputs()
  reference = _hf_logits(model, tokens, mask, positions)
  ours, _ = llama.LLaMAForCausalLM(config).apply({'params': params}, jnp.asarray(tokens), jnp.asarray(mask))
  assert _relative_error(np.asarray(ours), reference, mask) > 1e-2


def test_kv_cache_decoding_matches_hf_full_forward(hf_model):
  """Prefill a left-padded prompt, then feed one token per cached step; every step's logits must equal
  HF's full forward over the whole sequence at that position."""
  model, directory = hf_model
  config, params, _ = hf_llama.import_hf(directory)
  tokens, mask, positions = _inputs()
  reference = _hf_logits(model, tokens, mask, positions)
  decoder = llama.LLaMAForCausalLM(config)
  prompt = 6
  apply = jax.jit(lambda p, t, m, c: decoder.apply({'params': p}, t, m, cache=c))
  cache = llama.init_cache(config, BATCH, LENGTH)
  logits, cache = apply(params, jnp.asarray(tokens[:, :prompt]), jnp.asarray(mask[:, :prompt]), cache)
  steps = [np.asarray(logits)]
  for column in range(prompt, LENGTH):
    logits, cache = apply(params, jnp.asarray(tokens[:, column:column + 1]), jnp.asarray(mask[:, column:column + 1]),
                          cache)
    steps.append(np.asarray(logits))
  error = _relative_error(np.concatenate(steps, axis=1), reference, mask)
  print(f'HF parity, KV-cache decoding: max relative logit error {error:.2e}')
  assert error <= 1e-4
