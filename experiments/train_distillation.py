"""The main job's distillation (`clip.train.distillation`): its teacher (loaded online, or the
stored one of reinforced shards), what the data pipelines add for it, and what its checkpoints
record of reinforced shards so that a resume reads the same teacher's."""
from clip.train import distillation
from data import model_inputs


def load_teacher(config, built_in=()):
  """The run's distillation teacher (`clip.train.distillation.Teacher`), None when it does not
  distil: `train.teacher` loaded in `train.teacher_dtype` (online), or, with no teacher named,
  the stored embeddings of reinforced shards (offline, their `reinforced.json` giving the
  teacher's logit scale). Errors (an unknown tokenizer, shards that are not reinforced, the
  `built_in` data sets' names, which hold no stored embeddings) come before anything
  compiles."""
  tcfg, run = config.train, config.run
  if not tcfg.distills:
    return None
  if tcfg.teacher is not None:
    return distillation.Teacher.load(tcfg.teacher, tcfg.teacher_dtype)
  if run.data in built_in:
    raise ValueError(f'distill_weight={tcfg.distill_weight} without a teacher reads stored '
                     'teacher embeddings from reinforced shards (python -m '
                     'experiments.reinforce); the built-in data has none: give --teacher')
  return distillation.Teacher.offline(reinforced_spec(run.data)[2])


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


def stored_teacher(config):
  """What an offline distillation run's checkpoints record of its reinforced shards
  (`reinforced_spec`), None for other runs."""
  tcfg = config.train
  if not tcfg.distills or tcfg.teacher is not None:  # (`load_teacher` refused built-in data)
    return None
  return reinforced_spec(config.run.data)


def check_reinforced(meta, config, ckpt_dir):
  """A run resumed on reinforced shards reads those of the same teacher and augmentation count
  (`[embed_dim, augmentations, logit_scale]`, recorded in each checkpoint): ValueError naming
  both otherwise (the `--data` glob may name rewritten shards)."""
  saved, now = meta.get('reinforced'), stored_teacher(config)
  if saved is not None and now is not None and saved != now:
    raise ValueError(f'{ckpt_dir} was trained on reinforced shards of [embed_dim, augmentations, '
                     f'teacher logit_scale] {saved}; {config.run.data} now holds {now}: use '
                     'another --workdir (or the same shards)')


def pipeline_options(config, cfg, teacher):
  """What a distillation `teacher` adds to the data pipeline's arguments (the built-in set's
  `batches` and `shards.Pipeline` take both): `teacher=` its inputs when it does not read the
  student's (`distillation.batch_keys`), `reinforced=` the shards' spec offline, else nothing."""
  keys = distillation.batch_keys(cfg, teacher) if teacher is not None else ()
  if keys == distillation.ONLINE_KEYS:
    return {'teacher': model_inputs.TeacherInputs.of(teacher.cfg)}
  if keys == distillation.OFFLINE_KEYS:
    from data import reinforced  # pylint: disable=g-import-not-at-top  # TensorFlow: shards only
    return {'reinforced': reinforced.ReinforcedSpec(*reinforced_spec(config.run.data)[:2])}
  return {}
