"""Cuts the page-fault tax of XLA:CPU training: the entry points re-execute themselves under
mimalloc (Microsoft's allocator, from the `cmeel-mimalloc` wheel) told to keep freed memory, or,
where it is not installed, with glibc's malloc backing large allocations with transparent huge
pages.

Why: XLA:CPU allocates each step's temporary buffer (~272 MB for the `small` main job) with
malloc on a worker thread; glibc serves a request that large with a fresh `mmap` and `munmap`s
it when the step ends, so every step faults in and zeroes ~70k fresh 4 KiB pages: 11.5M minor
faults and 17-19% of the CPU time in the kernel over 150 steps of the main job (`perf record`:
`clear_page_erms`, `exc_page_fault`). glibc cannot keep a request over 32 MB mapped between
frees (its mmap threshold's ceiling).

`MIMALLOC`: mimalloc preloaded (`LD_PRELOAD`) with `MIMALLOC_PURGE_DELAY=-1` keeps the freed
buffer and hands it back at the next step: no faults (0.06M in all), kernel time 2-3%. The
price is memory: what the job once freed stays mapped (peak RSS +0.47 GB at `small`; it grows
with the step's temporary buffers, which `bench_train` reports). A purge delay (milliseconds)
gives memory back and the faults with it: set `MIMALLOC_PURGE_DELAY=1000` yourself before
starting an entry point (1 s: about as many faults as glibc's huge pages, +0.05 GB).
`TUNABLES` (the fallback): `glibc.malloc.hugetlb=1` (glibc >= 2.35, transparent huge pages in
`madvise` mode) has malloc `madvise(MADV_HUGEPAGE)` its mappings: faults come 2 MiB at a time
(0.3M in all), but the kernel still zeroes the buffer every step (6-9% kernel time).
`python -m experiments.bench_malloc` measures the settings side by side (docs/performance.md).

The settings are read once, when a process starts, so they need a re-exec: an entry point calls
`reexec_if_untuned()` before it imports jax, which prints one line to stderr saying what it did
or why not. It does nothing for `--help`, in the process it re-executed (`TUNED` set), and when
the user opted out (CLIP_NO_MALLOC_TUNING set to anything but empty or 0), already preloads an
allocator or sets any glibc.malloc tunable, the C library is not glibc (macOS), or jax would
run on an accelerator (an accelerator plugin is installed and JAX_PLATFORMS does not start with
cpu): only the CPU backend was measured; the glibc fallback also not when transparent huge
pages are not in `madvise` mode (it would change nothing). The user's own `MIMALLOC_*`
settings are kept. The processes the job starts inherit the setting.
"""
import importlib.metadata
import os
import pkgutil
import sys

OPT_OUT = 'CLIP_NO_MALLOC_TUNING'
TUNED = 'CLIP_MALLOC_TUNED'  # set by the re-exec: the new process (and its children) is tuned
TUNABLES = (('glibc.malloc.hugetlb', '1'),)  # transparent huge pages for malloc's mappings
MIMALLOC = (('MIMALLOC_PURGE_DELAY', '-1'),)  # keep freed memory: no fresh pages per step
_ALLOCATOR = 'malloc'  # in the file name of an LD_PRELOAD entry that is an allocator (je/tc/mi)
_ACCELERATOR_PLUGINS = ('jax_cuda', 'jax_rocm', 'libtpu')  # module name prefixes


def glibc_version():
  """The running process's glibc version ('2.36'), or None under another C library (macOS)."""
  try:
    name, version = os.confstr('CS_GNU_LIBC_VERSION').split()
  except (AttributeError, ValueError, OSError):  # no confstr, unknown name, musl's None
    return None
  return version if name == 'glibc' else None


def accelerator_plugins():
  """Top-level modules that give jax a GPU or TPU backend, found without importing them."""
  return sorted(m.name for m in pkgutil.iter_modules()
                if m.name.startswith(_ACCELERATOR_PLUGINS))


def mimalloc_library(distribution='cmeel-mimalloc'):
  """The path of the installed `cmeel-mimalloc` wheel's libmimalloc.so, None if not installed."""
  try:
    files = importlib.metadata.distribution(distribution).files or ()
  except importlib.metadata.PackageNotFoundError:
    return None
  for f in files:
    if f.name == 'libmimalloc.so':
      path = str(f.locate())
      return path if os.path.exists(path) else None
  return None


def thp_mode(path='/sys/kernel/mm/transparent_hugepage/enabled'):
  """The kernel's transparent huge page mode ('always', 'madvise', 'never'), None if unknown."""
  try:
    with open(path) as f:
      text = f.read()
  except OSError:
    return None
  return text[text.index('[') + 1:text.index(']')] if '[' in text and ']' in text else None


