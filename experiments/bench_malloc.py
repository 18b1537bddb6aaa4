"""A/B of the main job's malloc settings: wall time, kernel share of CPU time, page faults.

Runs `python -m experiments.train` (the `small` config on the built-in data, shortened to
--steps) once per setting per round, the settings alternating (A B C A B C ...), each in a fresh
workdir, and measures every run from outside with `os.wait4`: wall seconds, user and kernel CPU
seconds, minor page faults and peak RSS, plus the job's own last logged images/s.

  python -m experiments.bench_malloc                       # 150 steps, 2 rounds
  python -m experiments.bench_malloc --steps 60 --rounds 1 --settings off,auto,heap,both

Settings (the baseline is `off`, the opt-out):
  off      CLIP_NO_MALLOC_TUNING=1: glibc's defaults, what the job did before the fix.
  auto     nothing set: the entry point re-executes itself under mimalloc
           (`malloc_tuning.MIMALLOC`; glibc's `TUNABLES` where mimalloc is not installed): what
           a user who knows no trick gets; the re-exec is inside the measured time.
  mimalloc the same from outside: LD_PRELOAD of the installed libmimalloc.so, freed memory kept.
  mimalloc_purge1s  mimalloc giving freed memory back after 1 s (MIMALLOC_PURGE_DELAY=1000).
  hugetlb  CLIP_NO_MALLOC_TUNING=1 GLIBC_TUNABLES=glibc.malloc.hugetlb=1, from outside: the
           trick the issue found (transparent huge pages for malloc), glibc's fallback.
  heap     the step's buffer kept in the heap (one arena, no mmap, no trim): no faults.
  both     heap and hugetlb.
  sbrk     no mmap and no trim, every arena kept: glibc retries the big request in the main
           arena, yet it still faults (60 steps: 4.9M faults, as `off`).
  sbrk_hugetlb  sbrk and hugetlb.

A setting written `NAME@REV` runs the job as the repository held it at the commit git revision
REV names (a `git archive` of it, extracted once per commit, run from its folder: its own clip/,
data/ and experiments/) with NAME's environment: `--settings off@ad91aca,off,auto` compares the
job before a change, under glibc's defaults, with the job after it, in one alternating run. Each
run's record in the JSON names its commit.

Prints a table (medians over the rounds, speed-up against the first setting) and writes
--out/bench_malloc.json with every run.
"""
import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from typing import NamedTuple

from experiments import malloc_tuning

HEAP = 'glibc.malloc.arena_max=1:glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=1099511627776'
# No mmap, no trim, every arena: a request too big for a thread's arena (over 64 MB) fails there
# and glibc retries it in the main arena, whose sbrk heap keeps it after the free.
SBRK = 'glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=1099511627776'
# The mimalloc settings' LD_PRELOAD is filled in by `setting_env` (finding the library reads the
# wheel's file list: only when such a setting is run).
_MIMALLOC = {malloc_tuning.OPT_OUT: '1', 'LD_PRELOAD': None}
SETTINGS = {
    'off': {malloc_tuning.OPT_OUT: '1'},
    'auto': {},
    'mimalloc': {**_MIMALLOC, **dict(malloc_tuning.MIMALLOC)},
    'mimalloc_purge1s': {**_MIMALLOC, 'MIMALLOC_PURGE_DELAY': '1000'},
    'hugetlb': {malloc_tuning.OPT_OUT: '1', 'GLIBC_TUNABLES': 'glibc.malloc.hugetlb=1'},
    'heap': {malloc_tuning.OPT_OUT: '1', 'GLIBC_TUNABLES': HEAP},
    'both': {malloc_tuning.OPT_OUT: '1', 'GLIBC_TUNABLES': f'glibc.malloc.hugetlb=1:{HEAP}'},
    'sbrk': {malloc_tuning.OPT_OUT: '1', 'GLIBC_TUNABLES': SBRK},
    'sbrk_hugetlb': {malloc_tuning.OPT_OUT: '1',
                     'GLIBC_TUNABLES': f'glibc.malloc.hugetlb=1:{SBRK}'},
}


def setting_env(name):
  """The environment variables of SETTINGS[name], with the mimalloc library's path resolved."""
  env = dict(SETTINGS[name])
  if 'LD_PRELOAD' in env and env['LD_PRELOAD'] is None:
    env['LD_PRELOAD'] = malloc_tuning.mimalloc_library()
    if env['LD_PRELOAD'] is None:
      raise FileNotFoundError(f'setting {name!r} preloads mimalloc, and no libmimalloc.so is '
                              'installed: pip install cmeel-mimalloc')
  return env


