"""The vision-language-action model of LAPA: an LWM LLaMA with one embedding table and head per modality.

Text, VQGAN vision codes, latent actions (LAQ codes) and discretised actions each have their own id
space, embedding table (`transformer/{wte,vte,dte,ate}`) and bias-free head (`lm_head`,
`vision_head`, `delta_head`, `action_head`), as in LWM/LAPA, so released checkpoints load as they
are. Per-position modality ids (the contract with `lapa_jax.data.sequences`, which builds the
sequences on the host) route inputs to tables and targets to heads.

Unlike the official code, heads run only where there are targets: the hidden states at the target
positions are gathered first, so a latent-pretraining step evaluates `(batch, 4, 8)` latent logits
and a handful of text positions instead of `batch x length x (32000 + 8448 + 8)` logits. Generation
samples exactly k tokens from the requested modality's head, so no code can be mistaken for an
end-of-sequence id (the official greedy decoder turns every latent code 2 into EOS, §2.8).

Batches (all `(batch, length)`): `tokens`, `modality`, `targets`, `target_modality` int32,
`loss_mask` float32, `attention_mask` (1 on real tokens), optional `segment_ids` for packing.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from lapa_jax.data.sequences import ACTION, LATENT, MODALITY_NAMES, TEXT, VISION
from lapa_jax.models import llama

Array = jax.Array
HEAD_NAMES = {TEXT: 'lm_head', VISION: 'vision_head', LATENT: 'delta_head', ACTION: 'action_head'}
TABLE_NAMES = {TEXT: 'wte', VISION: 'vte', LATENT: 'dte', ACTION: 'ate'}


@dataclasses.dataclass(frozen=True)
class VLAConfig:
  """Vocabulary sizes per modality (0 = the modality is absent) on top of a LLaMA config.

  Text uses `llama.vocab_size`. LWM's vision vocabulary is 8448 = 8192 codes + eof/eov + unused.
  """
  llama: llama.LLaMAConfig = llama.LLaMAConfig()
  vision_vocab_size: int = 8448
  latent_vocab_size: int = 8
  action_vocab_size: int = 0

  def vocab_size(self, modality: int) -> int:
    return (self.llama.vocab_size, self.vision_vocab_size, self.latent_vocab_size,
            self.action_vocab_size)[modality]

  @property
  def modalities(self) -> tuple[int, ...]:
    return tuple(m for m in (TEXT, VISION, LATENT, ACTION) if self.vocab_size(m) > 0)

  def replace(self, **changes) -> 'VLAConfig':
    return dataclasses.replace(self, **changes)


PRESETS = {
    # LAPA latent pretraining on LWM-7B: 8 latent codes; finetuning adds action_vocab_size=256.
    '7b': dict(llama='7b', vision_vocab_size=8448, latent_vocab_size=8),
    '1b': dict(llama='1b', vision_vocab_size=8448, latent_vocab_size=8),
    # The built-in world: a 1024-code VQGAN (+ eof/eov, padded to a multiple of 64).
    'small': dict(llama='small', vision_vocab_size=1088, latent_vocab_size=8),
    'tiny': dict(llama='tiny', vision_vocab_size=136, latent_vocab_size=8),
}


def vla_config(preset: str = '7b', *, llama_overrides: Mapping[str, Any] | None = None, **overrides) -> VLAConfig:
  """A preset ('7b', '1b', 'small', 'tiny') with VLA field and LLaMA field overrides."""
  if preset not in PRESETS:
    raise ValueError(f'VLA preset {preset!r}: expected one of {sorted(PRESETS)}')
  fields = {**PRESETS[preset], **overrides}
  fields['llama'] = llama.llama_config(fields['llama'], **(llama_overrides or {}))
  return VLAConfig(**fields)


# Small tables and heads (latent codes, action bins) stay replicated: their size need not divide `tp`.
def _shards_rows(modality: int) -> bool:
  return modality in (TEXT, VISION)


class VLA(nn.Module):
  """`transformer` with per-modality tables, plus one head per modality present in the config."""
  config: VLAConfig

  def setup(self):
    config = self.config
    tables = tuple(llama.Table(TABLE_NAMES[m], config.vocab_size(m), _shards_rows(m))
                   for m in (TEXT, VISION, LATENT, ACTION))
    self.transformer = llama.Transformer(config.llama, tables)
    self.heads = {m: llama.head(config.llama, config.vocab_size(m), HEAD_NAMES[m], _shards_rows(m))
                  for m in config.modalities}

  def __call__(self, tokens: Array, modality: Array, attention_mask: Array | None = None,
               positions: Array | None = None, segment_ids: Array | None = None,
               cache: dict[str, Array] | None = None) -> tuple[Array, dict[str, Array] | None]:
    """Hidden states `(batch, length, embed)` after the final norm, and the updated cache."""
    return self.transformer(tokens, modality, attention_mask, positions, segment_ids, cache)

  def head(self, hidden: Array, modality: int) -> Array:
    """float32 logits `(..., vocab of modality)` of hidden states `(..., embed)`."""
    return self.heads[modality](hidden).astype(jnp.float32)

  def initialize(self, tokens: Array, modality: Array) -> None:
    """Touches the trunk and every head, so `init(..., method=VLA.initialize)` creates all params."""
    hidden, _ = self(tokens, modality)
    for m in self.config.modalities:
      self.head(hidden[:, :1], m)


def init_params(model: VLA, rng: Array, batch_size: int = 1, length: int = 8):
  """Logically boxed params (`nn.LogicallyPartitioned` leaves); pure, for `sharding.create_sharded`."""
  tokens = jnp.zeros((batch_size, length), jnp.int32)
  return model.init(rng, tokens, tokens, method=VLA.initialize)['params']


# -------------------------------------------------------------------------------------------- loss

def target_positions(mask: Array, count: int) -> tuple[Array, Array, Array]:
  """The first `count` True positions of each row of `mask (batch, length)`.

  Returns `positions (batch, count)` int32 (0 where unused), `valid (batch, count)` bool and
  `dropped (batch,)`, how many targets did not fit in `count`.
  """
  positions = jax.vmap(lambda row: jnp.nonzero(row, size=count, fill_value=0)[0])(mask).astype(jnp.int32)
  present = mask.sum(axis=1)
  valid = jnp.arange(count)[None, :] < present[:, None]
  return positions, valid, jnp.maximum(present - count, 0)


@dataclasses.dataclass(frozen=True)
class LossConfig:
  """Weights of the per-modality cross-entropies and how many targets of each a sequence may hold.

  Defaults are LAPA's latent pretraining (0.99 latent + 0.01 text). The text targets there are the
  marker tokens after the image and EOS (about 10 SentencePiece or 16-18 byte tokens); the official
  text mask also counted the latent positions with target `<unk>` (a precedence bug, §2.6), which
  this loss does not. Targets beyond a modality's count are dropped and reported in the metrics.
  """
  weights: tuple[tuple[int, float], ...] = ((LATENT, 0.99), (TEXT, 0.01))
  targets_per_sequence: tuple[tuple[int, int], ...] = ((LATENT, 4), (TEXT, 32), (ACTION, 7), (VISION, 257))


def cross_entropy(logits: Array, targets: Array, valid: Array) -> tuple[Array, Array]:
  """Mean negative log-likelihood and accuracy over the valid entries (0 when there are none)."""
  log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  nll = -jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]
  weight = valid.astype(jnp.float32)
  count = jnp.maximum(weight.sum(), 1.0)
  correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
  return (nll * weight).sum() / count, (correct * weight).sum() / count


def vla_loss(model: VLA, params: Any, batch: Mapping[str, Array],
             loss_config: LossConfig = LossConfig()) -> tuple[Array, dict[str, Array]]:
  """Weighted sum of per-modality cross-entropies, each head run only at its target positions.

  Pure: `(params, batch) -> (loss, metrics)`; metrics are global-batch means.
  """
  variables = {'params': params}
  hidden, _ = model.apply(variables, batch['tokens'], batch['modality'], batch['attention_mask'],
                          segment_ids=batch.get('segment_ids'))
  counts = dict(loss_config.targets_per_sequence)
  loss = jnp.zeros((), jnp.float32)
  metrics = {}
  for modality, weight in loss_config.weights:
    name = MODALITY_NAMES[modality]
    mask = (batch['loss_mask'] > 0) & (batch['target_modality'] == modality)
    positions, valid, dropped = target_positions(mask, counts[modality])
    gathered = jnp.take_along_axis(hidden, positions[..., None], axis=1)  # (batch, count, embed)
    logits = model.apply(variables, gathered, modality, method=VLA.head)
    targets = jnp.take_along_axis(batch['targets'], positions, axis=1)
    modality_loss, accuracy = cross_entropy(logits, targets, valid)
    loss = loss + weight * modality_loss
    metrics.update({f'{name}_loss': modality_loss, f'{name}_accuracy': accuracy,
                    f'{name}_dropped_targets': dropped.sum().astype(jnp.float32)})
  metrics['loss'] = loss
  return loss, metrics


def make_loss_fn(model: VLA, loss_config: LossConfig = LossConfig()) -> Callable:
  """`vla_loss` in the stage contract's form, for `lapa_jax.train.step.make_train_step`.

  `loss_fn(params, model_state, batch, rng, step) -> (loss, (metrics, model_state))`: the VLA has
  no non-trained state and no dropout, so `model_state` passes through and `rng`, `step` go unused.
  """

  def loss_fn(params, model_state, batch, rng, step):
    del rng, step
    loss, metrics = vla_loss(model, params, batch, loss_config)
    return loss, (metrics, model_state)

  return loss_fn


# ---------------------------------------------------------------------------------------- decoding

def sample_token(logits: Array, rng: Array, temperature: float = 0.0, top_k: int = 0) -> Array:
  """Greedy when `temperature == 0`, else a draw from softmax(logits / temperature) over the top k."""
  if temperature == 0.0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits / temperature
  if 0 < top_k < logits.shape[-1]:
    kth_largest = jax.lax.top_k(logits, top_k)[0][..., -1:]
    logits = jnp.where(logits < kth_largest, -jnp.inf, logits)
  return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


def for_decoding(model: VLA, params: Any) -> tuple[VLA, Any]:
  """The same model with separate per-layer params (`scan_layers=False`), for generation.

  A single-token step reads every weight once; slicing each layer out of the scanned stack would
  copy every weight first, which makes cached steps several times slower on CPUs.
  """
  config = model.config
  return VLA(config.replace(llama=config.llama.replace(scan_layers=False))), llama.unscan_params(params)


def generate(model: VLA, params: Any, tokens: Array, modality: Array, attention_mask: Array, rng: Array, *,
             target: int, num_tokens: int, temperature: float = 0.0, top_k: int = 0,
             allowed: Array | None = None) -> Array:
  """Samples `num_tokens` ids of modality `target` after left-padded prompts `(batch, prompt_length)`.

  One prefill pass fills the KV cache; each later token costs one cached single-position step. Only
  the target modality's head is evaluated, so ids come from its vocabulary and never end early.
  `allowed (num_tokens, vocab)` bool narrows each position further (e.g. an action dimension with
  fewer bins than the head has ids). Returns `(batch, num_tokens)` int32. Jit it with the keyword
  arguments static except `allowed`; `for_decoding` gives the faster layout for it.
  """
  batch_size, prompt_length = tokens.shape
  variables = {'params': params}
  if allowed is None:
    allowed = jnp.ones((num_tokens, model.config.vocab_size(target)), bool)

  def sample(hidden, index, step_rng):
    logits = model.apply(variables, hidden, target, method=VLA.head)
    return sample_token(jnp.where(allowed[index], logits, -jnp.inf), step_rng, temperature, top_k)

  cache = llama.init_cache(model.config.llama, batch_size, prompt_length + num_tokens)
  hidden, cache = model.apply(variables, tokens, modality, attention_mask, cache=cache)
  rngs = jax.random.split(rng, num_tokens)
  first = sample(hidden[:, -1], 0, rngs[0])

  def step(carry, inputs):
    token, cache = carry
    index, step_rng = inputs
    column = token[:, None]
    hidden, cache = model.apply(variables, column, jnp.full_like(column, target), jnp.ones_like(column),
                                cache=cache)
    next_token = sample(hidden[:, 0], index, step_rng)
    return (next_token, cache), next_token

  _, rest = jax.lax.scan(step, (first, cache), (jnp.arange(1, num_tokens), rngs[1:]))
  return jnp.concatenate([first[:, None], rest.T], axis=1)
