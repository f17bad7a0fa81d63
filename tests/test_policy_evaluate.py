"""The policy API and `lapa evaluate` on the tiny runs of tests/tiny_runs.py: shapes and batching,
decoding constrained to each action dimension's bins, clear errors for bad observations, identical
rollouts for identical seeds, resumable evaluation outputs. (2 processes agreeing with 1:
test_multihost_stages.py.)"""

import os

import numpy as np
import pytest
from PIL import Image

from lapa_jax import evaluate
from lapa_jax.policy import ObservationError, Policy
from tiny_runs import IMAGE_SIZE, train

INSTRUCTIONS = ['push the red block to the left', 'move to the top left corner', 'move to the blue block']


@pytest.fixture(scope='module')
def policy(pipeline):
  return Policy.from_checkpoint(str(pipeline['finetune'][0]))


def _images(count, size=IMAGE_SIZE, seed=0):
  return np.random.default_rng(seed).integers(0, 256, (count, size, size, 3), dtype=np.uint8)


def test_policy_infers_one_observation_or_a_batch(policy):
  images = _images(3)
  batch = policy.infer({'image': images, 'instruction': INSTRUCTIONS})
  assert batch['actions'].dtype == np.float32 and batch['actions'].shape == (3, 7)
  for row in range(3):
    single = policy.infer({'image': images[row], 'instruction': INSTRUCTIONS[row]})
    assert single['actions'].shape == (7,)
    np.testing.assert_array_equal(single['action_ids'], batch['action_ids'][row])  # padding rows change nothing
  # Decoded actions are bin values of the finetuning data; larger camera images are resized.
  np.testing.assert_array_equal(batch['actions'], policy.bins.decode(batch['action_ids']))
  assert policy.infer({'image': _images(1, 100)[0], 'instruction': 'x'})['actions'].shape == (7,)
  assert policy.metadata['kind'] == 'action' and policy.metadata['action_dim'] == 7


def test_sampled_ids_never_leave_their_dimension_bins(pipeline):
  hot = Policy.from_checkpoint(str(pipeline['finetune'][0]), temperature=5.0, seed=1)
  ids = hot.infer({'image': _images(64), 'instruction': INSTRUCTIONS[:1] * 64})['action_ids']
  assert np.all(ids < np.asarray(hot.bins.num_bins)) and np.all(ids >= 0)
  # Dimensions with one bin (z, rotations, gripper) always give it; the sampled planar ones vary.
  assert np.all(ids[:, 2:] == 0) and len(np.unique(ids[:, 0])) > 1


@pytest.mark.parametrize('obs, field', [
    ({'image': np.zeros((32, 32, 3), np.float32), 'instruction': 'x'}, "'image'"),
    ({'image': np.zeros((32, 32, 4), np.uint8), 'instruction': 'x'}, "'image'"),
    ({'instruction': 'x'}, "'image'"),
    ({'image': np.zeros((32, 32, 3), np.uint8)}, "'instruction'"),
    ({'image': np.zeros((32, 32, 3), np.uint8), 'instruction': 7}, "'instruction'"),
    ({'image': np.zeros((2, 32, 32, 3), np.uint8), 'instruction': ['one']}, "'instruction'"),
    ({'image': np.zeros((32, 32, 3), np.uint8), 'instruction': 'push ' * 100}, 'prompt tokens'),
])
def test_bad_observations_name_the_field(policy, obs, field):
  with pytest.raises(ObservationError, match=field):
    policy.infer(obs)


def test_latent_policy_predicts_latent_actions(pipeline):
  latent = Policy.from_checkpoint(str(pipeline['latent_pretrain'][0]))
  out = latent.infer({'image': _images(2), 'instruction': INSTRUCTIONS[:2]})
  assert set(out) == {'latent_action'} and out['latent_action'].shape == (2, 4)
  assert out['latent_action'].min() >= 0 and out['latent_action'].max() < 8


