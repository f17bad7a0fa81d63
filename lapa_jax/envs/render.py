"""Vectorised numpy rendering of the tabletop world for two embodiments.

`robot`: a grey lab table with a grid, a metal arm from the bottom edge ending in a dark gripper
with two light fingers. `hand`: a wooden table, a skin-coloured forearm ending in a larger palm with
four fingers and a thumb. Both show the same world state (same dynamics underneath), so datasets of
the two embodiments differ only in how the effector and the table look.

Every shape is painted on a small window around it with array masks (no per-pixel Python loops);
tables are drawn once per (embodiment, size) and copied.
"""

from __future__ import annotations

import functools
import math

import numpy as np

from lapa_jax.envs import world

EMBODIMENTS = ('robot', 'hand')
MAX_IMAGE_SIZE = 256
MIN_IMAGE_SIZE = 16

BLOCK_RGB = {
    'red': (215, 40, 40), 'green': (40, 165, 60), 'blue': (40, 85, 215),
    'yellow': (240, 205, 35), 'purple': (145, 60, 190), 'orange': (245, 135, 25),
}
_BLOCK_FILL = np.array([BLOCK_RGB[c] for c in world.COLORS], np.uint8)      # (colors, 3)
_BLOCK_EDGE = (_BLOCK_FILL * 0.6).astype(np.uint8)
_BLOCK_HALF = 0.05        # drawn half side of a block (it collides as a disc of BLOCK_RADIUS)
_SHADOW_OFFSET = 0.015    # shadows fall down and to the right
_BOX_OFFSETS = np.array([[_SHADOW_OFFSET, -_SHADOW_OFFSET], [0.0, 0.0], [0.0, 0.0]])  # shadow, edge, fill

_METAL, _METAL_DARK = (150, 155, 165), (80, 84, 92)
_GRIPPER_BODY, _GRIPPER_FINGER = (55, 58, 66), (210, 212, 220)
_SKIN, _SKIN_DARK = (232, 180, 146), (196, 140, 108)
# Arms come in from below the table's near edge; layers are (half width, end inset, color).
_ARM_BASE = {'robot': (0.5, -0.15), 'hand': (0.5, -0.25)}
_ARM_LAYERS = {'robot': ((0.04, 0.0, _METAL_DARK), (0.028, 0.012, _METAL)),
               'hand': ((0.058, 0.0, _SKIN_DARK), (0.048, 0.0, _SKIN))}
# Hand parts as capsules in the arm's frame: (sideways offset of the root, length forward, length
# sideways, half width) for four fingers, the thumb and the palm (a zero-length capsule, a disc drawn
# larger than the effector's collision disc).
_HAND_PARTS = np.array([
    (-0.036, 0.085, 0.0, 0.013), (-0.012, 0.1, 0.0, 0.013), (0.012, 0.1, 0.0, 0.013),
    (0.036, 0.085, 0.0, 0.013), (0.04, 0.035, 0.045, 0.014), (0.0, 0.0, 0.0, 0.065)])
_HAND_OUTLINE = 0.006
_FINGER_OFFSETS = np.array([[-0.03], [0.03]])   # robot gripper fingers, sideways


def check_image_size(image_size: int) -> None:
  if (isinstance(image_size, bool) or not isinstance(image_size, (int, np.integer))
      or not MIN_IMAGE_SIZE <= image_size <= MAX_IMAGE_SIZE):
    raise ValueError(f'image_size: expected an integer in [{MIN_IMAGE_SIZE}, {MAX_IMAGE_SIZE}], '
                     f'got {image_size!r}')


def check_embodiment(embodiment: str) -> None:
  if embodiment not in EMBODIMENTS:
    raise ValueError(f'embodiment: expected one of {EMBODIMENTS}, got {embodiment!r}')


@functools.lru_cache(maxsize=None)
def _pixel_centers(size: int) -> tuple[np.ndarray, np.ndarray]:
  """Table coordinates of pixel centres: x per column (size,), y per row (size,), y up."""
  centers = (np.arange(size) + 0.5) / size
  return centers, 1.0 - centers


