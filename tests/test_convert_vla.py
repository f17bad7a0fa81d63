"""Importers/exporters of the VLA backbone and VQGAN: EasyLM/LWM streaming params, LWM's VQGAN pickle,
Hugging Face safetensors. Every test writes its own tiny checkpoint in the foreign format."""

import functools
import json
import os
import pickle
import struct

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import traverse_util
from flax.core import FrozenDict

from lapa_jax.convert import easylm, hf_llama, lwm_vqgan
from lapa_jax.models import llama, vqgan


def _draw(abstract, seed=0):
  """Random params in the shapes of `abstract` (norms 1), without compiling an init."""
  rng = np.random.RandomState(seed)

  def draw(path, leaf):
    is_norm = any(k in str(path[-2:]) for k in ('norm', 'ln_f', 'scale'))
    return np.ones(leaf.shape, np.float32) if is_norm else rng.normal(0, 0.02, leaf.shape).astype(np.float32)

  return jax.tree.map_with_path(draw, nn.unbox(abstract))


@functools.lru_cache(maxsize=None)
def _vla_params(spec='vla:tiny'):
  _, init_fn = easylm.model_from_spec(spec)
  return _draw(jax.eval_shape(init_fn, jax.random.key(0)))


def _assert_trees_equal(a, b):
  flat_a, flat_b = traverse_util.flatten_dict(a), traverse_util.flatten_dict(b)
  assert set(flat_a) == set(flat_b)
  for key in flat_a:
    np.testing.assert_array_equal(np.asarray(flat_a[key], np.float32), np.asarray(flat_b[key], np.float32),
                                  err_msg='/'.join(key))


# ------------------------------------------------------------------------------------ EasyLM / LWM

def test_lapa_7b_param_names_are_the_released_checkpoints():
  """The keys and shapes of LAPA-7B (latent pretraining) and its finetuned variant, as the released
  streaming files name them (reference/official_lapa.md §2.3, jax_recipes.md §1.3)."""
  layer = {'attention/wq/kernel': (32, 4096, 4096), 'attention/wk/kernel': (32, 4096, 4096),
           'attention/wv/kernel': (32, 4096, 4096), 'attention/wo/kernel': (32, 4096, 4096),
           'feed_forward/w1/kernel': (32, 4096, 11008), 'feed_forward/w3/kernel': (32, 4096, 11008),
           'feed_forward/w2/kernel': (32, 11008, 4096), 'attention_norm/kernel': (32, 4096),
           'ffn_norm/kernel': (32, 4096)}
  expected = {**{f'transformer/h/scan_decoder/{k}': v for k, v in layer.items()},
              'transformer/wte/embedding': (32000, 4096), 'transformer/vte/embedding': (8448, 4096),
              'transformer/dte/embedding': (8, 4096), 'transformer/ln_f/kernel': (4096,),
              'lm_head/kernel': (4096, 32000), 'vision_head/kernel': (4096, 8448), 'delta_head/kernel': (4096, 8)}
  for spec, extra in (('vla:7b', {}), ('vla:7b,action_vocab_size=256',
                                      {'transformer/ate/embedding': (256, 4096), 'action_head/kernel': (4096, 256)})):
    _, init_fn = easylm.model_from_spec(spec)
    abstract = nn.unbox(jax.eval_shape(init_fn, jax.random.key(0)))
    names = {k: v.shape for k, v in traverse_util.flatten_dict(abstract, sep='/').items()}
    assert names == {**expected, **extra}


@pytest.mark.parametrize('layout', ['scanned', 'unscanned'])
def test_streaming_round_trip(tmp_path, layout):
  params = _vla_params()
  path = str(tmp_path / 'params')
  easylm.export_easylm(params, path, layout=layout, float_dtype='fp32')
  keys = set(easylm.read_streaming(path))
  assert (('transformer', 'h', '1', 'attention', 'wq', 'kernel') in keys) == (layout == 'unscanned')
  imported, filled = easylm.import_easylm(path, 'vla:tiny')
  assert not filled
  _assert_trees_equal(imported, params)


