"""The cost models: byte formulas and the α-β(-γ) time model, and the probe that fits them."""

from __future__ import annotations

import pytest

import ddpzero_lab as dzl
from ddpzero_lab import comm
from ddpzero_lab.comm import AlphaBeta, chunk_numels, fit_alpha_beta, traffic_model


@pytest.mark.parametrize("n", [2, 3, 4, 8])
def test_textbook_figures_when_the_world_size_divides_the_payload(n):
    numel, e = 24 * n, 4
    b = numel * e
    for r in range(n):
        assert traffic_model("all_reduce", numel, e, n, r) == (2 * (n - 1) * b // n,) * 2
        assert traffic_model("reduce_scatter", numel, e, n, r) == ((n - 1) * b // n,) * 2
        assert traffic_model("all_gather", numel, e, n, r) == ((n - 1) * b // n,) * 2


def test_uneven_all_reduce_moves_every_byte_exactly_as_often_as_the_ring():
    for n in range(2, 9):
        for numel in (1, n - 1, n + 1, 1001):
            per_rank = [traffic_model("all_reduce", numel, 2, n, r) for r in range(n)]
            # each of the N chunks crosses N-1 links in each of the two phases
            assert sum(s for s, _ in per_rank) == sum(r for _, r in per_rank)
            assert sum(s for s, _ in per_rank) == 2 * (n - 1) * numel * 2


def test_broadcast_is_a_chain_from_the_source():
    n, b = 4, 100
    rows = [traffic_model("broadcast", 25, 4, n, r, src=2) for r in range(n)]
    assert rows == [(b, b), (0, b), (b, 0), (b, b)]  # 2 -> 3 -> 0 -> 1


def test_single_rank_and_point_to_point():
    assert traffic_model("all_reduce", 10, 4, 1, 0) == (0, 0)
    assert traffic_model("send", 10, 4, 4, 1) == (40, 0)
    assert traffic_model("recv", 10, 4, 4, 1) == (0, 40)
    assert traffic_model("barrier", 0, 4, 4, 1) == (0, 0)
    with pytest.raises(ValueError, match="unknown op"):
        traffic_model("all_to_all", 1, 4, 2, 0)


def test_chunks_follow_tensor_split():
    import torch

    for numel, n in [(10, 3), (2, 4), (0, 3), (7, 7)]:
        assert chunk_numels(numel, n) == [c.numel() for c in torch.arange(numel).tensor_split(n)]


def test_alpha_beta_gamma_predictions():
    m = AlphaBeta(alpha=1e-5, beta=1e-9, gamma=2e-10)
    b, n = 1e6, 4
    assert m.predict("send", b, n) == pytest.approx(1e-5 + 1e-3)
    assert m.predict("all_reduce", b, n) == pytest.approx(6e-5 + 1.5e-3 + 0.75 * 2e-4)
    assert m.predict("reduce_scatter", b, n) == pytest.approx(3e-5 + 0.75 * b * 1.2e-9)
    assert m.predict("all_gather", b, n) == pytest.approx(3e-5 + 0.75e-3)
    assert m.predict("broadcast", b, n) == pytest.approx(3e-5 + 1e-3)
    assert m.predict("all_reduce", b, 1) == 0.0
    assert m.bandwidth == pytest.approx(1e9)


@pytest.mark.parametrize("relative", [True, False])
def test_fit_recovers_a_known_line(relative):
    sizes = [16.0 * 4**k for k in range(8)]
    times = [2e-5 + s * 5e-10 for s in sizes]
    fit = fit_alpha_beta(sizes, times, relative=relative)
    assert fit.alpha == pytest.approx(2e-5, rel=1e-6)
    assert fit.beta == pytest.approx(5e-10, rel=1e-6)


def test_relative_fit_is_not_thrown_by_noise_on_large_messages():
    sizes = [16.0 * 4**k for k in range(9)]
    times = [2e-5 + s * 5e-10 for s in sizes]
    times[-1] *= 1.3  # 30 % noise on the largest message
    assert fit_alpha_beta(sizes, times, relative=True).alpha == pytest.approx(2e-5, rel=0.05)
    plain = fit_alpha_beta(sizes, times, relative=False).alpha
    assert abs(plain - 2e-5) / 2e-5 > 0.2  # the plain fit lets the big message decide alpha


def test_fit_rejects_bad_input():
    with pytest.raises(ValueError):
        fit_alpha_beta([1.0], [1.0])
    with pytest.raises(ValueError):
        fit_alpha_beta([4.0, 4.0], [1.0, 2.0])


def test_probe_runs_on_the_cluster_and_agrees_across_ranks():
    with dzl.LiveCluster(2, timeout=10.0) as cluster:
        # up to 16 MB: its transfer (milliseconds) stands above a busy machine's noise, so
        # the fitted bandwidth term cannot vanish
        fits = cluster.run(comm.probe_alpha_beta, (16, 1024, 65536, 1 << 20, 1 << 24), 3)
    assert fits[0] == fits[1]
    assert fits[0].beta > 0 and fits[0].gamma > 0 and fits[0].alpha >= 0
