"""Named Open-X mixtures, ad-hoc 'name:weight' lists, and sampling proportions.

    parse('oxe_magic_soup')                  # [('fractal20220817_data', 0.5409), ('kuka', 0.8341), ...]
    parse('bridge_dataset:1,taco_play:2')    # ad-hoc
    datasets = resolve('/data/oxe', 'lapa_openx', skip_missing=True)   # [(oxe.Dataset, weight), ...]

Sampling proportions are weight x dataset size (number of standardised transitions, as Octo's
balance_weights=True), or weight x episodes, or the weights alone (`balance`).
"""

from __future__ import annotations

import difflib
import logging
import os
from typing import Sequence

import numpy as np

from lapa_jax.data import oxe

DataError = oxe.DataError
BALANCES = ('transitions', 'episodes', 'none')
_log = logging.getLogger(__name__)

# Octo's OXE_MAGIC_SOUP (octo/data/oxe/oxe_dataset_mixes.py): 25 datasets, weights before balancing.
OXE_MAGIC_SOUP = [
    ('fractal20220817_data', 0.54087122203), ('kuka', 0.8341046294), ('bridge_dataset', 1.0),
    ('taco_play', 2.0), ('jaco_play', 1.0), ('berkeley_cable_routing', 1.0), ('roboturk', 2.0),
    ('nyu_door_opening_surprising_effectiveness', 1.0), ('viola', 2.0), ('berkeley_autolab_ur5', 2.0),
    ('toto', 1.0), ('language_table', 0.1), ('stanford_hydra_dataset_converted_externally_to_rlds', 2.0),
    ('austin_buds_dataset_converted_externally_to_rlds', 1.0),
    ('nyu_franka_play_dataset_converted_externally_to_rlds', 3.0),
    ('furniture_bench_dataset_converted_externally_to_rlds', 0.1),
    ('ucsd_kitchen_dataset_converted_externally_to_rlds', 2.0),
    ('austin_sailor_dataset_converted_externally_to_rlds', 1.0),
    ('austin_sirius_dataset_converted_externally_to_rlds', 1.0), ('bc_z', 0.2),
    ('dlr_edan_shared_control_converted_externally_to_rlds', 1.0),
    ('iamlab_cmu_pickup_insert_converted_externally_to_rlds', 1.0), ('utaustin_mutex', 1.0),
    ('berkeley_fanuc_manipulation', 2.0), ('cmu_stretch', 1.0),
]

# LAPA pretrains on OpenVLA's Open-X mixture (~970k trajectories): `oxe_magic_soup_plus_minus` in
# openvla/prismatic/vla/datasets/rlds/oxe/mixtures.py - the magic soup with fractal at 1.0, without
# nyu_door_opening and language_table, plus fmb and dobbe.
LAPA_OPENX = [
    ('fractal20220817_data', 1.0), ('kuka', 0.8341046294), ('bridge_orig', 1.0), ('taco_play', 2.0),
    ('jaco_play', 1.0), ('berkeley_cable_routing', 1.0), ('roboturk', 2.0), ('viola', 2.0),
    ('berkeley_autolab_ur5', 2.0), ('toto', 1.0),
    ('stanford_hydra_dataset_converted_externally_to_rlds', 2.0),
    ('austin_buds_dataset_converted_externally_to_rlds', 1.0),
    ('nyu_franka_play_dataset_converted_externally_to_rlds', 3.0),
    ('furniture_bench_dataset_converted_externally_to_rlds', 0.1),
    ('ucsd_kitchen_dataset_converted_externally_to_rlds', 2.0),
    ('austin_sailor_dataset_converted_externally_to_rlds', 1.0),
    ('austin_sirius_dataset_converted_externally_to_rlds', 1.0),
    ('dlr_edan_shared_control_converted_externally_to_rlds', 1.0),
    ('iamlab_cmu_pickup_insert_converted_externally_to_rlds', 1.0), ('utaustin_mutex', 1.0),
    ('berkeley_fanuc_manipulation', 2.0), ('cmu_stretch', 1.0), ('bc_z', 0.2), ('fmb_dataset', 1.0),
    ('dobbe', 0.2),
]

NAMED_MIXTURES: dict[str, list[tuple[str, float]]] = {
    'bridge': [('bridge_dataset', 1.0)],
    'oxe_magic_soup': OXE_MAGIC_SOUP,
    'lapa_openx': LAPA_OPENX,
    'rtx': [('fractal20220817_data', 0.54087122203), ('kuka', 0.8341046294), ('bridge_dataset', 1.0),
            ('taco_play', 2.0), ('jaco_play', 2.0), ('berkeley_cable_routing', 3.0), ('roboturk', 1.0),
            ('viola', 2.0), ('berkeley_autolab_ur5', 1.0), ('toto', 1.0)],
}


