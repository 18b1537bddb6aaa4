"""experiments/bench_gloo.py: two real processes run the CPU collectives, and every reduced value
is the known total on both of them."""
import json
import os

import pytest

from experiments import bench_gloo


def test_two_processes_reduce_right_and_the_table_and_json_are_written(tmp_path, capsys):
  bench_gloo.main(['--sizes', '256,4096', '--scatter-size', '64', '--repeats', '1',
                   '--timeout', '240', '--out', str(tmp_path)])
  with open(tmp_path / 'bench_gloo.json') as f:
    result = json.load(f)
  rows = {(r['phase'], r['floats_per_device']): r for r in result['rows']}
  assert set(rows) == {('all_reduce_fresh', 256), ('all_reduce_fresh', 4096),
                       ('reduce_scatter', 64), ('all_reduce_after', 256),
                       ('all_reduce_after', 4096)}
  assert all(r['correct'] and r['seconds'] > 0 for r in rows.values()), rows
  assert os.path.exists(tmp_path / 'bench_gloo.png')
  assert not [p for p in os.listdir(tmp_path) if p.startswith('worker')]
  table = capsys.readouterr().out
  assert '| 4096 |' in table and 'reduce-scatter of 64' in table and 'NO' not in table


def test_a_scatter_size_the_devices_do_not_divide_is_refused(capsys):
  with pytest.raises(SystemExit):
    bench_gloo.parse_args(['--scatter-size', '1022'])
  assert '--scatter-size must be divisible by the 4 devices it is scattered over, got 1022' in \
      capsys.readouterr().err
