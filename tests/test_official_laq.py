"""Official LAQ weights: the torch-free .pt reader, strict conversion, and exact parity with PyTorch.

The fixture holds a tiny official LAQ (state dict as .pt and .npz, its constructor arguments, input
pairs, and the official model's codes, reconstructions and forced-code reconstructions).
"""

import pickle
import zipfile

import jax
import numpy as np
import pytest

from lapa_jax import laq_infer
from lapa_jax.convert import cli as convert_cli
from lapa_jax.convert import official_laq, torch_pickle
from lapa_jax.models import laq


@pytest.fixture(scope='module')
def fixture(official_laq_dir):
  config = official_laq.load_config(official_config=str(official_laq_dir / 'laq_tiny_config.json'))
  with np.load(official_laq_dir / 'laq_tiny_io.npz') as data:
    io_arrays = {key: data[key] for key in data.files}
  return official_laq_dir, config, io_arrays


@pytest.fixture(scope='module')
def official_model(fixture):
  directory, config, io_arrays = fixture
  model = laq.from_config(config.model)
  params = official_laq.convert_state_dict(official_laq.load_state_dict(str(directory / 'laq_tiny.pt')), config.model)
  forward = jax.jit(lambda p, v: model.apply({'params': p}, v))
  decode = jax.jit(lambda p, frame, codes: model.apply({'params': p}, frame, codes, method=model.decode_codes))
  return model, params, forward, decode


def test_pt_reader_matches_the_npz_state_dict(official_laq_dir):
  state = torch_pickle.load(str(official_laq_dir / 'laq_tiny.pt'))
  with np.load(official_laq_dir / 'laq_tiny_state_dict.npz') as reference:
    assert sorted(state) == sorted('module.' + key for key in reference.files)  # saved from DDP
    for key in reference.files:
      assert state['module.' + key].dtype == reference[key].dtype
      np.testing.assert_array_equal(state['module.' + key], reference[key])
  assert state['module.enc_spatial_transformer.layers.0.1.null_kv'].shape == (4, 0, 16)  # empty tensors too


def test_pt_reader_refuses_code_in_the_pickle(tmp_path):
  class Exploit:
    def __reduce__(self):
      return (print, ('pwned',))

  path = tmp_path / 'evil.pt'
  with zipfile.ZipFile(path, 'w') as archive:
    archive.writestr('evil/data.pkl', pickle.dumps({'weight': Exploit()}, protocol=2))
  with pytest.raises(pickle.UnpicklingError, match='unsupported object (__builtin__|builtins).print'):
    torch_pickle.load(str(path))
  (tmp_path / 'not_a_zip.pt').write_bytes(b'\x80\x02}q\x00.')
  with pytest.raises(ValueError, match='not a PyTorch zip checkpoint'):
    torch_pickle.load(str(tmp_path / 'not_a_zip.pt'))


def test_pt_reader_handles_views_dtypes_and_shared_storage(tmp_path):
  torch = pytest.importorskip('torch')  # only to write the file; reading never needs it
  base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
  tensors = {'transposed': base.t(), 'strided': base[:, 1::2], 'offset': base[2], 'scalar': torch.tensor(3.5),
             'half': torch.ones(3, dtype=torch.float16) / 3, 'bf16': torch.ones(2, dtype=torch.bfloat16) * 1.5,
             'long': torch.tensor([1, -2], dtype=torch.int64), 'bool': torch.tensor([True, False]),
             'param': torch.nn.Parameter(torch.ones(2, 2))}
  path = tmp_path / 'views.pt'
  torch.save(tensors, path)
  loaded = torch_pickle.load(str(path))
  for key, tensor in tensors.items():
    expected = tensor.detach().float().numpy() if key == 'bf16' else tensor.detach().numpy()
    np.testing.assert_array_equal(np.asarray(loaded[key], expected.dtype), expected, err_msg=key)
  assert loaded['half'].dtype == np.float16 and loaded['long'].dtype == np.int64


@pytest.mark.parametrize('state_file', ['laq_tiny.pt', 'laq_tiny_state_dict.npz'])
def test_official_variant_reproduces_the_official_outputs(fixture, official_model, state_file):
  directory, config, io_arrays = fixture
  model, _, forward, decode = official_model
  params = official_laq.convert_state_dict(official_laq.load_state_dict(str(directory / state_file)), config.model)
  video = laq_infer.to_model_layout(io_arrays['video'], 32, 3)  # official (batch, 3, 2, H, W) layout
  out = forward(params, video)
  np.testing.assert_array_equal(np.asarray(out['indices']), io_arrays['indices'])
  recon = np.asarray(out['recon']).transpose(0, 3, 1, 2)
  assert np.abs(recon - io_arrays['recon']).max() <= 1e-4
  forced = np.asarray(decode(params, video[:, 0], io_arrays['forced_codes'].astype(np.int32))).transpose(0, 3, 1, 2)
  assert np.abs(forced - io_arrays['recon_forced']).max() <= 1e-4