def tuned_environ(environ, libc_version, plugins, thp='madvise', mimalloc=None):
  """The environment to re-execute with, or None and why not.

  Args:
    environ: the current environment (a mapping of str to str); not modified.
    libc_version: `glibc_version()`: None for another C library.
    plugins: `accelerator_plugins()`: names of installed accelerator backends.
    thp: `thp_mode()`: glibc's hugetlb=1 acts only in 'madvise' mode ('always' already gives
      malloc huge pages, 'never' none).
    mimalloc: `mimalloc_library()`: the libmimalloc.so to preload, None for glibc's fallback.

  Returns:
    (env, reason): env is a new dict, `environ` with the library first in LD_PRELOAD (the user's
    entries after it) and `MIMALLOC` where the user did not set them, or, without a library,
    TUNABLES appended to GLIBC_TUNABLES after the user's own entries, and TUNED set; None when
    nothing should change. reason says what and why in one line (None in the re-executed
    process, whose parent said it).
  """
  if environ.get(TUNED):
    return None, None  # the process the re-exec started: nothing to say twice
  if environ.get(OPT_OUT, '') not in ('', '0'):
    return None, f'malloc tuning off ({OPT_OUT} is set)'
  if libc_version is None:
    return None, 'malloc tuning off: the C library is not glibc'
  first_platform = environ.get('JAX_PLATFORMS', '').split(',')[0].strip().lower()
  if first_platform not in ('', 'cpu'):
    return None, f'malloc tuning off: JAX_PLATFORMS={environ["JAX_PLATFORMS"]} is not cpu'
  if plugins and first_platform != 'cpu':
    return None, (f'malloc tuning off: jax may run on an accelerator ({", ".join(plugins)}; '
                  'JAX_PLATFORMS=cpu turns it on)')
  preload = [e for e in environ.get('LD_PRELOAD', '').replace(' ', ':').split(':') if e]
  allocators = [e for e in preload if _ALLOCATOR in os.path.basename(e)]
  if allocators:
    return None, f'malloc tuning off: LD_PRELOAD already loads {", ".join(allocators)}'
  current = environ.get('GLIBC_TUNABLES', '')
  entries = [e for e in current.split(':') if e]
  users = [e.split('=', 1)[0] for e in entries if e.startswith('glibc.malloc.')]
  if users:
    return None, f'malloc tuning off: GLIBC_TUNABLES already sets {", ".join(users)}'
  env = dict(environ)
  if mimalloc is not None:
    env['LD_PRELOAD'] = ':'.join([mimalloc] + preload)
    env.update({k: v for k, v in MIMALLOC if k not in environ})
    env[TUNED] = 'mimalloc'
    if all(environ.get(k, v) == v for k, v in MIMALLOC):
      what = ', '.join(f'{k}={v}' for k, v in MIMALLOC) + ': freed memory kept, no fresh pages'
    else:
      what = ', '.join(f'your {k}={environ[k]}' for k, _ in MIMALLOC if k in environ)
    return env, (f'malloc tuning: re-executing under mimalloc ({mimalloc}, {what}; {OPT_OUT}=1 '
                 'turns this off)')
  if thp != 'madvise':
    return None, f'malloc tuning off: transparent huge pages are {thp!r}, not madvise'
  added = ':'.join(f'{k}={v}' for k, v in TUNABLES)
  env['GLIBC_TUNABLES'] = ':'.join(entries + [added])
  env[TUNED] = 'glibc'
  return env, (f'malloc tuning: re-executing with GLIBC_TUNABLES={added} (huge pages: fewer page '
               f'faults per training step; {OPT_OUT}=1 turns this off)')


def command_line():
  """The interpreter and arguments this process was started with (`python -m x ...` kept)."""
  return list(getattr(sys, 'orig_argv', None) or [sys.executable] + sys.argv)


def reexec_if_untuned(environ=None, execve=os.execve, log=None):
  """Replaces this process by itself under mimalloc (or with TUNABLES set), unless
  `tuned_environ` says not to.

  Call it first thing in a script's `if __name__ == '__main__'` path, before jax is imported
  (an import before it is only wasted time: the new process imports again). Logs what it does
  or why it does nothing (not for `--help`, nor in the re-executed process) and returns that
  reason when nothing was done; on success it does not return.

  Args:
    environ: the environment to read (default os.environ).
    execve: the exec function (tests pass a fake).
    log: prints the one line saying what was done (default: to stderr); None-returning.
  """
  environ = os.environ if environ is None else environ
  log = log or (lambda line: print(line, file=sys.stderr, flush=True))
  if {'-h', '--help'} & set(command_line()[1:]):
    return 'malloc tuning off: --help'
  env, reason = tuned_environ(environ, glibc_version(), accelerator_plugins(), thp_mode(),
                              mimalloc_library())
  if reason is not None:
    log(reason)
  if env is None:
    return reason
  sys.stdout.flush()
  sys.stderr.flush()
  return execve(sys.executable, command_line(), env)
