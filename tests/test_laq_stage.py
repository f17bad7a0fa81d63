"""The LAQ stage: dead-code revival on crafted states, configs, training on the built-in world and
Bridge, and the 8-device step against the 1-device step."""

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lapa_jax import config as config_lib
from lapa_jax.envs import writer
from lapa_jax.train import laq as laq_stage
from lapa_jax.train import loop

CONFIG = str(pathlib.Path(__file__).resolve().parents[1] / 'configs' / 'laq.py')
CODES, QUANT = 8, 4


def revival_config(**overrides):
  # The official schedule unless a test names another: the presets choose their own.
  overrides = {'schedule': 'official', **overrides}
  return config_lib.load(f'{CONFIG}:tiny', [f'--config.revival.{k}={v}' for k, v in overrides.items()]).revival


def crafted_state(step, usage, codebook=None):
  """A TrainState whose params hold only a codebook, with Adam moments that are all ones, and a
  pool of latents 1000 + row index."""
  codebook = jnp.arange(CODES * QUANT, dtype=jnp.float32).reshape(CODES, QUANT) if codebook is None else codebook
  pool = 1000.0 + jnp.broadcast_to(jnp.arange(16, dtype=jnp.float32)[:, None], (16, codebook.shape[1]))
  params = {'quantizer': {'codebook': codebook}, 'other': jnp.ones((3,))}
  optimizer = optax.chain(optax.clip_by_global_norm(0.5), optax.adam(1e-3))
  opt_state = optimizer.init(params)
  opt_state = optax.tree_utils.tree_set(opt_state, mu=jax.tree.map(jnp.ones_like, params),
                                        nu=jax.tree.map(jnp.ones_like, params))
  return loop.TrainState(step=jnp.asarray(step, jnp.int32), params=params, opt_state=opt_state,
                         model_state={'code_usage': jnp.asarray(usage, jnp.float32),
                                      'codes_revived_total': jnp.zeros((), jnp.int32), 'latent_pool': pool},
                         rng=jax.random.PRNGKey(0))


def test_official_schedule_has_26_events_up_to_step_4500():
  due = jax.jit(lambda s: laq_stage.revival_due(s, revival_config()))(jnp.arange(20_000))
  steps = np.flatnonzero(np.asarray(due))
  assert len(steps) == 26
  assert list(steps[:10]) == [10, 20, 30, 40, 50, 60, 70, 80, 90, 100]
  assert steps[-1] == 4500 and 1500 in steps and 950 not in steps


def test_periodic_schedules():
  periodic = laq_stage.revival_due(jnp.arange(2000), revival_config(schedule='periodic', every=300))
  assert list(np.flatnonzero(np.asarray(periodic))) == [300, 600, 900, 1200, 1500, 1800]
  both = np.flatnonzero(np.asarray(laq_stage.revival_due(jnp.arange(7000),
                                                         revival_config(schedule='official+periodic', every=1000))))
  assert len(both) == 28 and list(both[-3:]) == [4500, 5500, 6500]
  assert not np.any(laq_stage.revival_due(jnp.arange(6000), revival_config(schedule='none')))
  with pytest.raises(ValueError, match='revival.every'):
    laq_stage.revival_due(jnp.int32(0), revival_config(schedule='periodic', every=0))


def test_a_pool_smaller_than_the_codebook_names_what_limits_it():
  config = config_lib.load(f'{CONFIG}:demo', ['--config.model.codebook_size=64'])  # batch 32 x 1 code
  with pytest.raises(ValueError, match=r'min\(revival.pool, batch_size x model.code_seq_len\) = 32 latents'):
    laq_stage.make_stage(config)


def test_dead_codes_are_counted_per_assignment():
  # 1000 assignments: uniform share 125, threshold 0.1 -> fewer than 12.5 assignments is dead.
  usage = jnp.array([500, 300, 100, 50, 38, 12, 0, 0], jnp.float32)
  np.testing.assert_array_equal(laq_stage.dead_codes(usage, 0.1), [0, 0, 0, 0, 0, 1, 1, 1])


def test_revival_from_latents_uses_distinct_latents_of_the_batch():
  state = crafted_state(step=20, usage=[400, 0, 300, 0, 300, 0, 0, 0])
  new, metrics = jax.jit(lambda s: laq_stage.revive_dead_codes(s, revival_config()))(state)
  codebook = np.asarray(new.params['quantizer']['codebook'])
  np.testing.assert_array_equal(codebook[[0, 2, 4]], np.asarray(state.params['quantizer']['codebook'])[[0, 2, 4]])
  rows = codebook[[1, 3, 5, 6, 7], 0] - 1000
  assert len(set(rows)) == 5 and set(rows) <= set(range(16))  # distinct pool rows, unchanged
  assert np.all(codebook[[1, 3, 5, 6, 7]] == codebook[[1, 3, 5, 6, 7], :1])
  assert float(metrics['codes_revived']) == 5


