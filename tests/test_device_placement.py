"""Every tensor handed to a collective lives on the backend's device: a pretend-NCCL check.

NCCL moves only CUDA tensors; a tensor made on a hard-coded device (`torch.zeros(3)`,
`device="cpu"`) works under gloo and fails on exactly the GPU machines a workshop runs on.
With no GPU here, the ranks (spawned by the test, as torchrun does) run every code path that
issues a collective under a check that stands in for NCCL's:

  * a torch function mode notes where each tensor made by a factory (torch.zeros, torch.tensor,
    ...) got its device: from `comm.backend_device()` (patched to hand out one marked device
    object), from an existing tensor (`p.device`), or from nowhere (no device, a string, a
    literal `torch.device("cpu")`). Only the last kind would stay on the CPU under NCCL;
  * torch.distributed's tensor collectives, patched inside the ranks, refuse such a tensor with
    the line that made it.

Tensors derived from parameters or gradients live where the model lives, which the caller
chose: the check lets them through, as NCCL does once the model is on the GPU.
"""

from __future__ import annotations

import traceback

import torch
import torch.distributed as dist
from own_ranks import run_ranks
from torch.overrides import TorchFunctionMode

# factories that place a new tensor on `device` (the current default, the CPU, when None)
_FACTORIES = {
    "tensor",
    "as_tensor",
    "zeros",
    "ones",
    "empty",
    "full",
    "arange",
    "rand",
    "randn",
    "randint",
    "eye",
    "linspace",
    "scalar_tensor",
}


class HostTensorError(RuntimeError):
    pass


class PlacementCheck(TorchFunctionMode):
    """Notes the tensors whose device came from nowhere but a default or a literal."""

    def __init__(self, marked_device: torch.device) -> None:
        super().__init__()
        self.devices = [marked_device]  # device objects that say where the backend is
        self.host_made: dict[int, tuple[torch.Tensor, str]] = {}
        self.collectives = 0  # tensor collectives checked: a path that issued none tests nothing

    def _known(self, device) -> bool:
        # the marked device by value (it survives torch's parsing of Module.to's arguments),
        # a tensor's device by identity (an equal device typed in by hand is not one of them)
        if isinstance(device, torch.device) and device == self.devices[0]:
            return True
        return any(device is d for d in self.devices)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        result = func(*args, **kwargs)
        name = getattr(func, "__name__", "")
        if name == "__get__" and isinstance(result, torch.device):
            self.devices.append(result)  # `t.device`: where an existing tensor lives
        elif name in _FACTORIES and isinstance(result, torch.Tensor):
            if not self._known(kwargs.get("device")):
                where = "".join(traceback.format_stack(limit=4)[:-1])
                self.host_made[_key(result)] = (result, where)
        elif name == "to" and isinstance(result, torch.Tensor):
            target = kwargs.get("device", args[1] if len(args) > 1 else None)
            if self._known(target) or isinstance(target, torch.Tensor):
                self.host_made.pop(_key(result), None)  # moved where the backend is
        return result

    def check(self, tensor, op: str) -> None:
        self.collectives += 1
        if isinstance(tensor, torch.Tensor) and _key(tensor) in self.host_made:
            where = self.host_made[_key(tensor)][1]
            raise HostTensorError(
                f"pretend-nccl: {op} got a tensor made on a hard-coded device; made at\n{where}"
            )


def _key(tensor: torch.Tensor) -> tuple:
    # a view shares its base's storage; an empty tensor has no storage to tell it by
    if tensor.numel() == 0:
        return ("id", id(tensor))
    return ("storage", tensor.untyped_storage().data_ptr())


_TENSOR_OPS = (
    "all_reduce",
    "broadcast",
    "all_to_all_single",
    "reduce_scatter_tensor",
    "all_gather_into_tensor",
    "all_gather",
    "reduce_scatter",
    "send",
    "recv",
    "isend",
    "irecv",
)


