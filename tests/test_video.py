"""Human videos -> RLDS: frame folders and mp4/webm files, instructions, fps and pair offsets."""

import csv
import io
import json
import os

import numpy as np
import pytest
from PIL import Image

from lapa_jax.data import oxe, rlds, video


def frame_folders(root, clips=3, frames=30):
  """SSv2 layout: root/<video id>/<frame>.jpg; red = 20 x clip, green = 8 x frame."""
  for clip in range(clips):
    os.makedirs(root / f'{100 + clip}')
    for t in range(frames):
      Image.new('RGB', (24, 16), (20 * clip, 8 * t, 0)).save(root / f'{100 + clip}' / f'{t + 1:05d}.jpg')
  return root


def video_files(root, suffix, codec, clips=2, frames=24, rate=12):
  av = pytest.importorskip('av')
  os.makedirs(root)
  for clip in range(clips):
    with av.open(str(root / f'clip{clip}.{suffix}'), 'w') as container:
      stream = container.add_stream(codec, rate=rate)
      stream.width, stream.height, stream.pix_fmt = 32, 32, 'yuv420p'
      for t in range(frames):
        frame = av.VideoFrame.from_ndarray(np.full((32, 32, 3), 8 * t, np.uint8), format='rgb24')
        for packet in stream.encode(frame):
          container.mux(packet)
      for packet in stream.encode():
        container.mux(packet)
  return root


def read_all(data_dir, name):
  dataset = oxe.open_dataset(data_dir, name)
  reader = oxe.EpisodeReader(dataset)
  return dataset, [e for segment in reader.segments('train') for e in reader.episodes(segment)]


def test_frame_folders_with_ssv2_labels(tmp_path):
  source = frame_folders(tmp_path / 'frames')
  labels = tmp_path / 'labels.json'
  labels.write_text(json.dumps([{'id': str(100 + c), 'label': f'pushing cup {c} left', 'template': 'x',
                                 'placeholders': []} for c in range(3)]))
  path = video.import_videos(str(source), str(tmp_path / 'out'), name='sthsthv2', instructions=str(labels),
                             fps=12, episodes_per_shard=2, progress=False)
  assert path == str(tmp_path / 'out' / 'sthsthv2' / '1.0.0')
  assert sorted(n for n in os.listdir(path) if 'tfrecord' in n) == [
      'sthsthv2-train.tfrecord-00000', 'sthsthv2-train.tfrecord-00001']
  with open(os.path.join(path, 'lapa_spec.json')) as f:
    assert json.load(f) == {'embodiment': 'human', 'image_key': 'observation/image',
                            'instruction_key': 'language_instruction', 'fps': 12.0}
  dataset, episodes = read_all(str(tmp_path / 'out'), 'sthsthv2')
  assert dataset.spec.embodiment == 'human' and dataset.spec.source == 'metadata'
  assert rlds.dataset_fps(dataset.builder) == 12.0  # what data/pairs.py reads
  assert oxe.default_frame_offset(dataset.spec) == 29  # 2.4 s at 12 fps
  assert len(episodes) == 3
  for clip, episode in enumerate(episodes):
    assert episode['action'] is None and episode['image'].shape == (30,)
    assert set(episode['instruction']) == {f'pushing cup {clip} left'.encode()}
    assert episode['image'][0] == (source / f'{100 + clip}' / '00001.jpg').read_bytes()  # JPEGs kept as they are
    last = np.asarray(Image.open(io.BytesIO(episode['image'][-1])))
    assert abs(last[..., 1].mean() - 8 * 29) <= 3  # natural frame order: 00030.jpg last


@pytest.mark.parametrize('suffix,codec', [('mp4', 'mpeg4'), ('webm', 'libvpx')])
def test_video_files_with_csv_instructions(tmp_path, suffix, codec):
  source = video_files(tmp_path / 'videos', suffix, codec)
  labels = tmp_path / 'labels.csv'
  with open(labels, 'w', newline='') as f:
    writer = csv.writer(f)
    writer.writerow(['id', 'instruction'])
    writer.writerows([['clip0', 'open the drawer'], ['clip1', 'close the drawer']])
  video.import_videos(str(source), str(tmp_path / 'native'), name='clips', instructions=str(labels), size=16,
                      progress=False)
  dataset, episodes = read_all(str(tmp_path / 'native'), 'clips')
  assert dataset.spec.fps == 12.0 and [len(e['image']) for e in episodes] == [24, 24]
  assert Image.open(io.BytesIO(episodes[0]['image'][0])).size == (16, 16)
  assert episodes[1]['instruction'][0] == b'close the drawer'
  green = [np.asarray(Image.open(io.BytesIO(frame)))[..., 1].mean() for frame in episodes[0]['image']]
  assert abs(green[-1] - 8 * 23) <= 6
  # Resampled to 6 fps: every other frame.
  video.import_videos(str(source), str(tmp_path / 'slow'), name='clips', instructions=str(labels), fps=6,
                      progress=False)
  dataset, episodes = read_all(str(tmp_path / 'slow'), 'clips')
  assert dataset.spec.fps == 6.0 and len(episodes[0]['image']) == 12


def test_bad_input_is_reported_before_work(tmp_path):
  source = frame_folders(tmp_path / 'frames', clips=2, frames=3)
  labels = tmp_path / 'labels.csv'
  labels.write_text('id,instruction\n100,wave\n')
  with pytest.raises(video.VideoImportError, match=r'no instruction for 1 of 2 videos \(e.g. 101\)'):
    video.import_videos(str(source), str(tmp_path / 'out'), name='x', instructions=str(labels), fps=12)
  with pytest.raises(video.VideoImportError, match='frame folders carry no timing; pass --fps'):
    video.import_videos(str(source), str(tmp_path / 'out'), name='x')
  bad = tmp_path / 'bad.csv'
  bad.write_text('video,text\n100,wave\n')
  with pytest.raises(video.VideoImportError, match='expected CSV columns id and instruction'):
    video.import_videos(str(source), str(tmp_path / 'out'), name='x', instructions=str(bad), fps=12)
  # Without instructions the dataset has none (a language-conditioned stage then errs or uses '').
  assert video.main([str(source), str(tmp_path / 'out'), '--name', 'unlabeled', '--fps', '12']) == 0
  dataset, episodes = read_all(str(tmp_path / 'out'), 'unlabeled')
  assert dataset.spec.instruction_key is None and episodes[0]['instruction'].tolist() == [b''] * 3
  assert video.main([str(source), str(tmp_path / 'out'), '--name', 'unlabeled', '--fps', '12']) == 2  # exists
