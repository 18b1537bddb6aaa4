"""Resuming a run (`clip/train/resume.py`): a workdir continues only on its own data source,
resampling, tokenizer and preprocessing; another run length or batch size is allowed and said;
what a checkpoint stores is what the checks read."""
# pylint: disable=redefined-outer-name
import dataclasses
import os
import shutil

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
  meta = {'step': 3, **resume.checkpoint_meta(position, config.run, config.train)}
  resume.check_resume(meta, config.run, config.train, 'w/checkpoints')
  assert capsys.readouterr().out == ''
  assert resume.resume_example(meta['data'], 12) == 24
  assert resume.resume_example({'step': 3}, 12) == 36  # an older checkpoint's step position