def test_streaming_bf16_and_trainstate_prefix(tmp_path):
  """EasyLM's default bf16 floats, and keys nested under ('params', 'params') as in trainstate files."""
  params = _vla_params()
  flat = {('params', 'params') + k: v for k, v in easylm.flatten(params).items()}
  path = str(tmp_path / 'params')
  easylm.write_streaming(flat, path)  # bf16
  imported, _ = easylm.import_easylm(path, 'vla:tiny')
  wq = imported['transformer']['h']['scan_decoder']['attention']['wq']['kernel']
  assert wq.dtype == ml_dtypes.bfloat16
  source = params['transformer']['h']['scan_decoder']['attention']['wq']['kernel']
  np.testing.assert_array_equal(wq, source.astype(ml_dtypes.bfloat16))
  float32, _ = easylm.import_easylm(path, 'vla:tiny', dtype='float32')
  assert float32['lm_head']['kernel'].dtype == np.float32


def test_cli_import_to_workdir_and_export_back(tmp_path):
  params = _vla_params()
  source, workdir, exported = str(tmp_path / 'lwm_params'), str(tmp_path / 'run'), str(tmp_path / 'out_params')
  easylm.export_easylm(params, source, float_dtype='fp32')
  assert easylm.main(['import', source, workdir, '--model', 'vla:tiny']) == 0
  assert os.path.isdir(os.path.join(workdir, 'checkpoints', '0')) and not os.path.exists(workdir + '.tmp')
  _assert_trees_equal(easylm.load_params_checkpoint(workdir), params)
  assert easylm.main(['export', workdir, exported, '--float-dtype', 'fp32']) == 0
  assert easylm.read_streaming(exported).keys() == easylm.read_streaming(source).keys()
  _assert_trees_equal(traverse_util.unflatten_dict(easylm.read_streaming(exported)), params)
  with pytest.raises(SystemExit):  # an existing output is never overwritten
    easylm.main(['import', source, workdir, '--model', 'vla:tiny'])


def test_unknown_missing_and_misshaped_tensors_are_named(tmp_path):
  flat = easylm.flatten(_vla_params())
  path = str(tmp_path / 'params')

  def import_with(entries, **kwargs):
    easylm.write_streaming(entries, path, 'fp32')
    return easylm.import_easylm(path, 'vla:tiny', **kwargs)

  with pytest.raises(ValueError, match='unknown tensors: transformer/extra/kernel'):
    import_with({**flat, ('transformer', 'extra', 'kernel'): np.zeros(3)})
  bad = dict(flat)
  bad[('delta_head', 'kernel')] = np.zeros((64, 9), np.float32)
  with pytest.raises(ValueError, match=r'mis-shaped tensors: delta_head/kernel \(64, 9\) \(expected \(64, 8\)\)'):
    import_with(bad)
  # An LWM file has no latent-action table or head: an error unless asked to initialise them.
  lwm = {k: v for k, v in flat.items() if k[-2] not in ('dte', 'delta_head')}
  with pytest.raises(ValueError, match='missing tensors: delta_head/kernel, transformer/dte/embedding'):
    import_with(lwm)
  params, filled = import_with(lwm, init_missing=True)
  assert filled == ['delta_head/kernel', 'transformer/dte/embedding']
  assert abs(float(np.std(params['delta_head']['kernel'])) - 0.02) < 0.01  # the model's N(0, 0.02)
  np.testing.assert_array_equal(params['lm_head']['kernel'], flat[('lm_head', 'kernel')])
  with open(path, 'wb') as stream:
    stream.write(b'not msgpack at all')
  with pytest.raises(ValueError, match='streaming params file'):
    easylm.read_streaming(path)


# --------------------------------------------------------------------------------------- VQGAN

@functools.lru_cache(maxsize=None)
def _vqgan_params():
  config = vqgan.vqgan_config('tiny')
  images = jnp.zeros((1, config.resolution, config.resolution, 3))
  return _draw(jax.eval_shape(vqgan.VQGAN(config).init, jax.random.key(0), images)['params'])


