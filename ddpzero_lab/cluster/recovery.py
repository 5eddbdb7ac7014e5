"""The recovery policy of a LiveCluster: after a job failed or was stopped, what to do.

A pure function, `decide(Observation) -> Recovery`: no processes, pipes, locks or clocks, so
that the policy can be read in one place and tested by a table of cases (see
tests/test_recovery_policy.py). The job (job.py) gathers the observation, asks, and carries the
answer out: it ends the ranks to kill, and has the cluster replace its workers.

The policy:
  * fn raises on some ranks: the others get `grace` seconds to finish on their own, then are
    cancelled; a rank that does not answer the cancel either is stuck (in a collective,
    usually) and is ended. (Waiting and cancelling are the job's; this module sees the result:
    a rank that never answered has the outcome "stuck".)
  * After a failed or cancelled job, the process group can be trusted again only if no rank
    was ended or died, no collective failed, and every rank left the job at the same
    process-group sequence number. A failed collective breaks the group even with the ranks
    in step: gloo closes its connections when an op times out, and NCCL aborts its
    communicator. Ranks at different sequence numbers (one did a collective the others did
    not) can never pair their collectives again. In those cases the workers are replaced;
    otherwise the workers, and the state they hold, are kept.
  * A hung collective is ended by the process group's own timeout, which raises on the waiting
    rank; a dead rank is seen at once through its process sentinel (hub.py), which marks the
    generation broken.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .errors import describe_exitcode, is_comm_error, join_ranks, name_ranks

STATUSES = ("ok", "error", "cancelled", "died", "stuck")


@dataclass(frozen=True)
class Outcome:
    """How one rank's part of a job ended, as the parent knows it.

    status: "ok" | "error" | "cancelled" (the rank answered: messages.Result) | "died" (its
    process ended) | "stuck" (it answered neither the job's end nor a cancel in time).
    """

    status: str
    payload: Any = None  # "ok": the pickled value; "error": the worker's dict describing it
    seq: int | None = None  # the process group's sequence number when the rank left the job
    exitcode: int | None = None  # "died": the process's exit code
    stderr: str = ""  # "died": the last lines it wrote to its native stderr

    @property
    def error_message(self) -> str:
        if self.status != "error" or not isinstance(self.payload, dict):
            return ""
        return self.payload.get("message", "") or ""


@dataclass(frozen=True)
class Observation:
    """What the parent saw of a job when it settled it."""

    outcomes: tuple[Outcome, ...]  # indexed by rank, none missing
    # Ranks whose last counted collective in this job did not end well (their flight records).
    collective_failed: frozenset[int] = frozenset()
    # Why the workers' process group is known to be broken already (a rank died), or None.
    broken: str | None = None
    # The job's workers are still the cluster's current ones and the cluster is open, so they
    # can be replaced (not after close(), nor when a restart already replaced them).
    can_replace: bool = True


@dataclass(frozen=True)
class Recovery:
    """What to do about it."""

    kill: tuple[int, ...]  # ranks whose processes must be ended (stuck ones)
    reason: str | None  # why the process group can no longer be trusted; None: it can
    replace_workers: bool  # start a fresh generation of workers now


def decide(observed: Observation) -> Recovery:
    """The recovery for a settled job: which ranks to end, and whether to replace the workers."""
    outcomes = observed.outcomes
    for o in outcomes:
        if o.status not in STATUSES:
            raise ValueError(f"unknown outcome status {o.status!r}; expected one of {STATUSES}")
    stuck = tuple(r for r, o in enumerate(outcomes) if o.status == "stuck")
    dead = [r for r, o in enumerate(outcomes) if o.status == "died"]
    failed = [r for r, o in enumerate(outcomes) if o.status != "ok"]
    reason = None
    if stuck:
        reason = f"rank{'s' if len(stuck) > 1 else ''} {join_ranks(stuck)} stuck"
    elif observed.broken:
        reason = observed.broken
    elif dead:
        # The hub marks the generation broken when it sees a death, so `broken` names it
        # first; this covers a death reported to the job alone.
        rank = dead[0]
        reason = f"rank {rank} died ({describe_exitcode(outcomes[rank].exitcode)})"
    elif failed:
        broken_ops = set(observed.collective_failed)
        # A raw torch.distributed call that comm/ never counted shows only in the error text.
        broken_ops.update(r for r, o in enumerate(outcomes) if is_comm_error(o.error_message))
        # Only ranks that answered report a sequence number.
        seqs = {o.seq for o in outcomes if o.status in ("ok", "error", "cancelled")}
        if broken_ops:
            reason = f"a collective failed on {name_ranks(sorted(broken_ops))}"
        elif None in seqs or len(seqs) > 1:
            reason = "the ranks left the job having issued different collectives"
    return Recovery(
        kill=stuck,
        reason=reason,
        replace_workers=reason is not None and observed.can_replace,
    )
