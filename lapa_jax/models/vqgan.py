"""The LWM VQGAN image tokenizer (MaskGIT-style, no attention), with configurable width and depth.

Encoder: Conv3x3 -> one DownsamplingBlock per level (`num_res_blocks` ResnetBlocks, then a stride-2
conv except at the last level) -> MidBlock (2 ResnetBlocks) -> GroupNorm -> SiLU -> Conv3x3 to
`z_channels`; `quant_conv` (1x1) -> nearest of `codebook_size` codes by squared L2. The decoder
mirrors it with `num_res_blocks + 1` ResnetBlocks per level and nearest x2 upsampling + Conv3x3.
With the LWM preset a 256x256 image becomes 16x16 = 256 codes of 8192.

Module and param names are LWM's (`encoder/DownsamplingBlock_0/ResnetBlock_0/Conv_0/kernel`,
`quantize/embeddings`, `quant_conv`, `post_quant_conv`, ...), created in LWM's order, so its
pickled params load as they are (`lapa_jax.convert.lwm_vqgan`). LWM's attention blocks are off in
its config (no attention resolutions, no mid-block attention) and are not implemented.

Images here are float `(..., height, width, 3)` in [0, 1] (LWM works in [-1, 1]; the conversion is
inside).
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class VQGANConfig:
  resolution: int = 256
  channels: int = 3
  hidden_channels: int = 128
  channel_mult: tuple[int, ...] = (1, 2, 2, 4, 6)
  num_res_blocks: int = 2
  z_channels: int = 64
  codebook_size: int = 8192
  embed_dim: int = 64
  norm_groups: int = 32
  commitment_cost: float = 0.25

  def __post_init__(self):
    if self.resolution % (2 ** (len(self.channel_mult) - 1)):
      raise ValueError(f'VQGANConfig: resolution {self.resolution} is not divisible by '
                       f'2^{len(self.channel_mult) - 1} (one halving per level but the last)')

  @property
  def tokens_per_side(self) -> int:
    return self.resolution // 2 ** (len(self.channel_mult) - 1)

  @property
  def tokens_per_image(self) -> int:
    return self.tokens_per_side ** 2


PRESETS = {
    'lwm': dict(),  # LWM / LAPA: 256x256 -> 16x16 codes of 8192 x 64.
    'small': dict(resolution=64, hidden_channels=64, channel_mult=(1, 2, 2, 4), z_channels=32,
                  codebook_size=1024, embed_dim=32),  # the built-in 64x64 world: 8x8 codes.
    'demo': dict(resolution=64, hidden_channels=16, channel_mult=(1, 1, 2, 2), num_res_blocks=1, z_channels=16,
                 codebook_size=1024, embed_dim=8, norm_groups=8),  # the built-in world in minutes on a CPU.
    'tiny': dict(resolution=16, hidden_channels=16, channel_mult=(1, 2), num_res_blocks=1, z_channels=8,
                 codebook_size=32, embed_dim=8, norm_groups=8),  # tests: 8x8 codes.
}


def vqgan_config(preset: str = 'lwm', **overrides) -> VQGANConfig:
  if preset not in PRESETS:
    raise ValueError(f'VQGAN preset {preset!r}: expected one of {sorted(PRESETS)}')
  return VQGANConfig(**{**PRESETS[preset], **overrides})


def from_config(model_config) -> VQGANConfig:
  """A config's `model` group (ConfigDict or dict with every VQGANConfig field, e.g. read back from a
  workdir's config.json, where tuples became lists) -> VQGANConfig."""
  given = model_config.to_dict() if hasattr(model_config, 'to_dict') else dict(model_config)
  fields = {field.name: field for field in dataclasses.fields(VQGANConfig)}
  unknown = sorted(set(given) - set(fields))
  missing = sorted(set(fields) - set(given))
  if unknown or missing:
    raise ValueError(f'config field model: expected the VQGAN fields {", ".join(fields)}; '
                     + '; '.join(f'{kind}: {", ".join(names)}' for kind, names in
                                 (('unknown', unknown), ('missing', missing)) if names))
  values = {name: float(value) if name == 'commitment_cost' else
            tuple(int(m) for m in value) if name == 'channel_mult' else int(value)
            for name, value in given.items()}
  return VQGANConfig(**values)


