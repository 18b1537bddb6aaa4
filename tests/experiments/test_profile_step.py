"""experiments/profile_step.py: a real trace of the tiny config's train step, its operations
found in the compiled program and sorted by kind and pass; the sorting rules on XLA's names."""
import json
import warnings

import pytest

from experiments import profile_step

HLO = '''
  %ynn_fusion.3 = f32[8,4]{1,0} fusion(%a, %b), kind=kCustom, calls=%f, metadata={op_name="jit(train_step)/transpose(jvp(jit(encode_image)))/dot_general"}
  %copy_bitcast_fusion.6 = f32[4,8]{1,0} fusion(%c), kind=kLoop, metadata={op_name="jit(train_step)/jvp(jit(encode_text))/add_any"}
  ROOT %stack.2 = f32[2,4]{1,0} concatenate(%d, %e), dimensions={0}, metadata={op_name="jit(train_step)/jvp(jit(encode_image))/stack"}
  %multiply_add_fusion = f32[4]{0} fusion(%g), kind=kLoop, metadata={op_name="jit(train_step)/mul"}
  %while.1 = (s32[]) while(%t), condition=%c1, body=%b1
'''


def test_operations_sorted_by_kind_and_pass():
  hlo = profile_step.instructions(HLO)
  assert hlo['ynn_fusion.3'][0] == 'fusion' and hlo['stack.2'][0] == 'concatenate'
  events = [{'ph': 'X', 'name': n, 'dur': 2000.0} for n in hlo] + [
      {'ph': 'X', 'name': 'ThunkExecutor::Execute', 'dur': 9e9},  # not an operation
      {'ph': 'i', 'name': 'ynn_fusion.3', 'dur': 9e9}]  # not a complete event
  table, ops = profile_step.breakdown(events, hlo, steps=2)
  assert dict(table) == {('matmul', 'backward'): 1.0, ('layout copy', 'forward'): 1.0,
                         ('layer stack', 'forward'): 1.0,
                         ('element-wise', 'optimizer & other'): 1.0}  # the while not counted
  assert set(ops) == set(hlo) - {'while.1'}

  with warnings.catch_warnings():
    warnings.simplefilter('error')
    profile_step.warn_if_no_matmul(table, 'trace')  # silent: a matmul was found
  no_matmul = profile_step.breakdown(events[1:], hlo, steps=2)[0]
  with pytest.warns(UserWarning, match='no operation of trace was sorted as a matmul'):
    profile_step.warn_if_no_matmul(no_matmul, 'trace')


@pytest.mark.filterwarnings('ignore:No pretrained weights')
def test_tiny_step_traced(tmp_path, capsys):
  # Per-layer weights under block remat: the scan's stacking shows as its own kind.
  profile_step.main(['--model', 'tiny', '--batch-size', '4', '--steps', '1', '--top', '3',
                     '--out', str(tmp_path)])
  saved = json.loads((tmp_path / 'tiny_4.json').read_text())
  ms = saved['ms_per_step']
  for key in ('matmul / forward', 'matmul / backward', 'layer stack / forward',
              'element-wise / optimizer & other'):
    assert ms[key] > 0, key
  assert set(k.split(' / ')[0] for k in ms) <= set(profile_step.CATEGORIES)
  assert len(saved['top']) == 3 and saved['step_s'] > 0
  out = capsys.readouterr().out
  assert [line.split()[0] for line in out.splitlines()[2:7]] == [
      'matmul', 'layout', 'layer', 'element-wise', 'all']
