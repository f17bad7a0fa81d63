"""The LLaMA-2 decoder as LWM (and so LAPA) uses it, in Flax linen.

Pre-RMSNorm (eps 1e-6, computed in float32), SwiGLU MLP, bias-free projections, rotary position
embeddings in Meta's interleaved-pair convention (pairs `(x[2i], x[2i+1])`; LWM uses theta 5e7), and
the layers stacked with `nn.scan` (or, for decoding, unrolled: `scan_layers=False`, `h/<i>/...`).
Param names and layout are LWM's, so EasyLM/LWM/LAPA checkpoints map one to one:

  transformer/{wte,vte,dte,ate}/embedding                (vocab, embed)
  transformer/h/scan_decoder/attention/{wq,wk,wv}/kernel (layers, embed, heads * head_dim)
  transformer/h/scan_decoder/attention/wo/kernel         (layers, heads * head_dim, embed)
  transformer/h/scan_decoder/feed_forward/{w1,w3}/kernel (layers, embed, mlp)
  transformer/h/scan_decoder/feed_forward/w2/kernel      (layers, mlp, embed)
  transformer/h/scan_decoder/{attention,ffn}_norm/kernel (layers, embed)
  transformer/ln_f/kernel                                (embed,)
  lm_head/kernel                                         (embed, vocab)

Incremental decoding uses an explicit KV cache pytree (`init_cache`) passed in and returned, so a
whole generation loop stays inside one `jax.jit`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array
# Activation layouts (logical names of lapa_jax.sharding.LOGICAL_RULES).
HIDDEN_AXES = ('batch', 'length', 'embed')
HEADS_AXES = ('batch', 'length', 'heads', 'kv')
MLP_AXES = ('batch', 'length', 'mlp')
REMAT_POLICIES = ('none', 'nothing_saveable', 'dots_saveable', 'dots_with_no_batch_dims_saveable',
                  'everything_saveable')


@dataclasses.dataclass(frozen=True)
class LLaMAConfig:
  """Sizes and numerics of the decoder. `dtype` is the compute dtype; params are `param_dtype`."""
  vocab_size: int = 32000
  hidden_size: int = 4096
  intermediate_size: int = 11008
  num_layers: int = 32
  num_heads: int = 32
  rms_norm_eps: float = 1e-6
  initializer_range: float = 0.02
  rope_theta: float = 5e7
  remat_policy: str = 'none'
  # Layers as one `nn.scan` (LWM's stacked layout, fast to compile) or a Python loop over separate
  # per-layer params (EasyLM's `h/<i>` layout): the loop avoids copying each layer's weights out of
  # the stack, which dominates single-token decoding steps.
  scan_layers: bool = True
  attention_implementation: str | None = None  # jax.nn.dot_product_attention: None/'xla' or 'cudnn'
  dtype: str = 'float32'
  param_dtype: str = 'float32'

  def __post_init__(self):
    if self.hidden_size % self.num_heads or (self.hidden_size // self.num_heads) % 2:
      raise ValueError(f'LLaMAConfig: hidden_size {self.hidden_size} must split into {self.num_heads} heads '
                       'of an even head dimension (RoPE rotates pairs)')
    if self.remat_policy not in REMAT_POLICIES:
      raise ValueError(f'LLaMAConfig.remat_policy: expected one of {REMAT_POLICIES}, got {self.remat_policy!r}')

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_heads

  def replace(self, **changes) -> 'LLaMAConfig':
    return dataclasses.replace(self, **changes)


PRESETS = {
    # LWM-7B (LLaMA-2-7B) as LAPA trains it: remat of every block, as in the official scripts.
    '7b': dict(hidden_size=4096, intermediate_size=11008, num_layers=32, num_heads=32,
               remat_policy='nothing_saveable'),
    # EasyLM's 1B shape.
    '1b': dict(hidden_size=2048, intermediate_size=5504, num_layers=22, num_heads=16),
    # ~106M params with both untied 32000-token matrices: the CPU benchmark size.
    'small': dict(hidden_size=768, intermediate_size=2048, num_layers=8, num_heads=12),
    'tiny': dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4),
}


def llama_config(preset: str = '7b', **overrides) -> LLaMAConfig:
  """A preset ('7b', '1b', 'small', 'tiny') with field overrides."""
  if preset not in PRESETS:
    raise ValueError(f'LLaMA preset {preset!r}: expected one of {sorted(PRESETS)}')
  return LLaMAConfig(**{**PRESETS[preset], **overrides})


def param_count(config: LLaMAConfig, extra_vocab: int = 0) -> int:
  """Parameters of the decoder with one embedding table and one head of `vocab_size + extra_vocab` rows."""
  d, f = config.hidden_size, config.intermediate_size
  per_layer = 4 * d * d + 3 * d * f + 2 * d
  return config.num_layers * per_layer + d + 2 * d * (config.vocab_size + extra_vocab)


# --------------------------------------------------------------------------------------------- math

def rope_frequencies(positions: Array, head_dim: int, theta: float) -> tuple[Array, Array]:
  """cos, sin of `positions * theta^(-2i/head_dim)`: `(batch, length, head_dim // 2)` in float32.

  Angles are computed in float32 (the official code builds them in the compute dtype, bf16, which
  loses whole radians at long positions).
  """
  exponents = jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim
  inverse_frequencies = 1.0 / (theta ** exponents)
  angles = positions.astype(jnp.float32)[..., None] * inverse_frequencies
  return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: Array, cos: Array, sin: Array) -> Array:
  """Rotates the interleaved pairs `(x[2i], x[2i+1])` of `x (batch, length, heads, head_dim)`."""
  pairs = x.astype(jnp.float32).reshape(*x.shape[:-1], -1, 2)
  even, odd = pairs[..., 0], pairs[..., 1]
  cos, sin = cos[:, :, None, :], sin[:, :, None, :]
  rotated = jnp.stack([even * cos - odd * sin, even * sin + odd * cos], axis=-1)
  return rotated.reshape(x.shape).astype(x.dtype)


def default_positions(attention_mask: Array, offset: Array | None = None) -> Array:
  """Positions that skip padding: `offset + cumsum(mask) - 1`, clipped at 0; `(batch, length)` int32.

  Left-padded prompts thus start at position 0 like unpadded ones (HF generate does the same).
  """
  positions = jnp.cumsum(attention_mask.astype(jnp.int32), axis=1) - 1
  if offset is not None:
    positions = positions + offset[:, None]
  return jnp.maximum(positions, 0)


def attention_mask_full(attention_mask: Array, segment_ids: Array | None = None) -> Array:
  """`(batch, query, key)` bool: causal, key not padding, same segment (packed sequences)."""
  length = attention_mask.shape[1]
  causal = jnp.tril(jnp.ones((length, length), bool))
  mask = causal[None] & attention_mask.astype(bool)[:, None, :]
  if segment_ids is not None:
    mask = mask & (segment_ids[:, :, None] == segment_ids[:, None, :])
  return mask


# ----------------------------------------------------------------------------------------- KV cache

def init_cache(config: LLaMAConfig, batch_size: int, length: int, dtype: Any = None) -> dict[str, Array]:
  """An empty KV cache for `length` positions.

    key, value:     (layers, batch, length, heads, head_dim) in the compute dtype
    mask:           (batch, length) bool, which slots hold real (non-padding) tokens
    index:          () int32, the next slot to write (the same for every row)
    next_position:  (batch,) int32, the RoPE position of each row's next real token
  """
  dtype = jnp.dtype(dtype or config.dtype)
  shape = (config.num_layers, batch_size, length, config.num_heads, config.head_dim)
  return dict(key=jnp.zeros(shape, dtype), value=jnp.zeros(shape, dtype),
              mask=jnp.zeros((batch_size, length), bool), index=jnp.zeros((), jnp.int32),
              next_position=jnp.zeros((batch_size,), jnp.int32))


# ------------------------------------------------------------------------------------------ modules

def _partitioned_normal(std: float, names: tuple[str | None, ...]):
  return nn.with_logical_partitioning(nn.initializers.normal(std), names)


class RMSNorm(nn.Module):
  """x / rms(x) * kernel, computed in float32 and cast back (LWM's `RMSNorm`, param `kernel`)."""
  eps: float
  dtype: Any
  param_dtype: Any

  @nn.compact
  def __call__(self, x: Array) -> Array:
    # Norm weights are tiny: replicated rather than sharded over the embed axis (as in LWM).
    kernel = self.param('kernel', nn.with_logical_partitioning(nn.initializers.ones, (None,)),
                        (x.shape[-1],), self.param_dtype)
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
    return (normed * kernel.astype(jnp.float32)).astype(self.dtype)


def _dense(config: LLaMAConfig, features: int, names: tuple[str, str], name: str) -> nn.Dense:
  return nn.Dense(features, use_bias=False, dtype=jnp.dtype(config.dtype),
                  param_dtype=jnp.dtype(config.param_dtype),
                  kernel_init=_partitioned_normal(config.initializer_range, names), name=name)


class Attention(nn.Module):
  """Multi-head causal self-attention with RoPE; writes into and reads from a layer's KV cache."""
  config: LLaMAConfig

  @nn.compact
  def __call__(self, x: Array, cos: Array, sin: Array, mask: Array, cache_index: Array | None,
               layer_cache: dict[str, Array] | None) -> tuple[Array, dict[str, Array] | None]:
    """x (batch, length, embed); mask (batch, length, keys) bool.

    Returns (batch, length, embed) and, with a cache, this call's keys and values
    `{'key', 'value'}: (batch, length, heads, head_dim)`.
    """
    config = self.config
    width = config.num_heads * config.head_dim

    def heads(name):
      y = _dense(config, width, ('embed', 'heads'), name)(x)
      y = y.reshape(*x.shape[:2], config.num_heads, config.head_dim)
      return nn.with_logical_constraint(y, HEADS_AXES)

    query = apply_rope(heads('wq'), cos, sin)
    key = apply_rope(heads('wk'), cos, sin)
    value = heads('wv')
    new_entries = None
    if layer_cache is not None:
      # Attend over the cached keys/values with this call's inserted; only the new entries are
      # returned, and the caller writes them into the (donated) cache in place.
      new_entries = dict(key=key.astype(layer_cache['key'].dtype), value=value.astype(layer_cache['value'].dtype))
      start = (0, cache_index, 0, 0)
      key = jax.lax.dynamic_update_slice(layer_cache['key'], new_entries['key'], start)
      value = jax.lax.dynamic_update_slice(layer_cache['value'], new_entries['value'], start)
    # Logits and softmax in float32 whatever the compute dtype.
    out = jax.nn.dot_product_attention(query, key.astype(query.dtype), value.astype(query.dtype),
                                       mask=mask[:, None], implementation=config.attention_implementation)
    out = nn.with_logical_constraint(out, HEADS_AXES).reshape(*x.shape[:2], width)
    return _dense(config, config.hidden_size, ('heads', 'embed'), 'wo')(out), new_entries


class FeedForward(nn.Module):
  """SwiGLU: w2(silu(w1 x) * w3 x)."""
  config: LLaMAConfig

  @nn.compact
  def __call__(self, x: Array) -> Array:
    config = self.config
    gate = _dense(config, config.intermediate_size, ('embed', 'mlp'), 'w1')(x)
    up = _dense(config, config.intermediate_size, ('embed', 'mlp'), 'w3')(x)
    hidden = nn.with_logical_constraint(nn.silu(gate) * up, MLP_AXES)
    return _dense(config, config.hidden_size, ('mlp', 'embed'), 'w2')(hidden)


class DecoderBlock(nn.Module):
  """Pre-norm residual block; the scanned body (carry = hidden states)."""
  config: LLaMAConfig

  @nn.compact
  def __call__(self, hidden: Array, cos: Array, sin: Array, mask: Array, cache_index: Array | None,
               layer_cache: dict[str, Array] | None):
    config = self.config
    dtype, param_dtype = jnp.dtype(config.dtype), jnp.dtype(config.param_dtype)
    hidden = nn.with_logical_constraint(hidden, HIDDEN_AXES)
    normed = RMSNorm(config.rms_norm_eps, dtype, param_dtype, name='attention_norm')(hidden)
    attended, new_entries = Attention(config, name='attention')(normed, cos, sin, mask, cache_index, layer_cache)
    hidden = hidden + attended
    normed = RMSNorm(config.rms_norm_eps, dtype, param_dtype, name='ffn_norm')(hidden)
    hidden = hidden + FeedForward(config, name='feed_forward')(normed)
    return nn.with_logical_constraint(hidden, HIDDEN_AXES), new_entries


class BlockStack(nn.Module):
  """`h`: the layers, as one `nn.scan` named `scan_decoder` (params stacked on a leading `layers`
  axis) or, with `scan_layers=False`, as blocks `0 .. num_layers - 1`.

  Returns the hidden states and, with a cache, every layer's new keys and values stacked:
  `(layers, batch, length, heads, head_dim)`.
  """
  config: LLaMAConfig

  @nn.compact
  def __call__(self, hidden, cos, sin, mask, cache_index, layer_caches):
    config = self.config
    block = DecoderBlock
    if config.remat_policy != 'none':
      block = nn.remat(block, policy=getattr(jax.checkpoint_policies, config.remat_policy), prevent_cse=False)
    if config.scan_layers:
      scanned = nn.scan(
          block, variable_axes={'params': 0}, split_rngs={'params': True},
          in_axes=(nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast, 0),
          length=config.num_layers, metadata_params={nn.PARTITION_NAME: 'layers'})
      return scanned(config, name='scan_decoder')(hidden, cos, sin, mask, cache_index, layer_caches)
    new_entries = []
    for layer in range(config.num_layers):
      layer_cache = None if layer_caches is None else jax.tree.map(lambda x: x[layer], layer_caches)
      hidden, entries = block(config, name=str(layer))(hidden, cos, sin, mask, cache_index, layer_cache)
      new_entries.append(entries)
    if layer_caches is None:
      return hidden, None
    return hidden, jax.tree.map(lambda *xs: jnp.stack(xs), *new_entries)


def unscan_params(params: dict) -> dict:
  """Params of a `scan_layers=True` model -> those of the same model with `scan_layers=False`."""
  stacked = params['transformer']['h']['scan_decoder']
  layers = jax.tree.leaves(stacked)[0].shape[0]
  blocks = {str(i): jax.tree.map(lambda x: x[i], stacked) for i in range(layers)}
  return {**params, 'transformer': {**params['transformer'], 'h': blocks}}


def scan_params(params: dict) -> dict:
  """The inverse of `unscan_params`."""
  blocks = params['transformer']['h']
  if sorted(blocks, key=int) != [str(i) for i in range(len(blocks))]:
    raise ValueError(f'transformer/h: layers {sorted(blocks, key=int)} are not 0..{len(blocks) - 1}')
  stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *[blocks[str(i)] for i in range(len(blocks))])
  return {**params, 'transformer': {**params['transformer'], 'h': {'scan_decoder': stacked}}}


