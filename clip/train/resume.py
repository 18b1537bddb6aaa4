"""Resuming a run from its workdir: what a checkpoint's meta.json says about the run (its data
position, data source and settings), and the checks that a resumed run continues the same run.

A workdir resumes on the data it was trained on, read as it was (the same source, resampling,
tokenizer and preprocessing); its data position is the next unseen example, so a resume at
another batch size sees each example once. Another length of run is allowed (to extend one)."""
import dataclasses
import filecmp

from clip.formats import workdirs


def checkpoint_meta(data_state, run, tcfg):
  """What a checkpoint stores besides the state for `check_resume`: the data position
  `data_state` (`data_position`), the run's data source and resampling (`run.data`,
  `run.data_resampled`), its global batch size and length (`tcfg`)."""
  return {'data': data_state, 'data_source': run.data, 'data_resampled': run.data_resampled,
          'batch_size': tcfg.batch_size, 'total_steps': tcfg.total_steps}


def check_resume(meta, run, tcfg, ckpt_dir):
  """A workdir resumes on the data it was trained on, read as it was: its position means nothing
  in another source, or in the draws of another resampling (ValueError). Another length of run
  is allowed (to extend one) and said, as is another batch size (the data continues at the next
  unseen example: `resume_example`, or the shard pipeline's record positions)."""
  source = meta.get('data_source', run.data)
  if source != run.data:
    raise ValueError(f'{ckpt_dir} was trained on --data {source!r}; its data position does not '
                     f'apply to {run.data!r}: use another --workdir (or the same data)')
  resampled = meta.get('data_resampled', False)
  if resampled != run.data_resampled:
    raise ValueError(f'{ckpt_dir} was trained with data_resampled={resampled}; its data position '
                     f'does not apply to data_resampled={run.data_resampled}: use another '
                     '--workdir (or the same setting)')
  batch = meta.get('batch_size')
  if batch is not None and batch != tcfg.batch_size:
    where = (f'example {resume_example(meta["data"], batch)}' if run.data == 'synthetic' else
             'each source\'s next record')
    print(f'resuming a run of global batch {batch} at batch {tcfg.batch_size}: the data '
          f'continues at {where}, each example seen once')
  elif batch is None and run.data == 'synthetic' and 'example' not in meta['data']:
    print(f'{ckpt_dir} holds its data position as a step ({meta["data"]["step"]}), not an '
          f'example: assumed trained at this batch size, {tcfg.batch_size}')
  if meta.get('total_steps', tcfg.total_steps) != tcfg.total_steps:
    print(f'resuming a run of {meta["total_steps"]} steps as one of {tcfg.total_steps}: the '
          'learning-rate schedule follows the new length from here')


def check_processing(workdir, cfg):
  """A workdir resumes with the tokenizer and image preprocessing it was trained with (its
  `model_config.json`; one written before those were saved is taken as it comes): tokens or
  pixels of another kind would continue the run on other inputs (ValueError)."""
  try:
    saved = workdirs.load_model_config(workdir)
  except FileNotFoundError:
    return
  if saved.preprocess != cfg.preprocess:
    raise ValueError(f'{workdir} was trained with preprocessing {saved.preprocess}, this run\'s '
                     f'model has {cfg.preprocess}: use another --workdir (or the same model)')
  if not _same_tokenizer(saved.tokenizer, cfg.tokenizer):
    raise ValueError(f'{workdir} was trained with tokenizer {saved.tokenizer}, this run\'s model '
                     f'has {cfg.tokenizer}: use another --workdir (or the same model)')


def _same_tokenizer(a, b):
  """Equal settings and model files of equal bytes (the workdir holds a copy of the file)."""
  if dataclasses.replace(a, model_file=None) != dataclasses.replace(b, model_file=None):
    return False
  if a.model_file is None or b.model_file is None:
    return a.model_file == b.model_file
  return filecmp.cmp(a.model_file, b.model_file, shallow=False)


def resume_example(data_state, batch_size):
  """The synthetic set's next unseen example at a checkpoint's data position: its
  `{'example': n}`, or for a checkpoint written before positions were examples, `{'step': s}`,
  s * `batch_size` (assumed trained at this batch size: such a checkpoint does not say)."""
  if data_state is None:
    return 0
  return data_state['example'] if 'example' in data_state else data_state['step'] * batch_size


def data_position(pipeline, start_example, steps, batch_size):
  """The data position a checkpoint stores after `steps` batches of `batch_size` read from
  `start_example` on: the shard pipeline's (or mixture's) own state, record positions whatever
  the batch, or the synthetic set's next unseen example `{'example': n}`."""
  if pipeline is not None:
    return pipeline.state()
  return {'example': start_example + steps * batch_size}
