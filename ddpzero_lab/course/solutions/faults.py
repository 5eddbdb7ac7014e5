"""Solutions to lesson 12's exercise (when things go wrong): who is where, from the ranks' logs
of completed collectives."""

import math  # noqa: F401 - the names every notebook imports, for a solution pasted into it

import torch  # noqa: F401
import torch.distributed as dist  # noqa: F401
from torch import nn  # noqa: F401

import ddpzero_lab as dzl  # noqa: F401


def who_is_where(logs, returned):
    """logs: {rank: [(seq, op, tag, step), ...]}, the ops each rank completed, in order.
    returned: the set of ranks whose function returned.

    Returns (places, first_split):
      places[rank] = ("finished after", seq of its last op) if it returned,
                     else ("waiting in", seq of its last op + 1);
      first_split = (seq, {rank: step}) for the first seq the ranks completed in different
                    steps, or None if they never got out of step.
    """
    places = {}
    for rank, log in logs.items():
        last = log[-1][0] if log else 0
        places[rank] = ("finished after", last) if rank in returned else ("waiting in", last + 1)
    steps_by_seq = {}  # seq -> {rank: the step in which that rank completed it}
    for rank, log in logs.items():
        for seq, _op, _tag, step in log:
            steps_by_seq.setdefault(seq, {})[rank] = step
    for seq in sorted(steps_by_seq):
        if len(set(steps_by_seq[seq].values())) > 1:
            return places, (seq, steps_by_seq[seq])
    return places, None
