"""Open-X Embodiment registry: where each dataset keeps its cameras, instruction and actions, its
control frequency, and how its episodes are read and standardised (actions via standardize.py).

    dataset = open_dataset('/data/oxe', 'taco_play')          # finds taco_play/<version> on disk
    dataset.spec.frame_offset(0.6)                            # 9 steps at 15 Hz
    reader = EpisodeReader(dataset)
    for episode in reader.episodes(reader.segments('train')[0]):
      episode['image'], episode['instruction'], episode['action']   # (time,) bytes, (time,), (time, 7)

Facts come from ../shared/reference/openx_rlds.md (section 2) for the datasets it covers
(`source='reference'`), otherwise from Octo's/OpenVLA's dataset configs (`source='octo'`: keys not
checked against a real copy here; `open_dataset` checks them against features.json before reading).
Datasets written by lapa_jax itself (human videos, the built-in world) describe themselves in a
`lapa_spec.json` next to their features.json.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import json
import logging
import math
import os
import re
from typing import Any, Iterator, Mapping

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from lapa_jax.data import pairs  # the one rounding rule for frame offsets lives there
from lapa_jax.data import rlds
from lapa_jax.data import standardize as std
from lapa_jax.envs import metaworld as metaworld_env  # numpy only: its dataset spec, for the registry

DataError = rlds.DataError
SPEC_FILE = 'lapa_spec.json'
EMBODIMENTS = ('robot', 'human')
CORRUPT_POLICIES = ('skip', 'error')
# What TF raises on a truncated or corrupted tfrecord (bad length/CRC, or bytes that do not parse).
READ_ERRORS = (tf.errors.DataLossError, tf.errors.InvalidArgumentError)
_log = logging.getLogger(__name__)


# Step features `lapa label` adds to a dataset.
LABEL_KEYS = ('latent_action', 'vision_tokens')


class MissingDataset(DataError):
  """No directory for a dataset name under the data directory."""


_RT1_ACTION = ('action/world_vector', 'action/rotation_delta', 'action/gripper_closedness_action')
_NL = 'observation/natural_language_instruction'
_STEP_NL = 'language_instruction'


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
  """How to read one Open-X dataset. Keys are step paths ('observation/image')."""
  name: str
  fps: float                          # control frequency of the raw data (Hz)
  image_key: str                      # primary camera
  wrist_image_key: str | None = None
  instruction_key: str | None = _NL   # None: the dataset has no instruction
  instruction_codes: bool = False     # instruction stored as zero-padded int32 UTF-8 codes
  transform: std.Transform | None = None   # raw fields -> (action (time, 7), proprio); None: no actions
  fields: tuple[str, ...] = ()        # step paths the transform reads
  subsample: int = 1                  # keep every n-th step; actions summed over the skipped steps
  action_layout: tuple[str, ...] | None = None   # a spec file's action layout (its transform is from_layout)
  embodiment: str = 'robot'           # 'robot' | 'human': selects the default pair offset
  frame_offset_seconds: float | None = None   # pair window of this dataset; None: the embodiment's default
  source: str = 'reference'           # where the keys come from: 'reference' | 'octo' | 'metadata'

  @property
  def effective_fps(self) -> float:
    """Steps per second after time subsampling; frame offsets are counted at this rate."""
    return self.fps / self.subsample

  def frame_offset(self, seconds: float) -> int:
    """Pair offset in standardised steps for `seconds`: max(1, round(seconds * effective_fps))."""
    return pairs.resolve_frame_offset(frame_offset_seconds=seconds, fps=self.effective_fps)

  def description(self) -> str:
    """Everything that determines the standardised episodes, as text (hashed by statistics.py)."""
    # The name and key source do not change the episodes (bridge_orig is bridge_dataset renamed).
    fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
              if f.name not in ('transform', 'name', 'source')}
    if self.transform is None:
      transform = 'none'
    elif isinstance(self.transform, functools.partial):  # a spec file's layout: its arguments matter
      transform = inspect.getsource(self.transform.func) + json.dumps(self.transform.keywords, sort_keys=True)
    else:
      transform = inspect.getsource(self.transform)
    return json.dumps(fields, sort_keys=True, default=str) + '\n' + transform


def _spec(name, fps, image_key, transform, fields, **kwargs) -> DatasetSpec:
  return DatasetSpec(name=name, fps=fps, image_key=image_key, transform=transform, fields=tuple(fields),
                     **kwargs)


def _converted(name, fps, transform, fields=('action', 'observation/state'), image_key='observation/image',
               wrist_image_key='observation/wrist_image', **kwargs) -> DatasetSpec:
  """The '*_converted_externally_to_rlds' template: step-level language_instruction, Tensor action."""
  return _spec(name, fps, image_key, transform, fields, wrist_image_key=wrist_image_key,
               instruction_key=_STEP_NL, source='octo', **kwargs)


_SPECS = [
    # --- datasets whose schema ../shared/reference/openx_rlds.md gives -------------------------------
    _spec('bridge_dataset', 5, 'observation/image_0', std.bridge, ('action', 'observation/state'),
          instruction_key=_STEP_NL),
    _spec('bridge', 5, 'observation/image', std.bridge_oxe,
          ('action/open_gripper', 'observation/state')),
    _spec('fractal20220817_data', 3, 'observation/image', std.fractal,
          _RT1_ACTION + ('observation/base_pose_tool_reached', 'observation/gripper_closed')),
    _spec('kuka', 10, 'observation/image', std.kuka,
          _RT1_ACTION + ('observation/clip_function_input/base_pose_tool_reached',
                         'observation/gripper_closed')),
    _spec('taco_play', 15, 'observation/rgb_static', std.taco_play,
          ('action/rel_actions_world', 'observation/robot_obs'), wrist_image_key='observation/rgb_gripper'),
    _spec('jaco_play', 10, 'observation/image', std.jaco_play,
          ('action/world_vector', 'action/gripper_closedness_action',
           'observation/end_effector_cartesian_pos'), wrist_image_key='observation/image_wrist'),
    _spec('language_table', 10, 'observation/rgb', std.language_table,
          ('action', 'observation/effector_translation'), instruction_key='observation/instruction',
          instruction_codes=True),
    _spec('roboturk', 10, 'observation/front_rgb', std.absolute_closedness, _RT1_ACTION),
    _spec('berkeley_autolab_ur5', 5, 'observation/image', std.berkeley_autolab_ur5,
          _RT1_ACTION + ('observation/robot_state',), wrist_image_key='observation/hand_image'),
    _spec('toto', 30, 'observation/image', std.toto,
          ('action/world_vector', 'action/rotation_delta', 'action/open_gripper', 'observation/state')),
    _spec('viola', 20, 'observation/agentview_rgb', std.viola,
          _RT1_ACTION + ('observation/joint_states', 'observation/gripper_states'),
          wrist_image_key='observation/eye_in_hand_rgb'),
    _spec('berkeley_cable_routing', 10, 'observation/image', std.cable_routing,
          ('action/world_vector', 'action/rotation_delta', 'observation/robot_state'),
          wrist_image_key='observation/wrist45_image'),
    # Only a wrist camera: it serves as the primary image.
    _spec('nyu_door_opening_surprising_effectiveness', 3, 'observation/image', std.rt1, _RT1_ACTION),
    # --- the rest of the magic soup (keys from Octo/OpenVLA configs) --------------------------------
    _converted('stanford_hydra_dataset_converted_externally_to_rlds', 10, std.flat_inverted),
    _converted('austin_buds_dataset_converted_externally_to_rlds', 20, std.flat_clipped_inverted),
    _converted('nyu_franka_play_dataset_converted_externally_to_rlds', 3, std.nyu_franka_play,
               wrist_image_key=None),
    _converted('furniture_bench_dataset_converted_externally_to_rlds', 10, std.furniture_bench),
    _converted('ucsd_kitchen_dataset_converted_externally_to_rlds', 2, std.drop_last_dim, wrist_image_key=None),
    _converted('austin_sailor_dataset_converted_externally_to_rlds', 20, std.flat_clipped_inverted),
    _converted('austin_sirius_dataset_converted_externally_to_rlds', 20, std.flat_clipped_inverted),
    _converted('dlr_edan_shared_control_converted_externally_to_rlds', 5, std.flat_inverted,
               wrist_image_key=None),
    _converted('iamlab_cmu_pickup_insert_converted_externally_to_rlds', 20, std.iamlab_pickup_insert),
    _converted('utaustin_mutex', 20, std.flat_clipped_inverted),
    _converted('berkeley_fanuc_manipulation', 10, std.fanuc),
    _converted('cmu_stretch', 10, std.drop_last_dim, wrist_image_key=None),
    _spec('bc_z', 10, 'observation/image', std.bc_z,
          ('action/future/xyz_residual', 'action/future/axis_angle_residual', 'action/future/target_close'),
          source='octo'),
    _converted('fmb_dataset', 10, std.flat_open_is_one, fields=('action',),
               image_key='observation/image_side_1', wrist_image_key='observation/image_wrist_1'),
    _converted('dobbe', 3.75, std.flat_open_is_one, fields=('action',), image_key='observation/wrist_image',
               wrist_image_key=None),
]

REGISTRY: dict[str, DatasetSpec] = {spec.name: spec for spec in _SPECS}
# OpenVLA renames bridge_dataset's directory to bridge_orig (its README); same files, same schema.
REGISTRY['bridge_orig'] = dataclasses.replace(REGISTRY['bridge_dataset'], name='bridge_orig')
# A mixture naming one of these also finds the dataset under the other directory name.
DIRECTORY_ALIASES = {'bridge_dataset': ('bridge_orig',), 'bridge_orig': ('bridge_dataset',)}


def register(spec: DatasetSpec) -> None:
  """Adds (or replaces) a registry entry, e.g. a local dataset or a subsampled variant."""
  REGISTRY[spec.name] = spec


# --- opening datasets -----------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Dataset:
  """An opened dataset: its registry entry, TFDS builder and the version directory found on disk."""
  spec: DatasetSpec
  builder: tfds.core.DatasetBuilder
  path: str

  @property
  def version(self) -> str:
    return str(self.builder.info.version)


STANDARD_ACTION = ('x', 'y', 'z', 'roll', 'pitch', 'yaw', 'gripper')
SPEC_KEYS = ('fps', 'image_key', 'wrist_image_key', 'instruction_key', 'embodiment', 'frame_offset_seconds',
             'action', 'action_key')
SPEC_HELP = 'see "Your own dataset" in README.md, or propose one with lapa inspect-data --path DIR --propose-spec FILE'


def _action_transform(action: Mapping[str, Any] | None, where: str):
  """(transform, fields, layout) of a spec's `action` entry (None: the dataset has no actions)."""
  if action is None:
    return None, (), None
  if not isinstance(action, Mapping) or not isinstance(action.get('key'), str):
    raise DataError(f'{where}: "action" must be null or {{"key": step path, "layout": [...], "gripper_open": v, '
                    f'"gripper_closed": v}}; {SPEC_HELP}')
  unknown = set(action) - {'key', 'layout', 'gripper_open', 'gripper_closed'}
  if unknown:
    raise DataError(f'{where}: unknown action field(s) {", ".join(sorted(unknown))} '
                    '(expected key, layout, gripper_open, gripper_closed)')
  layout = tuple(action.get('layout') or STANDARD_ACTION)
  bad = [name for name in layout if name not in std.LAYOUT_NAMES]
  if bad or len(set(name for name in layout if name != 'ignore')) != len([n for n in layout if n != 'ignore']):
    raise DataError(f'{where}: action layout {list(layout)} must name each stored entry once, with names from '
                    f'{", ".join(std.LAYOUT_NAMES)} ({"unknown: " + ", ".join(bad) if bad else "a name repeats"})')
  gripper_open, gripper_closed = action.get('gripper_open', 1.0), action.get('gripper_closed', 0.0)
  if 'gripper' in layout:
    for name, value in (('gripper_open', gripper_open), ('gripper_closed', gripper_closed)):
      if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise DataError(f'{where}: action {name} must be a number (the stored gripper value meaning {name[8:]}), '
                        f'got {value!r}')
    if gripper_open == gripper_closed:
      raise DataError(f'{where}: action gripper_open and gripper_closed are both {gripper_open}')
  transform = functools.partial(std.from_layout, key=action['key'], layout=layout,
                                gripper_open=float(gripper_open), gripper_closed=float(gripper_closed))
  return transform, (action['key'],), layout


