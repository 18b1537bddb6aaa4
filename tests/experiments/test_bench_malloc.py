"""experiments/bench_malloc.py: each setting's environment, mimalloc's library found only when a
setting preloads it, and a clear error where it is not installed."""
import os
import subprocess

import pytest

from experiments import bench_malloc
from experiments import malloc_tuning


def test_setting_environments(monkeypatch):
  monkeypatch.setattr(malloc_tuning, 'mimalloc_library', lambda: '/lib/libmimalloc.so')
  monkeypatch.setenv('LD_PRELOAD', '/mine.so')
  monkeypatch.setenv('MIMALLOC_PURGE_DELAY', '5')
  env = bench_malloc.job_env('mimalloc')
  assert env['LD_PRELOAD'] == '/lib/libmimalloc.so' and env[malloc_tuning.OPT_OUT] == '1'
  assert env['MIMALLOC_PURGE_DELAY'] == dict(malloc_tuning.MIMALLOC)['MIMALLOC_PURGE_DELAY']
  assert bench_malloc.job_env('mimalloc_purge1s')['MIMALLOC_PURGE_DELAY'] == '1000'
  off = bench_malloc.job_env('off')  # the user's allocator settings are not carried into it
  assert 'LD_PRELOAD' not in off and 'MIMALLOC_PURGE_DELAY' not in off
  assert bench_malloc.SETTINGS['mimalloc']['LD_PRELOAD'] is None  # resolved per run, not at import


def test_a_mimalloc_setting_without_the_library_is_an_error(monkeypatch):
  monkeypatch.setattr(malloc_tuning, 'mimalloc_library', lambda: None)
  assert bench_malloc.setting_env('hugetlb')['GLIBC_TUNABLES'] == 'glibc.malloc.hugetlb=1'
  with pytest.raises(FileNotFoundError, match='pip install cmeel-mimalloc'):
    bench_malloc.setting_env('mimalloc')
  with pytest.raises(SystemExit):  # argparse's error, before any run
    bench_malloc.parse_args(['--settings', 'off,mimalloc'])


def test_a_setting_at_a_revision_runs_that_revision_s_job(tmp_path):
  root = os.path.dirname(os.path.dirname(bench_malloc.__file__))
  head = subprocess.run(['git', '-C', root, 'rev-parse', 'HEAD'], capture_output=True,
                        check=True).stdout.decode().strip()
  args = bench_malloc.parse_args(['--settings', 'off@HEAD,auto,auto@HEAD@{0}'])
  assert args.settings == [bench_malloc.Setting('off@HEAD', 'off', 'HEAD', head),
                           bench_malloc.Setting('auto', 'auto', None, None),
                           bench_malloc.Setting('auto@HEAD@{0}', 'auto', 'HEAD@{0}', head)]
  with pytest.raises(SystemExit):
    bench_malloc.parse_args(['--settings', 'fast@HEAD'])
  tree = bench_malloc.source_tree('HEAD', str(tmp_path / 'src'))
  committed = subprocess.run(['git', '-C', root, 'show', 'HEAD:experiments/train.py'],
                             capture_output=True, check=True).stdout
  with open(os.path.join(tree, 'experiments', 'train.py'), 'rb') as f:
    assert f.read() == committed
  assert (tmp_path / 'src' / 'clip' / '__init__.py').is_file()
  with pytest.raises(ValueError, match='no-such-revision'):
    bench_malloc.source_tree('no-such-revision', str(tmp_path / 'bad'))
  assert not (tmp_path / 'bad').exists()


@pytest.mark.parametrize('label, message', [
    ('off@no-such-revision', "'no-such-revision' names no commit"),
    ('off@', "'' is not a git revision"),
    ('off@--all', "'--all' is not a git revision"),
    ('off@HEAD^{tree}', 'names no commit')])
def test_a_revision_naming_no_commit_is_an_error_before_any_run(label, message, capsys):
  with pytest.raises(SystemExit):
    bench_malloc.parse_args(['--settings', f'{label},auto'])
  assert message in capsys.readouterr().err


def test_help_shows_the_setting_forms(capsys):
  with pytest.raises(SystemExit):
    bench_malloc.parse_args(['--help'])
  out = capsys.readouterr().out
  assert 'NAME@REV' in out and 'mimalloc_purge1s' in out and 'sbrk_hugetlb' in out