def config_fields(config: VQGANConfig) -> dict:
  """The inverse of `from_config`: every field of `config`, e.g. for a stage config's `model` group."""
  return dataclasses.asdict(config)


class ResnetBlock(nn.Module):
  """GN -> SiLU -> Conv3 -> GN -> SiLU -> Conv3, plus a 1x1 shortcut when the width changes."""
  out_channels: int | None
  norm_groups: int

  @nn.compact
  def __call__(self, x: Array) -> Array:
    out_channels = self.out_channels or x.shape[-1]
    h = nn.Conv(out_channels, (3, 3))(nn.silu(nn.GroupNorm(self.norm_groups)(x)))
    h = nn.Conv(out_channels, (3, 3))(nn.silu(nn.GroupNorm(self.norm_groups)(h)))
    if out_channels != x.shape[-1]:
      x = nn.Conv(out_channels, (1, 1))(x)
    return x + h


class Downsample(nn.Module):
  @nn.compact
  def __call__(self, x: Array) -> Array:
    # Pad bottom/right only, then a VALID stride-2 conv: LWM's (and taming's) exact halving.
    x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
    return nn.Conv(x.shape[-1], (3, 3), strides=(2, 2), padding='VALID')(x)


class Upsample(nn.Module):
  @nn.compact
  def __call__(self, x: Array) -> Array:
    batch, height, width, channels = x.shape
    x = jax.image.resize(x, (batch, height * 2, width * 2, channels), method='nearest')
    return nn.Conv(channels, (3, 3))(x)


class DownsamplingBlock(nn.Module):
  config: VQGANConfig
  level: int

  @nn.compact
  def __call__(self, x: Array) -> Array:
    config = self.config
    for _ in range(config.num_res_blocks):
      x = ResnetBlock(config.hidden_channels * config.channel_mult[self.level], config.norm_groups)(x)
    if self.level != len(config.channel_mult) - 1:
      x = Downsample()(x)
    return x


class UpsamplingBlock(nn.Module):
  config: VQGANConfig
  level: int

  @nn.compact
  def __call__(self, x: Array) -> Array:
    config = self.config
    for _ in range(config.num_res_blocks + 1):
      x = ResnetBlock(config.hidden_channels * config.channel_mult[self.level], config.norm_groups)(x)
    if self.level != 0:
      x = Upsample()(x)
    return x


class MidBlock(nn.Module):
  norm_groups: int

  @nn.compact
  def __call__(self, x: Array) -> Array:
    x = ResnetBlock(None, self.norm_groups)(x)
    return ResnetBlock(None, self.norm_groups)(x)


class Encoder(nn.Module):
  config: VQGANConfig

  @nn.compact
  def __call__(self, x: Array) -> Array:
    config = self.config
    x = nn.Conv(config.hidden_channels, (3, 3))(x)
    for level in range(len(config.channel_mult)):
      x = DownsamplingBlock(config, level)(x)
    x = MidBlock(config.norm_groups)(x)
    x = nn.silu(nn.GroupNorm(config.norm_groups)(x))
    return nn.Conv(config.z_channels, (3, 3))(x)


class Decoder(nn.Module):
  config: VQGANConfig

  @nn.compact
  def __call__(self, x: Array) -> Array:
    config = self.config
    x = nn.Conv(config.hidden_channels * config.channel_mult[-1], (3, 3))(x)
    x = MidBlock(config.norm_groups)(x)
    for level in reversed(range(len(config.channel_mult))):
      x = UpsamplingBlock(config, level)(x)
    x = nn.silu(nn.GroupNorm(config.norm_groups)(x))
    return nn.Conv(config.channels, (3, 3))(x)