def spec_from_dict(meta: Mapping[str, Any], name: str, where: str) -> DatasetSpec:
  """A DatasetSpec from the JSON form of a spec (lapa_spec.json, a --spec file, config fields).

  Keys: fps, image_key (required); wrist_image_key, instruction_key (null: none), embodiment
  ('robot'|'human'), frame_offset_seconds (the LAQ pair window when the embodiment's default does not
  fit), action (null: no actions, else {key, layout, gripper_open, gripper_closed}: `layout` names
  each stored entry x, y, z, roll, pitch, yaw, gripper or ignore; the gripper is mapped linearly so
  that gripper_open -> 1 and gripper_closed -> 0). `action_key` is short for an action already in
  the standard layout [x, y, z, roll, pitch, yaw, gripper (1 open)] (lapa_jax's own writers).
  """
  if not isinstance(meta, Mapping):
    raise DataError(f'{where}: expected a JSON object with {", ".join(SPEC_KEYS)}; {SPEC_HELP}')
  unknown = sorted(set(meta) - set(SPEC_KEYS))
  if unknown:
    raise DataError(f'{where}: unknown key(s) {", ".join(unknown)} (expected {", ".join(SPEC_KEYS)})')
  for key in ('fps', 'image_key'):
    if meta.get(key) in (None, ''):
      raise DataError(f'{where}: {key} is missing; {SPEC_HELP}')
  fps = meta['fps']
  if isinstance(fps, bool) or not isinstance(fps, (int, float)) or not fps > 0:
    raise DataError(f'{where}: fps must be a number of steps per second > 0, got {fps!r}')
  if meta.get('embodiment', 'robot') not in EMBODIMENTS:
    raise DataError(f'{where}: embodiment {meta["embodiment"]!r} is not one of {EMBODIMENTS}')
  if 'action' in meta and 'action_key' in meta:
    raise DataError(f'{where}: give action or action_key, not both')
  action = meta.get('action')
  if meta.get('action_key'):
    action = {'key': meta['action_key']}
  transform, fields, layout = _action_transform(action, where)
  return DatasetSpec(
      name=name, fps=float(fps), image_key=meta['image_key'], wrist_image_key=meta.get('wrist_image_key') or None,
      instruction_key=meta.get('instruction_key') or None, transform=transform, fields=fields, action_layout=layout,
      embodiment=meta.get('embodiment', 'robot'), frame_offset_seconds=meta.get('frame_offset_seconds'),
      source='metadata')


