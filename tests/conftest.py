"""Test session set-up: 8 simulated CPU devices, unoptimised XLA CPU code and a compilation cache
(all before jax is imported), OpenAI's reference, and the modules of slow tests first."""
import os
import tempfile

from experiments import simulated_devices

simulated_devices.simulate_cpu_devices(8, who='the test session')
# Tests compile hundreds of small programs and run each a few times: LLVM's optimisation of XLA's
# CPU code is most of their compile time and buys them nothing (measured: 70 s -> 43 s on the
# distillation and ResNet tests, every result within its tolerance). Subprocesses inherit it.
if 'xla_backend_optimization_level' not in os.environ['XLA_FLAGS']:
  os.environ['XLA_FLAGS'] += ' --xla_backend_optimization_level=0'
# Tests, and the training jobs they start as subprocesses (which inherit the variable), compile
# the same programs again and again (a killed run and its resume, a rerun): JAX's persistent cache
# serves the repeats. One directory per run and xdist worker.
if 'JAX_COMPILATION_CACHE_DIR' not in os.environ:
  os.environ['JAX_COMPILATION_CACHE_DIR'] = tempfile.mkdtemp(
      prefix=f'clip-test-jax-cache-{os.environ.get("PYTEST_XDIST_WORKER", "main")}-')

# pylint: disable=g-import-not-at-top,wrong-import-position
import pytest

from experiments.references import openai as reference


@pytest.fixture(scope='session')
def openai_model():
  """OpenAI's `clip/model.py` from clip-anytorch 2.6.0 (installed on first use, test-only)."""
  return reference.load_module('model')


def pytest_collection_modifyitems(config, items):
  """The modules holding a slow test run first, each module's tests kept together and in order:
  under xdist a long test handed out last leaves the other worker idle until it ends (the CI
  run's tail), and a module's shared fixtures are built once per worker as before."""
  del config
  slow_modules = {item.module.__name__ for item in items if item.get_closest_marker('slow')}
  items.sort(key=lambda item: item.module.__name__ not in slow_modules)
