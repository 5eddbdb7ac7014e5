"""`python -m ddpzero_lab train`: spawned on its own LiveCluster, under torchrun on one node,
and in a two-"node" rehearsal on 127.0.0.1; every way ends with the same parameters."""

from __future__ import annotations

import json
import os
import subprocess

import pytest
import torch
from conftest import PYTHON, REPO, end_session, free_port

from ddpzero_lab import cli
from ddpzero_lab.cluster.worker import loopback_interface
from ddpzero_lab.workloads import TrainConfig, run, state_digest

TORCHRUN = os.path.join(os.path.dirname(PYTHON), "torchrun")
# a few steps of the small model on the offline digits; zero2: the most communication per step
ARGS = ["--strategy", "zero2", "--steps", "3", "--batch-size", "64", "--eval-samples", "64"]
TIMEOUT_S = 120


def _env() -> dict[str, str]:
    env = dict(os.environ)
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)  # started plainly, whatever the test runner's environment says
    env["GLOO_SOCKET_IFNAME"] = loopback_interface()  # the rehearsal's "nodes" talk on loopback
    env["OMP_NUM_THREADS"] = "1"
    return env


def _start(args: list[str], env=None) -> subprocess.Popen:
    return subprocess.Popen(
        args,
        cwd=REPO,
        env=env or _env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # so that a timeout can end torchrun and its workers together
    )


def _finish(proc: subprocess.Popen, timeout: float = TIMEOUT_S) -> tuple[int, str]:
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        end_session(proc, grace=2.0)
        out, _ = proc.communicate()
        pytest.fail(f"{proc.args} did not finish within {timeout} s:\n{out[-3000:]}")
    return proc.returncode, out


def _cli(*args: str, timeout: float = TIMEOUT_S) -> tuple[int, str]:
    """The CLI as a user starts it: `python -m ddpzero_lab ...` in a fresh process."""
    return _finish(_start([PYTHON, "-m", "ddpzero_lab", *args]), timeout)


def _torchrun(*args: str, save: str) -> subprocess.Popen:
    """torchrun with `args`, running the CLI's train with ARGS; rank 0 saves to `save`."""
    return _start([TORCHRUN, *args, "-m", "ddpzero_lab", "train", *ARGS, "--save-params", save])


def _load(path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=True)


def _assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


@pytest.fixture(scope="module")
def spawned_2(tmp_path_factory):
    """The CLI started plainly: its own LiveCluster of 2 ranks."""
    where = tmp_path_factory.mktemp("spawned")
    code, out = _cli(
        "train", *ARGS, "--world-size", "2", "--save-params", f"{where}/p.pt",
        "--json", f"{where}/r.json",
    )  # fmt: skip
    assert code == 0, out
    return out, _load(where / "p.pt"), json.loads((where / "r.json").read_text())


def test_spawned_cli_trains_and_agrees_with_one_process(spawned_2):
    out, params, result = spawned_2
    assert "2 rank(s) (gloo)" in out and result["world_size"] == 2
    losses = result["losses"]
    assert len(losses) == 3 and losses[-1] < losses[0]
    assert f"loss    {losses[0]:.4f} (step 1) -> {losses[-1]:.4f} (step 3)" in out
    # the same configuration, one process on the whole global batch (strategy local)
    alone = run(
        TrainConfig(
            strategy="local", steps=3, batch_size=64, eval_samples=64, return_state=True,
            world_size=1,
        )
    )[0]["state_dict"]  # fmt: skip
    for name, tensor in alone.items():
        torch.testing.assert_close(params[name], tensor, rtol=1e-5, atol=1e-6)
    # the printed digest is the saved parameters' own
    assert state_digest(params)[1][:16] in out


def test_torchrun_one_node_gives_the_live_clusters_parameters(spawned_2, tmp_path):
    code, out = _finish(_torchrun("--standalone", "--nproc-per-node", "2", save=f"{tmp_path}/p.pt"))
    assert code == 0, out
    assert "2 rank(s) (gloo)" in out
    _assert_same(_load(tmp_path / "p.pt"), spawned_2[1])


