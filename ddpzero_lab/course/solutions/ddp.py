"""Solutions to lesson 03 (DDP from scratch): the bucketed gradient hook."""

import math  # noqa: F401 - the names every notebook imports, available to the solutions

import torch
import torch.distributed as dist
from torch import nn  # noqa: F401

import ddpzero_lab as dzl


def install_bucketed_all_reduce(model, bucket_cap_mb):
    """Average model's gradients over the ranks in flat buckets that leave during backward.

    Returns finish(): call it right after loss.backward(); afterwards every .grad holds the
    mean over the ranks.
    """
    world_size = dist.get_world_size()
    params = [p for p in model.parameters() if p.requires_grad]

    # 1. buckets, in reverse parameter order: backward produces the last layer's gradients first
    cap = bucket_cap_mb * 2**20
    buckets, current, current_bytes = [], [], 0
    for p in reversed(params):
        nbytes = p.numel() * p.element_size()
        if current and current_bytes + nbytes > cap:
            buckets.append(current)
            current, current_bytes = [], 0
        current.append(p)
        current_bytes += nbytes
    buckets.append(current)
    flats = [torch.zeros(sum(p.numel() for p in b), device=b[0].device) for b in buckets]
    where = {}  # parameter -> (bucket index, offset in its flat bucket)
    for i, bucket in enumerate(buckets):
        offset = 0
        for p in bucket:
            where[p] = (i, offset)
            offset += p.numel()
    pending = [len(bucket) for bucket in buckets]  # gradients each bucket still waits for
    works = []  # the launched all-reduces, in bucket order

    # 2. the hook: fill the bucket; launch every full bucket whose predecessors have gone
    def hook(p):
        i, offset = where[p]
        flats[i][offset : offset + p.numel()].copy_(p.grad.reshape(-1))
        pending[i] -= 1
        while len(works) < len(buckets) and pending[len(works)] == 0:
            k = len(works)
            flats[k].div_(world_size)  # divide first: the sum of the shares is the mean
            works.append(dzl.comm.all_reduce(flats[k], async_op=True, tag=f"bucket{k}"))

    for p in params:
        p.register_post_accumulate_grad_hook(hook)

    # 3. after backward: wait for every bucket, copy the means back, reset for the next step
    def finish():
        for i, bucket in enumerate(buckets):
            works[i].wait()
            for p in bucket:
                _, offset = where[p]
                p.grad.copy_(flats[i][offset : offset + p.numel()].view_as(p))
            pending[i] = len(bucket)
        works.clear()

    return finish