def test_rollouts_repeat_exactly_for_the_same_seeds(policy):
  specs = evaluate.episode_seeds(['reach_corner', 'push_direction'], 2, seed=5)
  runs = [evaluate.rollouts(policy, specs, image_size=IMAGE_SIZE, max_steps=12, record=[True] * 4, progress=False)
          for _ in range(2)]
  for first, second in zip(*runs):
    assert (first.instruction, first.success, first.steps, first.final_distance) == \
        (second.instruction, second.success, second.steps, second.final_distance)
    np.testing.assert_array_equal(np.stack(first.frames), np.stack(second.frames))
  assert [e.steps for e in runs[0]] and all(0 <= e.progress <= 1 for e in runs[0])


def _evaluate(out, *checkpoints, extra=()):
  return evaluate.main([*map(str, checkpoints), '--out', str(out), '--episodes', '2', '--max-steps', '8',
                        '--kinds', 'reach_corner,push_direction', '--image-size', str(IMAGE_SIZE),
                        '--offline-batches', '1', '--imagined', '1', *extra])


def test_evaluate_writes_results_and_skips_finished_work(pipeline, world, tmp_path, monkeypatch):
  scratch = tmp_path / 'scratch'
  train('finetune.py:tiny,scratch', scratch, f'--config.data.path={world}',
        f'--config.vision_tokenizer={pipeline["tokenizer"][0]}', '--config.total_steps=4', '--config.log_every=1',
        '--config.checkpoint_every=4')
  out = tmp_path / 'eval'
  assert _evaluate(out, pipeline['finetune'][0], scratch, pipeline['latent_pretrain'][0]) == 0
  records = evaluate.read_results(str(out))
  kinds = {(r['checkpoint'], r['task_kind']) for r in records}
  assert kinds == {('finetune@40', 'reach_corner'), ('finetune@40', 'push_direction'), ('finetune@40', 'offline'),
                   ('scratch@4', 'reach_corner'), ('scratch@4', 'push_direction'), ('scratch@4', 'offline'),
                   ('pretrain@40', 'offline')}
  closed = [r for r in records if r['task_kind'] == 'reach_corner']
  assert all(r['episodes'] == 2 and r['success_low'] <= r['success'] <= r['success_high'] for r in closed)
  table = (out / 'results.md').read_text()
  assert 'finetune@40' in table and 'scratch@4' in table and 'push_direction' in table
  assert Image.open(out / 'success.png').size[0] > 300
  gifs = sorted(os.listdir(out / 'gifs'))
  assert len(gifs) == 4 and Image.open(out / 'gifs' / gifs[0]).n_frames > 2
  imagined = os.listdir(out / 'imagined')
  assert len(imagined) == 1 and Image.open(out / 'imagined' / imagined[0]).n_frames == 9

  def refuse(*args, **kwargs):
    raise AssertionError('a finished checkpoint was evaluated again')
  monkeypatch.setattr(evaluate.Policy, 'from_checkpoint', refuse)
  assert _evaluate(out, pipeline['finetune'][0], scratch) == 0
  assert len(evaluate.read_results(str(out))) == len(records)


def test_evaluate_errors_are_one_line(tmp_path, capsys):
  assert evaluate.main([str(tmp_path / 'missing'), '--out', str(tmp_path / 'eval')]) == 2
  assert evaluate.main([str(tmp_path), '--out', str(tmp_path / 'eval'), '--kinds', 'fly']) == 2
  errors = capsys.readouterr().err.strip().splitlines()
  assert len(errors) == 2 and 'no config.json' in errors[0] and "'fly'" in errors[1]


def test_runs_with_the_same_directory_name_stay_apart():
  labels = evaluate._labels(['/r/seed0/lapa', '/r/seed1/lapa', '/r/seed0/scratch'])
  assert labels == {'/r/seed0/lapa': 'seed0/lapa', '/r/seed1/lapa': 'seed1/lapa', '/r/seed0/scratch': 'scratch'}
