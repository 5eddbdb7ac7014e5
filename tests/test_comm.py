"""comm/: counted collectives and rings against torch.distributed, counters against the model.

One cluster per world size (2, 3, 4), shared by the tests of this module.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.distributed as dist

import ddpzero_lab as dzl
from ddpzero_lab import comm
from ddpzero_lab.comm import traffic_model

SIZES = [0, 1, 2, 3, 7, 1000, 1001]  # empty, one element, fewer than ranks, not divisible
DTYPES = [torch.float32, torch.bfloat16]


@pytest.fixture(scope="module", params=[2, 3, 4], ids=lambda n: f"N{n}")
def ncluster(request):
    with dzl.LiveCluster(world_size=request.param, timeout=10.0) as cluster:
        yield cluster


def _data(numel, dtype, salt=0):
    # Small integers: exact in bf16 and under any summation order, so ring and torch must
    # agree bit for bit.
    g = torch.Generator().manual_seed(1000 * dzl.rank() + numel + salt)
    return torch.randint(-8, 8, (numel,), generator=g).to(dtype)


@contextlib.contextmanager
def _handed_to_torch():
    """Tally the bytes the rings really hand to torch's point-to-point ops (one
    batch_isend_irecv per step: a send and a receive posted together), apart from any
    counter: the independent measurement the model and the counters are held against."""
    handed = {"sent": 0, "recv": 0, "batches": 0, "unpaired": 0}
    batch = dist.batch_isend_irecv

    def counting_batch(ops):
        handed["batches"] += 1
        kinds = sorted(op.op.__name__ for op in ops)
        if kinds != ["irecv", "isend"]:
            handed["unpaired"] += 1  # an empty chunk on one side: legal, counted apart
        for op in ops:
            side = "sent" if op.op.__name__ == "isend" else "recv"
            handed[side] += op.tensor.numel() * op.tensor.element_size()
        return batch(ops)

    dist.batch_isend_irecv = counting_batch
    try:
        yield handed
    finally:
        dist.batch_isend_irecv = batch


def _all_reduce_case(numel, dtype):
    n, r = dzl.world_size(), dzl.rank()
    x = _data(numel, dtype)
    ours, ring, ref = x.clone(), x.clone(), x.clone()
    dzl.reset_traffic()
    comm.all_reduce(ours)
    with _handed_to_torch() as handed:
        comm.ring_all_reduce(ring)
    dist.all_reduce(ref)
    counters = dzl.traffic()
    e = x.element_size()
    return {
        "ours": torch.equal(ours, ref),
        "ring": torch.equal(ring, ref),
        "model": traffic_model("all_reduce", numel, e, n, r),
        "counted": (counters["all_reduce"]["sent"], counters["all_reduce"]["recv"]),
        "measured": (counters["ring_all_reduce"]["sent"], counters["ring_all_reduce"]["recv"]),
        "handed": (handed["sent"], handed["recv"]),
        "batches": (handed["batches"], handed["unpaired"]),
        "bytes": (counters["all_reduce"]["bytes"], counters["ring_all_reduce"]["bytes"]),
        "calls": counters["all_reduce"]["calls"],
    }


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_all_reduce_and_ring_all_reduce_match_torch_and_the_model(ncluster, dtype):
    n = ncluster.world_size
    e = torch.tensor([], dtype=dtype).element_size()
    for numel in SIZES:
        results = ncluster.run(_all_reduce_case, numel, dtype)
        for r, out in enumerate(results):
            assert out["ours"] and out["ring"], (numel, r)
            # the counter (the model's figure) against the bytes a ring really hands to torch
            assert out["counted"] == out["model"] == out["handed"], (numel, r, out)
            assert out["measured"] == out["handed"], (numel, r, out)
            assert out["bytes"] == (numel * e, numel * e) and out["calls"] == 1
            if numel >= n:  # every chunk holds data: each of the 2(N-1) steps posts both together
                assert out["batches"] == (2 * (n - 1), 0), (numel, r, out)
        # the textbook figure: each rank sends and receives 2(N-1)/N·B when N divides numel
        if numel % n == 0:
            assert all(out["measured"] == (2 * (n - 1) * numel * e // n,) * 2 for out in results)
        # the ring moves, in all, what the model says: sum of sent == sum of received
        assert sum(o["measured"][0] for o in results) == sum(o["measured"][1] for o in results)


def _scatter_gather_case(chunk, dtype):
    n, r = dzl.world_size(), dzl.rank()
    x = _data(n * chunk, dtype, salt=1)
    dzl.reset_traffic()
    ours, ring, ref = (torch.empty(chunk, dtype=dtype) for _ in range(3))
    comm.reduce_scatter(ours, x)
    with _handed_to_torch() as rs_handed:
        comm.ring_reduce_scatter(ring, x)
    dist.reduce_scatter_tensor(ref, x.clone())
    unchanged = torch.equal(x, _data(n * chunk, dtype, salt=1))
    piece = _data(chunk, dtype, salt=2)
    g_ours, g_ring, g_ref = (torch.empty(n * chunk, dtype=dtype) for _ in range(3))
    comm.all_gather(g_ours, piece)
    with _handed_to_torch() as ag_handed:
        comm.ring_all_gather(g_ring, piece)
    dist.all_gather_into_tensor(g_ref, piece)
    c = dzl.traffic()
    e = x.element_size()
    return {
        "rs": torch.equal(ours, ref) and torch.equal(ring, ref) and unchanged,
        "ag": torch.equal(g_ours, g_ref) and torch.equal(g_ring, g_ref),
        "rs_model": traffic_model("reduce_scatter", n * chunk, e, n, r),
        "rs_counted": (c["reduce_scatter"]["sent"], c["reduce_scatter"]["recv"]),
        "rs_measured": (c["ring_reduce_scatter"]["sent"], c["ring_reduce_scatter"]["recv"]),
        "rs_handed": (rs_handed["sent"], rs_handed["recv"]),
        "ag_model": traffic_model("all_gather", n * chunk, e, n, r),
        "ag_counted": (c["all_gather"]["sent"], c["all_gather"]["recv"]),
        "ag_measured": (c["ring_all_gather"]["sent"], c["ring_all_gather"]["recv"]),
        "ag_handed": (ag_handed["sent"], ag_handed["recv"]),
    }


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_reduce_scatter_and_all_gather_match_torch_and_the_model(ncluster, dtype):
    n = ncluster.world_size
    e = torch.tensor([], dtype=dtype).element_size()
    for chunk in (0, 1, 3, 250):
        for r, out in enumerate(ncluster.run(_scatter_gather_case, chunk, dtype)):
            assert out["rs"] and out["ag"], (chunk, r)
            expected = ((n - 1) * chunk * e,) * 2  # (N-1)/N·B with B = N·chunk elements
            assert out["rs_model"] == out["rs_counted"] == out["rs_measured"] == expected
            assert out["ag_model"] == out["ag_counted"] == out["ag_measured"] == expected
            assert out["rs_handed"] == out["ag_handed"] == expected  # really handed to torch


def _gloo_algorithms_case():
    """comm's own reduce-scatter (one all-to-all, then a local reduction) and all-gather (one
    broadcast per rank) on gloo: every op, async handles, buffers that alias, a subgroup."""
    n, r = dzl.world_size(), dzl.rank()
    ops = {
        "sum": dist.ReduceOp.SUM,
        "max": dist.ReduceOp.MAX,
        "min": dist.ReduceOp.MIN,
        "product": dist.ReduceOp.PRODUCT,  # products of integers below 8^4: exact in fp32
    }
    out = {}
    for name, op in ops.items():
        x = _data(5 * n, torch.float32, salt=len(name))
        ours, ref = torch.empty(5), torch.empty(5)
        work = comm.reduce_scatter(ours, x, op=op, async_op=True)
        work.wait()
        dist.reduce_scatter_tensor(ref, x.clone(), op=op)
        out[name] = torch.equal(ours, ref)
    # the output aliases the input's own chunk (ZeRO-1 reduces into its bucket)
    x = _data(4 * n, torch.float32, salt=21)
    ref = torch.empty(4)
    dist.reduce_scatter_tensor(ref, x.clone())
    comm.reduce_scatter(x[4 * r : 4 * r + 4], x)
    out["rs_in_place"] = torch.equal(x[4 * r : 4 * r + 4], ref)
    # the input is this rank's chunk of the output, gathered asynchronously
    full = torch.zeros(3 * n)
    full[3 * r : 3 * r + 3] = _data(3, torch.float32, salt=22)
    work = comm.all_gather(full, full[3 * r : 3 * r + 3], async_op=True)
    work.wait()
    ref = torch.empty(3 * n)
    dist.all_gather_into_tensor(ref, _data(3, torch.float32, salt=22))
    out["ag_in_place"] = torch.equal(full, ref)
    # a subgroup of the first and last rank: roots and chunks by group rank
    members = sorted({0, n - 1})
    group = dist.new_group(members)
    if r in members:
        k = len(members)
        x = _data(2 * k, torch.float32, salt=23)
        ours, ref = torch.empty(2), torch.empty(2)
        comm.reduce_scatter(ours, x, group=group)
        dist.reduce_scatter_tensor(ref, x.clone(), group=group)
        gathered, ref_gathered = torch.empty(2 * k), torch.empty(2 * k)
        comm.all_gather(gathered, ours, group=group)
        dist.all_gather_into_tensor(ref_gathered, ref, group=group)
        out["subgroup"] = torch.equal(ours, ref) and torch.equal(gathered, ref_gathered)
    else:
        out["subgroup"] = True
    dist.destroy_process_group(group)
    return out


def test_gloo_reduce_scatter_and_all_gather_algorithms_match_torch(ncluster):
    for r, out in enumerate(ncluster.run(_gloo_algorithms_case)):
        assert all(out.values()), (r, out)
        assert set(out) == {
            "sum",
            "max",
            "min",
            "product",
            "rs_in_place",
            "ag_in_place",
            "subgroup",
        }


def _broadcast_send_barrier_case():
    n, r = dzl.world_size(), dzl.rank()
    dzl.reset_traffic()
    src = n - 1
    t = torch.full((10,), float(r))
    comm.broadcast(t, src)
    ok_bcast = torch.equal(t, torch.full((10,), float(src)))
    # a ring of sends: each rank sends 3 float64 to the right, receives from the left
    right, left = (r + 1) % n, (r - 1) % n
    out, inc = torch.full((3,), float(r), dtype=torch.float64), torch.empty(3, dtype=torch.float64)
    handle = comm.isend(out, right, tag="ring-hop")
    comm.recv(inc, left)
    handle.wait()
    ok_p2p = torch.equal(inc, torch.full((3,), float(left), dtype=torch.float64))
    comm.barrier()
    work = comm.all_reduce(torch.ones(4), async_op=True, tag="bucket-0")
    before = dzl.traffic().get("all_reduce", {}).get("calls", 0)
    work.wait()
    c = dzl.traffic()
    return {
        "ok": ok_bcast and ok_p2p,
        "bcast": (c["broadcast"]["sent"], c["broadcast"]["recv"]),
        "bcast_model": traffic_model("broadcast", 10, 4, n, r, src=src),
        "send": (c["send"]["sent"], c["send"]["recv"], c["send"]["calls"]),
        "recv": (c["recv"]["sent"], c["recv"]["recv"], c["recv"]["calls"]),
        "barrier": (c["barrier"]["calls"], c["barrier"]["sent"]),
        "async_counted_at_wait": (before, c["all_reduce"]["calls"]),
        "seconds": c["all_reduce"]["seconds"],
    }


def test_broadcast_point_to_point_barrier_and_async(ncluster):
    n = ncluster.world_size
    results = ncluster.run(_broadcast_send_barrier_case)
    src = n - 1
    for r, out in enumerate(results):
        assert out["ok"]
        # 10 float32 = 40 bytes along the chain src, src+1, ...: the source only sends, the
        # chain's last rank (src - 1) only receives, the others pass the tensor on
        want = (0 if r == (src - 1) % n else 40, 0 if r == src else 40)
        assert out["bcast"] == out["bcast_model"] == want, (r, out["bcast"])
        assert out["send"] == (24, 0, 1) and out["recv"] == (0, 24, 1)
        assert out["barrier"] == (1, 0)
        assert out["async_counted_at_wait"] == (0, 1) and out["seconds"] > 0
    # the chain: every rank but the source receives B, every rank but the last sends B
    assert sum(o["bcast"][0] for o in results) == (n - 1) * 40
    assert sum(o["bcast"][1] for o in results) == (n - 1) * 40


def _events_case():
    comm.all_reduce(torch.ones(8), tag="layer1.weight")
    return None


def test_collective_events_reach_the_parent(ncluster):
    job = ncluster.submit(_events_case)
    job.wait()
    events = [e for e in job.events if e.kind == "collective"]
    assert len(events) == ncluster.world_size
    for e in events:
        assert e["op"] == "all_reduce" and e["tag"] == "layer1.weight" and e["bytes"] == 32
        assert e["end"] >= e["start"] and isinstance(e["seq"], int)
        assert (e["sent"], e["recv"]) == traffic_model(
            "all_reduce", 8, 4, ncluster.world_size, e.rank
        )


def _bad_inputs_case():
    n = dzl.world_size()
    dzl.reset_traffic()
    errors = {}
    cases = {
        "noncontiguous": lambda: comm.all_reduce(torch.ones(4, 4).t()),
        "wrong_dtype_out": lambda: comm.all_gather(torch.empty(2 * n), torch.ones(2).double()),
        "wrong_size_out": lambda: comm.all_gather(torch.empty(2 * n + 1), torch.ones(2)),
        "noncontig_out": lambda: comm.all_gather(torch.empty(2, n).t(), torch.ones(2)),
        "rs_wrong_size": lambda: comm.reduce_scatter(torch.empty(3), torch.ones(3 * n + 1)),
        "ring_noncontig": lambda: comm.ring_all_reduce(torch.ones(4, 4).t()),
        "not_a_tensor": lambda: comm.broadcast([1, 2], 0),
        "bad_src": lambda: comm.broadcast(torch.ones(1), n),
        "send_to_self": lambda: comm.send(torch.ones(1), dzl.rank()),
        "ring_bad_op": lambda: comm.ring_all_reduce(torch.ones(2), op=dist.ReduceOp.BAND),
    }
    for name, call in cases.items():
        try:
            call()
            errors[name] = None
        except (TypeError, ValueError) as exc:
            errors[name] = f"{type(exc).__name__}: {exc}"
    return errors, dzl.traffic().get("all_reduce")


def test_bad_input_is_refused_before_anything_is_sent(ncluster):
    for errors, counted in ncluster.run(_bad_inputs_case):
        assert all(errors.values()), errors
        assert counted is None  # refused before the op ran: nothing counted
        assert "contiguous" in errors["noncontiguous"] and "contiguous" in errors["noncontig_out"]
        assert (
            errors["wrong_dtype_out"].startswith("TypeError")
            and "dtype" in errors["wrong_dtype_out"]
        )
        assert "world_size x input" in errors["wrong_size_out"]
        assert "world_size x output" in errors["rs_wrong_size"]
        assert "itself" in errors["send_to_self"]
    # and the cluster is fine afterwards: nothing was half-sent
    assert ncluster.run(lambda: comm.all_reduce(torch.ones(1)) or 1) == [1] * ncluster.world_size


def test_shapes_that_differ_across_ranks_fail_clearly_not_hang(ncluster):
    def mismatched():
        comm.all_reduce(torch.ones(4 + dzl.rank()))

    with pytest.raises(dzl.RankError) as info:
        ncluster.run(mismatched)
    text = str(info.value)
    assert "mismatch" in text or "size" in text, text
    assert ncluster.run(lambda: 1) == [1] * ncluster.world_size


def _float_ring_case(numel):
    g = torch.Generator().manual_seed(dzl.rank())
    x = torch.randn(numel, generator=g)
    ring, ref = x.clone(), x.clone()
    comm.ring_all_reduce(ring, op=dist.ReduceOp.AVG)
    dist.all_reduce(ref, op=dist.ReduceOp.AVG)
    mx, mref = x.clone(), x.clone()
    comm.ring_all_reduce(mx, op=dist.ReduceOp.MAX)
    dist.all_reduce(mref, op=dist.ReduceOp.MAX)
    return (ring - ref).abs().max().item() if numel else 0.0, torch.equal(mx, mref)


def test_ring_average_and_max_of_random_floats(ncluster):
    for err, max_equal in ncluster.run(_float_ring_case, 4097):
        assert err < 1e-6 and max_equal


def test_ring_all_reduce_at_world_sizes_1_and_5_to_8():
    for world_size in (1, 5, 8):
        with dzl.LiveCluster(world_size, timeout=10.0) as cluster:
            for numel in (0, 1, world_size - 1, 1001):
                for out in cluster.run(_all_reduce_case, numel, torch.float32):
                    assert out["ring"] and out["ours"]
                    assert out["counted"] == out["model"] == out["measured"]


def _fallback_case():
    """Make the backend refuse ops, as an older gloo does, and check the substitutes."""
    from ddpzero_lab.comm import collectives

    n = dzl.world_size()
    real_all_reduce = dist.all_reduce

    def refuse(*args, **kwargs):
        raise RuntimeError("ProcessGroupGloo does not support this op (not supported)")

    def no_bf16_all_reduce(tensor, *args, **kwargs):
        if tensor.dtype == torch.bfloat16:
            raise RuntimeError("Unsupported dtype BFloat16")
        return real_all_reduce(tensor, *args, **kwargs)

    saved = (collectives._reduce_scatter_native, collectives._all_gather_native)
    collectives._reduce_scatter_native = refuse
    collectives._all_gather_native = refuse
    dist.all_reduce = no_bf16_all_reduce
    collectives._unsupported.clear()
    try:
        x = _data(3 * n, torch.float32, salt=5)
        rs = torch.empty(3)
        comm.reduce_scatter(rs, x, tag="rs")
        ag = torch.empty(3 * n)
        comm.all_gather(ag, _data(3, torch.float32, salt=6), tag="ag")
        b = _data(5, torch.bfloat16, salt=7)
        comm.all_reduce(b, tag="bf16")
        comm.all_reduce(b.clone(), tag="again")  # second call: straight to the fallback
    finally:
        collectives._reduce_scatter_native, collectives._all_gather_native = saved
        dist.all_reduce = real_all_reduce
        collectives._unsupported.clear()
    ref_rs = torch.empty(3)
    dist.reduce_scatter_tensor(ref_rs, x.clone())
    ref_ag = torch.empty(3 * n)
    dist.all_gather_into_tensor(ref_ag, _data(3, torch.float32, salt=6))
    ref_b = _data(5, torch.bfloat16, salt=7)
    dist.all_reduce(ref_b)
    return torch.equal(rs, ref_rs), torch.equal(ag, ref_ag), torch.equal(b, ref_b)


def test_fallbacks_give_torchs_result_and_are_marked(ncluster):
    job = ncluster.submit(_fallback_case)
    for ok in job.wait():
        assert ok == (True, True, True)
    marks = {(e["tag"], e.get("fallback")) for e in job.events if e.kind == "collective"}
    assert marks == {
        ("rs", "all_reduce"),
        ("ag", "all_gather_list"),
        ("bf16", "float32"),
        ("again", "float32"),
    }


def _labels_of_each_op():
    dzl.reset_traffic()
    comm.all_reduce(torch.ones(8))
    if dzl.rank() == 0:
        comm.send(torch.ones(4), 1)
    elif dzl.rank() == 1:
        comm.recv(torch.empty(4), 0)
    comm.ring_all_reduce(torch.ones(8))
    return (
        {op: c["source"] for op, c in dzl.traffic().items()},
        {op: c["source"] for op, c in dzl.comm.traffic_by_group()["world"].items()},
    )


def test_traffic_says_which_figures_are_model_and_which_payload(ncluster):
    """dzl.traffic() labels its byte figures: the ring model for built-in collectives, the
    payload handed to send/recv for point-to-point ops and the rings built from them."""
    for labels, by_group in ncluster.run(_labels_of_each_op)[:2]:
        assert labels["all_reduce"] == "model"
        assert labels["ring_all_reduce"] == "payload"
        assert labels.get("send", labels.get("recv")) == "payload"
        assert by_group == labels
