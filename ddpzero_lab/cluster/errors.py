"""The cluster's errors: RankError (a job failed on some ranks) and ClusterError (the cluster
itself could not start or is closed). Both say what happened on which rank and what to do."""

from __future__ import annotations

import signal
from dataclasses import dataclass

# Substrings of the messages gloo and NCCL give when a *peer* failed or a collective timed out.
# A rank failing with one of these is usually a victim of another rank's failure, so the
# report lists it after the root cause.
_COMM_ERROR_MARKS = (
    "Connection closed by peer",
    "Connection reset by peer",
    "Timed out waiting",
    "timed out",
    "Timeout",
    "NCCL communicator was aborted",
    "ProcessGroupNCCL",
    "Broken pipe",
    "pair closure",  # gloo: "Application timeout caused pair closure"
)


def is_comm_error(message: str) -> bool:
    """True if an error message is one gloo or NCCL gives when a collective failed."""
    return any(m in message for m in _COMM_ERROR_MARKS)


class ClusterError(RuntimeError):
    """The cluster cannot do what was asked (start-up failed, it is closed, ...)."""


@dataclass
class RankFailure:
    """What went wrong on one rank.

    kind is one of:
      "exception"  fn raised; exc_type, message and the remote traceback are filled in
      "died"       the worker process ended (os._exit, a signal, the OOM killer); see exitcode
      "stuck"      the rank did not finish after another rank failed, nor when asked to stop
                   (typically waiting in a collective); its process was ended
      "cancelled"  the rank was stopped because the job was interrupted or another rank failed
    """

    rank: int
    kind: str
    exc_type: str = ""
    message: str = ""
    traceback: str = ""
    exitcode: int | None = None
    exception: BaseException | None = None
    stderr: str = ""  # for "died": the last lines the process wrote to its native stderr

    @property
    def is_comm_error(self) -> bool:
        return self.kind == "exception" and is_comm_error(self.message)

    def summary(self) -> str:
        if self.kind == "exception":
            return f"{self.exc_type}: {self.message}"
        if self.kind == "died":
            return f"worker process died ({describe_exitcode(self.exitcode)})"
        if self.kind == "stuck":
            return "did not finish and did not respond to cancel (stuck in a collective?); ended"
        return "cancelled"


OOM_HINT = " (the OOM killer sends SIGKILL when memory runs out)"


def describe_exitcode(code: int | None) -> str:
    if code is None:
        return "exit status unknown"
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        extra = OOM_HINT if name == "SIGKILL" else ""
        return f"killed by {name}{extra}"
    return f"exit code {code}"


