"""How a config rejects a bad value: a ValueError naming the field, what it allows and what it
got; and the warning for a config whose meaning rests on an assumption it does not state."""


class ConfigWarning(UserWarning):
  """A config whose meaning rests on an assumption it does not state (the message names it)."""


def require(ok, message):
  """Raises ValueError(`message`) unless `ok`."""
  if not ok:
    raise ValueError(message)


def one_of(value, allowed, name):
  """Raises ValueError unless `value` is in `allowed`, naming the field `name` and both."""
  require(value in allowed, f'{name} must be one of {allowed}, got {value!r}')
