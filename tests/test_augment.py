"""Training augmentation and its evaluation crop: geometry against an analytic resample, jitter laws.

Most tests share one batch shape (BATCH, SIZE, SIZE, 3) so that each function compiles once or twice.
"""

import jax
import numpy as np
import pytest

from lapa_jax.train import augment

BATCH = 128
SIZE = 40  # area 0.9 -> crop side round(0.9487 * 40) = 38: offsets 0, 1, 2 on each axis
CROP = 38


def _ramps(size=SIZE):
  """(BATCH, size, size, 3): channel 0 = column / (size - 1), 1 = row / (size - 1), 2 = 0.5."""
  ramp = np.arange(size) / (size - 1)
  columns, rows = np.meshgrid(ramp, ramp)
  image = np.stack([columns, rows, np.full((size, size), 0.5)], axis=-1)
  return np.broadcast_to(image, (BATCH, size, size, 3)).astype(np.float32)


def _repeated(image):
  """(BATCH, SIZE, SIZE, 3) copies of one (SIZE, SIZE, 3) image: examples then differ only by rng."""
  return np.broadcast_to(image, (BATCH,) + image.shape).copy()


def _expected_ramp_crop(top, left, crop=CROP, size=SIZE):
  """The analytic crop-and-resize of `_ramps`: bilinear interpolation of a linear ramp is linear,
  sampled at half-pixel centres and clamped to the crop's first and last pixel centres."""
  position = np.clip((np.arange(size) + 0.5) * crop / size - 0.5, 0, crop - 1)
  columns = np.broadcast_to((left + position)[None, :], (size, size)) / (size - 1)
  rows = np.broadcast_to((top + position)[:, None], (size, size)) / (size - 1)
  return np.stack([columns, rows, np.full((size, size), 0.5)], axis=-1)


def _uint8_images(seed):
  return np.random.default_rng(seed).integers(0, 256, (BATCH, SIZE, SIZE, 3), dtype=np.uint8)


def test_shapes_dtypes_ranges():
  images = _uint8_images(0)
  for output in (augment.augment(jax.random.PRNGKey(0), images), augment.evaluation_view(images)):
    assert output.shape == images.shape and output.dtype == np.float32
    output = np.asarray(output)
    assert output.min() >= 0.0 and output.max() <= 1.0 and output.max() > 0.9
  assert augment.crop_size(24, 32, 0.9) == (23, 30) and augment.crop_size(40, 40, 0.9) == (CROP, CROP)
  with pytest.raises(ValueError, match='area'):
    augment.center_crop(images, area=1.5)
  with pytest.raises(ValueError, match=r'\(batch, height, width, 3\)'):
    augment.center_crop(images[0])


def _ramp_crop_offsets(output):
  """(tops, lefts) of each example of a crop-and-resize of `_ramps`, checked to be exactly that crop."""
  reference = _expected_ramp_crop(0, 0)
  lefts = np.round(((output - reference)[..., 0] * (SIZE - 1)).mean(axis=(1, 2))).astype(int)
  tops = np.round(((output - reference)[..., 1] * (SIZE - 1)).mean(axis=(1, 2))).astype(int)
  for index in range(len(output)):
    np.testing.assert_allclose(output[index], _expected_ramp_crop(tops[index], lefts[index]), atol=1e-5)
  return tops, lefts


def test_augment_without_jitter_is_a_random_crop():
  rng = jax.random.PRNGKey(1)
  np.testing.assert_allclose(augment.augment(rng, _ramps(), area=1.0, jitter=False), _ramps(), atol=1e-6)
  tops, lefts = _ramp_crop_offsets(np.asarray(augment.augment(rng, _ramps(), jitter=False)))
  assert set(tops) == set(lefts) == {0, 1, 2}


def test_center_crop_matches_analytic_resample():
  output = np.asarray(augment.center_crop(_ramps()))
  np.testing.assert_allclose(output[0], _expected_ramp_crop(1, 1), atol=1e-6)
  np.testing.assert_array_equal(output, _repeated(output[0]))
  # Arbitrary content and a non-square image, against jax.image.resize of the numpy-cropped centre.
  images = np.random.default_rng(2).random((1, 50, 30, 3)).astype(np.float32)
  crop_height, crop_width = augment.crop_size(50, 30, 0.8)
  top, left = (50 - crop_height) // 2, (30 - crop_width) // 2
  region = images[0, top:top + crop_height, left:left + crop_width]
  expected = jax.jit(lambda region: jax.image.resize(region, (50, 30, 3), 'bilinear'))(region)
  np.testing.assert_allclose(augment.center_crop(images, area=0.8)[0], expected, atol=1e-5)


def test_random_crops_are_exact_crops_at_uniform_positions():
  output = np.asarray(augment.random_resized_crop(jax.random.PRNGKey(3), _ramps()))
  tops, lefts = _ramp_crop_offsets(output)  # each example is exactly a crop at integer offsets
  for offsets in (tops, lefts):
    assert offsets.min() == 0 and offsets.max() == SIZE - CROP  # inside the image, the whole range
    assert np.bincount(offsets).min() > BATCH / 3 - 16  # uniform: ~43 of each
  assert np.corrcoef(tops, lefts)[0, 1] ** 2 < 0.05  # independent axes


def test_random_crops_vary_and_are_deterministic():
  images = _repeated(np.random.default_rng(4).random((SIZE, SIZE, 3)).astype(np.float32))
  first = np.asarray(augment.random_resized_crop(jax.random.PRNGKey(5), images))
  again = np.asarray(augment.random_resized_crop(jax.random.PRNGKey(5), images))
  other = np.asarray(augment.random_resized_crop(jax.random.PRNGKey(6), images))
  np.testing.assert_array_equal(first, again)
  assert len({example.tobytes() for example in first}) == 9  # every one of the 3 x 3 positions
  assert not np.array_equal(first, other)
  assert not np.allclose(first[0], images[0], atol=1e-2)


