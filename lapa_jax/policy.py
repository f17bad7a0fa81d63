"""A trained VLA as a policy: camera image + instruction in, actions (or latent actions) out.

    policy = Policy.from_checkpoint('runs/finetune')            # a finetuned (or latent-pretrained) workdir
    policy.infer({'image': frame, 'instruction': 'push the red block to the left'})
    # {'actions': float32 (7,)}; a batch of images (B, H, W, 3) and B instructions gives (B, 7)

One object behind evaluation (evaluate.py), serving (serve.py) and notebooks, as openpi's policies.
What `infer` does, in one jitted call per batch-size bucket: resize the uint8 images to the vision
tokenizer's resolution (bilinear, antialiased, as the data pipeline resizes a dataset's frames), take
the finetuning stage's evaluation view (the centred crop matching its random resized crops), encode
them with the VQGAN, put the codes into the host-built prompt, and generate exactly 7 action ids (or
the LAQ's code_seq_len latent ids) with the KV cache, from the right head only, each position
restricted to its own dimension's bins. Ids decode to bin values in the dataset's standardised 7-D
action convention ([Δxyz, Δrpy, gripper]; the finetuning data is never normalised, data/actions.py).

Greedy by default; `temperature` > 0 samples (with `top_k` > 0, from the k likeliest ids), as the
official inference does (reference §2.8). Batches are padded to the next power of two, so a server
that sees every batch size compiles at most log2(max_batch) + 1 programs.
"""

from __future__ import annotations

import functools
import json
import os
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from lapa_jax import checkpoint, sharding, vision_tokenizer
from lapa_jax import config as config_lib
from lapa_jax.data import actions, sequences
from lapa_jax.data.sequences import ACTION, LATENT, VISION
from lapa_jax.models import vla, vqgan
from lapa_jax.train import augment, backbone
from lapa_jax.train.latent_pretrain import LAQ_FILE

STAGES = ('finetune', 'latent_pretrain')


class ObservationError(ValueError):
  """An observation the policy cannot take; the message names the field."""


def _bucket(size: int) -> int:
  return 1 << max(size - 1, 0).bit_length()


def _read_json(path: str) -> dict:
  if not os.path.isfile(path):
    raise FileNotFoundError(f'{path}: missing; the run that wrote this workdir predates policies, or it is '
                            'still starting')
  with open(path) as f:
    return json.load(f)


