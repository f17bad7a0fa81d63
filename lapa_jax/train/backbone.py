"""What the latent-pretraining and action-finetuning stages share: the VLA a config describes, its
text tokenizer, starting from another run, and evaluation on held-out batches.

A VLA stage config has `model` (every LLaMA size field plus the per-modality vocabularies, so a
workdir's config.json alone rebuilds the model), `text_tokenizer` ('bytes', or LWM's SentencePiece
tokenizer.model), `prompt` (the text around the instruction), `seq_len`, `init_from` (a workdir
whose params start this run: an imported LWM/LAPA/HF checkpoint or an earlier stage) and
`init_fresh` (param prefixes initialised fresh even when `init_from` has them).
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from lapa_jax import metrics as metrics_lib
from lapa_jax import sharding
from lapa_jax.data import pipelines, sequences
from lapa_jax.models import llama, vla
from lapa_jax.train import data as data_lib
from lapa_jax.train import loop, warm_start

# `model` groups of the VLA stage configs, by size. LWM-7B is what LAPA trains; the world sizes read
# byte tokens (vocab 512 >= 259) and a world vision tokenizer of up to 1086 codes.
SIZES = {
    'paper': dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_layers=32, num_heads=32,
                  rope_theta=5e7, remat_policy='nothing_saveable', vision_vocab_size=8448),
    '1b': dict(vocab_size=32000, hidden_size=2048, intermediate_size=5504, num_layers=22, num_heads=16,
               rope_theta=5e7, remat_policy='none', vision_vocab_size=8448),
    'small': dict(vocab_size=512, hidden_size=384, intermediate_size=1024, num_layers=6, num_heads=6,
                  rope_theta=1e4, remat_policy='none', vision_vocab_size=1088),
    'demo': dict(vocab_size=512, hidden_size=128, intermediate_size=384, num_layers=2, num_heads=4,
                 rope_theta=1e4, remat_policy='none', vision_vocab_size=1088),
    'tiny': dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                 rope_theta=1e4, remat_policy='none', vision_vocab_size=1088),
}

WORLD_PROMPT = '{instruction}'  # the built-in world's sizes skip LAPA's ~95-token preamble


def base_config(stage: str, size: str) -> ml_collections.ConfigDict:
  """The fields both VLA stage configs share, at a size of SIZES; each stage file sets the rest."""
  if size not in SIZES:
    raise ValueError(f'configs/{stage}.py: unknown size {size!r}; expected one of {tuple(SIZES)}')
  world = size not in ('paper', '1b')
  config = ml_collections.ConfigDict()
  config.stage = stage
  config.seed = 0
  config.mesh_dim = '1,-1,1'      # fully sharded data parallel, as LAPA trains LWM-7B
  config.dtype = 'float32' if world else 'bfloat16'
  config.model = ml_collections.ConfigDict(dict(**SIZES[size], latent_vocab_size=0, action_vocab_size=0))
  config.text_tokenizer = 'bytes' if world else ''   # '' must be set: LWM's tokenizer.model
  config.prompt = WORLD_PROMPT if world else sequences.PROMPT
  config.seq_len = {'paper': 384, '1b': 384}.get(size, 160)
  config.init_from = ''           # a workdir whose params start this run (train/warm_start.py)
  config.init_fresh = ''          # param path prefixes initialised fresh even when init_from has them
  config.optim = ml_collections.ConfigDict(dict(
      name='adamw', lr=2e-5, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.0, clip_norm=1.0,
      warmup_steps=0, schedule='constant', end_lr_fraction=1.0, freeze=''))
  config.data = pipelines.default_config()
  config.eval = ml_collections.ConfigDict(dict(
      split='val' if world else '',   # held-out split ('' turns evaluation off; Open-X has few val splits)
      batch_size=64, num_batches=2))
  config.log_every = 50
  config.keep_checkpoints = 2
  config.on_nonfinite = 'skip'    # a non-finite loss/gradient: 'skip' the step (counted) or 'stop'
  if world:
    config.optim.update(lr=1e-3, warmup_steps=50, schedule='cosine', end_lr_fraction=0.1)
  return config


LLAMA_FIELDS = ('vocab_size', 'hidden_size', 'intermediate_size', 'num_layers', 'num_heads', 'rope_theta',
                'remat_policy')
VOCAB_FIELDS = ('vision_vocab_size', 'latent_vocab_size', 'action_vocab_size')
DTYPES = ('float32', 'bfloat16')


def model_config(config: ml_collections.ConfigDict) -> vla.VLAConfig:
  """The VLAConfig of `config.model` with compute dtype `config.dtype` (params stay float32)."""
  if config.dtype not in DTYPES:
    raise ValueError(f'config field dtype: expected one of {DTYPES}, got {config.dtype!r}')
  missing = [name for name in LLAMA_FIELDS + VOCAB_FIELDS if name not in config.model]
  if missing:
    raise KeyError(f'config group model: missing field(s) {", ".join(missing)}')
  try:
    backbone = llama.LLaMAConfig(**{name: config.model[name] for name in LLAMA_FIELDS}, dtype=config.dtype)
  except ValueError as error:
    raise ValueError(f'config group model: {error}') from None
  return vla.VLAConfig(llama=backbone, **{name: int(config.model[name]) for name in VOCAB_FIELDS})


def text_tokenizer(config: ml_collections.ConfigDict) -> sequences.Tokenizer:
  """The text tokenizer of `config.text_tokenizer`, checked against the model's text vocabulary."""
  if not config.text_tokenizer:
    raise ValueError("config field text_tokenizer: set it to the SentencePiece tokenizer.model shipped with "
                     "LWM/LAPA checkpoints (or 'bytes' for the built-in world)")
  try:
    tokenizer = sequences.load_tokenizer(config.text_tokenizer)
  except FileNotFoundError as error:
    raise FileNotFoundError(f'config field text_tokenizer: {error}') from None
  if tokenizer.vocab_size > config.model.vocab_size:
    raise ValueError(f'config field model.vocab_size: {config.model.vocab_size} is smaller than the text '
                     f'tokenizer {config.text_tokenizer!r} ({tokenizer.vocab_size} ids)')
  if '{instruction}' not in config.prompt:
    raise ValueError(f'config field prompt: {config.prompt!r} has no {{instruction}} field')
  return tokenizer