def spec_to_dict(spec: DatasetSpec) -> dict[str, Any]:
  """The JSON form of a spec (spec_from_dict's input); registry transforms other than layouts have none."""
  meta = {'fps': spec.effective_fps, 'image_key': spec.image_key, 'wrist_image_key': spec.wrist_image_key,
          'instruction_key': spec.instruction_key, 'embodiment': spec.embodiment}
  if spec.frame_offset_seconds is not None:
    meta['frame_offset_seconds'] = spec.frame_offset_seconds
  if spec.transform is None:
    meta['action'] = None
  elif isinstance(spec.transform, functools.partial) and spec.transform.func is std.from_layout:
    keywords = spec.transform.keywords
    meta['action'] = {'key': keywords['key'], 'layout': list(keywords['layout']),
                      'gripper_open': keywords['gripper_open'], 'gripper_closed': keywords['gripper_closed']}
  else:
    raise DataError(f'{spec.name}: its actions come from the registry transform {spec.transform.__name__}, '
                    'which a spec file cannot express')
  return meta


def read_spec_file(path: str, name: str) -> DatasetSpec:
  """The spec in the JSON file `path` for dataset `name`; one-line errors naming the file."""
  if not tf.io.gfile.exists(path):
    raise DataError(f'{path}: spec file not found; {SPEC_HELP}')
  with tf.io.gfile.GFile(path) as f:
    try:
      meta = json.load(f)
    except json.JSONDecodeError as error:
      raise DataError(f'{path}: not valid JSON ({error})') from None
  return spec_from_dict(meta, name, path)