class VectorQuantizer(nn.Module):
  codebook_size: int
  embed_dim: int

  def setup(self):
    limit = 1.0 / self.codebook_size
    self.embeddings = self.param(
        'embeddings', lambda rng, shape: jax.random.uniform(rng, shape, jnp.float32, -limit, limit),
        (self.codebook_size, self.embed_dim))

  def nearest(self, z: Array) -> Array:
    """Code ids `(...)` of the nearest embeddings (squared L2, float32) to `z (..., embed_dim)`."""
    z = z.astype(jnp.float32)
    distances = (jnp.sum(z ** 2, axis=-1, keepdims=True) + jnp.sum(self.embeddings ** 2, axis=-1)
                 - 2 * jnp.einsum('...d,nd->...n', z, self.embeddings))
    return jnp.argmin(distances, axis=-1).astype(jnp.int32)

  def lookup(self, codes: Array) -> Array:
    return jnp.take(self.embeddings, codes, axis=0)


class VQGAN(nn.Module):
  config: VQGANConfig

  def setup(self):
    config = self.config
    self.encoder = Encoder(config)
    self.decoder = Decoder(config)
    self.quantize = VectorQuantizer(config.codebook_size, config.embed_dim)
    self.quant_conv = nn.Conv(config.embed_dim, (1, 1))
    self.post_quant_conv = nn.Conv(config.z_channels, (1, 1))

  def _latents(self, images: Array) -> Array:
    config = self.config
    if images.shape[-3:] != (config.resolution, config.resolution, config.channels):
      raise ValueError(f'VQGAN: expected images (..., {config.resolution}, {config.resolution}, '
                       f'{config.channels}), got {images.shape}')
    flat = images.reshape(-1, *images.shape[-3:]) * 2.0 - 1.0
    return self.quant_conv(self.encoder(flat))

  def encode(self, images: Array) -> Array:
    """Images `(..., resolution, resolution, channels)` in [0, 1] -> codes `(..., side, side)` int32."""
    codes = self.quantize.nearest(self._latents(images))
    return codes.reshape(*images.shape[:-3], *codes.shape[1:])

  def decode_latents(self, latents: Array, clip_output: bool = True) -> Array:
    images = self.decoder(self.post_quant_conv(latents))
    if clip_output:
      images = jnp.clip(images, -1.0, 1.0)
    return (images + 1.0) / 2.0

  def decode(self, codes: Array) -> Array:
    """Codes `(..., side, side)` -> images `(..., resolution, resolution, channels)` in [0, 1]."""
    flat = codes.reshape(-1, *codes.shape[-2:])
    images = self.decode_latents(self.quantize.lookup(flat))
    return images.reshape(*codes.shape[:-2], *images.shape[1:])

  def __call__(self, images: Array, clip_output: bool = True) -> tuple[Array, Array, dict[str, Array]]:
    """Training pass: (reconstruction in [0, 1], codes, {'codebook_loss', 'commitment_loss'}).

    The quantized latents pass the decoder's gradient straight through to the encoder. Training
    should pass `clip_output=False`: a clipped pixel gets no gradient, so one that overshoots [0, 1]
    where the target is inside would stay wrong. The encoder's latents `(images, side, side,
    embed_dim)` are sown as `intermediates/latents` (apply with `mutable=['intermediates']`), e.g.
    to revive dead codes from.
    """
    latents = self._latents(images)
    self.sow('intermediates', 'latents', latents)
    codes = self.quantize.nearest(latents)
    quantized = self.quantize.lookup(codes)
    losses = dict(codebook_loss=jnp.mean((jax.lax.stop_gradient(latents) - quantized) ** 2),
                  commitment_loss=self.config.commitment_cost
                  * jnp.mean((latents - jax.lax.stop_gradient(quantized)) ** 2))
    straight_through = latents + jax.lax.stop_gradient(quantized - latents)
    reconstruction = self.decode_latents(straight_through, clip_output).reshape(images.shape)
    return reconstruction, codes.reshape(*images.shape[:-3], *codes.shape[1:]), losses
