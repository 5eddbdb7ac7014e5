"""Emulated links: collectives that take as long as on a real interconnect, at laptop speed.

On a few CPU ranks, gloo's collectives compete with backward for the same cores, so the time
lessons (overlap, bucket size, prefetch, ring against parameter server) come out flat or
backwards. What shapes a real timeline is the ratio of compute to communication; this module
reproduces that ratio here:

* a `Link` is Hockney's α-β model of one interconnect (cost_model.AlphaBeta): a collective
  moving B bytes on it takes the α-β time of the op's algorithm for N ranks;
* `Link.preset("nvlink4", accelerator="h100")` scales a real link by the ratio of the
  accelerator's compute rate to this machine's (measured with a short matmul, `compute_rate`):
  an H100 computes ~1e4 times as fast as a laptop core, so its NVLink's times are stretched
  1e4 times as well, and a step here has the shape a step there has;
* while a link is set (`set_link`, in each rank; LiveCluster(link=...) and the environment
  variable DDPZERO_LINK set it for a whole cluster or torchrun job), every collective through
  comm/ completes no earlier than its start + the link's time (`Emulator.complete_at`). The
  wait is a sleep, so the cores stay free for compute, as with a NIC or NVLink doing the
  transfer; the real data still moves, so results do not change. One link per rank, used by
  one op at a time: an op launched while another is on the link starts when it is done;
* ranks may have different links (`per_rank`, LiveCluster(link={"default": ..., 0: ...})):
  one slow link, or a parameter server's own link. A rank's link carries all of its traffic,
  so a server's single link is shared by its N-1 workers' messages, one after another.

Presets (bandwidth per direction per GPU, α a typical per-message latency):
  nvlink4  450 GB/s, 3 µs   H100 SXM: 900 GB/s of NVLink per GPU, both directions together
  pcie4     25 GB/s, 5 µs   x16, ~32 GB/s theoretical per direction
  ib-100g 12.5 GB/s, 5 µs   100 Gb/s InfiniBand (one NIC)
  eth-10g 1.25 GB/s, 50 µs  10 Gb/s Ethernet, TCP
Accelerators (dense tensor-core FLOP/s): h100 989e12 (bf16), a100 312e12 (bf16), v100 125e12
(fp16), t4 65e12 (fp16), from the vendors' data sheets.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, replace

import torch

from .cost_model import AlphaBeta

LINKS = {  # name: (latency α in seconds, bandwidth in bytes per second per direction)
    "nvlink4": (3e-6, 450e9),
    "pcie4": (5e-6, 25e9),
    "ib-100g": (5e-6, 12.5e9),
    "eth-10g": (50e-6, 1.25e9),
}
ACCELERATORS = {"h100": 989e12, "a100": 312e12, "v100": 125e12, "t4": 65e12}  # FLOP/s


@dataclass(frozen=True)
class Link:
    """One interconnect: `latency` α (seconds per message), `bandwidth` (bytes per second per
    direction per rank), times multiplied by `scale` (1: real time)."""

    latency: float
    bandwidth: float
    scale: float = 1.0
    name: str = "custom"
    accelerator: str | None = None

    def __post_init__(self) -> None:
        for field, value in (("latency", self.latency), ("scale", self.scale)):
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{field} must be a non-negative number, got {value!r}")
        if not isinstance(self.bandwidth, (int, float)) or not self.bandwidth > 0:
            raise ValueError(f"bandwidth must be a positive number, got {self.bandwidth!r}")

    @classmethod
    def preset(
        cls, name: str, accelerator: str | None = None, compute_flops: float | None = None
    ) -> Link:
        """A real link, scaled to this machine when `accelerator` is named: times x (the
        accelerator's FLOP/s / this machine's, `compute_flops` or measured)."""
        if name not in LINKS:
            raise ValueError(f"unknown link {name!r}; one of {sorted(LINKS)}")
        latency, bandwidth = LINKS[name]
        link = cls(latency, bandwidth, 1.0, name)
        if accelerator is None:
            return link
        if accelerator not in ACCELERATORS:
            raise ValueError(f"unknown accelerator {accelerator!r}; one of {sorted(ACCELERATORS)}")
        here = compute_flops if compute_flops is not None else compute_rate()
        return replace(link, scale=ACCELERATORS[accelerator] / here, accelerator=accelerator)

    @classmethod
    def parse(cls, spec: str | Link) -> Link:
        """'nvlink4', 'nvlink4:h100' (scaled to this machine), a Link, or a Link's spec()."""
        if isinstance(spec, Link):
            return spec
        if not isinstance(spec, str):
            raise TypeError(f"a link is a Link or a name like 'nvlink4:h100', got {spec!r}")
        if spec.startswith("{"):
            return cls(**json.loads(spec))
        name, _, accelerator = spec.partition(":")
        return cls.preset(name, accelerator or None)

    def spec(self) -> str:
        """This link as a string (for DDPZERO_LINK and LiveCluster(link=)): Link.parse reads
        it back exactly, its scale included."""
        return json.dumps(
            {
                "latency": self.latency,
                "bandwidth": self.bandwidth,
                "scale": self.scale,
                "name": self.name,
                "accelerator": self.accelerator,
            }
        )

    @property
    def model(self) -> AlphaBeta:
        return AlphaBeta(alpha=self.latency * self.scale, beta=self.scale / self.bandwidth)

    def seconds(self, op: str, nbytes: float, world_size: int) -> float:
        """How long `op` with a payload of `nbytes` takes on this link among `world_size`
        ranks (cost_model's α-β forms: ring, chain; point-to-point one message)."""
        return self.model.predict(op, nbytes, world_size)

    def describe(self) -> str:
        """What a plot says about its timing, e.g. 'emulated nvlink4 (450 GB/s, 3 µs) scaled
        x9.9e+03 to h100 on this machine'."""
        text = f"emulated {self.name} ({self.bandwidth / 1e9:g} GB/s, {self.latency * 1e6:g} µs)"
        if self.scale != 1.0:
            target = f" to {self.accelerator}" if self.accelerator else ""
            text += f" scaled x{self.scale:.2g}{target} on this machine"
        return text


