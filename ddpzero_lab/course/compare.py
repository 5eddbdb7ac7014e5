"""The course's one tolerance contract, stated once and used by every lesson.

Every strategy is compared with one process training on the concatenated global batch (same
init, equal local batches, mean loss), parameter by parameter, after a few steps (at most 5).
The two differ only in the order float additions are done: N partial sums added together
instead of one long sum. Each addition rounds to float32's machine epsilon (1.2e-7), so the
results agree to round-off, not bit for bit. The contract allows about 100 epsilons:

    float32:      |got - want| <= 1e-5 + 1e-5 * |want|     for every element
    bf16 / fp16:  |got - want| <= 1e-2 + 1e-2 * |want|     (bf16: eps 7.8e-3)

A wrong algorithm misses by far more: a gradient summed instead of averaged, a shard updated
twice, a bucket left out. SGD is used for the checks where it can be: AdamW divides the
gradient by its own running scale, which hides a wrong gradient scale (a sum instead of a mean
moves AdamW's result by less than 1e-6).
"""

from __future__ import annotations

from collections.abc import Mapping

TOLERANCE = {"float32": 1e-5, "bfloat16": 1e-2, "float16": 1e-2}


def max_difference(got: Mapping, want: Mapping) -> float:
    """The largest |got - want| over every element of every tensor (same keys required)."""
    if set(got) != set(want):
        missing, extra = set(want) - set(got), set(got) - set(want)
        raise AssertionError(f"different tensors: missing {sorted(missing)}, extra {sorted(extra)}")
    worst = 0.0
    for key, value in want.items():
        other = got[key]
        if tuple(other.shape) != tuple(value.shape):
            raise AssertionError(f"{key}: shape {tuple(other.shape)}, want {tuple(value.shape)}")
        if value.numel():
            worst = max(worst, (other.double() - value.double()).abs().max().item())
    return worst


def same(got: Mapping, want: Mapping, precision: str = "float32") -> tuple[bool, float]:
    """(within the course's contract?, the largest difference) for two {name: tensor} dicts."""
    import torch

    tol = TOLERANCE[precision]
    ok = all(torch.allclose(got[k].double(), want[k].double(), rtol=tol, atol=tol) for k in want)
    return ok and set(got) == set(want), max_difference(got, want)


def assert_same(got, want, what: str = "", precision: str = "float32") -> str:
    """Raise AssertionError unless got matches want within the contract; else a one-line
    report (returned, for course.check's evidence, and printed by the caller if wanted).

    got may be one {name: tensor} dict or a list of them (one per rank).
    """
    per_rank = got if isinstance(got, (list, tuple)) else [got]
    worst = 0.0
    for rank, each in enumerate(per_rank):
        ok, diff = same(each, want, precision)
        worst = max(worst, diff)
        if not ok:
            where = f" on rank {rank}" if len(per_rank) > 1 else ""
            raise AssertionError(
                f"{what or 'the parameters'}{where} differ by up to {diff:.2e}: more than "
                f"the {precision} contract's {TOLERANCE[precision]:.0e}"
            )
    return f"{what or 'same'}: max |difference| {worst:.1e} (contract {TOLERANCE[precision]:.0e})"
