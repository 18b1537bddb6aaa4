"""Test session set-up: 8 simulated CPU devices (before jax is imported) and OpenAI's reference."""
from experiments import simulated_devices

simulated_devices.simulate_cpu_devices(8, who='the test session')

# pylint: disable=g-import-not-at-top,wrong-import-position
import pytest

from experiments import openai_reference as reference


@pytest.fixture(scope='session')
def openai_model():
  """OpenAI's `clip/model.py` from clip-anytorch 2.6.0 (installed on first use, test-only)."""
  return reference.load_module('model')
