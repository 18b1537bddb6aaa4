"""experiments/checkpoint_families.py: every family x format row is measured, none loads silently
wrong, and each gives the result the loader promises."""
import json

from experiments import checkpoint_families

RTOL = 1e-4  # fp32, relative error of features and logits


def test_every_row_measured_and_none_silently_wrong(tmp_path):
  checkpoint_families.main(['--out', str(tmp_path)])
  with open(tmp_path / 'checkpoint_families.json') as f:
    rows = json.load(f)['rows']
  expected = [(family, fmt, given) for family, fmt, given, _, _ in checkpoint_families.rows()]
  assert [(r['family'], r['format'], r['config_given']) for r in rows] == expected
  for r in rows:
    assert r['result'] == r['expected'], r  # never 'WRONG' or 'error: ...'
    if r['result'] == 'exact':
      assert r['error'] < RTOL, r
    if r['result'] == 'warns':
      assert r['note'] and r['error'] is not None, r
    if r['result'] == 'refused':
      assert 'ConvNeXt' in r['note'], r
  table = (tmp_path / 'checkpoint_families.md').read_text()
  assert table.count('\n') == len(rows) + 2
