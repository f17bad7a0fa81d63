"""Configs: `configs/<stage>.py:<preset>` files returning ml_collections.ConfigDict, plus overrides.

    cfg = load('configs/laq.py:small', ['--config.optim.lr=3e-4'])

Overrides of unknown fields fail with the closest valid field; values are parsed with the type of
the field they replace. The resolved config is saved as JSON in the workdir at the start of a run.
"""

from __future__ import annotations

import ast
import difflib
import importlib.util
import json
import os
from typing import Sequence

import ml_collections

_PREFIX = '--config.'


def _module_from_path(path: str):
  if not os.path.isfile(path):
    raise FileNotFoundError(f'config file {path!r} does not exist')
  name = 'lapa_config_' + os.path.splitext(os.path.basename(path))[0]
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  if not hasattr(module, 'get_config'):
    raise AttributeError(f'config file {path!r} has no get_config(preset) function')
  return module


def _all_fields(cfg: ml_collections.ConfigDict, prefix: str = '') -> list[str]:
  fields = []
  for key, value in cfg.items():
    fields.append(prefix + key)
    if isinstance(value, ml_collections.ConfigDict):
      fields.extend(_all_fields(value, prefix + key + '.'))
  return fields


def _parse_value(text: str, old):
  if isinstance(old, bool):
    if text.lower() in ('true', '1', 'yes'):
      return True
    if text.lower() in ('false', '0', 'no'):
      return False
    raise ValueError(f'expected true/false, got {text!r}')
  if isinstance(old, str):
    return text
  if old is None:
    try:
      return ast.literal_eval(text)
    except (ValueError, SyntaxError):
      return text
  if isinstance(old, int):
    return int(text)
  if isinstance(old, float):
    return float(text)
  if isinstance(old, (tuple, list)):
    value = ast.literal_eval(text)
    if not isinstance(value, (tuple, list)):
      value = (value,)
    return type(old)(value)
  return ast.literal_eval(text)


def override(cfg: ml_collections.ConfigDict, dotted: str, text: str) -> None:
  """Sets `cfg.<dotted>` from the string `text`, typed like the current value."""
  keys = dotted.split('.')
  node = cfg
  for depth, key in enumerate(keys):
    if not isinstance(node, ml_collections.ConfigDict) or key not in node:
      candidates = _all_fields(cfg)
      close = difflib.get_close_matches(dotted, candidates, n=1, cutoff=0.0)
      hint = f'; did you mean {close[0]!r}?' if close else ''
      raise KeyError(f'unknown config field {dotted!r}{hint}')
    if depth < len(keys) - 1:
      node = node[key]
  old = node[keys[-1]]
  if isinstance(old, ml_collections.ConfigDict):
    raise KeyError(f'config field {dotted!r} is a group; set one of its fields instead')
  try:
    value = _parse_value(text, old)
  except (ValueError, SyntaxError) as e:
    raise ValueError(f'config field {dotted!r}: cannot parse {text!r} as {type(old).__name__} ({e})') from None
  with node.ignore_type():
    node[keys[-1]] = value


def load(spec: str, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
  """Loads `path.py[:preset]` and applies `--config.a.b=value` overrides."""
  path, _, preset = spec.partition(':')
  module = _module_from_path(path)
  cfg = module.get_config(preset) if preset else module.get_config()
  for item in overrides:
    if not item.startswith(_PREFIX) or '=' not in item:
      raise ValueError(f'override {item!r}: expected --config.<field>=<value>')
    dotted, _, text = item[len(_PREFIX):].partition('=')
    override(cfg, dotted, text)
  cfg.lock()
  return cfg


def save(cfg: ml_collections.ConfigDict, workdir: str, name: str = 'config.json') -> str:
  """Writes the resolved config as JSON into `workdir` (atomically)."""
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, name)
  with open(path + '.tmp', 'w') as f:
    json.dump(cfg.to_dict(), f, indent=2, sort_keys=True, default=str)
  os.replace(path + '.tmp', path)
  return path


def load_workdir(workdir: str, stage: str, made_by: str, name: str = 'config.json') -> ml_collections.ConfigDict:
  """The resolved config a run saved in `workdir`, checked to be of `stage`; `made_by` says in the
  error what writes such a workdir (e.g. '`lapa train configs/laq.py:...`')."""
  path = os.path.join(workdir, name)
  if not os.path.isfile(path):
    raise FileNotFoundError(f'{path}: missing; expected a {stage} workdir ({made_by})')
  with open(path) as f:
    config = ml_collections.ConfigDict(json.load(f))
  if config.get('stage') != stage:
    raise ValueError(f'{path}: stage is {config.get("stage")!r}, not a {stage} workdir ({made_by})')
  if 'model' not in config:
    raise ValueError(f'{path}: no model group')
  return config


def differences(saved: dict, current: dict, prefix: str = '') -> list[str]:
  """'model.dim: 128 -> 96' for every leaf field whose value differs between two config dicts."""
  lines = []
  for key in sorted(set(saved) | set(current)):
    old, new = saved.get(key, '<absent>'), current.get(key, '<absent>')
    if isinstance(old, dict) and isinstance(new, dict):
      lines += differences(old, new, f'{prefix}{key}.')
    elif json.dumps(old, default=str) != json.dumps(new, default=str):
      lines.append(f'{prefix}{key}: {old!r} -> {new!r}')
  return lines


def split_overrides(argv: Sequence[str]) -> tuple[list[str], list[str]]:
  """Separates `--config.*` overrides from the other command-line arguments."""
  overrides = [a for a in argv if a.startswith(_PREFIX)]
  rest = [a for a in argv if not a.startswith(_PREFIX)]
  return overrides, rest
