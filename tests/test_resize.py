"""`lapa resize-dataset`: images resized to JPEG, every other field kept, resumable per shard."""

import io
import os

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

import oxe_schemas
from lapa_jax.data import oxe, resize, rlds


@pytest.fixture(scope='module')
def ur5_dir(tmp_path_factory):
  """berkeley_autolab_ur5: two cameras, a float depth image, 2 shards."""
  root = tmp_path_factory.mktemp('resize_in')
  oxe_schemas.write(str(root), 'berkeley_autolab_ur5', episodes=4, episodes_per_shard=2)
  return str(root)


def records(path):
  return [tf.train.Example.FromString(r) for r in tf.data.TFRecordDataset(path).as_numpy_iterator()]


def test_resized_copy_keeps_every_other_field(ur5_dir, tmp_path):
  out = resize.resize_dataset(os.path.join(ur5_dir, 'berkeley_autolab_ur5'), str(tmp_path), size=24,
                              workers=2, progress=False)
  assert out == str(tmp_path / 'berkeley_autolab_ur5' / '0.1.0') and not os.path.exists(out + '.incomplete')
  builder = rlds.open_builder(out)
  features = rlds.step_features(builder)
  for key in ('observation/image', 'observation/hand_image'):
    assert tuple(features[key].shape) == (24, 24, 3) and features[key].encoding_format == 'jpeg'
  assert tuple(features['observation/image_with_depth'].shape) == (60, 80, 1)  # depth left alone
  source_dir = os.path.join(ur5_dir, 'berkeley_autolab_ur5', '0.1.0')
  for shard in builder.info.splits['train'].filenames:
    before, after = records(os.path.join(source_dir, shard)), records(os.path.join(out, shard))
    assert len(before) == len(after) == 2
    for old, new in zip(before, after):
      old_features, new_features = old.features.feature, new.features.feature
      assert set(old_features) == set(new_features)
      for key in old_features:
        if key in ('steps/observation/image', 'steps/observation/hand_image'):
          frames = new_features[key].bytes_list.value
          assert len(frames) == len(old_features[key].bytes_list.value)
          assert Image.open(io.BytesIO(frames[0])).size == (24, 24)
        else:
          assert old_features[key] == new_features[key], key
  # The copy reads like the original through the registry: same actions, smaller images.
  dataset = oxe.open_dataset(str(tmp_path), 'berkeley_autolab_ur5', use_wrist=True)
  reader = oxe.EpisodeReader(dataset, use_wrist=True)
  episode = next(reader.episodes(reader.segments('train')[0]))
  np.testing.assert_array_equal(episode['action'][:, 6], oxe_schemas.expected_open(12))
  pixels = np.asarray(Image.open(io.BytesIO(episode['image'][5])))
  assert pixels.shape == (24, 24, 3) and abs(pixels[..., 1].mean() - 40) <= 3  # green = 8 x step


def test_resume_skips_finished_shards(ur5_dir, tmp_path, monkeypatch):
  source = os.path.join(ur5_dir, 'berkeley_autolab_ur5', '0.1.0')
  work = tmp_path / 'berkeley_autolab_ur5' / '0.1.0.incomplete'
  os.makedirs(work)
  first = 'berkeley_autolab_ur5-train.tfrecord-00000'
  resize.resize_shard(os.path.join(source, first), str(work / first), ['observation/image'], 24, 95)
  stamp = os.path.getmtime(work / first)
  done = []
  shard = resize.resize_shard
  monkeypatch.setattr(resize, 'resize_shard', lambda src, *a: done.append(os.path.basename(src)) or shard(src, *a))
  resize.resize_dataset(source, str(tmp_path), size=24, keys=['observation/image'], progress=False)
  assert done == ['berkeley_autolab_ur5-train.tfrecord-00001']
  assert os.path.getmtime(tmp_path / 'berkeley_autolab_ur5' / '0.1.0' / first) == stamp


def test_bad_arguments(ur5_dir, tmp_path):
  source = os.path.join(ur5_dir, 'berkeley_autolab_ur5')
  with pytest.raises(resize.ResizeError, match="no uint8 image feature observation/depth"):
    resize.resize_dataset(source, str(tmp_path), size=24, keys=['observation/depth'])
  assert resize.main([str(tmp_path / 'nowhere'), str(tmp_path), '--size', '24']) == 2
