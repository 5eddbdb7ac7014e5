"""The LiveCluster's recovery policy (cluster/recovery.py) as a table: what the parent observed
when it settled a job -> which ranks to end and whether to replace the workers. A pure function:
no processes are started here."""

from __future__ import annotations

import pytest

from ddpzero_lab.cluster.recovery import Observation, Outcome, Recovery, decide

OK = Outcome("ok", seq=4)
RAISED = Outcome("error", {"message": "bad value"}, seq=4)
RAISED_EARLY = Outcome("error", {"message": "gave up"}, seq=3)  # before the others' collective
CANCELLED = Outcome("cancelled", seq=4)
STUCK = Outcome("stuck")
DIED = Outcome("died", exitcode=7)
TIMED_OUT = Outcome("error", {"message": "[gloo] Timed out waiting 3000ms for recv"}, seq=5)
NO_SEQ = Outcome("error", {"message": "bad value"}, seq=None)

KEEP = Recovery(kill=(), reason=None, replace_workers=False)

# (name, observation, expected recovery)
CASES = [
    ("every rank returned", Observation((OK, OK)), KEEP),
    ("nothing at all: one rank", Observation((OK,)), KEEP),
    (
        "raised on one rank, the ranks in step: keep the workers and what they hold",
        Observation((OK, RAISED)),
        KEEP,
    ),
    ("raised on every rank, in step", Observation((RAISED, RAISED)), KEEP),
    (
        "cancelled in step (an interrupt between collectives)",
        Observation((CANCELLED, CANCELLED)),
        KEEP,
    ),
    (
        "raised before a collective the other rank issued: out of step",
        Observation((CANCELLED, RAISED_EARLY)),
        Recovery((), "the ranks left the job having issued different collectives", True),
    ),
    (
        "a rank that did not say its sequence number counts as out of step",
        Observation((OK, NO_SEQ)),
        Recovery((), "the ranks left the job having issued different collectives", True),
    ),
    (
        "a stuck rank is ended and the workers replaced",
        Observation((STUCK, RAISED_EARLY)),
        Recovery((0,), "rank 0 stuck", True),
    ),
    (
        "several stuck ranks are named together",
        Observation((RAISED, STUCK, STUCK)),
        Recovery((1, 2), "ranks 1, 2 stuck", True),
    ),
    (
        "stuck wins over a broken group in the reason; both replace",
        Observation((STUCK, DIED), broken="rank 1 died (killed by SIGKILL)"),
        Recovery((0,), "rank 0 stuck", True),
    ),
    (
        "a death seen by the hub breaks the group",
        Observation((RAISED, DIED), broken="rank 1 died (killed by SIGKILL)"),
        Recovery((), "rank 1 died (killed by SIGKILL)", True),
    ),
    (
        "a broken group is replaced even if every rank of this job returned",
        Observation((OK, OK), broken="rank 0 died (exit code 7)"),
        Recovery((), "rank 0 died (exit code 7)", True),
    ),
    (
        "a death reported to the job alone still replaces the workers",
        Observation((OK, DIED)),
        Recovery((), "rank 1 died (exit code 7)", True),
    ),
    (
        "a collective that timed out breaks the group even with the ranks in step",
        Observation((TIMED_OUT, Outcome("ok", seq=5))),
        Recovery((), "a collective failed on rank 0", True),
    ),
    (
        "a failed collective seen only in a flight record",
        Observation((RAISED, RAISED), collective_failed=frozenset({1, 0})),
        Recovery((), "a collective failed on ranks 0, 1", True),
    ),
    (
        "flight records and error messages together, named in order",
        Observation((TIMED_OUT, RAISED, OK), collective_failed=frozenset({2})),
        Recovery((), "a collective failed on ranks 0, 2", True),
    ),
    (
        "a flight record of a failed op is ignored when every rank returned",
        Observation((OK, OK), collective_failed=frozenset({0})),
        KEEP,
    ),
    (
        "after close() or a restart nothing is replaced, but stuck ranks are still ended",
        Observation((STUCK, RAISED_EARLY), can_replace=False),
        Recovery((0,), "rank 0 stuck", False),
    ),
    (
        "out of step on a cluster that cannot replace: the reason stays, for the error",
        Observation((CANCELLED, RAISED_EARLY), can_replace=False),
        Recovery((), "the ranks left the job having issued different collectives", False),
    ),
]


@pytest.mark.parametrize(
    ("observation", "expected"),
    [case[1:] for case in CASES],
    ids=[case[0] for case in CASES],
)
def test_recovery_policy(observation, expected):
    assert decide(observation) == expected


def test_an_unknown_status_is_refused():
    with pytest.raises(ValueError, match="unknown outcome status 'lost'"):
        decide(Observation((OK, Outcome("lost"))))


def test_the_error_message_of_an_outcome():
    assert RAISED.error_message == "bad value"
    assert OK.error_message == "" and Outcome("error", None).error_message == ""