@dataclasses.dataclass(frozen=True)
class Table:
  """One embedding table: LWM param name, rows, and whether the rows are sharded over `vocab`.

  Small tables (8 latent codes, 245 action bins) stay replicated: their row count need not divide
  the tensor-parallel axis.
  """
  name: str
  size: int
  shard_rows: bool = True


class Transformer(nn.Module):
  """`transformer`: per-modality embedding tables, the blocks `h`, and the final norm `ln_f`.

  `tables[i]` embeds the positions whose `modality` is `i` (LAPA's routing: one id space, table and
  head per modality, no merged vocabulary). A table of size 0 is absent; its modality must not occur.
  """
  config: LLaMAConfig
  tables: tuple[Table, ...] = ()

  @nn.compact
  def __call__(self, tokens: Array, modality: Array | None = None, attention_mask: Array | None = None,
               positions: Array | None = None, segment_ids: Array | None = None,
               cache: dict[str, Array] | None = None) -> tuple[Array, dict[str, Array] | None]:
    """tokens, modality, attention_mask, positions, segment_ids: (batch, length).

    Returns the final-normed hidden states `(batch, length, embed)` and the updated cache. With a
    cache, the tokens are written at slots `[index, index + length)` and attend to every earlier
    real slot; segment ids are for packed training sequences and are not used with a cache.
    """
    config = self.config
    dtype, param_dtype = jnp.dtype(config.dtype), jnp.dtype(config.param_dtype)
    tables = self.tables or (Table('wte', config.vocab_size),)
    if attention_mask is None:
      attention_mask = jnp.ones(tokens.shape, bool)
    if modality is None:
      modality = jnp.zeros(tokens.shape, jnp.int32)

    hidden = jnp.zeros((*tokens.shape, config.hidden_size), dtype)
    for index, table in enumerate(tables):
      if table.size == 0:
        continue
      embed = nn.Embed(table.size, config.hidden_size, dtype=dtype, param_dtype=param_dtype, name=table.name,
                       embedding_init=_partitioned_normal(
                           config.initializer_range, ('vocab' if table.shard_rows else None, 'embed')))
      selected = modality == index
      hidden = jnp.where(selected[..., None], embed(jnp.where(selected, tokens, 0)), hidden)
    hidden = nn.with_logical_constraint(hidden, HIDDEN_AXES)

    if cache is None:
      if positions is None:
        positions = default_positions(attention_mask)
      mask = attention_mask_full(attention_mask, segment_ids)
      cache_index, layer_caches, new_cache = None, None, None
    else:
      if segment_ids is not None:
        raise ValueError('Transformer: segment_ids (packed sequences) are not supported with a KV cache')
      cache_index = cache['index']
      if positions is None:
        positions = default_positions(attention_mask, cache['next_position'])
      valid = jax.lax.dynamic_update_slice(cache['mask'], attention_mask.astype(bool), (0, cache_index))
      slots = jnp.arange(valid.shape[1])
      query_slots = cache_index + jnp.arange(tokens.shape[1])
      mask = valid[:, None, :] & (slots[None, None, :] <= query_slots[None, :, None])
      layer_caches = dict(key=cache['key'], value=cache['value'])
      new_cache = dict(mask=valid, index=cache_index + tokens.shape[1],
                       next_position=cache['next_position'] + attention_mask.astype(jnp.int32).sum(1))

    cos, sin = rope_frequencies(positions, config.head_dim, config.rope_theta)
    hidden, new_entries = BlockStack(config, name='h')(hidden, cos, sin, mask, cache_index, layer_caches)
    if new_cache is not None:
      for name, stack in layer_caches.items():  # in place when the cache is donated
        new_cache[name] = jax.lax.dynamic_update_slice(stack, new_entries[name], (0, 0, cache_index, 0, 0))
    hidden = RMSNorm(config.rms_norm_eps, dtype, param_dtype, name='ln_f')(hidden)
    return hidden, new_cache


