"""A trained or converted VQGAN image tokenizer, loaded for the stages that use it (labelling, finetuning).

    vqgan_config, model, params = vision_tokenizer.load_vqgan(workdir)        # [step=N] [mesh=...]
    codes = model.apply({'params': params}, images, method=model.encode)     # (batch, side, side) int32
    images = model.apply({'params': params}, codes, method=model.decode)     # (batch, height, width, 3)

`images` are float (batch, resolution, resolution, 3) in [0, 1]. WORKDIR is either a training run
(`lapa train configs/tokenizer.py:<preset> --workdir WORKDIR`) or the output of
`lapa convert lwm-vqgan import vqgan WORKDIR`; both hold the same layout:

  config.json                 stage 'tokenizer'; `model` holds every VQGANConfig field
  checkpoints/<step>/state    params = the VQGAN tree (names of lapa_jax/models/vqgan.py:
                              encoder/..., quantize/embeddings, ...), plus a 'discriminator' subtree
                              after adversarial training, which is not restored here
"""

from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from lapa_jax import checkpoint
from lapa_jax import config as config_lib
from lapa_jax import sharding
from lapa_jax.models import vqgan

CONFIG_FILE = 'config.json'
STAGE = 'tokenizer'
# Written by the VLA stages into their workdir: which tokenizer made (or makes) their vision tokens.
USED_FILE = 'vision_tokenizer.json'
# The adversarial discriminator's params sit next to the VQGAN's in a training checkpoint.
DISCRIMINATOR = 'discriminator'


def load_config(workdir: str) -> ml_collections.ConfigDict:
  """The config.json of a tokenizer workdir (one-line errors for anything else)."""
  return config_lib.load_workdir(workdir, STAGE, '`lapa train configs/tokenizer.py:...` or `lapa convert lwm-vqgan import`',
                                 CONFIG_FILE)


def write_config(workdir: str, vqgan_config: vqgan.VQGANConfig, **fields: Any) -> str:
  """Writes a tokenizer config.json (stage, model, and `fields`) for a workdir not made by training."""
  config = ml_collections.ConfigDict({'stage': STAGE, 'model': vqgan.config_fields(vqgan_config), **fields})
  return config_lib.save(config, workdir, CONFIG_FILE)


def description(workdir: str, vqgan_config: vqgan.VQGANConfig, step: int | None) -> dict:
  """USED_FILE's content: the tokenizer's workdir, step and model fields (enough to rebuild the VQGAN)."""
  return {'workdir': os.path.abspath(workdir), 'step': step, 'resolution': vqgan_config.resolution,
          'codebook_size': vqgan_config.codebook_size, 'tokens_per_image': vqgan_config.tokens_per_image,
          'model': vqgan.config_fields(vqgan_config)}


def vqgan_params(params: dict) -> dict:
  """The VQGAN's part of a tokenizer's params (without the discriminator)."""
  return {name: value for name, value in params.items() if name != DISCRIMINATOR}


def abstract_params(model: vqgan.VQGAN) -> Any:
  """Shapes and dtypes of the model's params, without computing them."""
  config = model.config
  images = jax.ShapeDtypeStruct((1, config.resolution, config.resolution, config.channels), jnp.float32)
  return jax.eval_shape(lambda rng, x: model.init(rng, x)['params'], jax.random.key(0), images)


def load_vqgan(workdir: str, step: int | None = None, *,
               mesh: jax.sharding.Mesh | None = None) -> tuple[vqgan.VQGANConfig, vqgan.VQGAN, Any]:
  """(VQGANConfig, VQGAN module, params) of the tokenizer in `workdir` at `step` (default: the latest).

  The params are replicated over `mesh`, or on the first device without one.
  """
  config = load_config(workdir)
  try:
    vqgan_config = vqgan.from_config(config.model)
  except ValueError as error:
    raise ValueError(f'{os.path.join(workdir, CONFIG_FILE)}: {error}') from None
  model = vqgan.VQGAN(vqgan_config)
  placement = sharding.replicated(mesh) if mesh is not None else jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  target = jax.tree.map(lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=placement),
                        abstract_params(model))
  checkpoints = checkpoint.Checkpointer(checkpoint.directory_in(workdir), read_only=True)
  try:
    if checkpoints.latest_step() is None:
      raise FileNotFoundError(f'{workdir}: no checkpoint in {checkpoints.directory}')
    params = checkpoints.restore_params(target, step)
  finally:
    checkpoints.close()
  # The restore is partial (only the VQGAN's params): a param the checkpoint lacks comes back unfilled.
  missing = [jax.tree_util.keystr(path) for path, leaf in jax.tree_util.tree_leaves_with_path(params)
             if isinstance(leaf, jax.ShapeDtypeStruct)]
  if missing:
    raise ValueError(f'{workdir}: the checkpoint has no value for {len(missing)} VQGAN params '
                     f'(e.g. {missing[0]}); does config.json describe this checkpoint?')
  return vqgan_config, model, params
