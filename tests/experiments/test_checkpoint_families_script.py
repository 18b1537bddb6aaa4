"""experiments/checkpoint_families.py: the rows it measures give the result the loader promises
and none loads silently wrong. The behaviour of every family is asserted by
tests/formats/test_checkpoint_families.py; here the script runs one row of each kind (warns, exact,
refused, export) to keep CI short."""
import json

from experiments import checkpoint_families

RTOL = 1e-4  # fp32, relative error of features and logits


def test_every_row_measured_and_none_silently_wrong(tmp_path):
  only = ['big_vision', 'HF SiglipModel', 'ConvNeXt', 'save_hf (CLIP)']
  checkpoint_families.main(['--out', str(tmp_path), '--only', ','.join(only)])
  with open(tmp_path / 'checkpoint_families.json') as f:
    rows = json.load(f)['rows']
  expected = [(family, fmt, given) for family, fmt, given, _, _ in checkpoint_families.rows()
              if any(o in family for o in only)]
  assert {r['result'] for r in rows} == {'exact', 'warns', 'refused'}
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