def spec_from_metadata(version_dir: str, name: str) -> DatasetSpec | None:
  """The spec in the dataset's own `lapa_spec.json` (lapa_jax writers, or a user's), or None."""
  path = os.path.join(version_dir, SPEC_FILE)
  return read_spec_file(path, name) if tf.io.gfile.exists(path) else None


def find_dataset_dir(data_dir: str, name: str) -> str:
  """`<data_dir>/<name>/<version>` (highest version on disk), trying directory aliases (bridge_orig)."""
  tried = []
  for candidate in (name,) + DIRECTORY_ALIASES.get(name, ()):
    path = os.path.join(data_dir, candidate)
    tried.append(path)
    if tf.io.gfile.isdir(path):
      return rlds.resolve_version_dir(path)
  raise MissingDataset(f'dataset {name!r} not found: no directory {" or ".join(tried)}')


def open_dataset(data_dir: str, name: str, *, use_wrist: bool = False) -> Dataset:
  """Opens dataset `name` under `data_dir` and checks its features against the registry entry."""
  return open_path(find_dataset_dir(data_dir, name), name=name, use_wrist=use_wrist)


def open_path(path: str, *, name: str | None = None, spec: DatasetSpec | None = None,
              use_wrist: bool = False) -> Dataset:
  """Opens the dataset at `path` (`<dir>/<name>[/<version>]`) with `spec`, else its own lapa_spec.json,
  else the registry entry of its name; checks the features against the spec."""
  version_dir = rlds.resolve_version_dir(path)
  name = name or os.path.basename(os.path.dirname(version_dir))
  spec = spec or spec_from_metadata(version_dir, name) or REGISTRY.get(name)
  if spec is None:
    raise DataError(f'{version_dir}: dataset {name!r} is not in the Open-X registry and has no {SPEC_FILE}; '
                    f'describe it with a spec file ({SPEC_HELP}) and pass it as data.spec_file')
  builder = rlds.open_builder(version_dir)
  check_features(spec, builder, version_dir, use_wrist=use_wrist)
  return Dataset(spec=spec, builder=builder, path=version_dir)


