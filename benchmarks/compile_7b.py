"""The LWM-7B latent-pretraining step on an 8-device pod, compiled ahead of time on a CPU.

    python benchmarks/compile_7b.py [--mesh 1,8,1] [--batch 256] [--length 384] [--preset 7b]

LAPA's configuration (reference/official_lapa.md §2.7, §4): global batch 256 x sequence 384, bf16
compute, fp32 params, AdamW (b2 0.95, clip 1.0), remat of every block, FSDP over 8 devices
(`mesh_dim='1,8,1'`). The step is lowered from abstract shapes (`jax.ShapeDtypeStruct` with
shardings), so no parameter is ever allocated, and compiled for 8 simulated CPU devices.

Prints one JSON line with, per device: XLA's memory analysis (arguments, outputs, aliased by
donation, temporaries, and their total) against the 70 GiB target (an 80 GB H100); XLA's cost
analysis FLOPs (which count a `while`/scan body once, so they miss most of the 32 layers); the
textbook 6·N·tokens + causal attention (N = all params, embeddings included); and the model FLOPs
that are actually executed (matmul params only, heads at the target positions; jax_recipes.md §4),
next to the official all-positions-all-heads count per token.
"""

from __future__ import annotations

import argparse
import json
import os
import time

os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402

from lapa_jax import sharding  # noqa: E402
from lapa_jax.models import llama, vla  # noqa: E402
from lapa_jax.train import optim  # noqa: E402
from lapa_jax.train.step import init_train_state, make_train_step  # noqa: E402

TARGET_GIB = 70.0
GIB = 2 ** 30


def _optimizer_config() -> ml_collections.ConfigDict:
  """LAPA's optimizer: AdamW 2e-5 constant, b2 0.95, no weight decay, global-norm clip 1.0."""
  return ml_collections.ConfigDict(dict(name='adamw', lr=2e-5, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.0,
                                        clip_norm=1.0, warmup_steps=0, schedule='constant', end_lr_fraction=1.0))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--preset', default='7b', choices=sorted(vla.PRESETS))
  parser.add_argument('--mesh', default='1,8,1')
  parser.add_argument('--batch', type=int, default=256)
  parser.add_argument('--length', type=int, default=384)
  parser.add_argument('--remat', default=None, choices=llama.REMAT_POLICIES, help='override the preset policy')
  args = parser.parse_args()

  overrides = dict(dtype='bfloat16', param_dtype='float32')
  if args.remat:
    overrides['remat_policy'] = args.remat
  config = vla.vla_config(args.preset, llama_overrides=overrides)
  model = vla.VLA(config)
  optimizer = optim.make_optimizer(_optimizer_config(), total_steps=70000)
  mesh = sharding.make_mesh(args.mesh)
  loss_config = vla.LossConfig()

  def init_variables(rng):
    return {'params': vla.init_params(model, rng), 'model_state': {}}

  start = time.perf_counter()
  with sharding.use_mesh(mesh):
    abstract = jax.eval_shape(lambda: init_train_state(init_variables, optimizer, seed=0))
    shardings = nn.unbox(sharding.logical_to_shardings(abstract, mesh))
  # Unboxed outside the mesh: under it, unboxing applies a sharding constraint to each leaf.
  state = sharding.abstract_with_shardings(nn.unbox(abstract), shardings)
  with sharding.use_mesh(mesh):
    batch_spec = sharding.batch_sharding(mesh, 2)
    shape = (args.batch, args.length)
    batch = {name: jax.ShapeDtypeStruct(shape, dtype, sharding=batch_spec) for name, dtype in (
        ('tokens', jnp.int32), ('modality', jnp.int32), ('targets', jnp.int32), ('target_modality', jnp.int32),
        ('loss_mask', jnp.float32), ('attention_mask', jnp.int32))}
    step = jax.jit(make_train_step(vla.make_loss_fn(model, loss_config), optimizer),
                   out_shardings=(shardings, sharding.replicated(mesh)), donate_argnums=(0,))
    lowered = step.lower(state, batch)
    lowered_seconds = time.perf_counter() - start
    compiled = lowered.compile()
  compile_seconds = time.perf_counter() - start - lowered_seconds

  memory = compiled.memory_analysis()
  per_device = (memory.argument_size_in_bytes + memory.output_size_in_bytes - memory.alias_size_in_bytes
                + memory.temp_size_in_bytes)
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  params = sum(leaf.size for leaf in jax.tree.leaves(state.params))
  devices = mesh.devices.size
  tokens = args.batch * args.length
  targets = dict(loss_config.targets_per_sequence)
  head_fraction = sum(targets[m] * config.vocab_size(m) for m, _ in loss_config.weights) / args.length
  ours = llama.flops_per_token(config.llama, args.length, head_vocab=1, head_positions_fraction=head_fraction)
  official = llama.flops_per_token(config.llama, args.length,
                                   head_vocab=sum(config.vocab_size(m) for m in config.modalities))
  print(json.dumps(dict(
      benchmark='compile_7b', preset=args.preset, mesh=args.mesh, devices=devices, global_batch=args.batch,
      length=args.length, compute_dtype='bfloat16', param_dtype='float32', remat=config.llama.remat_policy,
      params=params, lower_seconds=round(lowered_seconds, 1), compile_seconds=round(compile_seconds, 1),
      per_device_gib=dict(arguments=round(memory.argument_size_in_bytes / GIB, 2),
                          outputs=round(memory.output_size_in_bytes / GIB, 2),
                          aliased=round(memory.alias_size_in_bytes / GIB, 2),
                          temporaries=round(memory.temp_size_in_bytes / GIB, 2),
                          total=round(per_device / GIB, 2)),
      target_gib=TARGET_GIB, fits=per_device / GIB <= TARGET_GIB,
      xla_cost_flops_per_device=float(cost.get('flops', -1)),
      analytic_flops_per_device=ours['total'] * tokens / devices,
      analytic_gflops_per_token=round(ours['total'] / 1e9, 2),
      official_all_heads_gflops_per_token=round(official['total'] / 1e9, 2),
      six_n_plus_attention_per_device=(6 * params + ours['attention']) * tokens / devices)), flush=True)


if __name__ == '__main__':
  main()
