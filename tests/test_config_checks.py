"""How a config rejects a bad value: ValueError with the caller's message, or naming the field,
what it allows and what it got."""
import pytest

from clip import config_checks


def test_require_raises_its_message_only_when_not_ok():
  config_checks.require(True, 'unused')
  with pytest.raises(ValueError, match='^width must be > 0, got 0$'):
    config_checks.require(0 > 0, 'width must be > 0, got 0')


def test_one_of_names_the_field_the_choices_and_the_value():
  config_checks.one_of('gelu', ('gelu', 'swiglu'), 'TextConfig.mlp')
  with pytest.raises(ValueError, match=r"^TextConfig.mlp must be one of \('gelu', 'swiglu'\), "
                                       r"got 'relu'$"):
    config_checks.one_of('relu', ('gelu', 'swiglu'), 'TextConfig.mlp')


def test_config_warning_is_a_user_warning():
  assert issubclass(config_checks.ConfigWarning, UserWarning)
