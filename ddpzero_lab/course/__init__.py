"""The course's helpers for the notebooks: run settings, exercises with hidden solutions, and
progress for long cells.

A lesson calls into here in one line for what the learner need not study; the lessons' own
plotting and table helpers live beside it, one module per lesson (``lesson_NN``). Nothing here
is needed to train: the package works without the course.
"""

from .compare import TOLERANCE, assert_same, max_difference, same
from .exercises import check, solution, solution_source
from .progress import progress
from .settings import Settings, settings, start_cluster

__all__ = [
    "Settings",
    "TOLERANCE",
    "assert_same",
    "max_difference",
    "same",
    "check",
    "progress",
    "settings",
    "solution",
    "solution_source",
    "start_cluster",
]
