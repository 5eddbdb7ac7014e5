"""The practitioner's decision: which layout of data, tensor and pipeline parallelism fits a
model on a cluster, and which is fastest.

`plan` lays `gpus` GPUs out as every dp x tp x pp mesh (tensor parallelism innermost, then
data, then pipeline stages, as Megatron-LM places them) with each data-parallel strategy, and
estimates per GPU, for one step of `global_batch` sequences:

  compute     6 Ψ FLOPs per token (forward 2, backward 4; Kaplan et al. 2020), 8 with
              activation checkpointing (the forward again), split over all GPUs, at `mfu` of
              the accelerator's dense 16-bit rate;
  bubble      a pipeline of p stages and m micro-batches idles (p-1)/m of the compute
              (GPipe and 1F1B alike; Narayanan et al. 2021);
  tensor      four all-reduces of one micro-batch's activations (b·s·h) per layer, two in
              forward and two in backward (six with checkpointing: the recomputed forward),
              on the critical path (Shoeybi et al. 2019);
  pipeline    one activation and one gradient message per micro-batch between stages, on
              the step's critical path only while the pipeline fills and drains (2(p-1)
              messages); in the steady state they travel while other micro-batches compute;
  data        the strategy's collectives over the dp ranks on the gradients of this GPU's
              Ψ/(tp·pp) slice: DDP one all-reduce per step (no_sync over the micro-batches),
              ZeRO-1 one reduce-scatter and one all-gather, ZeRO-2 one reduce-scatter per
              micro-batch (it keeps no full gradients to accumulate in) and one all-gather,
              ZeRO-3 two all-gathers and a reduce-scatter per micro-batch. DDP's all-reduce
              and ZeRO-2's reduce-scatters hide behind backward, ZeRO-3's behind the whole
              compute (prefetch), ZeRO-1's nothing: only what does not fit is exposed.

A group whose ranks span more than one node (`gpus_per_node`) runs on `inter_link`, else on
`intra_link` (comm/link.py's α-β model, real hardware time: no scaling to this machine).

Memory per GPU: the ZeRO paper's model-state formula on the GPU's Ψ/(tp·pp) slice over dp
ranks (memory.zero_memory_estimate); activations per layer and micro-batch after Korthikanti
et al. 2022 (16-bit activations, no sequence parallelism): s·b·h·(10 + 24/t + 5·a·s/(h·t))
bytes, without the attention scores' 5·a·s/(h·t) when `flash_attention`. With checkpointing a
layer keeps its 2·s·b·h-byte input and one layer is recomputed at a time. That is times the
layers of a stage and the micro-batches in flight (1F1B: min(p, m)); ZeRO-3 adds two gathered
layers (the running one and the prefetched one). The logits, the embeddings' activations and
the allocator's slack are left out: the estimate is a lower bound of the peak.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from .comm.link import ACCELERATORS, Link
from .memory import zero_memory_estimate

STAGES = {"ddp": 0, "zero1": 1, "zero2": 2, "zero3": 3}
PRECISIONS = {  # bytes per parameter on the wire (gradients, gathers) and the memory preset
    "bf16-mixed": (2, "mixed_adam"),
    "fp16-mixed": (2, "mixed_adam"),
    "fp32": (4, "fp32_adam"),
}
GB = 1e9  # decimal, as the ZeRO paper and GPU data sheets count


@dataclass
class Layout:
    """One way to train on the cluster: its mesh, strategy, and per-GPU step time and memory
    (seconds on the real hardware, bytes)."""

    dp: int
    tp: int
    pp: int
    strategy: str
    micro_batch: int  # sequences per micro-batch
    micro_batches: int  # per step and data-parallel rank
    memory: dict[str, float] = field(default_factory=dict)  # bytes by category, and "total"
    fits: bool = False
    compute_s: float = 0.0
    bubble_s: float = 0.0
    tp_comm_s: float = 0.0  # each dimension's time on its link per step
    pp_comm_s: float = 0.0
    dp_comm_s: float = 0.0
    exposed: dict[str, float] = field(default_factory=dict)  # what the step waits for, per dim

    @property
    def exposed_comm_s(self) -> float:
        return sum(self.exposed.values())

    step_s: float = 0.0
    tokens_per_s: float = 0.0
    mfu: float = 0.0  # model FLOPs per second achieved / the GPUs' peak

    @property
    def name(self) -> str:
        return f"dp={self.dp} tp={self.tp} pp={self.pp} b={self.micro_batch} {self.strategy}"


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    return value


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def activation_bytes_per_layer(
    seq_len: int,
    micro_batch: int,
    hidden: int,
    heads: int,
    tp: int = 1,
    flash_attention: bool = True,
) -> float:
    """One transformer layer's activations kept for backward, one micro-batch, 16-bit
    (Korthikanti et al. 2022, tensor parallelism without sequence parallelism). A fused
    attention kernel (FlashAttention, Dao et al. 2022) keeps no s x s scores: the 5·a·s/h
    term is gone."""
    s, b, h, a, t = seq_len, micro_batch, hidden, heads, tp
    scores = 0.0 if flash_attention else 5 * a * s / (h * t)
    return s * b * h * (10 + 24 / t + scores)


def _spans_nodes(span: int, gpus_per_node: int) -> bool:
    return span > gpus_per_node


def plan(
    num_params: float,
    *,
    layers: int,
    hidden: int,
    seq_len: int,
    global_batch: int,
    gpus: int,
    gpu: str = "h100",
    gpu_memory_gb: float = 80,
    gpus_per_node: int = 8,
    intra_link: str | Link = "nvlink4",
    inter_link: str | Link = "ib-100g",
    precision: str = "bf16-mixed",
    micro_batch: int | Sequence[int] = (1, 2, 4, 8),
    strategies: Sequence[str] = ("ddp", "zero1", "zero2", "zero3"),
    mfu: float = 0.5,
    activation_checkpointing: bool = False,
    heads: int | None = None,
    flash_attention: bool = True,
) -> list[Layout]:
    """Every dp x tp x pp layout of `gpus` GPUs with each strategy and micro-batch size:
    fitting layouts first, fastest first, then the others by memory. tp divides the heads,
    pp the layers, and dp x micro_batch the global batch (m = global_batch / (dp x
    micro_batch) micro-batches per step)."""
    if isinstance(num_params, bool) or not isinstance(num_params, (int, float)):
        raise ValueError(f"num_params must be a positive number, got {num_params!r}")
    if not num_params > 0 or not math.isfinite(num_params):
        raise ValueError(f"num_params must be a positive number, got {num_params!r}")
    for name, value in (
        ("layers", layers),
        ("hidden", hidden),
        ("seq_len", seq_len),
        ("global_batch", global_batch),
        ("gpus", gpus),
        ("gpus_per_node", gpus_per_node),
    ):
        _positive_int(name, value)
    sizes = [micro_batch] if isinstance(micro_batch, int) else list(micro_batch)
    if not sizes:
        raise ValueError("micro_batch must be an int >= 1 or a non-empty list of them")
    for size in sizes:
        _positive_int("micro_batch", size)
    heads = _positive_int("heads", heads if heads is not None else max(1, hidden // 128))
    if gpu not in ACCELERATORS:
        raise ValueError(f"unknown gpu {gpu!r}; one of {sorted(ACCELERATORS)}")
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {sorted(PRECISIONS)}, got {precision!r}")
    if not (isinstance(mfu, (int, float)) and 0 < mfu <= 1):
        raise ValueError(f"mfu must be in (0, 1], got {mfu!r}")
    if not (isinstance(gpu_memory_gb, (int, float)) and gpu_memory_gb > 0):
        raise ValueError(f"gpu_memory_gb must be a positive number, got {gpu_memory_gb!r}")
    unknown = [s for s in strategies if s not in STAGES]
    if unknown or not strategies:
        raise ValueError(f"strategies must be some of {sorted(STAGES)}, got {list(strategies)!r}")
    links = {"intra": Link.parse(intra_link), "inter": Link.parse(inter_link)}
    if any(link.scale != 1.0 for link in links.values()):
        raise ValueError("plan works in real hardware time: give unscaled links ('nvlink4')")
    wire_bytes, preset = PRECISIONS[precision]
    flops = ACCELERATORS[gpu] * mfu
    tokens = global_batch * seq_len

    layouts = []
    for tp in _divisors(gpus):
        if heads % tp:
            continue
        for pp in _divisors(gpus // tp):
            if layers % pp:
                continue
            dp = gpus // (tp * pp)
            for b, strategy in ((b, s) for b in sizes for s in strategies):
                if global_batch % (dp * b):
                    continue
                m = global_batch // (dp * b)
                layouts.append(
                    _estimate(
                        num_params, layers, hidden, heads, seq_len, b, tokens,
                        dp, tp, pp, m, strategy, links, gpus_per_node, wire_bytes, preset,
                        flops, ACCELERATORS[gpu], activation_checkpointing,
                        flash_attention, gpu_memory_gb * GB,
                    )
                )  # fmt: skip
    if not layouts:
        raise ValueError(
            f"no layout of {gpus} GPUs divides the heads ({heads}), the layers ({layers}) and "
            f"the global batch ({global_batch} sequences in micro-batches of {sizes})"
        )
    fitting = sorted((x for x in layouts if x.fits), key=lambda x: x.step_s)
    others = sorted((x for x in layouts if not x.fits), key=lambda x: x.memory["total"])
    return fitting + others


def _estimate(
    psi, layers, hidden, heads, seq_len, micro_batch, tokens, dp, tp, pp, m, strategy, links,
    gpus_per_node, wire_bytes, preset, flops, peak_flops, checkpointing, flash, budget,
) -> Layout:  # fmt: skip
    gpus = dp * tp * pp
    link_of = {  # each dimension's group on the node's link or across nodes
        "tp": links["inter" if _spans_nodes(tp, gpus_per_node) else "intra"],
        "dp": links["inter" if _spans_nodes(tp * dp, gpus_per_node) else "intra"],
        "pp": links["inter" if _spans_nodes(gpus, gpus_per_node) else "intra"],
    }
    compute = (8 if checkpointing else 6) * psi * tokens / gpus / flops
    bubble = compute * (pp - 1) / m
    message = micro_batch * seq_len * hidden * wire_bytes  # one micro-batch's activations
    stage_layers = layers // pp
    tp_comm = 0.0
    if tp > 1:
        per_layer = 6 if checkpointing else 4
        tp_comm = m * stage_layers * per_layer * link_of["tp"].seconds("all_reduce", message, tp)
    p2p = link_of["pp"].seconds("send", message, 2) if pp > 1 else 0.0

    slice_bytes = psi / (tp * pp) * wire_bytes  # this GPU's gradients (or parameters)
    link = link_of["dp"]
    reduce_scatter = link.seconds("reduce_scatter", slice_bytes, dp)
    all_gather = link.seconds("all_gather", slice_bytes, dp)
    backward = compute * 2 / 3
    if strategy == "ddp":  # no_sync: one all-reduce, during the last micro-batch's backward
        dp_comm, window = link.seconds("all_reduce", slice_bytes, dp), backward / m
    elif strategy == "zero1":  # reduce-scatter after backward, all-gather after the step
        dp_comm, window = reduce_scatter + all_gather, 0.0
    elif strategy == "zero2":  # a reduce-scatter in every micro-batch's backward
        dp_comm, window = m * reduce_scatter + all_gather, backward
    else:  # zero3: gathered for forward and backward of every micro-batch, prefetched
        dp_comm, window = m * (2 * all_gather + reduce_scatter), compute
    if dp == 1:
        dp_comm = 0.0
    exposed = {"tp": tp_comm, "pp": 2 * (pp - 1) * p2p, "dp": max(dp_comm - window, 0.0)}
    step = compute + bubble + sum(exposed.values())

    memory = dict(zero_memory_estimate(psi / (tp * pp), dp, STAGES[strategy], preset=preset))
    in_flight = min(pp, m)
    full_layer = activation_bytes_per_layer(seq_len, micro_batch, hidden, heads, tp, flash)
    if checkpointing:  # each layer's input kept, one layer's activations rebuilt at a time
        memory["activations"] = stage_layers * in_flight * 2 * seq_len * micro_batch * hidden
        memory["activations"] += full_layer
    else:
        memory["activations"] = stage_layers * in_flight * full_layer
    layer_params = psi / layers / tp  # one layer's slice, gathered whole over the dp ranks
    memory["buffers"] = 2 * layer_params * wire_bytes if strategy == "zero3" and dp > 1 else 0.0
    memory["total"] = memory["total"] + memory["activations"] + memory["buffers"]
    return Layout(
        dp, tp, pp, strategy, micro_batch, m, memory,
        fits=memory["total"] <= budget,
        compute_s=compute, bubble_s=bubble,
        tp_comm_s=tp_comm, pp_comm_s=2 * m * p2p, dp_comm_s=dp_comm, exposed=exposed,
        step_s=step, tokens_per_s=tokens / step,
        mfu=6 * psi * tokens / step / (gpus * peak_flops),
    )  # fmt: skip


def plan_table(layouts: Sequence[Layout], top: int | None = 10) -> str:
    """The layouts as a printed table (the first `top`; None: all); returns the text."""
    rows = list(layouts)[:top] if top else list(layouts)
    head = (
        f"{'layout':<28} {'m':>4} {'GB/GPU':>7} {'fits':>4} {'step s':>8} {'compute':>8} "
        f"{'bubble':>7} {'TP':>7} {'PP':>7} {'DP':>7} {'MFU':>5}"
    )
    lines = [head, f"{'':<61}{'exposed communication':-^31}", "-" * len(head)]
    for x in rows:
        lines.append(
            f"{x.name:<28} {x.micro_batches:>4} {x.memory['total'] / GB:>7.1f} "
            f"{'yes' if x.fits else 'no':>4} {x.step_s:>8.3f} {x.compute_s:>8.3f} "
            f"{x.bubble_s:>7.3f} {x.exposed['tp']:>7.3f} {x.exposed['pp']:>7.3f} "
            f"{x.exposed['dp']:>7.3f} {x.mfu:>5.0%}"
        )
    text = "\n".join(lines)
    print(text)
    return text
