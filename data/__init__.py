"""Input pipelines: img2dataset shards (`data.shards`: webdataset tars and tfrecords, each format's
writer and record reader in `data.webdataset_tars` / `data.tfrecords`, which files a source names
in `data.shard_files`, what a pipeline counts in `data.pipeline_stats`, parquet filtering in
`data.filters`, weighted sources in `data.mixture`), tensorflow-datasets classification sets
(`data.tfds`), the built-in captioned shapes (`data.synthetic`, numpy only; written as shards by
`data.synthetic_shards`, evaluated by `data.synthetic_eval`), the layout set at several aspect
ratios (`data.synthetic_layout`, numpy and clip's NaFlex preprocessing; evaluated per bucket and
sequence length by `data.synthetic_layout_eval`) and the image transforms they share
(`data.transforms`; SigLIP 2's NaFlex patches in `data.naflex_transforms`, each step's length and
batch size in `data.naflex_batching`). What a distillation teacher reads in a shard pipeline is
`data.teacher_views`; reinforced shards (a teacher's stored outputs) are `data.reinforced`, written
by `data.reinforced_writer`. How the processes share batches and files is `data.processes`.
Every model-ready batch is the model's own: its tokenizer (`tokenize=`, e.g.
`functools.partial(clip.get_tokenizer(cfg), truncate=True)`) and its `clip.PreprocessConfig`
(`preprocess=cfg.preprocess`) are required, with no OpenAI default (`data.model_inputs` checks
them). Import the module you need: only `synthetic`, `synthetic_layout`, `processes`,
`model_inputs`, `naflex_batching` and the `*_eval` modules work without tensorflow."""