def test_revival_replaces_dead_codes_resets_their_moments_and_the_window():
  usage = [400, 0, 300, 0, 300, 0, 0, 0]
  state = crafted_state(step=20, usage=usage)
  new, metrics = jax.jit(lambda s: laq_stage.revive_dead_codes(s, revival_config(source='codes')))(state)
  old_codebook = np.asarray(state.params['quantizer']['codebook'])
  codebook = np.asarray(new.params['quantizer']['codebook'])
  live, dead = [0, 2, 4], [1, 3, 5, 6, 7]
  np.testing.assert_array_equal(codebook[live], old_codebook[live])
  for row in dead:  # a copy of a live code, plus a little noise (1% of its RMS)
    distances = np.linalg.norm(old_codebook[live] - codebook[row], axis=-1)
    source = old_codebook[live][distances.argmin()]
    assert 0 < distances.min() <= 0.05 * np.sqrt(np.mean(source ** 2)) * np.sqrt(QUANT)
  assert float(metrics['codes_revived']) == 5 and int(new.model_state['codes_revived_total']) == 5
  for moments in (optax.tree_utils.tree_get(new.opt_state, 'mu'), optax.tree_utils.tree_get(new.opt_state, 'nu')):
    rows = np.asarray(moments['quantizer']['codebook'])
    assert np.all(rows[dead] == 0) and np.all(rows[live] == 1)
    np.testing.assert_array_equal(moments['other'], 1)  # other params keep their moments
  np.testing.assert_array_equal(new.model_state['code_usage'], 0)  # a new window starts


def test_nothing_changes_between_revivals_or_without_assignments():
  state = crafted_state(step=25, usage=[400, 0, 300, 0, 300, 0, 0, 0])
  new, metrics = laq_stage.revive_dead_codes(state, revival_config())
  np.testing.assert_array_equal(new.params['quantizer']['codebook'], state.params['quantizer']['codebook'])
  np.testing.assert_array_equal(new.model_state['code_usage'], state.model_state['code_usage'])
  assert float(metrics['codes_revived']) == 0
  empty = crafted_state(step=30, usage=np.zeros(CODES))
  new, metrics = laq_stage.revive_dead_codes(empty, revival_config())
  assert float(metrics['codes_revived']) == 0
  no_reset = revival_config(reset_moments=False)
  new, _ = laq_stage.revive_dead_codes(crafted_state(step=30, usage=[9, 0, 0, 0, 0, 0, 0, 0]), no_reset)
  np.testing.assert_array_equal(optax.tree_utils.tree_get(new.opt_state, 'mu')['quantizer']['codebook'], 1)


def test_revival_draws_sources_in_proportion_to_use():
  codebook = jnp.eye(CODES, QUANT * 2)  # distinct, easily identified codes
  state = crafted_state(step=10, usage=[900, 100, 0, 0, 0, 0, 0, 0], codebook=codebook)
  sources = []
  for seed in range(40):
    new, _ = laq_stage.revive_dead_codes(state.replace(rng=jax.random.PRNGKey(seed)), revival_config(source='codes'))
    rows = np.asarray(new.params['quantizer']['codebook'])[2:]
    sources += list(np.argmax(rows, axis=-1))
  counts = np.bincount(sources, minlength=CODES)
  assert counts[2:].sum() == 0
  assert 0.8 < counts[0] / len(sources) < 0.97  # 90% expected


def test_presets_match_the_issue():
  paper = config_lib.load(f'{CONFIG}:paper')
  assert (paper.model.dim, paper.model.spatial_depth, paper.model.temporal_depth, paper.model.decoder_depth) == (1024, 8, 8, 8)
  assert (paper.model.heads, paper.model.head_dim, paper.model.image_size, paper.model.patch_size) == (16, 64, 256, 32)
  assert (paper.model.quant_dim, paper.model.codebook_size, paper.model.code_seq_len) == (32, 8, 4)
  assert (paper.optim.name, paper.optim.lr, paper.optim.b1, paper.optim.b2, paper.optim.clip_norm) == ('adam', 1e-4, 0.9, 0.99, 0.5)
  assert paper.total_steps == 100_000 and paper.model.variant == 'lapa'
  small = config_lib.load(f'{CONFIG}:small')
  assert (small.model.dim, small.model.spatial_depth, small.model.heads, small.model.head_dim) == (256, 2, 8, 32)
  assert (small.model.image_size, small.model.patch_size, small.model.quant_dim, small.model.code_seq_len) == (64, 8, 32, 4)
  with pytest.raises(ValueError, match='data.path'):
    laq_stage.make_stage(small)


