"""experiments/malloc_tuning: the environment the entry points re-execute with, the cases that
leave it alone, and a real re-exec whose glibc then asks for huge pages for a large malloc."""
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
  assert env == {'PATH': '/bin',
                 'GLIBC_TUNABLES': f'glibc.rtld.optional_static_tls=2048:{ADDED}'}
  assert environ['GLIBC_TUNABLES'] == 'glibc.rtld.optional_static_tls=2048'  # not modified
  assert malloc_tuning.OPT_OUT in reason and ADDED in reason
  env, _ = malloc_tuning.tuned_environ({}, '2.36', [])
  assert env == {'GLIBC_TUNABLES': ADDED}


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
  calls, lines = [], []
  malloc_tuning.reexec_if_untuned({'HOME': '/h'}, lambda *a: calls.append(a), lines.append)
  assert calls == [(sys.executable, malloc_tuning.command_line(),
                    {'HOME': '/h', 'GLIBC_TUNABLES': ADDED})]
  assert len(lines) == 1 and lines[0].startswith('malloc tuning: re-executing')
  calls.clear()
  reason = malloc_tuning.reexec_if_untuned({malloc_tuning.OPT_OUT: '1'},
                                           lambda *a: calls.append(a), lines.append)
  assert not calls and malloc_tuning.OPT_OUT in reason and len(lines) == 1


# Prints its tunables and arguments, and whether glibc madvised a 300 MB malloc's mapping for
# huge pages (VmFlags `hg` in /proc/self/smaps).
SCRIPT = textwrap.dedent('''
  import ctypes, os, sys
  sys.path.insert(0, sys.argv[1])
  from experiments import malloc_tuning
  if __name__ == '__main__':
    malloc_tuning.reexec_if_untuned()
    libc = ctypes.CDLL(None)
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    pointer, flags = libc.malloc(300 << 20), None
    for line in open('/proc/self/smaps'):
      head = line.split()[0]
      if not head.endswith(':'):  # a mapping's first line: start-end perms ...
        start, end = (int(a, 16) for a in head.split('-'))
        inside = start <= pointer < end
      elif head == 'VmFlags:' and inside:
        flags = line.split()[1:]
    print(os.environ.get('GLIBC_TUNABLES'), sys.argv[2:], 'hg' in flags)
''')


def run_script(tmp_path, **env):
  script = tmp_path / 'job.py'
  script.write_text(SCRIPT)
  base = {k: v for k, v in os.environ.items()
          if k not in ('GLIBC_TUNABLES', malloc_tuning.OPT_OUT)}
  return subprocess.run([sys.executable, str(script), REPO, 'a', '--b=c'], capture_output=True,
                        text=True, check=True, env={**base, 'JAX_PLATFORMS': 'cpu', **env})


@pytest.mark.skipif(malloc_tuning.glibc_version() is None
                    or malloc_tuning.thp_mode() != 'madvise',
                    reason='glibc, and transparent huge pages in madvise mode, only')
def test_reexec_sets_the_tunables_and_glibc_reads_them(tmp_path):
  version = tuple(int(v) for v in malloc_tuning.glibc_version().split('.')[:2])
  tuned = run_script(tmp_path)
  assert tuned.stdout.split() == [ADDED, "['a',", "'--b=c']", str(version >= (2, 35))]
  assert tuned.stderr.count('malloc tuning: re-executing') == 1
  untouched = run_script(tmp_path, **{malloc_tuning.OPT_OUT: '1'})
  assert untouched.stdout.split() == ['None', "['a',", "'--b=c']", 'False']
  assert not untouched.stderr
