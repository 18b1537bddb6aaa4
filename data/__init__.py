"""Input pipelines: img2dataset tfrecords (`data.tfrecords`), tensorflow-datasets classification
sets (`data.tfds`), the built-in captioned shapes (`data.synthetic`, numpy only) and the image
transforms they share (`data.transforms`). Import the module you need: only `synthetic` works
without tensorflow."""