# ----- Training (slow: shares one small world dataset) ------------------------------------------

@pytest.fixture(scope='module')
def world_dir(tmp_path_factory):
  return writer.write_dataset(str(tmp_path_factory.mktemp('world')), 'robot', episodes=48, seed=0, image_size=32)


def tiny_config(data_path, *overrides):
  return config_lib.load(f'{CONFIG}:tiny', [f'--config.data.path={data_path}', *overrides])


def test_tiny_preset_learns_the_world_and_draws_pictures(world_dir, tmp_path):
  config = tiny_config(world_dir)
  # One device: 8 simulated devices on a 2-core machine only add overhead to a model this small.
  state = loop.train(config, str(tmp_path), laq_stage.make_stage(config), devices=jax.devices()[:1])
  assert int(state.step) == config.total_steps
  lines = [json.loads(line) for line in (tmp_path / 'metrics.jsonl').read_text().splitlines()]
  evaluation = [line for line in lines if 'eval/mse' in line][-1]
  # A useful LAQ reconstructs x_{t+H} better than copying x_t on held-out pairs.
  assert evaluation['eval/mse'] < evaluation['eval/copy_mse']
  assert evaluation['eval/psnr_of_mean_mse'] > evaluation['eval/copy_psnr_of_mean_mse']
  train_lines = [line for line in lines if 'perplexity' in line and 'eval/mse' not in line]
  assert {'loss', 'psnr', 'perplexity', 'unique_codes', 'codes_revived'} <= set(train_lines[-1])
  images = sorted(p.name for p in (tmp_path / 'images').iterdir())
  assert any(name.startswith('reconstructions_') for name in images)
  assert any(name.startswith('latent_action_atlas_') for name in images)


def test_loss_falls_on_bridge(bridge_dir, tmp_path):
  config = tiny_config(bridge_dir, '--config.total_steps=60', '--config.log_every=10', '--config.data.eval_split=',
                       '--config.checkpoint_every=60', '--config.batch_size=8')
  loop.train(config, str(tmp_path), laq_stage.make_stage(config), devices=jax.devices()[:1])
  losses = [json.loads(line)['loss'] for line in (tmp_path / 'metrics.jsonl').read_text().splitlines()]
  assert losses[-1] < 0.5 * losses[0]


def test_eight_devices_step_like_one(world_dir, tmp_path):
  if jax.device_count() < 8:
    pytest.skip('needs 8 (simulated) devices')
  overrides = ('--config.total_steps=3', '--config.data.eval_split=', '--config.checkpoint_every=3',
               '--config.revival.every=2')
  results = {}
  for devices in (1, 8):
    config = tiny_config(world_dir, *overrides)
    state = loop.train(config, str(tmp_path / str(devices)), laq_stage.make_stage(config),
                       devices=jax.devices()[:devices])
    results[devices] = jax.device_get(state)
  one, eight = results[1], results[8]
  # Updates are ~lr = 3e-3 per step; atol covers the last NSVQ conv bias, whose gradient is zero in
  # exact arithmetic (it cancels in z(x_{t+H}) - z(x_t)) and whose rounding noise Adam rescales.
  for a, b in zip(jax.tree.leaves(one.params), jax.tree.leaves(eight.params)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=5e-5)
  np.testing.assert_allclose(one.model_state['code_usage'], eight.model_state['code_usage'])
  assert int(one.model_state['codes_revived_total']) == int(eight.model_state['codes_revived_total'])


def test_taco_play_pairs_come_from_the_registry_camera_0_6_seconds_apart(tmp_path):
  import oxe_schemas
  path = oxe_schemas.write(str(tmp_path), 'taco_play', episodes=4)
  config = config_lib.load(f'{CONFIG}:tiny', [f'--config.data.path={path}', '--config.batch_size=8'])
  pairs = laq_stage.make_pairs(config, split='train', batch_size=8, process_index=0, process_count=1, statistics=None)
  source = pairs.mixture.sources[0]
  # Not the alphabetically first image (rgb_gripper, the wrist camera) and not a 5 Hz guess (3 steps):
  # taco_play records at 15 Hz, so 0.6 s is 9 steps.
  assert source.dataset.spec.image_key == 'observation/rgb_static' and source.frame_offset == 9
  batch = next(pairs)
  assert batch['video'].shape == (8, 2, 32, 32, 3) and set(batch['frame_offset']) == {9}
  green = batch['video'][..., 1].astype(float).mean(axis=(2, 3))  # 8 x step index in the synthetic frames
  np.testing.assert_allclose(green[:, 1] - green[:, 0], 72, atol=4)
  pairs.close()
