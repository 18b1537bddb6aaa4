"""experiments/malloc_tuning: the environment the entry points re-execute with (mimalloc, or
glibc's huge pages without it), the cases that leave it alone, and real re-execs: under mimalloc
a freed large buffer is reused without page faults, glibc's fallback asks for huge pages."""
import json
import os
import subprocess
import sys
import textwrap

import pytest

from experiments import malloc_tuning

ADDED = ':'.join(f'{k}={v}' for k, v in malloc_tuning.TUNABLES)
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_tunables_appended_after_the_users_own_entries():
  environ = {'PATH': '/bin', 'GLIBC_TUNABLES': 'glibc.rtld.optional_static_tls=2048'}
  env, reason = malloc_tuning.tuned_environ(environ, '2.36', [])
  assert env == {'PATH': '/bin', malloc_tuning.TUNED: 'glibc',
                 'GLIBC_TUNABLES': f'glibc.rtld.optional_static_tls=2048:{ADDED}'}
  assert environ['GLIBC_TUNABLES'] == 'glibc.rtld.optional_static_tls=2048'  # not modified
  assert malloc_tuning.OPT_OUT in reason and ADDED in reason
  env, _ = malloc_tuning.tuned_environ({}, '2.36', [])
  assert env == {'GLIBC_TUNABLES': ADDED, malloc_tuning.TUNED: 'glibc'}
  # The re-executed process (and what it starts) says nothing more and changes nothing.
  assert malloc_tuning.tuned_environ(env, '2.36', []) == (None, None)


@pytest.mark.parametrize('environ, libc, plugins, why', [
    ({malloc_tuning.OPT_OUT: '1'}, '2.36', [], malloc_tuning.OPT_OUT),
    ({'GLIBC_TUNABLES': 'glibc.rtld.x=1:glibc.malloc.arena_max=4'}, '2.36', [],
     'sets glibc.malloc.arena_max'),
    ({}, None, [], 'not glibc'),
    ({}, '2.36', ['jax_cuda12_plugin'], 'jax_cuda12_plugin'),
    ({'JAX_PLATFORMS': 'cuda,cpu'}, '2.36', [], 'JAX_PLATFORMS=cuda,cpu'),
])
def test_left_alone(environ, libc, plugins, why):
  env, reason = malloc_tuning.tuned_environ(environ, libc, plugins)
  assert env is None and why in reason


@pytest.mark.parametrize('text, mode', [('always [madvise] never\n', 'madvise'),
                                        ('[always] madvise never\n', 'always'), (None, None)])
def test_thp_mode_decides(tmp_path, text, mode):
  path = tmp_path / 'enabled'
  if text is not None:
    path.write_text(text)
  assert malloc_tuning.thp_mode(str(path)) == mode
  env, reason = malloc_tuning.tuned_environ({}, '2.36', [], mode)
  assert (env is not None) == (mode == 'madvise')
  assert env or f'transparent huge pages are {mode!r}' in reason


def test_cpu_platform_tuned_beside_an_accelerator_plugin():
  env, _ = malloc_tuning.tuned_environ({'JAX_PLATFORMS': 'cpu', malloc_tuning.OPT_OUT: '0'},
                                       '2.36', ['libtpu'])
  assert env['GLIBC_TUNABLES'] == ADDED


def test_reexec_calls_execve_with_the_same_command(monkeypatch):
  monkeypatch.setattr(malloc_tuning, 'glibc_version', lambda: '2.36')
  monkeypatch.setattr(malloc_tuning, 'accelerator_plugins', lambda: [])
  monkeypatch.setattr(malloc_tuning, 'thp_mode', lambda: 'madvise')
  monkeypatch.setattr(malloc_tuning, 'mimalloc_library', lambda: '/lib/libmimalloc.so')
  calls, lines = [], []
  malloc_tuning.reexec_if_untuned({'HOME': '/h'}, lambda *a: calls.append(a), lines.append)
  assert calls == [(sys.executable, malloc_tuning.command_line(),
                    {'HOME': '/h', 'LD_PRELOAD': '/lib/libmimalloc.so',
                     malloc_tuning.TUNED: 'mimalloc', **dict(malloc_tuning.MIMALLOC)})]
  assert len(lines) == 1 and lines[0].startswith('malloc tuning: re-executing')
  calls.clear()
  reason = malloc_tuning.reexec_if_untuned({malloc_tuning.OPT_OUT: '1'},
                                           lambda *a: calls.append(a), lines.append)
  assert not calls and malloc_tuning.OPT_OUT in reason and lines[1:] == [reason]  # said why
  monkeypatch.setattr(malloc_tuning, 'command_line', lambda: ['python', 'job.py', '--help'])
  assert malloc_tuning.reexec_if_untuned({}, lambda *a: calls.append(a), lines.append)
  assert not calls and len(lines) == 2  # --help: neither a re-exec nor a line


def test_mimalloc_preloaded_first_and_told_to_keep_freed_memory():
  lib = '/site/cmeel.prefix/lib/libmimalloc.so'
  environ = {'LD_PRELOAD': '/opt/libprofiler.so', 'GLIBC_TUNABLES': 'glibc.rtld.x=1'}
  env, reason = malloc_tuning.tuned_environ(environ, '2.36', [], 'never', mimalloc=lib)
  assert env == {'LD_PRELOAD': f'{lib}:/opt/libprofiler.so', 'GLIBC_TUNABLES': 'glibc.rtld.x=1',
                 malloc_tuning.TUNED: 'mimalloc', **dict(malloc_tuning.MIMALLOC)}  # any THP mode
  assert 'mimalloc' in reason and 'freed memory kept' in reason and malloc_tuning.OPT_OUT in reason
  env, reason = malloc_tuning.tuned_environ({'MIMALLOC_PURGE_DELAY': '500'}, '2.36', [],
                                            mimalloc=lib)
  assert env == {'LD_PRELOAD': lib, 'MIMALLOC_PURGE_DELAY': '500',  # the user's setting kept
                 malloc_tuning.TUNED: 'mimalloc'}
  assert 'your MIMALLOC_PURGE_DELAY=500' in reason and 'freed memory kept' not in reason