class Setting(NamedTuple):
  """One --settings entry: `label` as written, the SETTINGS `name` whose environment the job
  gets, the git revision `rev` whose job runs (None: this working tree's) and the full hash of
  the commit it names (filled in by `parse_args`)."""
  label: str
  name: str
  rev: str | None
  commit: str | None = None


def parse_setting(label):
  """`NAME` or `NAME@REV` as a Setting, split at the first '@' (a revision such as `HEAD@{1}`
  keeps its own); neither the name nor the revision checked yet."""
  name, at, rev = label.partition('@')
  return Setting(label, name, rev if at else None)


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter,
                     argparse.RawDescriptionHelpFormatter):
  """--help prints the module docstring as written, and each flag's default."""


def parse_args(argv):
  parser = argparse.ArgumentParser(prog='python -m experiments.bench_malloc', description=__doc__,
                                   formatter_class=_HelpFormatter)
  parser.add_argument('--steps', type=int, default=150, help='training steps per run')
  parser.add_argument('--rounds', type=int, default=2, help='runs per setting, alternating')
  parser.add_argument('--settings', default='off,auto,hugetlb',
                      help=f'comma-separated, each NAME or NAME@REV (the job as the git commit '
                      f'REV names held it), NAME from {sorted(SETTINGS)}; the first is the '
                      'baseline')
  parser.add_argument('--config', default='small', help='the --config passed to the job')
  parser.add_argument('--eval-examples', type=int, default=None,
                      help="the job's final evaluation size (None: the config's)")
  parser.add_argument('--out', default='results/bench_malloc', help='where bench_malloc.json goes')
  args = parser.parse_args(argv)
  args.settings = [parse_setting(label) for label in args.settings.split(',')]
  unknown = [s.label for s in args.settings if s.name not in SETTINGS]
  if unknown or args.steps < 1 or args.rounds < 1:
    parser.error(f'settings must be from {sorted(SETTINGS)} (got {unknown}), steps and rounds '
                 f'>= 1 (got {args.steps}, {args.rounds})')
  for name in dict.fromkeys(s.name for s in args.settings):
    try:
      setting_env(name)  # before any run: a setting that preloads a missing library
    except FileNotFoundError as e:
      parser.error(str(e))
  for i, s in enumerate(args.settings):
    if s.rev is not None:
      try:
        args.settings[i] = s._replace(commit=resolve_commit(s.rev))
      except ValueError as e:
        parser.error(f'--settings {s.label}: {e}')
  return args


def job_env(name):
  """os.environ without any malloc setting of ours or the user's, plus SETTINGS[name]'s."""
  ours = ('GLIBC_TUNABLES', 'LD_PRELOAD', malloc_tuning.OPT_OUT, malloc_tuning.TUNED)
  env = {k: v for k, v in os.environ.items() if k not in ours and not k.startswith('MIMALLOC_')}
  env.update(setting_env(name))
  return env


def _git(*args):
  """Runs git in this repository; its stdout, or ValueError with git's own message."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  proc = subprocess.run(['git', '-C', root, *args], capture_output=True, check=False)
  if proc.returncode:
    raise ValueError(f'git {" ".join(args)} in {root} failed: '
                     f'{proc.stderr.decode(errors="replace").strip()}')
  return proc.stdout


def resolve_commit(rev):
  """The full hash of the commit git revision `rev` names in this repository (a tag is peeled
  to its commit); ValueError if it names none."""
  if not rev or rev.startswith('-'):
    raise ValueError(f'{rev!r} is not a git revision')
  try:
    return _git('rev-parse', '--verify', '--quiet', f'{rev}^{{commit}}').decode().strip()
  except ValueError:
    raise ValueError(f'git revision {rev!r} names no commit in this repository') from None


def source_tree(rev, dest):
  """Extracts the repository's files at the commit git revision `rev` names into `dest`
  (created); returns `dest`. ValueError if `rev` names no commit."""
  archive = _git('archive', resolve_commit(rev))
  os.makedirs(dest)
  subprocess.run(['tar', '-x', '-C', dest], input=archive, check=True)
  return dest


def last_images_per_s(workdir):
  """The job's last logged training throughput (metrics.jsonl), or None if it logged none."""
  rates = []
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    for line in f:
      rates.append(json.loads(line).get('images_per_s'))
  rates = [r for r in rates if r is not None]
  return rates[-1] if rates else None


