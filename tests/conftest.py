"""Test session set-up: 8 simulated CPU devices and a compilation cache (both before jax is
imported), and OpenAI's reference."""
import os
import tempfile

from experiments import simulated_devices

simulated_devices.simulate_cpu_devices(8, who='the test session')
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
