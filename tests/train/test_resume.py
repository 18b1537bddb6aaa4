"""Resuming a run (`clip/train/resume.py`): a workdir continues only on its own data source,
resampling, tokenizer and preprocessing; another run length or batch size is allowed and said;
what a checkpoint stores is what the checks read."""
# pylint: disable=redefined-outer-name
import dataclasses
import os
import shutil

import jax
import pytest

from clip.formats import workdirs
from clip.train import resume
from experiments import train
from tests.data.test_tfrecords import siglip_cfg  # pylint: disable=unused-import


def test_a_workdir_resumes_only_on_its_own_data(capsys):
  """The saved data position belongs to the source it was read from: another --data is refused;
  another run length is allowed and said."""
  config = train.load_config(train.parse_args(['--config', 'tiny', '--data', 'a/*.tar']))
  capsys.readouterr()
  meta = {'step': 3, 'data': {'epoch': 0, 'record': 96, 'step': 3}, 'data_source': 'a/*.tar',
          'total_steps': 50}
  resume.check_resume(meta, config.run, config.train, 'w/checkpoints')
  assert capsys.readouterr().out == ''
  with pytest.raises(ValueError, match="trained on --data 'a/\\*.tar'.*'b/\\*.tar'"):
    resume.check_resume(meta, dataclasses.replace(config.run, data='b/*.tar'), config.train,
                       'w/checkpoints')
  resume.check_resume({**meta, 'total_steps': 40}, config.run, config.train, 'w/checkpoints')
  assert 'resuming a run of 40 steps as one of 50' in capsys.readouterr().out


def test_a_workdir_resumes_only_with_its_own_processing(siglip_cfg, tmp_path):
  """The workdir's `model_config.json` names the tokenizer (its SentencePiece file copied in)
  and the preprocessing; a resume with others is refused, one without the file (older
  workdirs) goes on."""
  workdir = str(tmp_path / 'run')
  resume.check_processing(workdir, siglip_cfg)  # nothing saved: an older workdir resumes
  workdirs.save_model_config(workdir, siglip_cfg)
  saved = workdirs.load_model_config(workdir)
  assert saved.tokenizer.model_file == os.path.join(workdir, workdirs.TOKENIZER_FILE)
  resume.check_processing(workdir, siglip_cfg)
  moved = tmp_path / 'elsewhere.model'
  shutil.copy(siglip_cfg.tokenizer.model_file, moved)  # the same file under another name
  resume.check_processing(workdir, dataclasses.replace(
      siglip_cfg, tokenizer=dataclasses.replace(siglip_cfg.tokenizer, model_file=str(moved))))
  moved.write_bytes(b'another vocabulary')
  others = {
      'tokenizer': dataclasses.replace(siglip_cfg.tokenizer, model_file=str(moved)),
      'preprocess': dataclasses.replace(siglip_cfg.preprocess, resize_mode='shortest'),
  }
  for name, other in others.items():
    with pytest.raises(ValueError, match=f'trained with {name}.*another --workdir'):
      resume.check_processing(workdir, dataclasses.replace(siglip_cfg, **{name: other}))
  with pytest.raises(ValueError, match='trained with tokenizer'):
    resume.check_processing(workdir, dataclasses.replace(
        siglip_cfg, tokenizer=dataclasses.replace(siglip_cfg.tokenizer, clean='lower')))


def test_a_checkpoint_meta_resumes_its_own_run_and_positions_continue(capsys):
  """`checkpoint_meta` holds what `check_resume` reads: the same run resumes silently; the
  synthetic set's position is the next unseen example, at any batch size."""
  config = train.load_config(train.parse_args(['--config', 'tiny']))
  capsys.readouterr()
  position = resume.data_position(None, resume.resume_example(None, 8), 3, 8)
  assert position == {'example': 24}
  meta = {'step': 3, **resume.checkpoint_meta(position, config.run, config.train, config.model)}
  resume.check_resume(meta, config.run, config.train, 'w/checkpoints')
  resume.check_model(meta, config.model, 'w/checkpoints')
  assert capsys.readouterr().out == ''
  assert resume.process_position(meta) == position and meta['data_per_process'] == [position]
  assert resume.resume_example(meta['data'], 12) == 24
  assert resume.resume_example({'step': 3}, 12) == 36  # an older checkpoint's step position


def test_a_checkpoint_of_another_model_is_refused_naming_its_fields():
  config = train.load_config(train.parse_args(['--config', 'tiny']))
  meta = resume.checkpoint_meta({'example': 0}, config.run, config.train, config.model)
  wider = dataclasses.replace(config.model, embed_dim=config.model.embed_dim * 2)
  with pytest.raises(ValueError, match=r'w/ck holds another model: embed_dim: this run\'s model '
                     r'says 64, the checkpoint\'s says 32'):
    resume.check_model(meta, wider, 'w/ck')
  resume.check_model(meta, dataclasses.replace(config.model, remat='block'), 'w/ck')  # runtime


def test_each_process_resumes_at_its_own_position(monkeypatch, capsys):
  """Shard readers keep a position per process; the synthetic set's is global (any process
  count continues it); a checkpoint holding process 0's only gives it to every process, said."""
  shards = {'data': {'epoch': 0, 'p': 0}, 'data_source': 'a/*.tar',
            'data_per_process': [{'epoch': 0, 'p': 0}, {'epoch': 0, 'p': 1}]}
  monkeypatch.setattr(jax, 'process_count', lambda: 2)
  monkeypatch.setattr(jax, 'process_index', lambda: 1)
  assert resume.process_position(shards) == {'epoch': 0, 'p': 1}
  same = {**shards, 'data_per_process': [{'example': 8}] * 2}
  monkeypatch.setattr(jax, 'process_count', lambda: 4)
  assert resume.process_position(same) == {'example': 8}
  with pytest.raises(ValueError, match='written by 2 processes.*4 processes cannot continue'):
    resume.process_position(shards)
  old = {'data': {'epoch': 0, 'p': 0}, 'data_source': 'a/*.tar'}
  assert resume.process_position(old) == {'epoch': 0, 'p': 0}
  assert "process 0's data position only" in capsys.readouterr().out


def test_a_run_keeps_an_ema_from_its_start_or_not_at_all(capsys):
  config = train.load_config(train.parse_args(['--config', 'tiny']))
  meta = resume.checkpoint_meta({'example': 0}, config.run, config.train, config.model)
  with_ema = dataclasses.replace(config.train, ema_decay=0.99)
  with pytest.raises(ValueError, match=r'w/ck kept no EMA; this run has ema_decay=0.99'):
    resume.check_resume(meta, config.run, with_ema, 'w/ck')
  meta = resume.checkpoint_meta({'example': 0}, config.run, with_ema, config.model)
  with pytest.raises(ValueError, match=r'w/ck kept an EMA \(ema_decay=0.99\); this run has '
                     r'ema_decay=None'):
    resume.check_resume(meta, config.run, config.train, 'w/ck')
  capsys.readouterr()
  resume.check_resume(meta, config.run, dataclasses.replace(with_ema, ema_decay=0.9), 'w/ck')
  assert 'resuming an EMA of decay 0.99 with decay 0.9' in capsys.readouterr().out