class Policy:
  """A VLA with its text and vision tokenizers and (for action policies) its action bins.

  kind 'action': `infer` returns 'actions' (and 'action_ids'); kind 'latent' (a latent-pretrained
  LAPA run): 'latent_action', the LAQ codes the model predicts for the next H frames.
  """

  def __init__(self, config: ml_collections.ConfigDict, params: Any, vqgan_config: vqgan.VQGANConfig,
               vqgan_params: Any, *, bins: actions.ActionBins | None = None, latent_tokens: int = 0,
               crop_area: float | None = None, temperature: float = 0.0, top_k: int = 0, seed: int = 0,
               max_batch: int = 64, source: str = '', laq: dict | None = None):
    self.config = config
    self.kind = 'action' if bins is not None else 'latent'
    self.bins = bins
    self.source = source
    self.laq = laq
    self.vqgan_config = vqgan_config
    self.image_size = vqgan_config.resolution
    self.max_batch = max_batch
    self.tokenizer = backbone.text_tokenizer(config)
    model = vla.VLA(backbone.model_config(config))
    self._model, self._params = vla.for_decoding(model, params)
    self._vqgan, self._vqgan_params = vqgan.VQGAN(vqgan_config), vqgan_params
    self._target = ACTION if self.kind == 'action' else LATENT
    self.num_tokens = 7 if self.kind == 'action' else int(latent_tokens)
    vocab = model.config.vocab_size(self._target)
    if self.kind == 'action':
      allowed = np.arange(vocab)[None, :] < np.asarray(bins.num_bins)[:, None]   # (7, vocab)
    else:
      codebook = int(laq['codebook_size']) if laq else vocab
      allowed = np.broadcast_to(np.arange(vocab) < codebook, (self.num_tokens, vocab))
    self._allowed = jnp.asarray(allowed)
    self._crop_area = crop_area
    self._placeholders = np.zeros(vqgan_config.tokens_per_image, np.int32)
    example = self._prompt('')
    self.prompt_length = int(config.seq_len)
    if len(example['tokens']) >= self.prompt_length:
      raise ValueError(f'config field seq_len: {self.prompt_length} cannot hold even an empty instruction')
    self._rng = jax.random.key(seed)
    self._act = jax.jit(functools.partial(self._act_fn, temperature=float(temperature), top_k=int(top_k)))

  # ------------------------------------------------------------------------------------ loading

  @classmethod
  def from_checkpoint(cls, workdir: str, *, step: int | None = None, vision_tokenizer_dir: str | None = None,
                      **options) -> 'Policy':
    """The run in `workdir` at `step` (default: its latest checkpoint).

    Finetuned runs are complete (the VQGAN's params are in the checkpoint); a latent-pretrained run
    loads the tokenizer that labelled its data, or `vision_tokenizer_dir`. `options` go to Policy
    (temperature, top_k, seed, max_batch).
    """
    config = _load_config(workdir)
    model = vla.VLA(backbone.model_config(config))
    used = _read_json(os.path.join(workdir, vision_tokenizer.USED_FILE))
    step = checkpoint.latest_step(workdir) if step is None else step
    if step is None:
      raise FileNotFoundError(f'{workdir}: no checkpoint yet in {checkpoint.directory_in(workdir)}')
    mesh = sharding.make_mesh('1,1,1', jax.local_devices()[:1])
    params_target = checkpoint.restore_target(lambda rng: vla.init_params(model, rng), mesh, jax.random.key(0))
    target = {'params': params_target}
    in_checkpoint = config.stage == 'finetune'
    if in_checkpoint:
      vqgan_config = vqgan.from_config(ml_collections.ConfigDict(used['model']))
      placement = sharding.replicated(mesh)
      target['model_state'] = {'vision_tokenizer': jax.tree.map(
          lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=placement),
          vision_tokenizer.abstract_params(vqgan.VQGAN(vqgan_config)))}
    with checkpoint.Checkpointer(checkpoint.directory_in(workdir), read_only=True) as checkpoints:
      with checkpoint.quiet_orbax():
        restored = checkpoints.restore_subtree(target, step)
    if in_checkpoint:
      vqgan_params = restored['model_state']['vision_tokenizer']
    else:
      vqgan_config, _, vqgan_params = vision_tokenizer.load_vqgan(vision_tokenizer_dir or used['workdir'],
                                                                  None if vision_tokenizer_dir else used['step'])
    bins_path = os.path.join(workdir, actions.BINS_FILE)
    is_action = config.stage == 'finetune' or config.get('target') == 'action'
    laq = None if is_action else _read_json(os.path.join(workdir, LAQ_FILE))
    crop = float(config.augment.crop_area) if 'augment' in config else None
    return cls(config, restored['params'], vqgan_config, vqgan_params,
               bins=actions.load(bins_path) if is_action else None,
               latent_tokens=0 if is_action else int(laq['code_seq_len']), crop_area=crop,
               source=f'{os.path.abspath(workdir)}@{step}', laq=laq, **options)

  @classmethod
  def untrained(cls, size: str = 'tiny', *, seed: int = 0, **options) -> 'Policy':
    """Random weights at a backbone size of the built-in world (64x64 images, the demo VQGAN): the
    real program with meaningless actions, for benchmarks and tests; reads no files."""
    config = backbone.base_config('finetune', size)
    config.model.action_vocab_size = 256
    vqgan_config = vqgan.vqgan_config('demo')
    model = vla.VLA(backbone.model_config(config))
    rng_vla, rng_vqgan, rng_bins = jax.random.split(jax.random.key(seed), 3)
    params = jax.tree.map(lambda leaf: getattr(leaf, 'value', leaf), vla.init_params(model, rng_vla),
                          is_leaf=lambda leaf: hasattr(leaf, 'value'))
    images = jnp.zeros((1, vqgan_config.resolution, vqgan_config.resolution, 3))
    vqgan_params = vqgan.VQGAN(vqgan_config).init(rng_vqgan, images)['params']
    samples = np.asarray(jax.random.uniform(rng_bins, (4096, 7), minval=-1.0, maxval=1.0))
    return cls(config, params, vqgan_config, vqgan_params, bins=actions.fit(samples, 256), crop_area=0.9,
               source=f'untrained:{size}', **options)

  # ---------------------------------------------------------------------------------- inference

  @property
  def metadata(self) -> dict:
    """What a client may want to know (sent by serve.py on connect); JSON-able."""
    return {'kind': self.kind, 'image_size': self.image_size, 'action_dim': 7 if self.kind == 'action' else 0,
            'latent_tokens': self.num_tokens if self.kind == 'latent' else 0, 'source': self.source,
            'observation': {'image': 'uint8 (H, W, 3) RGB', 'instruction': 'str'}}

  def check_observation(self, obs: Any) -> dict:
    """One observation {'image': uint8 (H, W, 3), 'instruction': str}, checked; ObservationError names
    the field that is wrong."""
    if not isinstance(obs, dict):
      raise ObservationError(f"observation: expected a dict with 'image' and 'instruction', got {type(obs).__name__}")
    for key in ('image', 'instruction'):
      if key not in obs:
        raise ObservationError(f"observation field {key!r}: missing (got keys {sorted(map(str, obs))})")
    image = obs['image']
    if not isinstance(image, np.ndarray):
      raise ObservationError(f"observation field 'image': expected a numpy uint8 array, got {type(image).__name__}")
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3 or min(image.shape[:2]) < 8:
      raise ObservationError(f"observation field 'image': expected uint8 (H, W, 3) RGB with H, W >= 8, got "
                             f"{image.dtype} {image.shape}")
    instruction = obs['instruction']
    if isinstance(instruction, np.ndarray) and instruction.ndim == 0:
      instruction = instruction.item()
    if isinstance(instruction, bytes):
      instruction = instruction.decode('utf-8', 'replace')
    if not isinstance(instruction, str):
      raise ObservationError(f"observation field 'instruction': expected a string, got {type(instruction).__name__}")
    length = len(self._prompt(instruction)['tokens'])
    if length > self.prompt_length:
      raise ObservationError(f"observation field 'instruction': {length} prompt tokens, more than this policy's "
                             f"{self.prompt_length} (config seq_len); shorten it")
    return {'image': image, 'instruction': instruction}

  def infer(self, obs: dict) -> dict:
    """{'image': uint8 (H, W, 3) or (B, H, W, 3), 'instruction': str or B strings} ->
    {'actions': float32 (7,) or (B, 7), 'action_ids': int32 ...} or {'latent_action': int32 (k,) or (B, k)}."""
    if not isinstance(obs, dict) or 'image' not in obs or 'instruction' not in obs:
      self.check_observation(obs)  # raises, naming what is missing
    images = obs['image']
    single = isinstance(images, np.ndarray) and images.ndim == 3
    if single:
      checked = [self.check_observation(obs)]
    else:
      instructions = obs['instruction']
      if isinstance(instructions, (str, bytes)) or len(instructions) != len(images):
        raise ObservationError(f"observation field 'instruction': expected {len(images)} strings for a batch "
                               f"of {len(images)} images")
      checked = [self.check_observation({'image': image, 'instruction': text})
                 for image, text in zip(images, instructions)]
    ids = np.concatenate([self._infer_chunk(checked[start:start + self.max_batch])
                          for start in range(0, len(checked), self.max_batch)])
    result = ({'actions': self.bins.decode(ids), 'action_ids': ids} if self.kind == 'action'
              else {'latent_action': ids})
    return {name: value[0] for name, value in result.items()} if single else result

  def _prompt(self, instruction: str) -> dict[str, np.ndarray]:
    return sequences.generation_prompt(self.tokenizer, instruction, self._placeholders,
                                       codebook_size=self.vqgan_config.codebook_size, target=self._target,
                                       prompt=self.config.prompt)

  def _infer_chunk(self, observations: Sequence[dict]) -> np.ndarray:
    """(len(observations), num_tokens) int32 ids of at most max_batch checked observations."""
    size, padded = len(observations), _bucket(len(observations))
    prompts = [self._prompt(obs['instruction']) for obs in observations]
    prompts += prompts[-1:] * (padded - size)
    batch = sequences.pad_batch(prompts, self.prompt_length, left=True, pad_id=self.tokenizer.pad_id)
    images = [resize_uint8(obs['image'], self.image_size) for obs in observations]
    images = np.stack(images + images[-1:] * (padded - size))
    self._rng, rng = jax.random.split(self._rng)
    ids = self._act(self._params, self._vqgan_params, images, batch['tokens'], batch['modality'],
                    batch['attention_mask'], rng, self._allowed)
    return np.asarray(ids)[:size]

  def _act_fn(self, params, vqgan_params, images, tokens, modality, attention_mask, rng, allowed, *,
              temperature, top_k):
    views = augment.to_float(images)
    if self._crop_area is not None:
      views = augment.center_crop(views, self._crop_area)
    codes = self._vqgan.apply({'params': vqgan_params}, views, method=self._vqgan.encode)
    tokens = backbone.fill_positions(tokens, modality, codes.reshape(codes.shape[0], -1), VISION)
    return vla.generate(self._model, params, tokens, modality, attention_mask, rng, target=self._target,
                        num_tokens=self.num_tokens, temperature=temperature, top_k=top_k, allowed=allowed)


@functools.lru_cache(maxsize=None)
def _resizer(size: int):
  return jax.jit(lambda image: jnp.round(jax.image.resize(image.astype(jnp.float32), (size, size, 3), 'linear',
                                                          antialias=True)).clip(0, 255).astype(jnp.uint8))


def resize_uint8(image: np.ndarray, size: int) -> np.ndarray:
  """uint8 (H, W, 3) -> (size, size, 3): bilinear, antialiased, as tf.image.resize in the data pipeline."""
  if image.shape[:2] == (size, size):
    return image
  return np.asarray(_resizer(size)(image))


def _load_config(workdir: str) -> ml_collections.ConfigDict:
  """The config.json of a finetuning or latent-pretraining run."""
  path = os.path.join(workdir, 'config.json')
  made_by = '`lapa train configs/finetune.py:...` or `configs/latent_pretrain.py:...`'
  if not os.path.isfile(path):
    raise FileNotFoundError(f'{path}: missing; expected a finetuning or latent-pretraining workdir ({made_by})')
  stage = _read_json(path).get('stage')
  if stage not in STAGES:
    raise ValueError(f'{path}: stage is {stage!r}, not a finetuning or latent-pretraining run ({made_by})')
  return config_lib.load_workdir(workdir, stage, made_by)