class RankError(ClusterError):
    """A job failed on one or more ranks.

    `failures` maps rank -> RankFailure for every rank that did not return normally;
    `ranks` lists the ranks whose failure is a root cause (not a peer's consequence);
    `results` holds the values of the ranks that did return (None for the others);
    `restarted` says whether the cluster replaced its workers to recover;
    `report` says where each rank stood in its collectives when the job was settled (from
    the ranks' flight records), when collectives were involved; else "".
    """

    def __init__(
        self,
        failures: dict[int, RankFailure],
        world_size: int,
        job_name: str = "fn",
        results: list | None = None,
        restarted: bool = False,
        note: str = "",
        report: str = "",
    ):
        self.failures = dict(sorted(failures.items()))
        self.world_size = world_size
        self.job_name = job_name
        self.results = results if results is not None else [None] * world_size
        self.restarted = restarted
        self.note = note
        self.report = report
        causes = [
            r
            for r, f in self.failures.items()
            if f.kind not in ("cancelled", "stuck") and not f.is_comm_error
        ]
        self.ranks = causes or [r for r, f in self.failures.items() if f.kind != "cancelled"]
        super().__init__(self._format())

    def short(self) -> str:
        """A few lines: which ranks failed and why, without the tracebacks."""
        failed = [r for r, f in self.failures.items() if f.kind != "cancelled"]
        lines = [
            f"{self.job_name} failed on rank{'s' if len(failed) != 1 else ''} "
            f"{', '.join(map(str, failed))} of {self.world_size}"
        ]
        ordered = sorted(self.failures.values(), key=lambda f: (f.rank not in self.ranks, f.rank))
        for failure in ordered:
            if failure.kind != "cancelled":
                summary = failure.summary().splitlines()[0] if failure.summary() else ""
                cause = "" if failure.rank in self.ranks else " (a consequence)"
                lines.append(f"  rank {failure.rank}: {summary[:200]}{cause}")
        if self.restarted:
            lines.append("  the cluster replaced its workers; it is ready for the next job")
        return "\n".join(lines)

    def _render_traceback_(self) -> list[str]:
        # IPython shows this instead of a traceback: a planned failure in a notebook reads as a
        # short report; the full one (every rank's traceback, the flight report) stays on demand.
        return [
            f"\x1b[31mRankError\x1b[0m: {self.short()}",
            "  (every rank's full traceback: print(sys.last_value) in the next cell)",
        ]

    def _format(self) -> str:
        failed = [r for r, f in self.failures.items() if f.kind != "cancelled"]
        lines = [
            f"{self.job_name} failed on rank{'s' if len(failed) != 1 else ''} "
            f"{', '.join(map(str, failed))} of {self.world_size}"
        ]
        if self.report:
            lines.append(self.report)
        ordered = sorted(self.failures.values(), key=lambda f: (f.rank not in self.ranks, f.rank))
        for failure in ordered:
            if failure.kind == "cancelled":
                continue
            tag = (
                ""
                if failure.rank in self.ranks or not failure.is_comm_error
                else ("  [probably a consequence of the failure above]")
            )
            lines.append(f"--- rank {failure.rank}: {failure.summary()}{tag}")
            if failure.traceback and failure.rank in self.ranks:
                lines.append(_indent(failure.traceback.rstrip()))
            if failure.stderr:
                lines.append("    its last words on stderr:")
                lines.append(_indent(_indent(failure.stderr)))
        cancelled = [r for r, f in self.failures.items() if f.kind == "cancelled"]
        if cancelled:
            lines.append(f"ranks stopped because of it: {', '.join(map(str, cancelled))}")
        if self.note:
            lines.append(self.note)
        if self.restarted:
            lines.append(
                "The cluster replaced its workers to recover (state kept in worker processes is "
                "gone); it is ready for the next job."
            )
        return "\n".join(lines)


def _indent(text: str) -> str:
    return "\n".join("    " + line for line in text.splitlines())


def code_files(fn) -> dict[str, str]:
    """Map the names of fn's code objects (and nested ones) to the files they came from.

    cloudpickle sends functions by value with their file name blanked to '<dynamic-code>', so
    a remote traceback has no source lines; the parent still knows where the code came from
    (a notebook cell's file included) and puts the lines back with `restore_source`.
    """
    found: dict[str, str] = {}
    stack = [getattr(fn, "__code__", None)]
    for cell in getattr(fn, "__closure__", None) or ():
        try:
            stack.append(getattr(cell.cell_contents, "__code__", None))
        except ValueError:  # an empty cell
            pass
    while stack:
        code = stack.pop()
        if code is None or not hasattr(code, "co_consts"):
            continue
        found.setdefault(code.co_name, code.co_filename)
        stack.extend(c for c in code.co_consts if hasattr(c, "co_consts"))
    return found


def restore_source(text: str, files: dict[str, str]) -> str:
    """Put file names and source lines back into a remote traceback (see code_files)."""
    import linecache
    import re

    pattern = re.compile(r'^(\s*)File "<dynamic-code>", line (\d+), in (\S+)$')
    out: list[str] = []
    for line in text.splitlines():
        match = pattern.match(line)
        if match and match.group(3) in files:
            indent, lineno, name = match.group(1), int(match.group(2)), match.group(3)
            filename = files[name]
            out.append(f'{indent}File "{filename}", line {lineno}, in {name}')
            source = linecache.getline(filename, lineno).strip()
            if source:
                out.append(f"{indent}    {source}")
        else:
            out.append(line)
    return "\n".join(out) + ("\n" if text.endswith("\n") else "")


def join_ranks(ranks) -> str:
    """'0, 2, 3': rank numbers for a message."""
    return ", ".join(str(r) for r in ranks)


def name_ranks(ranks) -> str:
    """'rank 1' or 'ranks 0, 2': one or more ranks, named for a message."""
    ranks = list(ranks)
    return f"rank {ranks[0]}" if len(ranks) == 1 else f"ranks {join_ranks(ranks)}"
