"""The pre-training loop in-process on the tiny preset: learning, non-finite losses."""

import json

import numpy as np
import pytest

from pixssl_jax.data import pipeline
from pixssl_jax.train import pretrain
from tests.helpers import load_config


def read_metrics(workdir):
  lines = (workdir / 'metrics.jsonl').read_text().splitlines()
  return {r['step']: r for r in map(json.loads, lines)}  # The last record of a step wins.


def test_loss_falls_over_30_steps(tmp_path):
  config = load_config('tiny')
  config.num_steps = 30
  config.checkpoint_every = 30
  config.optim.warmup_steps = 3
  lines = []
  pretrain.train(config, str(tmp_path), print_fn=lines.append)
  losses = [read_metrics(tmp_path)[s]['train/loss'] for s in range(1, 31)]
  assert np.mean(losses[-5:]) < 0.8 * np.mean(losses[:5]), losses
  assert lines[-1].startswith('step 30/30')
  last = read_metrics(tmp_path)[30]
  # The progress line shows the enabled terms' losses, in summation order.
  parts = ', '.join(f"{name} {last[f'train/loss_{name}']:.4f}"
                    for name in ('variance', 'covariance', 'global', 'pixel'))
  assert f"loss {last['train/loss']:.4f} ({parts})" in lines[-1], lines[-1]
  assert 'restoration' not in lines[-1] and 'calibration' not in lines[-1]


def test_non_finite_loss_stops_and_names_the_step(tmp_path, monkeypatch):
  make_loader = pipeline.pretrain_loader

  def poisoned_loader(*args, **kwargs):
    loader = make_loader(*args, **kwargs)

    class Poisoned:
      def __iter__(self):
        for i, batch in enumerate(loader):
          if i == 2:
            batch = dict(batch, view1=np.full_like(batch['view1'], np.nan))
          yield batch
    return Poisoned()

  monkeypatch.setattr(pipeline, 'pretrain_loader', poisoned_loader)
  config = load_config('tiny')
  config.checkpoint_every = 100
  with pytest.raises(FloatingPointError, match='Non-finite loss nan at step 2'):
    pretrain.train(config, str(tmp_path), print_fn=lambda _: None)
