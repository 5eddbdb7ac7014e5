"""Solutions for lesson 11 (the tiny GPT with ZeRO-3, and torchrun on several nodes)."""

import math  # noqa: F401 - the names every solution may use (exercises.py)

import torch  # noqa: F401
import torch.distributed as dist  # noqa: F401
from torch import nn  # noqa: F401

import ddpzero_lab as dzl  # noqa: F401


def torchrun_command(node_rank, nnodes, nproc_per_node, endpoint, train_args):
    """The command one node runs: torchrun, its options, then the training module's."""
    return [
        "torchrun",
        "--nnodes", str(nnodes),  # how many machines take part
        "--nproc-per-node", str(nproc_per_node),  # ranks started on this machine
        "--node-rank", str(node_rank),
        "--rdzv-backend", "c10d",  # the nodes meet at the endpoint, a TCP store on one of them
        "--rdzv-endpoint", endpoint,
        "--rdzv-id", "ddpzero-gpt",  # the same on every node: it names the job
        "-m", "ddpzero_lab", "train", *train_args,
    ]  # fmt: skip
