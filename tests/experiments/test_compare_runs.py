"""experiments/compare_runs: the table and plot from finished runs' files; unfinished runs refused."""
import json

import pytest

from experiments import compare_runs


def write_run(root, name, losses, heldout):
  folder = root / name
  folder.mkdir(parents=True)
  with open(folder / 'metrics.jsonl', 'w') as f:
    for i, loss in enumerate(losses):
      f.write(json.dumps({'step': 25 * (i + 1), 'loss': loss}) + '\n')
  evaluation = {key: 0.5 for key, _ in compare_runs.COLUMNS}
  evaluation['heldout/colour_shape_top1'] = heldout
  evaluation['heldout/colour_shape_chance'] = 1 / 48
  (folder / 'eval.json').write_text(json.dumps(evaluation))


def test_table_and_plot(tmp_path, capsys):
  write_run(tmp_path, 'a', [4.0, 3.0, 2.0, 1.0], 0.25)
  write_run(tmp_path, 'b', [6.0, 5.0], 0.125)
  out = tmp_path / 'out'
  compare_runs.main(['--runs', 'a,b', '--root', str(tmp_path), '--out', str(out), '--window', '2'])
  lines = (out / 'table.md').read_text().splitlines()
  assert lines[2].startswith('| `a` | 100 | 3.500 | 1.500 | 25.0% |')
  assert lines[3].startswith('| `b` | 50 | 5.500 | 5.500 | 12.5% |')
  assert lines[4].startswith('| chance | | | | 2.1% |')
  assert (out / 'loss.png').stat().st_size > 0
  assert json.loads((out / 'compare.json').read_text())['rows'][0]['last_loss'] == 1.5
  assert '| `a` |' in capsys.readouterr().out


def test_unfinished_run_is_refused(tmp_path):
  (tmp_path / 'c').mkdir()
  with pytest.raises(FileNotFoundError, match="run 'c' is not finished"):
    compare_runs.main(['--runs', 'c', '--root', str(tmp_path), '--out', str(tmp_path / 'o')])
