"""Real workloads: the course's models, offline data sets, sharding, and the training loop.

from ddpzero_lab.workloads import TrainConfig, run, train

results = run(TrainConfig(strategy="zero2", model="resnet18", dataset="synthetic"))
# or, on a cluster you already have: cluster.run(train, config)
"""

from .data import DATASETS, CharDataset, DataSplit, SyntheticImages, TensorPairs
from .data import load as load_dataset
from .models import TinyGPT, mlp, resnet18_32, tiny_gpt
from .sampler import ShardedSampler
from .training import (
    MODELS,
    STRATEGIES,
    TrainConfig,
    build_model,
    evaluate,
    local_batch_size,
    run,
    state_digest,
    train,
)

__all__ = [
    "DATASETS",
    "MODELS",
    "STRATEGIES",
    "CharDataset",
    "DataSplit",
    "ShardedSampler",
    "SyntheticImages",
    "TensorPairs",
    "TinyGPT",
    "TrainConfig",
    "build_model",
    "evaluate",
    "load_dataset",
    "local_batch_size",
    "mlp",
    "resnet18_32",
    "run",
    "state_digest",
    "tiny_gpt",
    "train",
]