@functools.lru_cache(maxsize=None)
def _box_halves(size: int) -> np.ndarray:
  """Half sides (3,) of a block's shadow, edge and fill squares; the edge is 1 pixel per 64."""
  return np.array([_BLOCK_HALF, _BLOCK_HALF, _BLOCK_HALF - max(1, size // 64) / size])


@functools.lru_cache(maxsize=None)
def table(embodiment: str, size: int, shadow: bool = False) -> np.ndarray:
  """The empty table (size, size, 3) uint8, read-only; in shadow it is 75% as bright."""
  if shadow:
    image = table(embodiment, size)
    image = image - (image >> 2)
    image.setflags(write=False)
    return image
  xs, ys = _pixel_centers(size)
  if embodiment == 'robot':
    image = np.empty((size, size, 3), np.float32)
    image[:] = (188, 192, 198)
    # A faint grid every eighth of the table, like a lab bench mat.
    line = max(1, size // 64)
    for edge in np.flatnonzero(np.diff(np.arange(size) * 8 // size)) + 1:
      image[edge:edge + line, :] = (172, 177, 184)
      image[:, edge:edge + line] = (172, 177, 184)
  else:
    # Wood: five planks whose grain waves along the rows, with fixed pseudo-random phases.
    plank = np.floor(ys * 5).astype(int)[:, None]                     # (size, 1)
    phase = np.random.default_rng(1234).uniform(0, 2 * np.pi, size=5)[plank]
    grain = np.sin(ys[:, None] * 90 + 3 * np.sin(xs[None, :] * 7 + phase) + phase)
    shade = 0.88 + 0.07 * grain + 0.05 * (plank % 2)
    image = shade[..., None] * np.array([165, 112, 70], np.float32)
    image[np.flatnonzero(np.diff(plank[:, 0])) + 1] = (95, 62, 38)
  border = max(1, size // 32)
  rim = (120, 124, 130) if embodiment == 'robot' else (90, 58, 35)
  image[:border], image[-border:], image[:, :border], image[:, -border:] = rim, rim, rim, rim
  image = np.clip(image, 0, 255).astype(np.uint8)
  image.setflags(write=False)
  return image


def _block_boxes(blocks: np.ndarray, size: int) -> list[list[tuple[slice, slice]]]:
  """Pixel (rows, cols) slices of each block's shadow, edge and fill squares: 3 lists of
  num_blocks, from one vectorised computation."""
  centers = blocks[None] + _BOX_OFFSETS[:, None, :]                     # (3, num_blocks, 2)
  halves = _box_halves(size)[:, None, None]
  corners = np.concatenate([centers - halves, centers + halves], axis=-1) * size
  corners = np.clip(np.rint(corners), 0, size).astype(int).tolist()     # [x0, y0, x1, y1]
  return [[(slice(size - y1, size - y0), slice(x0, x1)) for x0, y0, x1, y1 in layer]
          for layer in corners]


def _window(low_x: float, low_y: float, high_x: float, high_y: float, size: int):
  """Pixel rows [r0, r1) and columns [c0, c1) covering a box in table coordinates."""
  c0, c1 = max(math.floor(low_x * size), 0), min(math.ceil(high_x * size), size)
  r0, r1 = max(math.floor((1.0 - high_y) * size), 0), min(math.ceil((1.0 - low_y) * size), size)
  return r0, r1, c0, c1


def _paint_capsules(image: np.ndarray, starts: np.ndarray, ends: np.ndarray, layers) -> None:
  """Paints thick lines (capsules) from starts (count, 2) to ends (count, 2); a capsule with
  start == end is a disc. layers: [(half_widths (count,), color), ...] painted in order, so a wide
  dark layer under a narrower one gives outlined shapes from one distance computation.

  Geometry stays in Python floats and the pixel work in one pass of (count, rows, cols) arrays over
  the capsules' bounding window: at 64x64, numpy's per-call overhead dominates the arithmetic.
  """
  size = image.shape[0]
  reach = max(float(np.max(half_widths)) for half_widths, _ in layers)
  low_x, low_y = (np.minimum(starts, ends).min(axis=0) - reach).tolist()
  high_x, high_y = (np.maximum(starts, ends).max(axis=0) + reach).tolist()
  r0, r1, c0, c1 = _window(low_x, low_y, high_x, high_y, size)
  if r0 >= r1 or c0 >= c1:
    return
  xs, ys = _pixel_centers(size)
  px = xs[c0:c1] - starts[:, :1]                                        # (count, cols)
  py = ys[r0:r1] - starts[:, 1:]                                        # (count, rows)
  direction = ends - starts
  length2 = (direction * direction).sum(axis=1)
  if length2.any():
    dx, dy = direction[:, :1], direction[:, 1:]
    along = (px * dx)[:, None, :] + (py * dy)[:, :, None]              # (count, rows, cols)
    t = np.clip(along / np.maximum(length2, 1e-12)[:, None, None], 0.0, 1.0)
    ex = px[:, None, :] - t * dx[:, :, None]
    ey = py[:, :, None] - t * dy[:, :, None]
    dist2 = ex * ex + ey * ey
  else:
    dist2 = (px * px)[:, None, :] + (py * py)[:, :, None]
  window = image[r0:r1, c0:c1]
  for half_widths, color in layers:
    radius2 = np.square(np.broadcast_to(half_widths, length2.shape))[:, None, None]
    window[(dist2 <= radius2).any(axis=0)] = color


def _paint_arm(image: np.ndarray, base: tuple[float, float], effector: np.ndarray, layers) -> None:
  """Paints an arm from its base (off the table) to the effector as rectangles.

  layers: [(half_width, end_inset, color), ...] painted in order; a layer stops end_inset short of
  the effector. Rectangles, not capsules: the base is off-image and the effector's own shape covers
  the other end, and two half-plane tests are much cheaper than a distance to a segment.
  """
  size = image.shape[0]
  base_x, base_y = base
  x, y = effector.tolist()
  length = max(math.hypot(x - base_x, y - base_y), 1e-9)
  forward_x, forward_y = (x - base_x) / length, (y - base_y) / length
  reach = max(half_width for half_width, _, _ in layers)
  r0, r1, c0, c1 = _window(min(x, base_x) - reach, min(y, base_y) - reach,
                           max(x, base_x) + reach, max(y, base_y) + reach, size)
  if r0 >= r1 or c0 >= c1:
    return
  xs, ys = _pixel_centers(size)
  px, py = xs[c0:c1] - base_x, ys[r0:r1, None] - base_y                 # (cols,), (rows, 1)
  along = px * forward_x + py * forward_y                               # (rows, cols)
  across = np.abs(py * forward_x - px * forward_y)
  window = image[r0:r1, c0:c1]
  for half_width, end_inset, color in layers:
    window[(across <= half_width) & (along <= length - end_inset)] = color


def _sideways(effector: np.ndarray, base: tuple[float, float]) -> tuple[np.ndarray, np.ndarray]:
  """Unit vectors (2,) from the arm's base to the effector, and to its left."""
  forward = effector - base
  forward = forward / max(math.hypot(*forward.tolist()), 1e-9)
  return forward, np.array([-forward[1], forward[0]])


def _paint_gripper(image: np.ndarray, effector: np.ndarray) -> None:
  forward, side = _sideways(effector, _ARM_BASE['robot'])
  roots = effector + _FINGER_OFFSETS * side
  _paint_capsules(image, roots, roots + 0.075 * forward, ((0.013, _GRIPPER_FINGER),))
  _paint_capsules(image, effector[None], effector[None], ((world.EFFECTOR_RADIUS, _GRIPPER_BODY),))


def _paint_hand(image: np.ndarray, effector: np.ndarray) -> None:
  forward, side = _sideways(effector, _ARM_BASE['hand'])
  offset, length_forward, length_side, half_width = _HAND_PARTS.T
  starts = effector + offset[:, None] * side
  ends = starts + length_forward[:, None] * forward + length_side[:, None] * side
  _paint_capsules(image, starts, ends, ((half_width, _SKIN_DARK), (half_width - _HAND_OUTLINE, _SKIN)))


def render(state: world.WorldState, embodiment: str = 'robot', image_size: int = 64) -> np.ndarray:
  """The camera image of a world state: (image_size, image_size, 3) uint8, top-down view.

  The arm is drawn under the blocks and the gripper or hand over them: a block pushed towards the
  arm's base stays visible, which matters more to a learner than a true occlusion order.
  """
  check_embodiment(embodiment)
  check_image_size(image_size)
  image = table(embodiment, image_size).copy()
  shaded = table(embodiment, image_size, shadow=True)
  shadows, edges, fills = _block_boxes(state.blocks, image_size)
  for region in shadows:
    image[region] = shaded[region]
  _paint_arm(image, _ARM_BASE[embodiment], state.effector, _ARM_LAYERS[embodiment])
  for region, color in zip(edges, state.colors.tolist()):
    image[region] = _BLOCK_EDGE[color]
  for region, color in zip(fills, state.colors.tolist()):
    image[region] = _BLOCK_FILL[color]
  if embodiment == 'robot':
    _paint_gripper(image, state.effector)
  else:
    _paint_hand(image, state.effector)
  return image
