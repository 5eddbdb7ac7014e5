"""The settings every notebook starts with: mode, world size, device.

The defaults follow the machine: without a GPU the sizes finish on a 2-core laptop ("laptop"),
with GPUs they are the full sizes ("full"). The learner edits plain variables in the notebook's
first cell; environment variables only override them for CI and workshops:

    DDPZERO_MODE=laptop|full     DDPZERO_WORLD_SIZE=N     DDPZERO_DEVICE=cpu|cuda
    DDPZERO_SMOKE=1              (CI: the same as DDPZERO_MODE=laptop)
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

MODES = ("laptop", "full")


@dataclass(frozen=True)
class Settings:
    mode: str  # "laptop": sizes for a 2-core CPU; "full": the lesson's full sizes (GPUs)
    world_size: int
    device: str  # "cpu" or "cuda"
    overrides: tuple[str, ...] = ()  # the environment variables that changed a value

    @property
    def small(self) -> bool:
        """True in laptop mode: use the lesson's small sizes."""
        return self.mode != "full"

    @property
    def backend(self) -> str:
        import torch

        if self.device == "cuda" and torch.cuda.device_count() >= self.world_size:
            return "nccl"
        return "gloo"

    def __str__(self) -> str:
        extra = f" (set by {', '.join(self.overrides)})" if self.overrides else ""
        return (
            f"mode={self.mode!r}, world_size={self.world_size}, device={self.device!r}, "
            f"backend={self.backend!r}{extra}"
        )


def _gpu_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def settings(
    mode: str = "auto",
    world_size: int = 2,
    device: str = "auto",
    *,
    min_world_size: int = 2,
    max_world_size: int = 8,
    quiet: bool = False,
) -> Settings:
    """The run's settings from the notebook's variables, the machine and the overrides.

    mode: "auto" (laptop without a GPU, full with one), "laptop" or "full".
    device: "auto" (cuda if there is a GPU), "cpu" or "cuda".
    """
    overrides = []
    env = os.environ
    if env.get("DDPZERO_SMOKE") == "1":
        mode, overrides = "laptop", ["DDPZERO_SMOKE=1"]
    elif env.get("DDPZERO_MODE"):
        mode = env["DDPZERO_MODE"]
        overrides.append(f"DDPZERO_MODE={mode}")
    if env.get("DDPZERO_WORLD_SIZE"):
        text = env["DDPZERO_WORLD_SIZE"]
        try:
            world_size = int(text)
        except ValueError:
            raise ValueError(f"DDPZERO_WORLD_SIZE must be a whole number, got {text!r}") from None
        overrides.append(f"DDPZERO_WORLD_SIZE={text}")
    if env.get("DDPZERO_DEVICE"):
        device = env["DDPZERO_DEVICE"]
        overrides.append(f"DDPZERO_DEVICE={device}")

    gpus = _gpu_count()
    if device == "auto":
        device = "cuda" if gpus else "cpu"
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', got {device!r}")
    if device == "cuda" and not gpus:
        raise ValueError("device='cuda' but torch sees no GPU here: use device='auto' or 'cpu'")
    if mode == "auto":
        mode = "full" if device == "cuda" else "laptop"
    if mode not in MODES:
        raise ValueError(f"mode must be 'auto', 'laptop' or 'full', got {mode!r}")
    if isinstance(world_size, bool) or not isinstance(world_size, int):
        raise TypeError(f"world_size must be an int, got {world_size!r}")
    if not min_world_size <= world_size <= max_world_size:
        raise ValueError(
            f"this lesson runs with {min_world_size} to {max_world_size} ranks, got "
            f"world_size={world_size}: change WORLD_SIZE in the first cell"
        )
    result = Settings(mode, world_size, device, tuple(overrides))
    if not quiet:
        print(f"settings: {result}")
    return result


def start_cluster(run: Settings, timeout: float = 60.0, **options):
    """Start the lesson's LiveCluster, saying so first (it takes a few seconds)."""
    from ..cluster import LiveCluster

    backend = run.backend
    print(f"starting {run.world_size} ranks ({backend}) ...", end="", flush=True)
    start = time.perf_counter()
    cluster = LiveCluster(world_size=run.world_size, backend=backend, timeout=timeout, **options)
    print(f" ready in {time.perf_counter() - start:.1f} s")
    return cluster
