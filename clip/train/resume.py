"""Resuming a run from its workdir: what a checkpoint's meta says about the run (its data
position on every process, data source, settings and model), and the checks that a resumed run
continues the same run.

A workdir resumes on the data it was trained on, read as it was (the same source, resampling,
tokenizer and preprocessing); its data position is the next unseen example, so a resume at
another batch size sees each example once. Another length of run is allowed (to extend one)."""
import dataclasses
import filecmp
import json

import jax
import numpy as np
from jax.experimental import multihost_utils

from clip import configs
from clip.formats import load
from clip.formats import workdirs


def checkpoint_meta(data_state, run, tcfg, cfg):
  """What a checkpoint stores besides the state: every process's data position (`data_state`
  here, `data_position`; gathered, so every process calls this), the run's data source and
  resampling (`run.data`, `run.data_resampled`), its train config `tcfg` and model `cfg`."""
  positions = all_processes(data_state)
  return {'data': positions[0], 'data_per_process': positions, 'data_source': run.data,
          'data_resampled': run.data_resampled, 'batch_size': tcfg.batch_size,
          'total_steps': tcfg.total_steps, 'train_config': dataclasses.asdict(tcfg),
          'model_config': configs.to_dict(cfg)}


def all_processes(value):
  """[value of process 0, value of process 1, ...] of a JSON-able `value` every process gives
  (two small all-gathers of its bytes; [value] in a one-process run)."""
  if jax.process_count() == 1:
    return [value]
  data = np.frombuffer(json.dumps(value).encode(), np.uint8)
  sizes = np.ravel(multihost_utils.process_allgather(np.array([data.size], np.int32)))
  padded = np.zeros(int(sizes.max()), np.uint8)
  padded[:data.size] = data
  gathered = multihost_utils.process_allgather(padded)
  return [json.loads(bytes(row[:n]).decode()) for row, n in zip(gathered, sizes)]


def process_position(meta):
  """This process's data position in checkpoint `meta`: its own where the checkpoint holds one
  per process and the process count is the same, the common one where all are equal (the
  synthetic set's global example, any process count), else ValueError (shard readers' record
  positions belong to the shards each process read). A checkpoint holding process 0's only
  (written before positions were gathered) gives it to every process, said."""
  positions = meta.get('data_per_process')
  if positions is None:
    if jax.process_count() > 1 and meta.get('data_source', 'synthetic') != 'synthetic':
      print('the checkpoint holds process 0\'s data position only: assumed for every process')
    return meta['data']
  if all(p == positions[0] for p in positions):
    return positions[0]
  if len(positions) != jax.process_count():
    raise ValueError(f'the checkpoint was written by {len(positions)} processes, each at its own '
                     f'position in its share of the shards; {jax.process_count()} processes '
                     'cannot continue those: resume with the process count that wrote it')
  return positions[jax.process_index()]


def check_model(meta, cfg, ckpt_dir):
  """A checkpoint whose meta names its model (`model_config`) resumes only into that
  architecture: ValueError naming every field that differs (not the dtype, remat or scan)."""
  if 'model_config' not in meta:
    return
  values = {k: v for k, v in meta['model_config'].items() if k not in ('tokenizer', 'preprocess')}
  saved = configs.from_dict(values)  # inputs are checked by check_processing
  differences = load.config_differences(cfg, saved, 'this run\'s model', 'the checkpoint\'s',
                                        skip=workdirs.NOT_ARCHITECTURE)
  if differences:
    raise ValueError(f'{ckpt_dir} holds another model: ' + '; '.join(differences)
                     + ': use another --workdir (or the same model)')


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
  _check_ema(meta.get('train_config', {}).get('ema_decay'), tcfg.ema_decay, ckpt_dir)
  _note_distillation(meta.get('train_config', {}), tcfg)
  if meta.get('total_steps', tcfg.total_steps) != tcfg.total_steps:
    print(f'resuming a run of {meta["total_steps"]} steps as one of {tcfg.total_steps}: the '
          'learning-rate schedule follows the new length from here')


DISTILLATION_FIELDS = ('distill_weight', 'distill_loss', 'distill_temperature', 'teacher',
                       'teacher_dtype')


def _note_distillation(saved, tcfg):
  """Says which distillation settings (teacher, weight, ...) differ from the checkpoint's: a
  resumed run may change its teacher on purpose, never unsaid."""
  changed = {f: (saved[f], getattr(tcfg, f)) for f in DISTILLATION_FIELDS
             if f in saved and saved[f] != getattr(tcfg, f)}
  if changed:
    print('resuming with other distillation settings than the checkpoint\'s: ' + ', '.join(
        f'{f} {old!r} -> {new!r}' for f, (old, new) in changed.items()))


def _check_ema(saved, given, ckpt_dir):
  """A run keeps an EMA of its parameters from its start or not at all (ValueError otherwise);
  another decay is allowed and said."""
  if (saved is None) != (given is None):
    kept = 'kept no EMA' if saved is None else f'kept an EMA (ema_decay={saved})'
    raise ValueError(f'{ckpt_dir} {kept}; this run has ema_decay={given}: resume with the same '
                     'setting, or use another --workdir')
  if saved != given:
    print(f'resuming an EMA of decay {saved} with decay {given}')


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
