"""Training throughput of the LLaMA backbone on this machine, against its measured fp32 matmul peak.

    python benchmarks/backbone_step.py [--preset small] [--batch 4] [--length 384] [--steps 5] [--hf]
    JAX_PLATFORMS=cuda python benchmarks/backbone_step.py --preset 1b --batch 32 --dtype bfloat16 \
        --peak-tflops 989 --matmul-size 8192        # MFU on an H100/H200 (benchmarks/gpu_check.sh)

The configuration of the issue's reference figure: the `small` preset (hidden 768, MLP 2048, 8
layers, 12 heads, vocab 32000), batch 4 x sequence 384, float32, AdamW, next-token cross-entropy
at every position (the full 32000-way head, as HF's LlamaForCausalLM computes it). HF transformers
(PyTorch 2.13 CPU, SDPA, AdamW) does 221 tokens/s = 0.147 TFLOP/s on a 2-core machine of the CI
kind, whose fp32 matmul peak is about 0.17 TFLOP/s; the target is >= 1.0x of it.

Prints JSON lines: the measured matmul peak, the step (`lm`), the VLA latent-pretraining step whose
heads run only at target positions (`vla`, the step lapa_jax actually trains), and with `--hf` the
HF model on the same machine in the same run (a fair ratio when the machine is shared). TFLOP/s
use the analytic count of jax_recipes.md §4 (6·N per token + causal attention; remat not counted).
Step times are the median of `--steps` timed steps after 2 warm-up steps. `--dtype` is the compute
dtype (params stay fp32) and the matmul peak's; with `--peak-tflops` (the chip's datasheet dense peak
in that dtype, e.g. 989 bf16 on an H100/H200) each step line also has `mfu`. The script runs on the
CPU unless JAX_PLATFORMS says otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

os.environ.setdefault('JAX_PLATFORMS', 'cpu')

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from lapa_jax.data import sequences  # noqa: E402
from lapa_jax.models import llama, vla  # noqa: E402
from lapa_jax.train.step import init_train_state, make_train_step  # noqa: E402

REFERENCE_TOKENS_PER_SECOND = 221.0
LEARNING_RATE = 1e-4


def _median_seconds(run, steps: int, warmup: int = 2) -> float:
  for _ in range(warmup):
    run()
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    run()
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def matmul_peak(size: int = 2048, dtype: str = 'float32', repeats: int = 5) -> float:
  """TFLOP/s of a jitted (size x size) @ (size x size) matmul in `dtype`: the best of `repeats`."""
  a = jnp.asarray(np.random.RandomState(0).randn(size, size), dtype)
  matmul = jax.jit(lambda x, y: x @ y)
  matmul(a, a).block_until_ready()
  best = min(_median_seconds(lambda: matmul(a, a).block_until_ready(), 1, warmup=0) for _ in range(repeats))
  return 2 * size ** 3 / best / 1e12


def lm_step(config: llama.LLaMAConfig, batch: int, length: int, steps: int) -> dict:
  model = llama.LLaMAForCausalLM(config)
  tokens = jnp.asarray(np.random.RandomState(0).randint(3, config.vocab_size, (batch, length + 1)), jnp.int32)
  params = jax.jit(lambda rng: nn.unbox(model.init(rng, tokens[:, :-1])['params']))(jax.random.key(0))
  optimizer = optax.adamw(LEARNING_RATE)
  opt_state = optimizer.init(params)

  def loss_fn(p):
    logits, _ = model.apply({'params': p}, tokens[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

  @jax.jit
  def step(p, o):
    loss, grads = jax.value_and_grad(loss_fn)(p)
    updates, o = optimizer.update(grads, o, p)
    return optax.apply_updates(p, updates), o, loss

  state = [params, opt_state]

  def run():
    state[0], state[1], loss = step(*state)
    loss.block_until_ready()

  seconds = _median_seconds(run, steps)
  flops = llama.flops_per_token(config, length)['total'] * batch * length
  return dict(step_seconds=seconds, tokens_per_second=batch * length / seconds, tflops=flops / seconds / 1e12)


def vla_step(preset: str, batch: int, length: int, steps: int, dtype: str = 'float32') -> dict:
  """The latent-pretraining step: LAPA's token layout, 0.99 latent + 0.01 text CE, heads at targets."""
  config = vla.vla_config(preset, llama_overrides=dict(dtype=dtype))
  model = vla.VLA(config)
  rng = np.random.RandomState(0)
  tokenizer = sequences.ByteTokenizer()
  codebook = config.vision_vocab_size - 2
  vision_tokens = length - 170  # a byte-tokenized prompt and markers take ~165 positions
  instruction = 'put the red block left of the cup'
  examples = [sequences.vla_sequence(tokenizer, instruction, rng.randint(0, codebook, vision_tokens),
                                     codebook_size=codebook, latent=rng.randint(0, 8, 4)) for _ in range(batch)]
  data = jax.tree.map(jnp.asarray, sequences.pad_batch(examples, length))
  optimizer = optax.adamw(LEARNING_RATE)

  def init_variables(init_rng):
    return {'params': vla.init_params(model, init_rng), 'model_state': {}}

  state = [jax.jit(lambda: nn.unbox(init_train_state(init_variables, optimizer, seed=0)))()]
  step = jax.jit(make_train_step(vla.make_loss_fn(model), optimizer))

  def run():
    state[0], metrics = step(state[0], data)
    metrics['loss'].block_until_ready()

  seconds = _median_seconds(run, steps)
  targets = 4 + 32  # latent positions + the text head's gathered positions per sequence
  per_token = llama.flops_per_token(config.llama, length, head_positions_fraction=targets / length)['total']
  flops = per_token * batch * length
  return dict(step_seconds=seconds, tokens_per_second=batch * length / seconds, tflops=flops / seconds / 1e12)


