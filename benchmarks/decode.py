"""Latency of generating latent-action and action tokens with the KV cache vs recomputing the sequence.

    python benchmarks/decode.py [--preset small] [--prompt 300] [--repeats 5]

After a ~300-token LAPA prompt (instruction, image codes, `<delta>` / `<action>` marker), the VLA
generates 4 latent codes (latent pretraining) or 7 action bins (a finetuned policy). With the cache,
one prefill pass is followed by one single-position step per token; without it every token re-runs
the whole sequence. Target: one cached step <= 10% of a full forward at the small preset.

Prints JSON lines: the prefill, one cached step and one full forward (the best of `--repeats` after
a warm-up) with the decoding layout (`layers: loop`, `vla.for_decoding`) and the scanned training
layout, then end-to-end `generate` for 4 latent and 7 action tokens vs the recompute loop.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import time

os.environ.setdefault('JAX_PLATFORMS', 'cpu')

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from lapa_jax.data import sequences  # noqa: E402
from lapa_jax.data.sequences import ACTION, LATENT  # noqa: E402
from lapa_jax.models import llama, vla  # noqa: E402

TARGET_STEP_FRACTION = 0.10


def _best_ms(run, repeats: int) -> float:
  """The fastest of `repeats` timed runs after a warm-up: on a shared machine, the least disturbed."""
  run()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    run()
    times.append(time.perf_counter() - start)
  return 1e3 * min(times)


def _prompt(config: vla.VLAConfig, length: int, target: int) -> dict[str, jax.Array]:
  """One LAPA prompt of exactly `length` tokens: the byte-tokenized instruction, image codes, marker."""
  tokenizer = sequences.ByteTokenizer()
  codebook = config.vision_vocab_size - 2
  rng = np.random.RandomState(0)
  instruction = 'put the red block left of the cup'
  base = sequences.generation_prompt(tokenizer, instruction, np.zeros(0, np.int32), codebook_size=codebook,
                                     target=target)
  codes = rng.randint(0, codebook, length - len(base['tokens']))
  prompt = sequences.generation_prompt(tokenizer, instruction, codes, codebook_size=codebook, target=target)
  return jax.tree.map(jnp.asarray, sequences.pad_batch([prompt], length, left=True))


def _step_figures(model, params, config, args, common) -> None:
  """One cached step vs one full forward over the prompt (each ending with the latent head)."""
  prompt = _prompt(config, args.prompt, LATENT)
  cache_length = args.prompt + 8
  tokens, modality, mask = prompt['tokens'], prompt['modality'], prompt['attention_mask']

  @jax.jit
  def prefill(params, tokens, modality, mask):
    cache = llama.init_cache(config.llama, 1, cache_length)
    hidden, cache = model.apply({'params': params}, tokens, modality, mask, cache=cache)
    return jnp.argmax(model.apply({'params': params}, hidden[:, -1], LATENT, method=vla.VLA.head), -1), cache

  @functools.partial(jax.jit, donate_argnums=(2,))
  def cached_step(params, token, cache):
    column = token[:, None].astype(jnp.int32)
    hidden, cache = model.apply({'params': params}, column, jnp.full_like(column, LATENT), jnp.ones_like(column),
                                cache=cache)
    return jnp.argmax(model.apply({'params': params}, hidden[:, 0], LATENT, method=vla.VLA.head), -1), cache

  @jax.jit
  def full_forward(params, tokens, modality, mask):
    hidden, _ = model.apply({'params': params}, tokens, modality, mask)
    return jnp.argmax(model.apply({'params': params}, hidden[:, -1], LATENT, method=vla.VLA.head), -1)

  token, cache = prefill(params, tokens, modality, mask)
  prefill_ms = _best_ms(lambda: jax.block_until_ready(prefill(params, tokens, modality, mask)), args.repeats)
  state = {'cache': cache}

  def step_once():
    _, state['cache'] = cached_step(params, token, state['cache'])
    jax.block_until_ready(state['cache'])
    state['cache']['index'] = jnp.asarray(args.prompt, jnp.int32)  # rewrite the same slot every time

  step_ms = _best_ms(step_once, args.repeats)
  full_ms = _best_ms(lambda: full_forward(params, tokens, modality, mask).block_until_ready(), args.repeats)
  print(json.dumps(dict(benchmark='decode_step', prefill_ms=round(prefill_ms, 2), cached_step_ms=round(step_ms, 3),
                        full_forward_ms=round(full_ms, 2), step_fraction=round(step_ms / full_ms, 4),
                        target_fraction=TARGET_STEP_FRACTION, **{'pass': step_ms / full_ms <= TARGET_STEP_FRACTION},
                        **common)), flush=True)


def _generate_figures(model, params, config, args, common) -> None:
  """End-to-end greedy generation of 4 latent / 7 action tokens: cached vs recomputing the sequence."""
  rng = jax.random.key(1)
  for target, count in ((LATENT, 4), (ACTION, 7)):
    prompt = _prompt(config, args.prompt, target)
    tokens, modality, mask = prompt['tokens'], prompt['modality'], prompt['attention_mask']
    generate = jax.jit(functools.partial(vla.generate, model, target=target, num_tokens=count))
    cached_ms = _best_ms(lambda: generate(params, tokens, modality, mask, rng).block_until_ready(), args.repeats)

    @jax.jit
    def recompute(params, tokens, modality, mask):
      """The same greedy tokens, re-running the whole (growing) sequence for each one."""
      generated = []
      for _ in range(count):
        hidden, _ = model.apply({'params': params}, tokens, modality, mask)
        token = jnp.argmax(model.apply({'params': params}, hidden[:, -1], target, method=vla.VLA.head), -1)
        generated.append(token)
        column = token[:, None].astype(jnp.int32)
        tokens = jnp.concatenate([tokens, column], axis=1)
        modality = jnp.concatenate([modality, jnp.full_like(column, target)], axis=1)
        mask = jnp.concatenate([mask, jnp.ones_like(column)], axis=1)
      return jnp.stack(generated, axis=1)

    recompute_ms = _best_ms(lambda: recompute(params, tokens, modality, mask).block_until_ready(), args.repeats)
    same = bool((generate(params, tokens, modality, mask, rng) == recompute(params, tokens, modality, mask)).all())
    print(json.dumps(dict(benchmark='decode_generate', target=sequences.MODALITY_NAMES[target], tokens=count,
                          cached_ms=round(cached_ms, 2), recompute_ms=round(recompute_ms, 2),
                          speedup=round(recompute_ms / cached_ms, 2), same_tokens=same, **common)), flush=True)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--preset', default='small', choices=sorted(vla.PRESETS))
  parser.add_argument('--prompt', type=int, default=300)
  parser.add_argument('--repeats', type=int, default=5)
  args = parser.parse_args()
  config = vla.vla_config(args.preset, action_vocab_size=256)
  scanned_model = vla.VLA(config)
  scanned_params = jax.jit(lambda rng: nn.unbox(vla.init_params(scanned_model, rng)))(jax.random.key(0))
  decoding = vla.for_decoding(scanned_model, scanned_params)
  common = dict(preset=args.preset, prompt_tokens=args.prompt, cpus=os.cpu_count(), jax=jax.__version__)
  for layout, (model, params) in (('loop', decoding), ('scan', (scanned_model, scanned_params))):
    _step_figures(model, params, config, args, dict(layers=layout, **common))
  _generate_figures(*decoding, config, args, dict(layers='loop', **common))


if __name__ == '__main__':
  main()