def test_vqgan_pickle_round_trip(tmp_path):
  params = _vqgan_params()
  source = tmp_path / 'vqgan'
  # LWM pickles whatever its params tree was: here a FrozenDict of jax arrays.
  with open(source, 'wb') as stream:
    pickle.dump(FrozenDict(jax.tree.map(jnp.asarray, params)), stream)
  _assert_trees_equal(lwm_vqgan.import_vqgan(str(source), 'tiny'), params)
  workdir, exported = str(tmp_path / 'run'), str(tmp_path / 'exported_vqgan')
  assert lwm_vqgan.main(['import', str(source), workdir, '--preset', 'tiny']) == 0
  assert lwm_vqgan.main(['export', workdir, exported]) == 0
  with open(exported, 'rb') as stream:
    plain = pickle.load(stream)
  assert isinstance(plain, dict) and isinstance(plain['quantize']['embeddings'], np.ndarray)
  _assert_trees_equal(plain, params)


def test_vqgan_pickle_refuses_code_and_checks_shapes(tmp_path):
  class Exploit:
    def __reduce__(self):
      return (os.system, ('echo pwned',))

  path = tmp_path / 'vqgan'
  with open(path, 'wb') as stream:
    pickle.dump({'encoder': Exploit()}, stream)
  with pytest.raises(ValueError, match='refusing to load'):
    lwm_vqgan.read_pickle(str(path))
  params = jax.tree.map(np.asarray, _vqgan_params())
  params = {**params, 'quantize': {'embeddings': np.zeros((16, 8), np.float32)}}
  lwm_vqgan.write_pickle(params, str(path))
  with pytest.raises(ValueError, match=r'quantize/embeddings \(16, 8\) \(expected \(32, 8\)\)'):
    lwm_vqgan.import_vqgan(str(path), 'tiny')


# -------------------------------------------------------------------------------- Hugging Face

def _write_safetensors(path, tensors):
  """The safetensors layout: u64 header size, JSON header, raw little-endian data."""
  codes = {np.dtype(np.float32): 'F32', np.dtype(ml_dtypes.bfloat16): 'BF16'}
  header, blobs, offset = {'__metadata__': {'format': 'pt'}}, [], 0
  for name, value in tensors.items():
    data = np.ascontiguousarray(value).tobytes()
    header[name] = {'dtype': codes[value.dtype], 'shape': list(value.shape),
                    'data_offsets': [offset, offset + len(data)]}
    blobs.append(data)
    offset += len(data)
  encoded = json.dumps(header).encode()
  with open(path, 'wb') as stream:
    stream.write(struct.pack('<Q', len(encoded)) + encoded + b''.join(blobs))


def _to_hf(params, config):
  """lapa_jax -> HF names, (out, in) weights and rotate-half q/k order (what HF's conversion does)."""
  layers = params['transformer']['h']['scan_decoder']
  half = config.head_dim // 2

  def interleaved_to_rotate_half(kernel):
    width = kernel.shape[0]
    return kernel.reshape(width, config.num_heads, half, 2).transpose(0, 1, 3, 2).reshape(kernel.shape)

  tensors = {'model.embed_tokens.weight': params['transformer']['wte']['embedding'],
             'model.norm.weight': params['transformer']['ln_f']['kernel'],
             'lm_head.weight': params['lm_head']['kernel'].T}
  names = {'q_proj': ('attention', 'wq'), 'k_proj': ('attention', 'wk'), 'v_proj': ('attention', 'wv'),
           'o_proj': ('attention', 'wo'), 'gate_proj': ('feed_forward', 'w1'), 'up_proj': ('feed_forward', 'w3'),
           'down_proj': ('feed_forward', 'w2')}
  for i in range(config.num_layers):
    for hf_name, (group, name) in names.items():
      kernel = layers[group][name]['kernel'][i]
      if name in ('wq', 'wk'):
        kernel = interleaved_to_rotate_half(kernel)
      prefix = 'self_attn' if group == 'attention' else 'mlp'
      tensors[f'model.layers.{i}.{prefix}.{hf_name}.weight'] = kernel.T
    tensors[f'model.layers.{i}.input_layernorm.weight'] = layers['attention_norm']['kernel'][i]
    tensors[f'model.layers.{i}.post_attention_layernorm.weight'] = layers['ffn_norm']['kernel'][i]
  return {k: np.ascontiguousarray(v) for k, v in tensors.items()}