@pytest.mark.parametrize('mimalloc', [None, '/lib/libmimalloc.so'])
@pytest.mark.parametrize('preload', ['/usr/lib/libjemalloc.so.2', 'libfoo.so libtcmalloc.so'])
def test_left_alone_when_an_allocator_is_preloaded(mimalloc, preload):
  env, reason = malloc_tuning.tuned_environ({'LD_PRELOAD': preload}, '2.36', [],
                                            mimalloc=mimalloc)
  assert env is None and 'LD_PRELOAD already loads' in reason and preload.split()[-1] in reason


def test_mimalloc_library_is_the_installed_wheels():
  path = malloc_tuning.mimalloc_library()
  if sys.platform.startswith('linux'):  # a dependency there (setup.py)
    assert path is not None and os.path.basename(path) == 'libmimalloc.so'
    assert os.path.exists(path)
  assert malloc_tuning.mimalloc_library('no-such-distribution') is None


# Re-executes as the entry points do (with glibc's fallback when argv[2] says so), then touches a
# 300 MB malloc twice (freed between) and prints its environment, whether mimalloc is mapped,
# the minor page faults of the second touch, and whether glibc madvised a live 300 MB malloc's
# mapping for huge pages (VmFlags `hg` in /proc/self/smaps).
SCRIPT = textwrap.dedent('''
  import ctypes, json, os, resource, sys
  sys.path.insert(0, sys.argv[1])
  from experiments import malloc_tuning
  if __name__ == '__main__':
    if sys.argv[2] == 'glibc':
      malloc_tuning.mimalloc_library = lambda: None
    malloc_tuning.reexec_if_untuned()
    libc = ctypes.CDLL(None)
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    faults = []
    for _ in range(2):
      before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
      pointer = libc.malloc(300 << 20)
      ctypes.memset(pointer, 1, 300 << 20)
      faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
      libc.free(pointer)
    pointer, flags = libc.malloc(300 << 20), None
    for line in open('/proc/self/smaps'):
      head = line.split()[0]
      if not head.endswith(':'):  # a mapping's first line: start-end perms ...
        start, end = (int(a, 16) for a in head.split('-'))
        inside = start <= pointer < end
      elif head == 'VmFlags:' and inside:
        flags = line.split()[1:]
    print(json.dumps({'argv': sys.argv[2:], 'tunables': os.environ.get('GLIBC_TUNABLES'),
                      'purge': os.environ.get('MIMALLOC_PURGE_DELAY'),
                      'mimalloc': 'libmimalloc' in open('/proc/self/maps').read(),
                      'second_faults': faults[1], 'huge': 'hg' in (flags or [])}))
''')


def run_script(tmp_path, allocator, **env):
  script = tmp_path / 'job.py'
  script.write_text(SCRIPT)
  base = {k: v for k, v in os.environ.items()
          if k not in ('GLIBC_TUNABLES', 'LD_PRELOAD', malloc_tuning.OPT_OUT,
                       malloc_tuning.TUNED)
          and not k.startswith('MIMALLOC_')}
  out = subprocess.run([sys.executable, str(script), REPO, allocator, '--b=c'],
                       capture_output=True, text=True, check=True,
                       env={**base, 'JAX_PLATFORMS': 'cpu', **env})
  return json.loads(out.stdout), out.stderr


@pytest.mark.skipif(malloc_tuning.glibc_version() is None
                    or malloc_tuning.thp_mode() != 'madvise',
                    reason='glibc, and transparent huge pages in madvise mode, only')
def test_reexec_keeps_the_freed_buffer_mapped(tmp_path):
  """Under mimalloc the second 300 MB buffer faults in no fresh pages (glibc's defaults: all of
  its 76,800 4 KiB pages; glibc's huge page fallback: 2 MiB at a time)."""
  version = tuple(int(v) for v in malloc_tuning.glibc_version().split('.')[:2])
  pages = (300 << 20) // 4096
  tuned, stderr = run_script(tmp_path, 'mimalloc')
  assert tuned['argv'] == ['mimalloc', '--b=c'] and tuned['mimalloc']
  assert tuned['purge'] == '-1' and tuned['tunables'] is None
  assert tuned['second_faults'] < 50  # purged at once (delay 0): 150, one per 2 MiB page
  assert stderr.count('malloc tuning: re-executing under mimalloc') == 1
  fallback, stderr = run_script(tmp_path, 'glibc')
  assert fallback['tunables'] == ADDED and not fallback['mimalloc']
  assert fallback['huge'] == (version >= (2, 35))
  assert stderr.count('malloc tuning: re-executing with GLIBC_TUNABLES') == 1
  untouched, stderr = run_script(tmp_path, 'mimalloc', **{malloc_tuning.OPT_OUT: '1'})
  assert untouched['tunables'] is None and not untouched['mimalloc'] and not untouched['huge']
  assert untouched['second_faults'] > pages // 2
  assert stderr == f'malloc tuning off ({malloc_tuning.OPT_OUT} is set)\n'