def check_vision_vocab(config: ml_collections.ConfigDict, codebook_size: int, source: str) -> None:
  """The vision table holds the tokenizer's codes plus end-of-frame and end-of-vision."""
  if config.model.vision_vocab_size < codebook_size + 2:
    raise ValueError(f'config field model.vision_vocab_size: {config.model.vision_vocab_size} cannot hold the '
                     f'{codebook_size} codes of {source} plus end-of-frame/end-of-vision ids (>= {codebook_size + 2})')


def make_init(model: vla.VLA, model_state: Callable[[], Any] = dict) -> Callable[[jax.Array], dict]:
  """Stage.init: the VLA's logically partitioned params (N(0, 0.02) tables and heads) and `model_state()`."""
  def init(rng):
    return {'params': vla.init_params(model, rng), 'model_state': model_state()}
  return init


def params_warm_start(config: ml_collections.ConfigDict) -> Callable[[loop.TrainState], loop.TrainState] | None:
  """Stage.warm_start that loads `config.init_from`'s matching params (None without init_from)."""
  if not config.init_from:
    return None
  fresh = tuple(prefix.strip() for prefix in config.init_fresh.split(',') if prefix.strip())
  warm_start.checkpoint_params(config.init_from)  # a missing checkpoint fails here, before any work

  def start(state: loop.TrainState) -> loop.TrainState:
    params, report = warm_start.load_matching(config.init_from, state.params, fresh=fresh)
    loop.say(report.summary())
    return state.replace(params=params)

  return start


def fill_positions(tokens: jax.Array, modality: jax.Array, values: jax.Array, kind: int) -> jax.Array:
  """`tokens (batch, length)` with its first `values.shape[1]` positions of modality `kind` set to
  `values (batch, count)`: the codes of an image tokenized in the step go where the host left
  placeholders (sequences.vla_sequence)."""
  positions, _, _ = vla.target_positions(modality == kind, values.shape[1])
  rows = jnp.arange(tokens.shape[0])[:, None]
  return tokens.at[rows, positions].set(values.astype(tokens.dtype))


class HeldOutEvaluator:
  """Stage.evaluate: the stage's loss metrics (teacher forcing, no update) averaged over the same
  `num_batches` held-out batches every time, plus what `extra(state, batches)` adds.

  `metrics_fn(params, model_state, batch) -> {name: scalar}` is jitted; `make_batches()` builds the
  held-out iterator on first use; it is rewound to its start before every evaluation.
  """

  def __init__(self, metrics_fn, make_batches: Callable[[], Any], num_batches: int, extra=None):
    self._metrics = jax.jit(metrics_fn)
    self._make_batches = make_batches
    self._num_batches = num_batches
    self._iterator = self._start = None
    self._extra = extra

  def batches(self) -> list[dict[str, np.ndarray]]:
    if self._iterator is None:
      self._iterator = self._make_batches()
      self._start = self._iterator.get_state()
    self._iterator.set_state(self._start)
    return [next(self._iterator) for _ in range(self._num_batches)]

  def __call__(self, state: loop.TrainState, step: int, writer: metrics_lib.MetricWriter) -> dict:
    mesh = jax.sharding.get_mesh()
    totals: dict[str, float] = {}
    batches = self.batches()
    for local in batches:
      batch = sharding.global_batch(mesh, loop.device_fields(local))
      for name, value in jax.device_get(self._metrics(state.params, state.model_state, batch)).items():
        totals[name] = totals.get(name, 0.0) + float(value) / len(batches)
    if self._extra is not None:
      totals.update(self._extra(state, step, batches, writer))
    return totals


def held_out_evaluator(config: ml_collections.ConfigDict, metrics_fn, token_batches) -> HeldOutEvaluator | None:
  """Stage.evaluate over config.eval.split (None when it is ''): `token_batches(data_config, local batch
  size, process index, process count, statistics)` makes the stage's batches of another split."""
  if not config.eval.split:
    return None
  batch_size = data_lib.local_batch_size(config.eval.batch_size, jax.process_count())
  make_batches = functools.partial(token_batches, data_lib.for_split(config.data, config.eval.split), batch_size,
                                   jax.process_index(), jax.process_count(), None)
  return HeldOutEvaluator(metrics_fn, make_batches, config.eval.num_batches)


def check_eval(config: ml_collections.ConfigDict) -> None:
  if config.eval.split and (config.eval.batch_size < 1 or config.eval.num_batches < 1):
    raise ValueError('config fields eval.batch_size and eval.num_batches: expected positive integers')
