"""The key-table engine: foreign checkpoint layouts <-> ours, one table per family, read in both
directions. The tables live with their families (`hf`, `open_clip_folder`, `big_vision`).

Our parameters are OpenAI's torch state dict (SigLIP's extra parts under torch-style names:
`visual.conv1.bias`, `visual.attn_pool.*`, `text_projection.{weight, bias}`, `logit_bias`). Each
table row is `(ours, theirs, transform)`: key templates in which `{i}` stands for a layer index,
`{rest}` for any key tail and `{text}` for a key of our text tower, and a transform that turns
the foreign array(s) into ours and back. A row with several foreign keys packs them (q, k, v ->
`in_proj_weight`).
"""
import dataclasses
import re

import numpy as np

MAP_HEAD = 'visual.attn_pool'  # our SigLIP MAP head's keys
# The top-level keys of our text tower (open_clip's CustomTextCLIP keeps them under `text.`).
_TEXT_KEYS = r'(token_embedding|positional_embedding|transformer|ln_final|text_projection)'


class ConversionError(ValueError):
  """Foreign keys that the family's table cannot place, or a pack with a part missing."""


@dataclasses.dataclass(frozen=True)
class Transform:
  """`load(list of foreign arrays) -> ours`, `save(ours) -> list of foreign arrays`."""
  load: object
  save: object = None


def _split(parts):
  def save(x):
    edges = np.cumsum([x.shape[0] * p // sum(parts) for p in parts])[:-1]
    return np.split(x, edges, axis=0)
  return save


SAME = Transform(lambda a: a[0], lambda x: [x])
TRANSPOSE = Transform(lambda a: a[0].T, lambda x: [x.T])
QKV = Transform(lambda a: np.concatenate(a, axis=0), _split((1, 1, 1)))  # q, k, v
Q_KV = Transform(lambda a: np.concatenate(a, axis=0), _split((1, 2)))  # q, packed k|v


def _squeeze_lead(a):
  if a[0].shape[:1] != (1,):
    raise ConversionError(f'expected a leading axis of 1, got shape {a[0].shape}')
  return a[0].reshape(a[0].shape[1:])


LEAD1 = Transform(_squeeze_lead, lambda x: [x[None]])  # (1, ...) theirs -> (...) ours


def rows(ours, theirs, transform=SAME, leaves=('weight', 'bias')):
  """One row per leaf name: `ours.leaf <- theirs.leaf` (norm and linear weights and biases)."""
  return [(f'{ours}.{leaf}', tuple(f'{t}.{leaf}' for t in theirs), transform) for leaf in leaves]


_PLACEHOLDERS = {'i': r'\d+', 'rest': r'.+', 'text': _TEXT_KEYS + r'(\..+)?'}


def _pattern(template):
  out, pos = '', 0
  for m in re.finditer(r'\{(\w+)\}', template):
    out += re.escape(template[pos:m.start()]) + f'(?P<{m.group(1)}>{_PLACEHOLDERS[m.group(1)]})'
    pos = m.end()
  return re.compile(out + re.escape(template[pos:]))


def _fill(template, groups):
  return template.format(**groups)


def _apply(table, source, forward, strict, ignored=None):
  """Every key of `source` matched by a row goes through its transform; with `strict`, a key
  no row matches is an error, otherwise it is passed through unchanged."""
  out, used = {}, set()
  for ours, theirs, transform in table:
    pattern = _pattern(theirs[0] if forward else ours)
    for key in sorted(source):
      m = pattern.fullmatch(key)
      if not m:
        continue
      groups = m.groupdict()
      if forward:
        names = [_fill(t, groups) for t in theirs]
        absent = [n for n in names if n not in source]
        if absent:
          raise ConversionError(f'{key} needs {absent} as well, which the file lacks')
        out[_fill(ours, groups)] = transform.load([np.asarray(source[n]) for n in names])
        used.update(names)
      else:
        if transform.save is None:
          raise ConversionError(f'this layout can be read but not written ({key})')
        names = [_fill(t, groups) for t in theirs]
        out.update(zip(names, transform.save(np.asarray(source[key]))))
        used.add(key)
  rest = {k: v for k, v in source.items()
          if k not in used and not (ignored and ignored.fullmatch(k))}
  if strict and rest:
    raise ConversionError(f'{len(rest)} keys with no place in this layout: {sorted(rest)[:20]}')
  out.update(rest)
  return out


def to_ours(foreign, table, strict=True, ignored=None):
  """`{foreign key: array}` -> `{our key: array}` through `table`."""
  return _apply(table, foreign, True, strict, ignored)


def to_theirs(ours, table, strict=True):
  """`{our key: array}` -> the foreign layout of `table` (the inverse of `to_ours`)."""
  return _apply(table, ours, False, strict)
