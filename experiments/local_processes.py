"""Several JAX processes on this machine, for the benchmarks that need a real multi-process run
(`bench_gloo`, `bench_checkpoint`): a free localhost port for the coordinator, and the worker
commands run at once with their JSON outputs collected."""
import json
import os
import socket
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port():
  """A TCP port free on 127.0.0.1 now (for `jax.distributed.initialize`'s coordinator)."""
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def run_workers(cmds, outs, timeout):
  """Runs the worker commands `cmds` at once from the repository root (each sets its own device
  count: XLA_FLAGS is not passed on), waits up to `timeout` seconds for each, and returns the JSON
  each wrote to its path in `outs` (the files are removed). RuntimeError with a failed worker's
  stderr; subprocess.TimeoutExpired past `timeout`."""
  env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get('PYTHONPATH', ''))
  env.pop('XLA_FLAGS', None)
  procs = [subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE) for cmd in cmds]
  try:
    for i, p in enumerate(procs):
      _, err = p.communicate(timeout=timeout)
      if p.returncode:
        raise RuntimeError(f'worker {i} failed (exit {p.returncode}):\n{err.decode()[-3000:]}')
  finally:
    for p in procs:
      p.kill()
  results = []
  for path in outs:
    with open(path) as f:
      results.append(json.load(f))
    os.remove(path)
  return results