def hf_step(config: llama.LLaMAConfig, batch: int, length: int, steps: int) -> dict:
  """HF transformers' LlamaForCausalLM at the same configuration (SDPA attention, torch AdamW)."""
  import torch
  import transformers
  torch.manual_seed(0)
  hf_config = transformers.LlamaConfig(
      vocab_size=config.vocab_size, hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
      num_hidden_layers=config.num_layers, num_attention_heads=config.num_heads,
      num_key_value_heads=config.num_heads, rms_norm_eps=config.rms_norm_eps, rope_theta=config.rope_theta,
      max_position_embeddings=length, attn_implementation='sdpa')
  model = transformers.LlamaForCausalLM(hf_config)
  optimizer = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE)
  tokens = torch.randint(3, config.vocab_size, (batch, length))

  def run():
    optimizer.zero_grad()
    model(input_ids=tokens, labels=tokens).loss.backward()
    optimizer.step()

  seconds = _median_seconds(run, steps)
  flops = llama.flops_per_token(config, length)['total'] * batch * length
  return dict(step_seconds=seconds, tokens_per_second=batch * length / seconds, tflops=flops / seconds / 1e12,
              torch=torch.__version__, transformers=transformers.__version__, torch_threads=torch.get_num_threads())


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--preset', default='small', choices=sorted(llama.PRESETS))
  parser.add_argument('--batch', type=int, default=4)
  parser.add_argument('--length', type=int, default=384)
  parser.add_argument('--steps', type=int, default=5)
  parser.add_argument('--hf', action='store_true', help='also time HF transformers in this run')
  parser.add_argument('--dtype', default='float32', choices=('float32', 'bfloat16'), help='compute dtype')
  parser.add_argument('--peak-tflops', type=float, help="the chip's dense peak in --dtype, for `mfu`")
  parser.add_argument('--matmul-size', type=int, default=2048, help='an accelerator needs ~8192 to reach its peak')
  args = parser.parse_args()
  if args.hf and args.dtype != 'float32':
    parser.error('--hf compares float32 steps only')
  common = dict(preset=args.preset, batch=args.batch, length=args.length, dtype=args.dtype, cpus=os.cpu_count(),
                machine=platform.machine(), jax=jax.__version__, device=str(jax.devices()[0]))
  peak = matmul_peak(args.matmul_size, args.dtype)
  print(json.dumps(dict(benchmark='matmul_peak', tflops=round(peak, 4), size=args.matmul_size, **common)),
        flush=True)
  config = llama.llama_config(args.preset, dtype=args.dtype)
  results = {'lm': lm_step(config, args.batch, args.length, args.steps),
             'vla': vla_step(args.preset, args.batch, args.length, args.steps, args.dtype)}
  if args.hf:
    results['hf_transformers'] = hf_step(config, args.batch, args.length, args.steps)
  for name, result in results.items():
    line = dict(benchmark='backbone_step', model=name, **{k: round(v, 4) if isinstance(v, float) else v
                                                          for k, v in result.items()},
                fraction_of_peak=round(result['tflops'] / peak, 3),
                vs_reference_221=round(result['tokens_per_second'] / REFERENCE_TOKENS_PER_SECOND, 3), **common)
    if args.peak_tflops:
      line.update(peak_tflops=args.peak_tflops, mfu=round(result['tflops'] / args.peak_tflops, 4))
    if name != 'hf_transformers' and 'hf_transformers' in results:
      line['vs_hf_same_run'] = round(result['tokens_per_second'] / results['hf_transformers']['tokens_per_second'], 3)
    print(json.dumps(line), flush=True)


if __name__ == '__main__':
  main()