SPEC_OVERRIDES = ('fps', 'image_key', 'wrist_image_key', 'instruction_key', 'embodiment', 'frame_offset_seconds',
                  'action_key', 'action_layout', 'gripper_open', 'gripper_closed')


def override_spec(spec: DatasetSpec | None, overrides: Mapping[str, Any], name: str, where: str) -> DatasetSpec:
  """`spec` (None: nothing known yet) with single fields replaced, e.g. from a stage's data.spec group.

  'none' as instruction_key or wrist_image_key removes it; action_layout is 'x,y,z,gripper' text;
  setting action_key or action_layout rebuilds the action transform (with gripper_open/closed).
  """
  unknown = set(overrides) - set(SPEC_OVERRIDES)
  if unknown:
    raise DataError(f'{where}: unknown spec field(s) {", ".join(sorted(unknown))}')
  if spec is None:
    meta = {key: overrides.get(key) for key in ('fps', 'image_key')}
    spec = spec_from_dict({k: v for k, v in meta.items() if v is not None}, name, where)
  changes = {}
  for key in ('fps', 'image_key', 'embodiment', 'frame_offset_seconds'):
    if key in overrides:
      changes[key] = overrides[key]
  for key in ('instruction_key', 'wrist_image_key'):
    if key in overrides:
      changes[key] = None if overrides[key] == 'none' else overrides[key]
  if 'fps' in changes and not (isinstance(changes['fps'], (int, float)) and changes['fps'] > 0):
    raise DataError(f'{where}: fps must be > 0, got {changes["fps"]!r}')
  if changes.get('embodiment', spec.embodiment) not in EMBODIMENTS:
    raise DataError(f'{where}: embodiment {changes["embodiment"]!r} is not one of {EMBODIMENTS}')
  if 'action_key' in overrides or 'action_layout' in overrides:
    key = overrides.get('action_key') or (spec.fields[0] if spec.action_layout else None)
    if not key:
      raise DataError(f'{where}: action_layout needs action_key (the step path of the stored action)')
    layout = overrides.get('action_layout')
    action = {'key': key, 'gripper_open': overrides.get('gripper_open', 1.0),
              'gripper_closed': overrides.get('gripper_closed', 0.0)}
    if layout:
      action['layout'] = [part.strip() for part in layout.split(',')] if isinstance(layout, str) else list(layout)
    changes['transform'], changes['fields'], changes['action_layout'] = _action_transform(action, where)
  return dataclasses.replace(spec, source='metadata', **changes) if changes else spec