def run_job(args, setting, workdir, cwd=None):
  """Runs the job once under Setting `setting`, from `cwd` (None: this one); returns its
  measurements. Raises CalledProcessError if it fails."""
  cmd = [sys.executable, '-m', 'experiments.train', '--config', args.config,
         '--steps', str(args.steps), '--workdir', workdir, '--checkpoint-every', str(10**9)]
  if args.eval_examples is not None:
    cmd += ['--eval-examples', str(args.eval_examples)]
  start = time.perf_counter()
  proc = subprocess.Popen(cmd, env=job_env(setting.name), stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, cwd=cwd)
  stderr = proc.stderr.read()
  _, status, usage = os.wait4(proc.pid, 0)
  wall = time.perf_counter() - start
  proc.returncode = os.waitstatus_to_exitcode(status)
  if proc.returncode:
    raise subprocess.CalledProcessError(proc.returncode, cmd, stderr=stderr.decode()[-2000:])
  cpu = usage.ru_utime + usage.ru_stime
  return {'setting': setting.label, 'commit': setting.commit, 'wall_s': wall,
          'user_s': usage.ru_utime, 'sys_s': usage.ru_stime, 'kernel_share': usage.ru_stime / cpu,
          'minor_faults': usage.ru_minflt, 'max_rss_mb': usage.ru_maxrss / 1024,
          'images_per_s': last_images_per_s(workdir),
          'reexec_line': next((l for l in stderr.decode().splitlines()
                               if l.startswith('malloc tuning')), None)}


def summarize(runs, labels):
  """Median of each measurement per setting (by label), and the wall-time speed-up against the
  first."""
  keys = ('wall_s', 'user_s', 'sys_s', 'kernel_share', 'minor_faults', 'max_rss_mb',
          'images_per_s')
  rows = []
  for label in labels:
    mine = [r for r in runs if r['setting'] == label]
    rows.append({'setting': label, 'runs': len(mine), **{
        k: statistics.median(r[k] for r in mine if r[k] is not None) for k in keys}})
  for row in rows:
    row['speedup'] = rows[0]['wall_s'] / row['wall_s']
  return rows


def print_table(rows):
  print(f'{"setting":>16} {"runs":>4} {"wall s":>7} {"speed-up":>8} {"user s":>7} '
        f'{"sys s":>6} {"kernel":>6} {"faults":>8} {"RSS MB":>7} {"img/s":>6}')
  for r in rows:
    print(f'{r["setting"]:>16} {r["runs"]:>4} {r["wall_s"]:7.1f} {r["speedup"]:7.2f}x '
          f'{r["user_s"]:7.1f} {r["sys_s"]:6.1f} {r["kernel_share"]:6.1%} '
          f'{r["minor_faults"] / 1e6:7.2f}M {r["max_rss_mb"]:7.0f} {r["images_per_s"]:6.0f}')


def main(argv=None):
  args = parse_args(argv)
  labels = [s.label for s in args.settings]
  print(f'{args.config}, {args.steps} steps, {args.rounds} round(s) of {labels}; '
        f'{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}')
  runs = []
  with tempfile.TemporaryDirectory(prefix='bench_malloc_') as tmp:
    trees = {c: source_tree(c, os.path.join(tmp, f'source_{n}')) for n, c in enumerate(
        dict.fromkeys(s.commit for s in args.settings if s.commit is not None))}
    for i in range(args.rounds):
      for n, setting in enumerate(args.settings):
        cwd = trees[setting.commit] if setting.commit is not None else None
        run = run_job(args, setting, os.path.join(tmp, f'run_{n}_{i}'), cwd)
        runs.append(run)
        print(f'  round {i + 1} {setting.label}: {run["wall_s"]:.1f} s wall, {run["sys_s"]:.1f} s '
              f'kernel ({run["kernel_share"]:.1%}), {run["minor_faults"] / 1e6:.2f}M faults')
  rows = summarize(runs, labels)
  print_table(rows)
  os.makedirs(args.out, exist_ok=True)
  path = os.path.join(args.out, 'bench_malloc.json')
  with open(path, 'w') as f:
    json.dump({'rows': rows, 'runs': runs, 'steps': args.steps, 'config': args.config,
               'tunables': dict(malloc_tuning.TUNABLES), 'mimalloc': dict(malloc_tuning.MIMALLOC),
               'mimalloc_library': malloc_tuning.mimalloc_library(),
               'glibc': malloc_tuning.glibc_version(),
               'cpus': os.cpu_count(), 'machine': platform.platform(),
               'load_average_end': os.getloadavg()}, f, indent=2)
  print(f'wrote {path}')


if __name__ == '__main__':
  main()
