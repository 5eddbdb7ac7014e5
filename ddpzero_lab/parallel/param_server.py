"""The parameter-server baseline: rank 0 holds the parameters and the optimizer.

Every step each worker *pushes* its gradients to the server (one flat message), the server
averages them with its own, steps the only optimizer there is, and each worker *pulls* the
updated parameters back (one flat message). It is the design that all-reduce replaced: the
server sends and receives (N-1)·B per step while every other rank moves B each way, so the
server's link is the bottleneck as N grows (Li et al., OSDI 2014, describe the architecture;
the course measures its cost in notebook 02).

The server computes on its own share of the batch like every other rank, so with equal local
batches and a mean loss the average of the N gradients is the gradient of the global batch:
training is numerically the same as one process on the concatenated batch.

Not owned here: choosing the strategy (api.py), the messages themselves (comm/).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
import torch.distributed as dist
from torch import nn

from .. import comm
from .flat import emit_shard_map, replicated
from .wrapper import WrappedOptimizer

SERVER = 0


class ParameterServerOptimizer(WrappedOptimizer):
    """The optimizer `parallelize(..., strategy="param_server")` returns.

    Use it like a torch optimizer: `loss.backward(); optimizer.step(); optimizer.zero_grad()`.
    On the server (rank 0) it wraps the real optimizer; on workers it holds no state at all.
    """

    def __init__(
        self,
        module: nn.Module,
        optimizer: Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer],
        group=None,
    ) -> None:
        self.module = module
        self.group = group
        self.world_size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.server = SERVER if group is None else dist.get_global_rank(group, SERVER)
        self.params = [p for p in module.parameters() if p.requires_grad]
        if not self.params:
            raise ValueError("the module has no trainable parameters (requires_grad=True)")
        dtypes = {p.dtype for p in self.params}
        devices = {p.device for p in self.params}
        if len(dtypes) > 1 or len(devices) > 1:
            raise ValueError(
                f"param_server flattens all parameters into one message, so they must share "
                f"one dtype and device; found {sorted(map(str, dtypes))} on "
                f"{sorted(map(str, devices))}"
            )
        self.numel = sum(p.numel() for p in self.params)
        # Same start everywhere: the server's parameters and buffers are everyone's.
        with torch.no_grad():
            for tensor in [*module.parameters(), *module.buffers()]:
                comm.broadcast(tensor.data, self.server, group=group, tag="init")
        self._adopt(self.params, optimizer(self.params) if self.rank == SERVER else None)
        named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
        emit_shard_map(
            "param_server",
            named,
            # replicas of parameters and gradients everywhere; optimizer state on the server
            lambda i, n: (replicated(n), replicated(n), [[SERVER, 0, n]]),
            self.world_size,
        )

    # -- the torch.optim.Optimizer surface the training loop uses -----------------------------
    def state_dict(self) -> dict:
        """The optimizer's state, held on the server only (empty on workers)."""
        return self.optimizer.state_dict() if self.optimizer is not None else {}

    def load_state_dict(self, state: dict) -> None:
        if self.optimizer is not None:
            self.optimizer.load_state_dict(state)

    @torch.no_grad()
    def step(self, closure=None):
        if closure is not None:
            raise ValueError("param_server's step() takes no closure")
        push = self._flat_gradients()
        if self.rank == SERVER:
            total = push.clone()
            incoming = torch.empty_like(push)
            for worker in range(self.world_size):
                if worker == SERVER:
                    continue
                comm.recv(incoming, self._global(worker), group=self.group, tag="push")
                total += incoming
            self._apply(total)
            self.optimizer.step()
            pull = torch.cat([p.detach().reshape(-1) for p in self.params])
            for worker in range(self.world_size):
                if worker != SERVER:
                    comm.send(pull, self._global(worker), group=self.group, tag="pull")
        else:
            comm.send(push, self.server, group=self.group, tag="push")
            pull = torch.empty(self.numel, dtype=push.dtype, device=push.device)
            comm.recv(pull, self.server, group=self.group, tag="pull")
            offset = 0
            for p in self.params:
                p.copy_(pull[offset : offset + p.numel()].view_as(p))
                offset += p.numel()
        return None

    # -- helpers ---------------------------------------------------------------------------
    def _global(self, rank: int) -> int:
        return rank if self.group is None else dist.get_global_rank(self.group, rank)

    def _flat_gradients(self) -> torch.Tensor:
        """One message: every gradient (zeros where none), then one has-gradient flag per
        parameter, so the server can leave alone a parameter that no rank used this step,
        exactly as a single process would."""
        first = self.params[0]
        parts = [
            p.grad.reshape(-1) if p.grad is not None else torch.zeros_like(p).reshape(-1)
            for p in self.params
        ]
        flags = torch.tensor(
            [p.grad is not None for p in self.params], dtype=first.dtype, device=first.device
        )
        return torch.cat([*parts, flags])

    def _apply(self, total: torch.Tensor) -> None:
        flags = total[self.numel :]
        offset = 0
        for p, flag in zip(self.params, flags.tolist(), strict=True):
            if flag > 0:
                # the mean over ranks; ranks that did not use p contributed zeros, as their
                # share of the global batch contributes nothing to p's gradient
                p.grad = (total[offset : offset + p.numel()] / self.world_size).view_as(p).clone()
            else:
                p.grad = None
            offset += p.numel()


def message_bytes(module: nn.Module) -> int:
    """Bytes of one push message for this module (gradients plus one flag per parameter)."""
    params = [p for p in module.parameters() if p.requires_grad]
    return (sum(p.numel() for p in params) + len(params)) * params[0].element_size()