def test_two_node_rehearsal_equals_four_ranks_on_one_node_and_the_live_cluster(tmp_path):
    port = free_port()
    # c10d rendezvous hands out ranks in arrival order (--node-rank is ignored there), so both
    # "nodes" are told where to save; only the one that holds rank 0 writes.
    nodes = [
        _torchrun(
            "--nnodes",
            "2",
            "--node-rank",
            str(node),
            "--nproc-per-node",
            "2",
            "--rdzv-backend",
            "c10d",
            "--rdzv-endpoint",
            f"127.0.0.1:{port}",
            "--rdzv-id",
            "ddpzero-rehearsal",
            save=f"{tmp_path}/node{node}.pt",
        )  # fmt: skip
        for node in (0, 1)
    ]
    outs = [_finish(proc) for proc in nodes]
    for code, out in outs:
        assert code == 0, out
    saved = [p for p in (tmp_path / "node0.pt", tmp_path / "node1.pt") if p.exists()]
    assert len(saved) == 1, "exactly one node holds rank 0"
    two_nodes = _load(saved[0])
    assert any("4 rank(s) (gloo)" in out for _, out in outs)

    code, out = _finish(
        _torchrun("--standalone", "--nproc-per-node", "4", save=f"{tmp_path}/one_node.pt")
    )
    assert code == 0, out
    _assert_same(two_nodes, _load(tmp_path / "one_node.pt"))

    live = run(
        TrainConfig(
            strategy="zero2", steps=3, batch_size=64, eval_samples=64, return_state=True,
            world_size=4,
        )
    )[0]["state_dict"]  # fmt: skip
    _assert_same(two_nodes, live)


def _main(capsys, *args: str) -> tuple[int, str]:
    """The CLI in this process: its exit status (as `python -m` would exit) and its output."""
    try:
        code = cli.main(list(args))
    except SystemExit as exc:  # argparse exits by itself on --help and on bad arguments
        code = exc.code
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def test_help_lists_every_option(capsys):
    code, out = _main(capsys, "train", "--help")
    assert code == 0
    for option in (
        "--strategy", "--model", "--dataset", "--world-size", "--steps", "--batch-size",
        "--lr", "--precision", "--grad-accum", "--checkpoint-dir", "--resume", "--seed",
        "zero3", "param_server", "resnet18", "gpt", "cifar10", "bf16-mixed", "torchrun",
    ):  # fmt: skip
        assert option in out, option


@pytest.mark.parametrize(
    "args, message",
    [
        (["--strategy", "zero9"], "invalid choice"),
        (["--steps", "x"], "invalid int value"),
        (["--model", "gpt", "--dataset", "digits"], "do not fit together"),
        (["--batch-size", "63", "--world-size", "2"], "multiple of world_size"),
        (["--grad-accum", "0"], "grad_accum"),
        (["--resume"], "checkpoint_dir"),
        (["--steps", "0"], "steps must be"),
    ],
)
def test_bad_arguments_are_one_line_and_exit_2(capsys, monkeypatch, args, message):
    for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR"):
        monkeypatch.delenv(name, raising=False)
    code, out = _main(capsys, "train", *args)
    assert code == 2, out
    errors = [line for line in out.splitlines() if "error:" in line]
    assert len(errors) == 1 and message in errors[0], out


def test_a_failure_inside_the_ranks_exits_1_with_the_reason(capsys, monkeypatch, tmp_path):
    for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR"):
        monkeypatch.delenv(name, raising=False)
    code, out = _main(
        capsys, "train", "--dataset", "cifar10", "--data-dir", str(tmp_path), "--steps", "1",
        "--world-size", "2",
    )  # fmt: skip
    assert code == 1, out
    assert "FileNotFoundError: CIFAR-10 is not under" in out and "Traceback" not in out


def test_doctor_says_when_ranks_do_not_fit(capsys):
    code, out = _main(capsys, "doctor", "--world-size", "100000")
    assert code == 1
    assert "does NOT fit" in out and "all-reduce" not in out  # no cluster was started


def test_torchrun_is_detected_from_its_environment(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR"):
        monkeypatch.delenv(name, raising=False)
    assert not cli.under_torchrun()
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    assert cli.under_torchrun()