def _describe(feature) -> str:
  if isinstance(feature, tfds.features.Image):
    return f'Image{tuple(feature.shape)} {feature.np_dtype.__name__}'
  if isinstance(feature, tfds.features.Text):
    return 'Text'
  return f'{type(feature).__name__}{tuple(feature.shape)} {np.dtype(feature.np_dtype).name}'


def check_features(spec: DatasetSpec, builder, path: str, *, use_wrist: bool = False) -> None:
  """DataError naming the first registry key that features.json lacks or types differently."""
  features = rlds.step_features(builder)
  where = f'{spec.name} ({path}/features.json)'

  def require(key, what, ok, expected):
    if key not in features:
      raise DataError(f'{where}: no step feature {key!r} ({what}, registry source: {spec.source}); '
                      f'step features: {", ".join(sorted(features))}')
    if not ok(features[key]):
      raise DataError(f'{where}: step feature {key!r} ({what}) is {_describe(features[key])}, expected {expected}')

  is_image = lambda f: isinstance(f, tfds.features.Image) and f.np_dtype == np.uint8
  require(spec.image_key, 'primary image', is_image, 'a uint8 Image')
  if use_wrist and spec.wrist_image_key:
    require(spec.wrist_image_key, 'wrist image', is_image, 'a uint8 Image')
  if spec.instruction_key:
    if spec.instruction_codes:
      require(spec.instruction_key, 'instruction codes',
              lambda f: isinstance(f, tfds.features.Tensor) and np.issubdtype(f.np_dtype, np.integer),
              'an integer Tensor of UTF-8 codes')
    else:
      require(spec.instruction_key, 'instruction', lambda f: f.np_dtype == object or f.tf_dtype == tf.string,
              'Text')
  for key in spec.fields:
    require(key, 'read by the action standardisation',
            lambda f: isinstance(f, tfds.features.Tensor) and not isinstance(f, tfds.features.Image),
            'a numeric Tensor')


# --- reading standardised episodes ----------------------------------------------------------------

def _tf_message(error: Exception) -> str:
  """The useful part of a TF error message (without the function-node wrapper and op name)."""
  text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
  text = re.sub(r'^\{\{function_node [^}]*\}\}\s*', '', text)
  return re.sub(r"'? failed with |\s*\[Op:[^\]]*\].*$", lambda m: ': ' if 'failed' in m.group(0) else '', text)


@dataclasses.dataclass(frozen=True)
class Segment:
  """Consecutive episodes [start, stop) of a base split, all inside one shard file."""
  base_split: str
  start: int
  stop: int
  filename: str

  @property
  def size(self) -> int:
    return self.stop - self.start

  def split(self, skip: int = 0) -> str:
    return f'{self.base_split}[{self.start + skip}:{self.stop}]'