def _install(check: PlacementCheck):
    """Patch torch.distributed's collectives (in this rank only) to refuse host-made tensors,
    and comm.backend_device to hand out the marked device. Returns an undo function."""
    from ddpzero_lab import comm
    from ddpzero_lab.comm import collectives

    saved = []

    def patch(owner, name, value):
        saved.append((owner, name, getattr(owner, name)))
        setattr(owner, name, value)

    def guarded(op, original):
        def call(*args, **kwargs):
            for value in [*args, *kwargs.values()]:
                for item in value if isinstance(value, (list, tuple)) else [value]:
                    check.check(item, op)
            return original(*args, **kwargs)

        return call

    for op in _TENSOR_OPS:
        patch(dist, op, guarded(op, getattr(dist, op)))
    original_batch = dist.batch_isend_irecv

    def batch(ops):
        for p2p in ops:
            check.check(p2p.tensor, "batch_isend_irecv")
        return original_batch(ops)

    patch(dist, "batch_isend_irecv", batch)
    # captured at import in comm/: patched too, although gloo takes other paths
    patch(collectives, "_torch_reduce_scatter", guarded("rs", collectives._torch_reduce_scatter))
    patch(collectives, "_torch_all_gather", guarded("ag", collectives._torch_all_gather))
    marked = check.devices[0]
    patch(collectives, "backend_device", lambda group=None: marked)
    patch(comm, "backend_device", lambda group=None: marked)

    def undo():
        for owner, name, value in reversed(saved):
            setattr(owner, name, value)

    return undo


def _under_check(path: str):
    """Run one code path under the pretend-nccl check; the name of the error, or "ok"."""
    # "cpu:0": where the CPU's tensors live, yet unequal to a hard-coded "cpu"
    check = PlacementCheck(torch.device("cpu", 0))
    undo = _install(check)
    try:
        with check:
            PATHS[path]()
    except HostTensorError as exc:
        return str(exc)
    finally:
        undo()
    return "ok" if check.collectives else "no collective was issued"


# --- the code paths that issue collectives ---------------------------------------------------