def test_a_single_pair_gives_the_same_output_as_in_a_batch(fixture, official_model):
  # Guards against a miscompilation seen with XLA:CPU (jax 0.10.2): a broadcast-multiply-reduce
  # formulation of the time attention gave wrong values for a batch of one at these sizes.
  _, _, io_arrays = fixture
  _, params, forward, _ = official_model
  video = laq_infer.to_model_layout(io_arrays['video'], 32, 3)
  single = forward(params, video[1:2])
  np.testing.assert_array_equal(np.asarray(single['indices']), io_arrays['indices'][1:2])
  assert np.abs(np.asarray(single['recon']).transpose(0, 3, 1, 2) - io_arrays['recon'][1:2]).max() <= 1e-4


def test_lapa_variant_differs_on_official_weights(fixture, official_model):
  _, config, io_arrays = fixture
  _, params, forward, _ = official_model
  lapa = laq.from_config({**config.model.to_dict(), 'variant': 'lapa'})
  video = laq_infer.to_model_layout(io_arrays['video'], 32, 3)
  recon = np.asarray(jax.jit(lambda p, v: lapa.apply({'params': p}, v)['recon'])(params, video))
  assert np.abs(recon.transpose(0, 3, 1, 2) - io_arrays['recon']).max() > 1e-2  # the quirks matter


def test_conversion_is_strict(fixture):
  directory, config, _ = fixture
  state = official_laq.load_state_dict(str(directory / 'laq_tiny_state_dict.npz'))
  missing = {k: v for k, v in state.items() if k != 'vq.codebooks'}
  with pytest.raises(official_laq.ConversionError, match=r'missing keys: vq\.codebooks'):
    official_laq.convert_state_dict(missing, config.model)
  with pytest.raises(official_laq.ConversionError, match=r'unexpected keys: vq\.extra'):
    official_laq.convert_state_dict({**state, 'vq.extra': np.zeros(1)}, config.model)
  bad = dict(state, **{'vq.codebooks': np.zeros((16, 8), np.float32)})
  with pytest.raises(official_laq.ConversionError, match=r'vq\.codebooks has shape \(16, 8\), the config expects \(8, 8\)'):
    official_laq.convert_state_dict(bad, config.model)
  beta = 'dec_spatial_transformer.norm_out.beta'
  with pytest.raises(official_laq.ConversionError, match='beta buffers must be zero'):
    official_laq.convert_state_dict(dict(state, **{beta: np.ones(64, np.float32)}), config.model)
  wrong_depth = official_laq.load_config(official_config=str(directory / 'laq_tiny_config.json'),
                                         overrides=['--config.model.spatial_depth=3', '--config.model.decoder_depth=3'])
  with pytest.raises(official_laq.ConversionError, match=r'missing keys: .*layers\.2'):
    official_laq.convert_state_dict(state, wrong_depth.model)


def test_convert_and_infer_commands(fixture, tmp_path, capsys):
  directory, _, io_arrays = fixture
  out_dir = tmp_path / 'converted'
  assert convert_cli.main(['official-laq', str(directory / 'laq_tiny.pt'), str(out_dir),
                           '--official-config', str(directory / 'laq_tiny_config.json')]) == 0
  pairs = tmp_path / 'pairs.npz'
  np.savez(pairs, video=io_arrays['video'].transpose(0, 2, 3, 4, 1))  # lapa_jax layout this time
  codes = tmp_path / 'codes.npz'
  assert laq_infer.main(['--checkpoint', str(out_dir), '--pairs', str(pairs), '--out', str(codes)]) == 0
  with np.load(codes) as result:
    np.testing.assert_array_equal(result['indices'], io_arrays['indices'])
    assert result['latents'].shape == (*io_arrays['indices'].shape, fixture[1].model.quant_dim)
    assert np.abs(result['recon'].transpose(0, 3, 1, 2) - io_arrays['recon']).max() <= 1e-4
  assert convert_cli.main(['no-such-source']) == 2
  assert 'official-laq' in capsys.readouterr().err


def test_infer_rejects_bad_layouts():
  with pytest.raises(ValueError, match=r'pairs.npz: video: expected shape \(batch, 2, 32, 32, 3\) or the official'):
    laq_infer.to_model_layout(np.zeros((2, 2, 16, 16, 3), np.float32), 32, 3, 'pairs.npz: video')
  frames = laq_infer.to_model_layout(np.full((1, 2, 32, 32, 3), 255, np.uint8), 32, 3)
  assert frames.dtype == np.float32 and frames.max() == 1.0
