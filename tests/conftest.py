"""Test session set-up: 8 simulated CPU devices (before jax is imported) and OpenAI's reference."""
import os

os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                           ' --xla_force_host_platform_device_count=8').strip()

import pytest  # pylint: disable=g-import-not-at-top,wrong-import-position

from experiments import openai_reference as reference  # pylint: disable=g-import-not-at-top,wrong-import-position


@pytest.fixture(scope='session')
def openai_model():
  """OpenAI's `clip/model.py` from clip-anytorch 2.6.0 (installed on first use, test-only)."""
  return reference.load_module('model')