def _model(seed: int = 0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(
        torch.nn.Linear(5, 7), torch.nn.ReLU(), torch.nn.Linear(7, 3), torch.nn.Linear(3, 2)
    )
    return model.to(_device())  # as a user does: the model on the rank's device


def _batch():
    torch.manual_seed(1 + dist.get_rank())
    return torch.randn(4, 5, device=_device()), torch.randn(4, 2, device=_device())


def _device():
    import ddpzero_lab as dzl

    return dzl.device()


def _train(strategy: str, steps: int = 2, clip: bool = False, **options):
    import ddpzero_lab as dzl

    model, opt = dzl.parallelize(
        _model(),
        strategy=strategy,
        optimizer=lambda params: torch.optim.AdamW(params, lr=1e-2),
        **options,
    )
    for _ in range(steps):
        x, y = _batch()
        torch.nn.functional.mse_loss(model(x), y).backward()
        if clip:
            opt.clip_grad_norm_(1.0)
        opt.step()
        opt.zero_grad()
    return model, opt


def _probe():
    from ddpzero_lab import comm

    comm.probe_alpha_beta(sizes=(16, 256), repeats=1)


def _doctor():
    from ddpzero_lab import cli

    cli._rank_and_sum()


def _comm_ops():
    from ddpzero_lab import comm

    n, dev = dist.get_world_size(), _device()
    t = torch.ones(6, device=dev)
    comm.all_reduce(t)
    comm.broadcast(t, 0)
    out = torch.empty(6 // n, device=dev)
    comm.reduce_scatter(out, t)
    comm.all_gather(t, out)
    comm.reduce_scatter(out, t, async_op=True).wait()
    comm.ring_all_reduce(t)
    comm.ring_reduce_scatter(out, t)
    comm.ring_all_gather(t, out)
    comm.barrier()
    peer = 1 - dist.get_rank()
    if dist.get_rank() == 0:
        comm.send(out, peer)
        comm.irecv(out, peer).wait()
    else:
        comm.recv(out, peer)
        comm.isend(out, peer).wait()


def _ddp_unused():
    import ddpzero_lab as dzl

    model = dzl.DDP(_model(), find_unused_parameters=True, compression="bf16")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(2):
        x, _ = _batch()
        model(x).sum().backward()
        opt.step()
        opt.zero_grad()


def _fp16():
    import ddpzero_lab as dzl

    policy = dzl.MixedPrecisionPolicy(param_dtype=torch.float16, reduce_dtype=torch.float32)
    model, opt = dzl.parallelize(
        _model(), strategy="zero2", optimizer=lambda p: torch.optim.SGD(p, lr=0.1), precision=policy
    )
    scaler = dzl.GradScaler()
    x, y = _batch()
    scaler.scale(torch.nn.functional.mse_loss(model(x).float(), y)).backward()
    scaler.step(opt)
    scaler.update()


def _zero_optimizer():
    import ddpzero_lab as dzl

    model = _model()
    opt = dzl.ZeroOptimizer(model.parameters(), torch.optim.AdamW, lr=1e-2)
    x, y = _batch()
    torch.nn.functional.mse_loss(model(x), y).backward()
    for p in model.parameters():
        dist.all_reduce(p.grad)  # what DDP would do; p.grad lives where the model lives
    opt.clip_grad_norm_(1.0)
    opt.step()


def _tiny_shards():
    """More ranks than elements in a parameter: a rank can hold no gradient at all."""
    import ddpzero_lab as dzl

    torch.manual_seed(0)
    model, opt = dzl.parallelize(
        torch.nn.Linear(1, 1, bias=False).to(_device()),
        strategy="zero2",
        optimizer=lambda p: torch.optim.SGD(p, lr=0.1),
    )
    model(torch.ones(2, 1, device=_device())).sum().backward()
    opt.clip_grad_norm_(1.0)
    opt.step()


def _no_gradients_here():
    """A rank that holds no gradient this step (all of its parameters unused, or sharded
    away) still joins the global norm's and the inf check's all-reduce."""
    from ddpzero_lab.parallel.precision import _found_inf
    from ddpzero_lab.parallel.zero import grad_norm

    grad_norm([], 1.0)
    _found_inf([])


def _checkpoint(tmp_dir: str):
    import ddpzero_lab as dzl

    model, opt = _train("zero3", steps=1)
    dzl.save_checkpoint(tmp_dir, model, opt, step=1)
    dzl.load_checkpoint(tmp_dir, model, opt)


def _state_dicts():
    import ddpzero_lab as dzl

    model, _ = _train("zero3", steps=1)
    dzl.full_state_dict(model)
    x, y = _batch()
    torch.nn.functional.mse_loss(model(x), y).backward()
    dzl.full_grads(model)


def _training_loop():
    from ddpzero_lab.workloads import TrainConfig, train

    train(TrainConfig(strategy="ddp", steps=2, batch_size=8, eval_samples=16, progress="none"))


def _lesson_sweep():
    from ddpzero_lab.course.lesson_01 import time_all_reduce

    time_all_reduce([4, 64], 1)


def _tensor_parallel():
    from ddpzero_lab.parallel.tensor import TensorParallelMLP

    mlp = TensorParallelMLP(4, 8).to(_device())
    x = torch.randn(3, 4, device=_device(), requires_grad=True)
    mlp(x).sum().backward()  # g forward, f backward


def _pipeline():
    from ddpzero_lab.parallel.pipeline import PipelineStage

    stage = PipelineStage(
        torch.nn.Linear(5, 5).to(_device()), micro_batches=2, loss_fn=torch.nn.functional.mse_loss
    )
    x = torch.randn(4, 5, device=_device())
    stage.step(x if stage.is_first else None, x if stage.is_last else None)


def _emulated_link():
    from ddpzero_lab import comm

    comm.set_link(comm.Link(latency=0.0, bandwidth=1e12))
    try:
        _train("zero3", steps=1)
    finally:
        comm.set_link(None)


PATHS = {
    "tensor_parallel": _tensor_parallel,
    "pipeline": _pipeline,
    "emulated_link": _emulated_link,
    "probe": _probe,
    "doctor": _doctor,
    "comm_ops": _comm_ops,
    "ddp": lambda: _train("ddp", steps=3),  # bucket order broadcast after step 1
    "ddp_naive": lambda: _train("ddp", mode="naive"),
    "ddp_unused": _ddp_unused,
    "zero1": lambda: _train("zero1", clip=True),
    "zero2": lambda: _train("zero2", clip=True),
    "zero3": lambda: _train("zero3", clip=True),
    "param_server": lambda: _train("param_server"),
    "fp16": _fp16,
    "zero_optimizer": _zero_optimizer,
    "tiny_shards": _tiny_shards,
    "no_gradients_here": _no_gradients_here,
    "state_dicts": _state_dicts,
    "training_loop": _training_loop,
    "lesson_01_sweep": _lesson_sweep,  # runs on the ranks of a notebook's cluster
}


def _all_paths(tmp_dir: str) -> dict[str, str]:
    import ddpzero_lab  # noqa: F401 - imported before the check, as a rank would

    paths = dict.fromkeys(PATHS)
    for name in paths:
        paths[name] = _under_check(name)
    PATHS["checkpoint"] = lambda: _checkpoint(f"{tmp_dir}/ckpt")
    paths["checkpoint"] = _under_check("checkpoint")
    return paths


def test_every_path_that_issues_a_collective_uses_the_backends_device(tmp_path):
    results = run_ranks(_all_paths, 2, str(tmp_path), timeout=400)
    for rank, paths in enumerate(results):
        assert set(paths) == {*PATHS, "checkpoint"}
        failed = {name: text for name, text in paths.items() if text != "ok"}
        assert not failed, f"rank {rank}: " + "\n\n".join(f"[{k}] {v}" for k, v in failed.items())


# --- the check itself catches what it is meant to ----------------------------------------------


_CAUGHT = {
    "default": True,  # torch.zeros(3)
    "string": True,  # device="cpu"
    "literal": True,  # device=torch.device("cpu")
    "view": True,  # a slice of a host-made tensor
    "helper": False,  # device=comm.backend_device()
    "from_tensor": False,  # device=t.device
    "moved": False,  # .to(comm.backend_device())
}


def _hard_coded() -> dict[str, str]:
    from ddpzero_lab import comm

    makers = {
        "default": lambda: torch.zeros(3),
        "string": lambda: torch.tensor([1.0, 2.0], device="cpu"),
        "literal": lambda: torch.ones(2, device=torch.device("cpu")),
        "view": lambda: torch.zeros(4)[:2],
        "helper": lambda: torch.zeros(3, device=comm.backend_device()),
        "from_tensor": lambda: torch.zeros(
            3, device=torch.ones(1).to(comm.backend_device()).device
        ),
        "moved": lambda: torch.zeros(3).to(comm.backend_device()),
    }
    results = {}
    for kind, make in makers.items():
        PATHS["case"] = lambda make=make: comm.all_reduce(make())
        results[kind] = _under_check("case")
    return results


def test_the_check_refuses_a_tensor_made_on_a_hard_coded_device():
    (results,) = run_ranks(_hard_coded, 1, timeout=120)
    for kind, caught in _CAUGHT.items():
        assert (results[kind] != "ok") == caught, (kind, results[kind])
        if caught:
            assert "made at" in results[kind] and "test_device_placement.py" in results[kind]
