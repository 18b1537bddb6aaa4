"""CLIP in plain JAX: OpenAI's pretrained models, training from scratch, sharded losses."""
import setuptools

TORCH = ['torch>=2.1']
# tensorflow-datasets imports importlib_resources (through etils) without declaring it on 3.10+.
# webdataset: its sample grouping and tar writer (data/webdataset_tars.py); braceexpand: shard
# ranges as webdataset writes them; pyarrow: the parquet img2dataset writes beside each shard
# (data/filters.py).
DATA = ['tensorflow-cpu>=2.16', 'tensorflow-datasets>=4.9', 'importlib_resources>=6.0',
        'webdataset>=0.2.5', 'braceexpand>=0.1.7', 'pyarrow>=12']
TEST = TORCH + DATA + [
    'pytest>=8',
    'pytest-xdist>=3.5',
    # A test whose xdist worker crashed runs once more in a fresh worker (pytest.ini); failures
    # are never rerun.
    'pytest-rerunfailures>=16',
    'scikit-learn>=1.3',  # clip_benchmark's metrics (experiments/references/clip_benchmark.py)
    'transformers>=4.40',
    # The real img2dataset writes the shards the data tests read (tests/data/test_img2dataset.py);
    # its tfrecord writer imports tensorflow_io (0.37's file-system plugins do not load beside
    # tensorflow 2.21, which the local files it writes do not need).
    'img2dataset==1.47.0',
    'tensorflow-io>=0.37',
]

setuptools.setup(
    name='jaxclip-research',
    version='0.1.0',
    description=__doc__,
    packages=setuptools.find_packages(include=['clip', 'clip.*', 'losses', 'losses.*', 'data',
                                               'data.*', 'experiments', 'experiments.*']),
    package_data={'clip': ['*.txt.gz']},
    python_requires='>=3.10',
    install_requires=[
        'jax>=0.7',
        'numpy>=1.26',
        'optax>=0.2.6',
        'chex>=0.1.90',
        'einops>=0.8',
        'safetensors>=0.4',
        'tqdm>=4.66',
        'pillow>=10.0',
        'ftfy>=6.1',
        'regex>=2023.0',
        'matplotlib>=3.8',
        'scipy>=1.11',  # Student-t intervals of the loss ablation (jax needs it too)
        'sentencepiece>=0.2',  # SigLIP's tokenizers
        'tokenizers>=0.20',  # MetaCLIP 2's XLM-V tokenizer (its tokenizer.json)
        'huggingface_hub>=0.26',  # clip.load by Hub name: its cache, offline mode, revisions
        'tensorboardX>=2.6',  # TensorBoard event files without torch or TensorFlow (metrics_log)
        # Train-state checkpoints: each process writes its shards, asynchronously, to any path
        # (local, gs://), restored onto any mesh (clip/train/state_store.py).
        'orbax-checkpoint>=0.11',
        # mimalloc's libmimalloc.so, which the training entry points preload: XLA:CPU's per-step
        # buffer is then reused, not faulted in afresh each step (experiments/malloc_tuning.py).
        'cmeel-mimalloc>=3.4; sys_platform == "linux"',
    ],
    extras_require={
        'torch': TORCH,
        'data': DATA,
        'test': TEST,
        'dev': TEST,
    },
)