def _hf_config(config, **changes):
  return {'model_type': 'llama', 'vocab_size': config.vocab_size, 'hidden_size': config.hidden_size,
          'intermediate_size': config.intermediate_size, 'num_hidden_layers': config.num_layers,
          'num_attention_heads': config.num_heads, 'num_key_value_heads': config.num_heads, 'rms_norm_eps': 1e-6,
          'rope_theta': 5e7, 'hidden_act': 'silu', 'tie_word_embeddings': False, **changes}


def _write_hf(directory, tensors, config_json, shards=1):
  os.makedirs(directory, exist_ok=True)
  with open(os.path.join(directory, 'config.json'), 'w') as stream:
    json.dump(config_json, stream)
  if shards == 1:
    _write_safetensors(os.path.join(directory, 'model.safetensors'), tensors)
    return
  names, weight_map = sorted(tensors), {}
  for shard in range(shards):
    file = f'model-{shard + 1:05d}-of-{shards:05d}.safetensors'
    part = {n: tensors[n] for n in names[shard::shards]}
    weight_map.update({n: file for n in part})
    _write_safetensors(os.path.join(directory, file), part)
  with open(os.path.join(directory, 'model.safetensors.index.json'), 'w') as stream:
    json.dump({'metadata': {}, 'weight_map': weight_map}, stream)


def test_hf_import_inverts_hf_layout_sharded_and_bf16(tmp_path):
  config = llama.llama_config('tiny')
  params = _vla_params('llama:tiny')
  _write_hf(tmp_path / 'hf', _to_hf(params, config), _hf_config(config), shards=3)
  imported_config, imported, filled = hf_llama.import_hf(str(tmp_path / 'hf'))
  assert imported_config == config and not filled
  _assert_trees_equal(imported, params)
  # bf16 files (most LLaMA checkpoints) are read without the safetensors package.
  bf16 = {k: v.astype(ml_dtypes.bfloat16) for k, v in _to_hf(params, config).items()}
  _write_hf(tmp_path / 'hf_bf16', bf16, _hf_config(config))
  _, imported, _ = hf_llama.import_hf(str(tmp_path / 'hf_bf16'))
  assert imported['lm_head']['kernel'].dtype == np.float32
  np.testing.assert_array_equal(imported['lm_head']['kernel'], params['lm_head']['kernel'].astype(ml_dtypes.bfloat16))


def test_hf_import_as_vla_backbone_and_errors(tmp_path):
  config = llama.llama_config('tiny')
  params = _vla_params('llama:tiny')
  tensors = _to_hf(params, config)
  _write_hf(tmp_path / 'hf', tensors, _hf_config(config))
  assert hf_llama.main([str(tmp_path / 'hf'), str(tmp_path / 'run'), '--model', 'vla:tiny', '--init-missing']) == 0
  vla_params = easylm.load_params_checkpoint(str(tmp_path / 'run'))
  np.testing.assert_array_equal(vla_params['transformer']['wte']['embedding'],
                                params['transformer']['wte']['embedding'])
  assert vla_params['transformer']['vte']['embedding'].shape == (136, 64)
  with pytest.raises(ValueError, match='rope_theta'):
    hf_llama.import_hf(str(tmp_path / 'hf'), 'vla:tiny,rope_theta=10000.0')
  _write_hf(tmp_path / 'gqa', tensors, _hf_config(config, num_key_value_heads=2))
  with pytest.raises(ValueError, match='grouped-query attention'):
    hf_llama.import_hf(str(tmp_path / 'gqa'))
  _write_hf(tmp_path / 'extra', {**tensors, 'model.layers.0.self_attn.q_norm.weight': np.ones(4, np.float32)},
            _hf_config(config))
  with pytest.raises(ValueError, match=r'unknown tensors: model.layers.0.self_attn.q_norm.weight'):
    hf_llama.import_hf(str(tmp_path / 'extra'))
  with pytest.raises(FileNotFoundError, match='config.json'):
    hf_llama.import_hf(str(tmp_path))