def segments(builder, split: str, process_index: int = 0, process_count: int = 1) -> list[Segment]:
  """This process's disjoint slice of `split` as per-shard segments (the slices of all processes
  cover the split: the same slicing as rlds.episodes)."""
  base = split.split('[')[0]
  if '+' in split or base not in builder.info.splits:
    raise DataError(f'{builder.data_dir}: split {split!r} must be one split, optionally sliced '
                    f'(e.g. train or train[:95%]); available: {", ".join(builder.info.splits.keys())}')
  rlds.check_split(builder, split)
  local = rlds.process_split(split, process_index, process_count)
  info = builder.info.splits[base]
  offsets = dict(zip(info.filenames, np.concatenate([[0], np.cumsum(info.shard_lengths)]).tolist()))
  out = []
  for instruction in builder.info.splits[local].file_instructions:
    start = offsets[os.path.basename(instruction.filename)] + instruction.skip
    if instruction.take > 0:
      out.append(Segment(base, start, start + instruction.take, instruction.filename))
  return out


class EpisodeReader:
  """Reads standardised episodes of one dataset, images still encoded.

  An episode is {'image': (time,) bytes, 'instruction': (time,) bytes, 'action': (time, 7) float32
  or None, 'proprio': (time, dim) float32 or None, 'wrist_image' with use_wrist, and each of
  `step_keys` (e.g. 'latent_action' of a labelled dataset) as stored}. Only the fields the registry
  names are kept (in the tf.data map, before anything reaches Python). A corrupted or truncated
  shard is skipped with a counted warning (on_corrupt='skip') or stops with a DataError.
  """

  def __init__(self, dataset: Dataset, *, use_wrist: bool = False, on_corrupt: str = 'skip',
               read_threads: int = 1, step_keys: tuple[str, ...] = ()):
    if on_corrupt not in CORRUPT_POLICIES:
      raise DataError(f'on_corrupt must be one of {CORRUPT_POLICIES}, got {on_corrupt!r}')
    self.dataset = dataset
    self.spec = dataset.spec
    self.use_wrist = use_wrist and self.spec.wrist_image_key is not None
    self.on_corrupt = on_corrupt
    self.read_threads = max(1, int(read_threads))
    self.corrupt_segments = 0
    self._features = rlds.step_features(dataset.builder)
    missing = [key for key in step_keys if key not in self._features]
    if missing:
      raise DataError(f'{dataset.path}: no step feature {missing[0]!r}'
                      + (' (a labelled dataset has it: run lapa label on this dataset first)'
                         if missing[0] in LABEL_KEYS else '')
                      + f'; step features: {", ".join(sorted(self._features))}')
    self.step_keys = tuple(step_keys)

  def segments(self, split: str, process_index: int = 0, process_count: int = 1) -> list[Segment]:
    return segments(self.dataset.builder, split, process_index, process_count)

  def _select(self, episode):
    steps = episode[rlds.STEPS]
    out = {'image': rlds.get_path(steps, self.spec.image_key)}
    if self.use_wrist:
      out['wrist_image'] = rlds.get_path(steps, self.spec.wrist_image_key)
    if self.spec.instruction_key:
      out['instruction'] = rlds.get_path(steps, self.spec.instruction_key)
    for key in self.step_keys:
      out['step/' + key] = rlds.get_path(steps, key)
    for key in self.spec.fields:
      value = rlds.get_path(steps, key)
      feature = self._features[key]
      if getattr(feature, '_encoding', None) == tfds.features.Encoding.ZLIB:
        # SkipDecoding leaves zlib tensors as compressed bytes, one string per step.
        value = tf.io.decode_raw(tf.io.decode_compressed(value, 'ZLIB'), feature.tf_dtype)
        value = tf.reshape(value, [-1, *feature.shape])
      out['field/' + key] = value
    return out

  def read(self, split: str, prefetch: int = 2, decode=None) -> Iterator[dict[str, np.ndarray]]:
    """Selected raw fields of the episodes of `split` (an expression such as
    'train[3:6]+train[0:3]'), in that order, with `decode(fields) -> fields` applied in tf.data
    (e.g. decoding the images in parallel). TF errors of corrupt shards propagate."""
    dataset = rlds.episodes(self.dataset.builder, split, sequential=True)
    dataset = dataset.map(self._select, num_parallel_calls=self.read_threads, deterministic=True)
    if decode is not None:
      dataset = dataset.map(decode, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return dataset.prefetch(prefetch).as_numpy_iterator()

  def corrupt(self, segment: Segment, read: int, error: Exception) -> None:
    """Applies the on_corrupt policy to `error` raised while reading `segment` after `read` episodes."""
    message = _tf_message(error)
    if self.on_corrupt == 'error':
      raise DataError(f'{segment.filename}: corrupted or truncated tfrecord after episode {read} of '
                      f'{segment.size} ({message}); set data.on_corrupt=skip to skip the rest of the shard') from None
    self.corrupt_segments += 1
    _log.warning('%s: corrupted or truncated tfrecord after episode %d of %d, skipping the rest of '
                 'this shard (%d skipped so far): %s', segment.filename, read, segment.size,
                 self.corrupt_segments, message)

  def standardize(self, raw: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """Raw selected fields of one episode -> the standardised episode."""
    action = proprio = None
    if self.spec.transform is not None:
      fields = {key[len('field/'):]: value for key, value in raw.items() if key.startswith('field/')}
      try:
        action, proprio = self.spec.transform(fields)
      except ValueError as error:  # a spec file's layout that does not fit the data
        raise DataError(f'{self.spec.name} ({self.dataset.path}): {error}') from None
      if action.ndim != 2 or action.shape[1] != 7:
        raise DataError(f'{self.spec.name}: standardised action has shape {action.shape}, expected (time, 7); '
                        'the registry transform does not match this copy of the data')
    every = self.spec.subsample
    length = len(raw['image']) if action is None else len(action)  # e.g. bridge drops its last step
    episode = {'image': raw['image'][:length:every]}
    if self.use_wrist:
      episode['wrist_image'] = raw['wrist_image'][:length:every]
    if 'instruction' not in raw:
      episode['instruction'] = np.full(len(episode['image']), b'', dtype=object)
    elif self.spec.instruction_codes:
      episode['instruction'] = std.decode_instruction_codes(raw['instruction'][:length:every])
    else:
      episode['instruction'] = raw['instruction'][:length:every]
    for key in self.step_keys:
      episode[key] = raw['step/' + key][:length:every]
    episode['action'] = None if action is None else std.subsample(action, every)
    episode['proprio'] = None if proprio is None else proprio[::every]
    return episode

  def episodes(self, segment: Segment, skip: int = 0) -> Iterator[dict[str, Any]]:
    """Standardised episodes of `segment` after the first `skip`; a corrupt rest is skipped or raised."""
    iterator = self.read(segment.split(skip))
    read = skip
    while True:
      try:
        raw = next(iterator)
      except StopIteration:
        return
      except READ_ERRORS as error:
        self.corrupt(segment, read, error)
        return
      read += 1
      yield self.standardize(raw)


def episode_bytes(dataset: Dataset, split: str = 'train') -> float:
  """Mean on-disk bytes of one episode of `split` (all fields), from dataset_info.json."""
  info = dataset.builder.info.splits[split.split('[')[0]]
  return info.num_bytes / max(1, info.num_examples)


# lapa_jax's own Meta-World datasets (`lapa world --env metaworld:mt10|mt3`), readable by name in a
# mixture like the Open-X ones: 20 Hz after the action repeat, actions already Open-X 7-D.
for _suite in metaworld_env.SUITES:
  for _embodiment in ('robot', 'video'):
    register(spec_from_dict(metaworld_env.dataset_spec(actions=_embodiment == 'robot'),
                            f'metaworld_{_suite}_{_embodiment}', 'the Meta-World registry entry'))


def default_frame_offset(spec: DatasetSpec, robot_seconds: float = 0.6, human_seconds: float = 2.4) -> int:
  """LAQ pair offset: the dataset's own window if it has one, else 0.6 s for robot data and 2.4 s
  for human video, at the standardised rate."""
  if spec.frame_offset_seconds is not None:
    seconds = spec.frame_offset_seconds
  else:
    seconds = human_seconds if spec.embodiment == 'human' else robot_seconds
  if not math.isfinite(seconds) or seconds <= 0:
    raise DataError(f'frame offset seconds must be > 0, got {seconds}')
  return spec.frame_offset(seconds)