def test_random_crop_of_constant_image_is_constant():
  images = np.full((BATCH, SIZE, SIZE, 3), 77 / 255, np.float32)
  output = augment.random_resized_crop(jax.random.PRNGKey(7), images)
  np.testing.assert_allclose(output, 77 / 255, atol=1e-6)


def _only(images, seed, **strengths):
  """color_jitter with every strength 0 but those given."""
  settings = dict(brightness=0.0, contrast=0.0, saturation=0.0, hue=0.0) | strengths
  return np.asarray(augment.color_jitter(jax.random.PRNGKey(seed), images, **settings), np.float64)


def test_jitter_with_zero_strength_is_identity():
  images = np.random.default_rng(8).random((BATCH, SIZE, SIZE, 3)).astype(np.float32)
  np.testing.assert_allclose(_only(images, 8), images, atol=1e-5)


def test_jitter_components_follow_their_laws():
  # Mid-range colours so that no step clips, with channel means unlike the mean luma.
  colours = 0.25 + np.array([0.0, 0.15, 0.3]) + 0.2 * np.random.default_rng(9).random((SIZE, SIZE, 3))
  images = _repeated(colours.astype(np.float32))
  grey = lambda x: x @ np.array([0.299, 0.587, 0.114])
  # Brightness: one factor per example, within [0.8, 1.2] and spread over it.
  ratio = _only(images, 0, brightness=0.2) / images
  np.testing.assert_allclose(ratio, np.broadcast_to(ratio[:, :1, :1, :1], ratio.shape), atol=1e-5)
  assert np.all(np.abs(ratio[:, 0, 0, 0] - 1) <= 0.2 + 1e-6) and np.ptp(ratio[:, 0, 0, 0]) > 0.3
  # Contrast: the mean luma stays; the spread around it scales by one factor per example.
  output = _only(images, 1, contrast=0.2)
  np.testing.assert_allclose(grey(output).mean(axis=(1, 2)), grey(images).mean(axis=(1, 2)), atol=1e-5)
  spread = output.std(axis=(1, 2, 3)) / images.std(axis=(1, 2, 3))
  assert np.all(np.abs(spread - 1) <= 0.2 + 1e-5) and np.ptp(spread) > 0.3
  # ... towards one grey level per example (output = mean + spread * (image - mean)), not per channel.
  factor = spread[:, None, None, None]
  centre = ((output - factor * images) / (1 - factor))[np.abs(spread - 1) > 0.05]
  mean_luma = grey(images).mean(axis=(1, 2))[np.abs(spread - 1) > 0.05]
  np.testing.assert_allclose(centre, np.broadcast_to(mean_luma[:, None, None, None], centre.shape), atol=1e-4)
  # Saturation: each pixel's luma stays, its colour moves along the line to grey.
  output = _only(images, 2, saturation=0.2)
  np.testing.assert_allclose(grey(output), grey(images), atol=1e-5)
  colourfulness = lambda x: np.abs(x - grey(x)[..., None]).sum(axis=(1, 2, 3))
  chroma = colourfulness(output) / colourfulness(images)
  assert np.all(np.abs(chroma - 1) <= 0.2 + 1e-5) and np.ptp(chroma) > 0.3
  # Hue: luma and chroma magnitude (YIQ) stay, the chroma angle turns by up to 0.1 of a turn.
  output = _only(images, 3, hue=0.1)
  to_yiq = np.array([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
  before, after = images @ to_yiq.T, output @ to_yiq.T
  np.testing.assert_allclose(after[..., 0], before[..., 0], atol=1e-5)
  np.testing.assert_allclose(np.hypot(after[..., 1], after[..., 2]), np.hypot(before[..., 1], before[..., 2]),
                             atol=1e-5)
  turn = np.angle((after[..., 1] + 1j * after[..., 2]) / (before[..., 1] + 1j * before[..., 2])) / (2 * np.pi)
  np.testing.assert_allclose(turn, np.broadcast_to(turn[:, :1, :1], turn.shape), atol=1e-3)
  assert np.all(np.abs(turn) <= 0.1 + 1e-4) and np.ptp(turn[:, 0, 0]) > 0.15


def test_jitter_stays_in_range_and_varies():
  images = _repeated(_uint8_images(10)[0]).astype(np.float32) / 255
  output = _only(images, 11, brightness=0.9, contrast=0.9, saturation=0.9, hue=0.5)
  assert output.min() == 0.0 and output.max() == 1.0  # strong jitter does clip
  assert len({example.tobytes() for example in output}) == BATCH


def test_inside_a_jitted_step():
  images = _uint8_images(12)
  rng = jax.random.PRNGKey(13)

  @jax.jit
  def step(rng, images, strength):  # like a train step: traced rng, images and jitter strengths
    floats = images.astype(np.float32) / 255
    return (augment.augment(rng, images), augment.evaluation_view(images),
            augment.color_jitter(rng, floats, strength, strength, strength, strength / 10))

  trained, evaluated, jittered = step(rng, images, 0.1)
  np.testing.assert_allclose(trained, augment.augment(rng, images), atol=1e-6)
  np.testing.assert_allclose(evaluated, augment.evaluation_view(images), atol=1e-6)
  np.testing.assert_allclose(jittered, _only(images / 255, 13, brightness=0.1, contrast=0.1, saturation=0.1,
                                            hue=0.01), atol=1e-6)
