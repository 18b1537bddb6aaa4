"""Input pipelines: img2dataset shards (`data.shards`: webdataset tars and tfrecords, each format's
writer and record reader in `data.webdataset_tars` / `data.tfrecords`, parquet filtering in
`data.filters`, weighted sources in `data.mixture`), tensorflow-datasets classification sets
(`data.tfds`), the built-in captioned shapes (`data.synthetic`, numpy only) and the image
transforms they share (`data.transforms`). Every model-ready batch is the model's own: its
tokenizer (`tokenize=`, e.g. `functools.partial(clip.get_tokenizer(cfg), truncate=True)`) and its
`clip.PreprocessConfig` (`preprocess=cfg.preprocess`) are required, with no OpenAI default. Import
the module you need: only `synthetic` works without tensorflow."""
