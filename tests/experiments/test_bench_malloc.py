"""experiments/bench_malloc.py: each setting's environment, mimalloc's library found only when a
setting preloads it, and a clear error where it is not installed."""
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
