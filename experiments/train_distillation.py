"""The main job's distillation (`clip.train.distillation`): its teacher (loaded online, or the
stored one of reinforced shards), what the data pipelines add for it, and what its checkpoints
record of reinforced shards so that a resume reads the same teacher's."""
import typing

from clip.train import distillation
from data import model_inputs


class Distillation(typing.NamedTuple):
  """The run's distillation as `load` reads it once: its `teacher`
  (`clip.train.distillation.Teacher`, None when the run does not distil) and, offline, its
  reinforced shards' `[embed_dim, augmentations, teacher logit_scale]` (`reinforced_spec`), what
  its checkpoints record; None for other runs."""
  teacher: distillation.Teacher | None = None
  reinforced: list | None = None


def load(config, built_in=()):
  """The run's `Distillation`: `train.teacher` loaded in `train.teacher_dtype` (online), or, with
  no teacher named, the stored embeddings of reinforced shards (offline, their `reinforced.json`
  giving the teacher's logit scale). Errors (an unknown tokenizer, shards that are not
  reinforced, the `built_in` data sets' names, which hold no stored embeddings) come before
  anything compiles."""
  tcfg, run = config.train, config.run
  if not tcfg.distills:
    return Distillation()
  if tcfg.teacher is not None:
    return Distillation(distillation.Teacher.load(tcfg.teacher, tcfg.teacher_dtype))
  if run.data in built_in:
    raise ValueError(f'distill_weight={tcfg.distill_weight} without a teacher reads stored '
                     'teacher embeddings from reinforced shards (python -m '
                     'experiments.reinforce); the built-in data has none: give --teacher')
  spec = reinforced_spec(run.data)
  return Distillation(distillation.Teacher.offline(spec[2]), spec)


def reinforced_spec(data):
  """`[embed_dim, augmentations, teacher logit_scale]` of the reinforced shards `data` (their
  sidecars, `data.reinforced.run_spec`), with the main job's way out when they are not."""
  from data import reinforced  # pylint: disable=g-import-not-at-top  # TensorFlow: shards only
  try:
    spec, logit_scale = reinforced.run_spec(data)
  except ValueError as e:
    raise ValueError(f'{e}. In the main job: give --teacher to distil online from these shards, '
                     'or leave out --distill-weight') from None
  return [spec.embed_dim, spec.augmentations, logit_scale]


def check_reinforced(meta, reinforced, data, ckpt_dir):
  """A run resumed on reinforced shards reads those of the same teacher and augmentation count:
  the checkpoint's record and the run's (`Distillation.reinforced`) are equal where both exist,
  else ValueError naming both (the `--data` glob `data` may name rewritten shards)."""
  saved = meta.get('reinforced')
  if saved is not None and reinforced is not None and saved != reinforced:
    raise ValueError(f'{ckpt_dir} was trained on reinforced shards of [embed_dim, augmentations, '
                     f'teacher logit_scale] {saved}; {data} now holds {reinforced}: use '
                     'another --workdir (or the same shards)')


def pipeline_options(cfg, distill):
  """What a `Distillation` adds to the data pipeline's arguments (the built-in set's `batches`
  and `shards.Pipeline` take both): `teacher=` its teacher's inputs when it does not read the
  student's (`distillation.batch_keys`), `reinforced=` the shards' spec offline, else nothing."""
  teacher = distill.teacher
  keys = distillation.batch_keys(cfg, teacher) if teacher is not None else ()
  if keys == distillation.ONLINE_KEYS:
    return {'teacher': model_inputs.TeacherInputs.of(teacher.cfg)}
  if keys == distillation.OFFLINE_KEYS:
    from data import reinforced  # pylint: disable=g-import-not-at-top  # TensorFlow: shards only
    return {'reinforced': reinforced.ReinforcedSpec(*distill.reinforced[:2])}
  return {}