def compute_rate(size: int = 512, repeats: int = 20) -> float:
    """This process's float32 matmul rate, FLOP/s (the best of `repeats` size x size
    products, with the threads torch uses here: on a busy machine the best is the rate a
    slice of a core gives when it is not pre-empted)."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    torch.mm(a, b)  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


class Emulator:
    """The link of this rank and when it is next free (one op on the link at a time)."""

    def __init__(self, link: Link) -> None:
        self.link = link
        self.busy = 0.0  # seconds this link has spent carrying ops (its utilisation's numerator)
        self._free_at = 0.0
        self._lock = threading.Lock()

    def complete_at(self, op: str, nbytes: float, world_size: int, start: float) -> float:
        """When an op issued at `start` (time.time()) is done on the link: after the op ahead
        of it on the link, plus its own time."""
        with self._lock:
            begin = max(start, self._free_at)
            took = self.link.seconds(op, nbytes, world_size)
            self.busy += took
            self._free_at = begin + took
            return self._free_at


def check_spec(spec) -> None:
    """Refuse what Link.parse would refuse, without measuring this machine (a preset's name
    and accelerator are checked, a Link's spec is read)."""
    if isinstance(spec, Link):
        return
    if not isinstance(spec, str):
        raise TypeError(f"a link is a Link or a name like 'nvlink4:h100', got {spec!r}")
    if spec.startswith("{"):
        Link.parse(spec)
        return
    name, _, accelerator = spec.partition(":")
    if name not in LINKS:
        raise ValueError(f"unknown link {name!r}; one of {sorted(LINKS)}")
    if accelerator and accelerator not in ACCELERATORS:
        raise ValueError(f"unknown accelerator {accelerator!r}; one of {sorted(ACCELERATORS)}")


def per_rank(links: Mapping, world_size: int) -> dict[int, str | None]:
    """Each rank's link spec from a mapping {rank: link, "default": link} (a link: a name such
    as "eth-10g:h100", a Link, or None for real time); every rank needs an entry or a default.
    A scaled name stays a name: each rank scales it by its own measured compute rate."""
    if not isinstance(links, Mapping):
        raise TypeError(f"per-rank links are a mapping {{rank: link}}, got {links!r}")
    for key in links:
        if key == "default":
            continue
        if isinstance(key, bool) or not isinstance(key, int):
            raise TypeError(f"a per-rank link's key is a rank (int) or 'default', got {key!r}")
        if not 0 <= key < world_size:
            raise ValueError(f"link given for rank {key}, but the ranks are 0..{world_size - 1}")
    missing = [r for r in range(world_size) if r not in links]
    if missing and "default" not in links:
        raise ValueError(
            f"no link for rank(s) {missing}: give every rank a link, or a 'default' "
            "(None: real time)"
        )
    chosen = {r: links.get(r, links.get("default")) for r in range(world_size)}
    for link in chosen.values():
        if link is not None:
            check_spec(link)
    return {
        r: None if v is None else v if isinstance(v, str) else v.spec() for r, v in chosen.items()
    }


def encode(link, world_size: int) -> str | None:
    """What DDPZERO_LINK holds for a cluster's `link=` argument: one link's spec, or a JSON
    object {"ranks": {"0": spec or null, ...}} for per-rank links (None: no emulation)."""
    if link is None:
        return None
    if isinstance(link, Mapping):
        ranks = per_rank(link, world_size)
        if all(v is None for v in ranks.values()):
            return None
        return json.dumps({"ranks": {str(r): v for r, v in ranks.items()}})
    check_spec(link)
    return link if isinstance(link, str) else link.spec()


def _rank_spec(spec: str) -> str | None:
    """This rank's entry when `spec` holds per-rank links; else `spec` itself."""
    if not spec.startswith("{"):
        return spec
    ranks = json.loads(spec).get("ranks")
    if ranks is None:
        return spec
    import torch.distributed as dist

    rank = dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", "0"))
    return ranks.get(str(rank))


_UNREAD = object()  # DDPZERO_LINK not looked at yet in this process
_emulator: Emulator | None | object = _UNREAD


def set_link(link: str | Link | None) -> Link | None:
    """Emulate `link` for every collective this rank issues from now on (None: real time).
    Call it on every rank alike (inside a job, or once per torchrun process)."""
    global _emulator
    _emulator = None if link is None else Emulator(Link.parse(link))
    return None if _emulator is None else _emulator.link


def current() -> Emulator | None:
    """This rank's emulated link; at first use, the one DDPZERO_LINK names (LiveCluster's
    `link=` sets it in its workers, torchrun jobs in their environment), or this rank's entry
    where it holds per-rank links (`encode`)."""
    if _emulator is _UNREAD:
        spec = os.environ.get("DDPZERO_LINK") or None
        set_link(None if spec is None else _rank_spec(spec))
    return _emulator


@contextlib.contextmanager
def emulate(link: str | Link | None):
    """Emulate `link` on this rank inside the block, then give the rank back the link it had
    (None: leave the rank as it is)."""
    global _emulator
    if link is None:
        yield current()
        return
    before = current()
    set_link(link)
    try:
        yield _emulator
    finally:
        _emulator = before


def sleep_until(deadline: float) -> None:
    """Sleep (not spin) until time.time() reaches `deadline`."""
    while True:
        left = deadline - time.time()
        if left <= 0:
            return
        time.sleep(left)
