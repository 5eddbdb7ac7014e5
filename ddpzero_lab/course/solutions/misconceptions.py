"""Solutions to lesson 13's exercise (misconceptions): one data-parallel AdamW step by hand."""

import math  # noqa: F401 - the names every notebook imports, for a solution pasted into it

import torch
import torch.distributed as dist  # noqa: F401
from torch import nn  # noqa: F401

import ddpzero_lab as dzl  # noqa: F401


def adamw_data_parallel_step(theta, grads, state, lr, betas, eps, weight_decay):
    """theta: the flat parameters (the same on every rank); grads: one flat gradient per rank;
    state: a dict kept between calls (empty at the first). Returns the new flat parameters,
    as DDP's all-reduce and torch.optim.AdamW give them together, and keeps "step",
    "exp_avg" and "exp_avg_sq" in state."""
    mean_grad = torch.stack(grads).mean(dim=0)  # 1. what the all-reduce delivers
    state["step"] = state.get("step", 0) + 1  # 2. the step count and the moments, from the mean
    t = state["step"]
    m = betas[0] * state.get("exp_avg", torch.zeros_like(theta)) + (1 - betas[0]) * mean_grad
    v = betas[1] * state.get("exp_avg_sq", torch.zeros_like(theta)) + (1 - betas[1]) * mean_grad**2
    state["exp_avg"], state["exp_avg_sq"] = m, v
    m_hat = m / (1 - betas[0] ** t)  # 3. bias corrections
    v_hat = v / (1 - betas[1] ** t)
    theta = theta * (1 - lr * weight_decay)  # 4. decoupled weight decay
    return theta - lr * m_hat / (v_hat.sqrt() + eps)  # 5. the step
