"""experiments.simulated_devices: the XLA flag that scripts and the test session set."""
import os
import sys

import jax
import pytest

from experiments import simulated_devices


def test_the_test_session_sees_eight_devices():
  assert jax.device_count() == 8


def test_a_count_already_given_is_replaced_and_other_flags_kept(monkeypatch):
  monkeypatch.delitem(sys.modules, 'jax')
  monkeypatch.setenv('XLA_FLAGS', '--xla_cpu_foo=1 --xla_force_host_platform_device_count=3 --bar')
  simulated_devices.simulate_cpu_devices(5)
  assert os.environ['XLA_FLAGS'] == (
      '--xla_cpu_foo=1 --bar --xla_force_host_platform_device_count=5')


def test_after_jax_is_imported_it_refuses_rather_than_being_ignored():
  with pytest.raises(RuntimeError, match='before jax is imported'):
    simulated_devices.simulate_cpu_devices(4, who='bench_x')


@pytest.mark.parametrize('count', [0, -1, 2.0, '8'])
def test_a_bad_count_is_a_clear_error(monkeypatch, count):
  monkeypatch.delitem(sys.modules, 'jax')
  with pytest.raises(ValueError, match='int >= 1'):
    simulated_devices.simulate_cpu_devices(count)


def test_keep_leaves_an_imported_jax_and_the_flags_alone(monkeypatch):
  monkeypatch.setenv('XLA_FLAGS', '--xla_force_host_platform_device_count=8')
  simulated_devices.simulate_cpu_devices(2, jax_imported='keep')
  assert os.environ['XLA_FLAGS'] == '--xla_force_host_platform_device_count=8'
  with pytest.raises(ValueError, match="'raise' or 'keep'"):
    simulated_devices.simulate_cpu_devices(2, jax_imported='ignore')
