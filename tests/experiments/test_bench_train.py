"""experiments/bench_train.py, one smoke run in-process: the tiny config's train step beside
open_clip's real one, with model FLOPs, MFU against the CPU matmul probe, and the table."""
import json

import pytest

from clip import flops
from experiments import bench_train
from experiments.configs import tiny


def test_models_take_their_own_batch_sizes():
  args = bench_train.parse_args(['--models', 'small@128,ViT-B/32@16,tiny',
                                 '--batch-sizes', '8,32'])
  assert bench_train.model_batches(args) == [('small', 128), ('ViT-B/32', 16), ('tiny', 8),
                                             ('tiny', 32)]


@pytest.mark.filterwarnings('ignore:No pretrained weights')
def test_tiny_beside_open_clip(tmp_path, capsys):
  # Scanned blocks: one block per tower to compile, the cheapest program.
  rows = bench_train.main(['--models', 'tiny@4', '--repeats', '1', '--probe-size', '256',
                           '--scan', 'on', '--peer', 'open_clip', '--out', str(tmp_path)])
  ours, peer = rows
  assert (ours['impl'], peer['impl']) == ('ours', 'open_clip')
  assert ours['params_m'] == peer['params_m']  # the same architecture (bench checks the count)
  expected = flops.train_step_flops(tiny.get_config().model, 4) / 1e12
  saved = json.loads((tmp_path / 'bench_train.json').read_text())
  peak = saved['peak_tflops']
  assert saved['peak_is_machine_wide'] and 0 < peak < 100
  for row in rows:
    assert row['model_tflop_per_step'] == expected
    assert row['images_per_s'] == pytest.approx(4 / row['step_s'])
    assert row['mfu'] == pytest.approx(expected / row['step_s'] / peak)
  assert ours['xla_tflop_per_step'] > 0  # low under scan: XLA counts a loop body once
  out = capsys.readouterr().out
  assert 'CPU peak measured: fp32 256x256 matmul' in out
  assert [line.split()[:2] for line in out.splitlines() if line.startswith('tiny ')] == [
      ['tiny', 'ours'], ['tiny', 'open_clip']]


def test_naflex_rows_per_length_and_mode(tmp_path):
  """`--naflex` (token-budget batching, the mode whose batch changes with the length): a row per
  length, the plan's steps compiled once per length, padding fractions of the drawn grids, and
  the fixed-resolution row."""
  rows = bench_train.main(['--naflex', '--models', 'tiny', '--naflex-lengths', '4,8',
                           '--naflex-batch', '4', '--naflex-modes', 'budget', '--naflex-steps',
                           '4', '--repeats', '1', '--probe-size', '256', '--scan', 'on',
                           '--out', str(tmp_path)])
  assert [(r['mode'], r['seq_len'], r['batch']) for r in rows] == [
      ('budget S', 4, 6), ('budget S', 8, 3), ('budget plan', None, rows[2]['batch']),
      ('fixed res', 16, 4)]
  for row in rows:
    assert 0 <= row['padding'] < 1 and row['images_per_s'] > 0 and row['mfu'] > 0
  assert rows[2]['compiles'] == 2 and 3 <= rows[2]['batch'] <= 6
  assert rows[3]['padding'] == 0
  model = tiny.get_config().model
  assert rows[0]['model_tflop_per_step'] == flops.train_step_flops(model, 6, num_patches=4) / 1e12
  assert (tmp_path / 'bench_train_naflex.json').exists()
