"""Tiny training runs that several test files share (built once per session by conftest.py's
`world` and `pipeline` fixtures): built-in world data -> vision tokenizer -> LAQ -> labels ->
latent pretraining -> action finetuning, each in-process on one device."""

import importlib
import json
import pathlib

import jax

from lapa_jax import config as config_lib
from lapa_jax import label
from lapa_jax.data import pipelines
from lapa_jax.envs import writer
from lapa_jax.train import loop

CONFIGS = pathlib.Path(__file__).resolve().parents[1] / 'configs'
IMAGE_SIZE = 32


def train(stage_spec: str, workdir, *overrides) -> list[dict]:
  """Runs `lapa train` in-process on one device; returns the training lines of metrics.jsonl."""
  config = config_lib.load(f'{CONFIGS}/{stage_spec}', list(overrides))
  stage = importlib.import_module(f'lapa_jax.train.{config.stage}').make_stage(config)
  loop.train(config, str(workdir), stage, devices=jax.devices()[:1])
  lines = [json.loads(line) for line in (pathlib.Path(workdir) / 'metrics.jsonl').read_text().splitlines()]
  return [line for line in lines if 'loss' in line]


def run_label(out, laq, tokenizer, *overrides) -> str:
  config = label.default_config()
  for item in overrides:
    dotted, _, text = item.partition('=')
    config_lib.override(config, dotted, text)
  labeller = label.Labeller(str(laq), str(tokenizer), batch_size=config.batch_size)
  dataset = pipelines.open_datasets(config.data)[0][0]
  return label.label_dataset(dataset, labeller, str(out), config, progress=False)


def write_world(root) -> str:
  return writer.write_dataset(str(root), 'robot', episodes=24, seed=0, image_size=IMAGE_SIZE, max_steps=20,
                              episodes_per_shard=6)


def run_pipeline(world: str, root: pathlib.Path) -> dict:
  """Every stage once, in order; {stage: (workdir, metric lines)} ('label': the labelled dataset)."""
  data = f'--config.data.path={world}'
  results = {}
  results['tokenizer'] = root / 'tokenizer', train('tokenizer.py:tiny', root / 'tokenizer', data,
                                                   '--config.total_steps=40', '--config.log_every=1',
                                                   '--config.data.eval_split=')
  results['laq'] = root / 'laq', train('laq.py:tiny', root / 'laq', data, '--config.total_steps=40',
                                       '--config.log_every=1', '--config.data.eval_split=')
  results['label'] = run_label(root / 'labelled', root / 'laq', root / 'tokenizer', f'data.path={world}',
                               'resize=true', 'batch_size=64')
  results['latent_pretrain'] = root / 'pretrain', train(
      'latent_pretrain.py:tiny', root / 'pretrain', f'--config.data.path={results["label"]}',
      '--config.total_steps=40', '--config.log_every=1', '--config.eval.split=')
  results['finetune'] = root / 'finetune', train(
      'finetune.py:tiny', root / 'finetune', data, f'--config.vision_tokenizer={root / "tokenizer"}',
      f'--config.init_from={root / "pretrain"}', '--config.total_steps=40', '--config.log_every=1',
      '--config.eval_every=0')
  return results