def parse(mixture: str | Sequence) -> list[tuple[str, float]]:
  """A named mixture, 'name[:weight],...' text, or a list of names / 'name:w' / (name, weight)."""
  if isinstance(mixture, str):
    if mixture in NAMED_MIXTURES:
      return list(NAMED_MIXTURES[mixture])
    items = [item.strip() for item in mixture.split(',') if item.strip()]
  else:
    items = list(mixture)
  if not items:
    raise DataError(f'empty mixture {mixture!r}; give a name ({", ".join(NAMED_MIXTURES)}) or name:weight,...')
  out, seen = [], set()
  for item in items:
    if isinstance(item, str):
      name, _, weight_text = item.partition(':')
      try:
        weight = float(weight_text) if weight_text else 1.0
      except ValueError:
        raise DataError(f'mixture entry {item!r}: weight {weight_text!r} is not a number (expected name:weight)') from None
    else:
      name, weight = item
      weight = float(weight)
    name = name.strip()
    if not name or not weight > 0:
      raise DataError(f'mixture entry {item!r}: expected a dataset name and a weight > 0')
    if name in seen:
      raise DataError(f'mixture {mixture!r} names {name!r} twice')
    seen.add(name)
    out.append((name, weight))
  return out


def resolve(data_dir: str, mixture: str | Sequence, *, skip_missing: bool = False,
            use_wrist: bool = False) -> list[tuple[oxe.Dataset, float]]:
  """Opens every dataset of `mixture` under `data_dir` (checking features against the registry).

  Datasets whose directory does not exist are an error listing all of them, or with skip_missing a
  warning (an error still when none is left). Datasets that exist but cannot be read are errors.
  """
  opened, missing = [], []
  for name, weight in parse(mixture):
    try:
      oxe.find_dataset_dir(data_dir, name)
    except oxe.MissingDataset:
      missing.append(name)
      continue
    opened.append((oxe.open_dataset(data_dir, name, use_wrist=use_wrist), weight))
  if missing:
    message = f'{data_dir}: {len(missing)} dataset(s) of the mixture are missing: {", ".join(missing)}'
    message += _suggestions(data_dir, missing)
    if not skip_missing or not opened:
      raise DataError(message + ('' if opened else ' (none left)') +
                      ('; set skip_missing=True to train on the rest' if opened else ''))
    _log.warning('%s; skipping them (skip_missing=True)', message)
  return opened


def _suggestions(data_dir: str, missing: Sequence[str]) -> str:
  """'; did you mean ...' from the datasets in `data_dir`, else the registry and the named mixtures."""
  present = sorted(os.listdir(data_dir)) if os.path.isdir(data_dir) else []
  known = sorted(set(oxe.REGISTRY) | set(NAMED_MIXTURES))
  hints = []
  for name in missing:
    close = (difflib.get_close_matches(name, present, n=2, cutoff=0.6) or
             difflib.get_close_matches(name, known, n=2, cutoff=0.6))
    if close:
      hints.append(f'{name}: did you mean {" or ".join(map(repr, close))}?')
  where = f' ({data_dir} holds {", ".join(present[:8])}{", ..." if len(present) > 8 else ""})' if present else ''
  return (f'; {"; ".join(hints)}' if hints else '') + where


def proportions(weights: Sequence[float], sizes: Sequence[float] | None = None) -> np.ndarray:
  """Sampling probabilities: weights (x sizes when balancing), normalised to sum to 1."""
  weights = np.asarray(weights, np.float64)
  if sizes is not None:
    weights = weights * np.asarray(sizes, np.float64)
  if not np.all(np.isfinite(weights)) or weights.sum() <= 0:
    raise DataError(f'mixture weights must be finite and positive, got {weights.tolist()}')
  return weights / weights.sum()


def allocate(total: int, probabilities: Sequence[float]) -> list[int]:
  """Splits `total` threads proportionally to `probabilities`, at least 1 each (Octo's allocate_threads)."""
  shares = np.asarray(probabilities, np.float64) / np.sum(probabilities)
  out = np.zeros(len(shares), int)
  left = float(max(total, len(shares)))
  while True:  # datasets whose share is under one thread get exactly one
    small = (shares * left < 1) & (shares > 0)
    if not small.any():
      break
    out[small] += 1
    left -= small.sum()
    shares[small] = 0
    if shares.sum() == 0:
      return out.tolist()
    shares = shares / shares.sum()
  whole = np.floor(shares * left)
  out += whole.astype(int)
  remainder = int(round(left - whole.sum()))
  for index in np.argsort(-(shares * left - whole), kind='stable')[:remainder]:
    out[index] += 1
  return out.tolist()
