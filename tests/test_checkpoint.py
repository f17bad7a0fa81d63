"""Orbax checkpoints: interval and retention, restore onto another mesh, params-only restore."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from lapa_jax import checkpoint
from lapa_jax import config as config_lib
from lapa_jax import sharding
from lapa_jax.train import loop, optim, toy


def _toy_state_fn(config):
  """The toy stage's full train state (boxed), as the loop builds it."""
  stage = toy.make_stage(config)
  optimizer = optim.make_optimizer(config.optim, config.total_steps)

  def init():
    variables = stage.init(jax.random.PRNGKey(config.seed))
    return loop.TrainState(step=jnp.zeros((), jnp.int32), params=variables['params'],
                           opt_state=optimizer.init(variables['params']), model_state=variables['model_state'],
                           rng=jax.random.PRNGKey(1))
  return init


def test_trained_state_restores_onto_another_mesh(tmp_path):
  config = config_lib.load('configs/toy.py:tiny', ['--config.mesh_dim=1,8,1', '--config.total_steps=3',
                                                   '--config.eval_every=0'])
  trained = loop.train(config, str(tmp_path), toy.make_stage(config))

  target = checkpoint.restore_target(_toy_state_fn(config), sharding.make_mesh('2,2,2'))
  with checkpoint.Checkpointer(checkpoint.directory_in(str(tmp_path)), read_only=True) as checkpoints:
    assert checkpoints.latest_step() == 3
    restored, data_state = checkpoints.restore(target)
  assert data_state == {'0': {'position': 3}}  # one position per process
  assert int(restored.step) == 3

  saved_leaves = jax.tree.leaves(trained)
  restored_leaves, restored_tree = jax.tree.flatten(restored)
  assert jax.tree.structure(trained) == restored_tree
  for saved, loaded, wanted in zip(saved_leaves, restored_leaves, jax.tree.leaves(target)):
    np.testing.assert_array_equal(np.asarray(loaded), np.asarray(saved))
    assert loaded.sharding == wanted.sharding
  # The (embed, mlp) kernel really changed layout: fsdp 8 -> fsdp 2 x tp 2.
  kernel = restored.params['Dense_0']['kernel']
  assert kernel.sharding.spec == P('fsdp', 'tp') and kernel.addressable_shards[0].data.shape == (8, 16)
  assert trained.params['Dense_0']['kernel'].addressable_shards[0].data.shape == (2, 32)


def test_interval_retention_and_forced_saves(tmp_path):
  mesh = sharding.make_mesh('1,-1,1')
  state = {'weights': jax.device_put(np.arange(16, dtype=np.float32), sharding.batch_sharding(mesh)),
           'step': jax.device_put(np.int32(0), sharding.replicated(mesh))}
  with checkpoint.Checkpointer(str(tmp_path / 'ckpt'), save_every=2, keep=2) as checkpoints:
    assert [step for step in range(1, 7) if checkpoints.should_save(step)] == [2, 4, 6]
    saved = [step for step in range(1, 7) if checkpoints.save(step, state, {'position': step})]
    assert saved == [2, 4, 6] and not checkpoints.should_save(6)
    assert checkpoints.save(7, state, {'position': 7}, force=True)
    assert not checkpoints.save(7, state, {'position': 7}, force=True)  # Already there.
    checkpoints.wait_until_finished()
    assert checkpoints.all_steps() == [6, 7]

  target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
  with checkpoint.Checkpointer(str(tmp_path / 'ckpt'), read_only=True) as checkpoints:
    restored, data_state = checkpoints.restore(target, step=6)
  assert data_state == {'position': 6}
  np.testing.assert_array_equal(np.asarray(restored['weights']), np.arange(16))


def test_restore_params_only(tmp_path):
  config = config_lib.load('configs/toy.py:tiny')
  mesh = sharding.make_mesh('1,-1,1')
  state, _ = sharding.create_sharded(_toy_state_fn(config), mesh)
  with checkpoint.Checkpointer(str(tmp_path), save_every=1, keep=1) as checkpoints:
    checkpoints.save(5, state, {'position': 5})

  params_target = checkpoint.restore_target(_toy_state_fn(config), sharding.make_mesh('8,1,1')).params
  with checkpoint.Checkpointer(str(tmp_path), read_only=True) as checkpoints:
    params = checkpoints.restore_params(params_target)
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), params, state.params)
  assert params['Dense_1']['kernel'].sharding.spec == P('tp', 'fsdp')


def test_missing_checkpoints_are_clear_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match='does not exist'):
    checkpoint.Checkpointer(str(tmp_path / 'nothing'), read_only=True)
  with checkpoint.Checkpointer(str(tmp_path / 'empty')) as checkpoints:
    with pytest.raises(FileNotFoundError, match='no checkpoint'):
      checkpoints.restore({})