def head(config: LLaMAConfig, size: int, name: str, shard_rows: bool = True) -> nn.Dense:
  """A bias-free output head `(embed, size)`, LWM's `lm_head` / `vision_head` / ... ."""
  return _dense(config, size, ('embed', 'vocab' if shard_rows else None), name)


class LLaMAForCausalLM(nn.Module):
  """The text-only model (`transformer` + `lm_head`): HF LLaMA parity and the backbone benchmark."""
  config: LLaMAConfig

  def setup(self):
    self.transformer = Transformer(self.config)
    self.lm_head = head(self.config, self.config.vocab_size, 'lm_head')

  def __call__(self, tokens: Array, attention_mask: Array | None = None, positions: Array | None = None,
               segment_ids: Array | None = None, cache: dict[str, Array] | None = None):
    """Returns float32 logits `(batch, length, vocab)` and the updated cache."""
    hidden, cache = self.transformer(tokens, None, attention_mask, positions, segment_ids, cache)
    return self.lm_head(hidden).astype(jnp.float32), cache


def flops_per_token(config: LLaMAConfig, sequence_length: int, head_positions_fraction: float = 1.0,
                    head_vocab: int | None = None) -> dict[str, float]:
  """Training FLOPs per token (forward + backward), MaxText's count (jax_recipes.md §4).

  `weights` = 6 x (matmul params of the blocks + the head, at the fraction of positions that run it);
  `attention` = 3 x layers x 2 x sequence x hidden: the QK^T and PV matmuls (4·S·hidden FLOPs per
  token forward) halved for the causal mask, times 3 for forward + backward. Embedding lookups are
  gathers and count 0.
  """
  d, f, layers = config.hidden_size, config.intermediate_size, config.num_layers
  vocab = config.vocab_size if head_vocab is None else head_vocab
  block_params = layers * (4 * d * d + 3 * d * f)
  weights = 6.0 * (block_params + d * vocab * head_positions_fraction)
  attention = 6.0 * layers * 2 * sequence_length * d / 2
  return dict(weights=weights, attention=attention, total=weights + attention)
