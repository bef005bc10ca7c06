"""Gradient surgery: flat-vector reference, orthogonality, pcgrad, None handling, 2-process gloo."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from maskloop.train import dist as mdist
from maskloop.train.surgery import accumulate_, collect_grads, gradient_surgery

SHAPES = [(4, 3), (5,), (2, 2, 3), (7,), (3, 3)]


def _grads(seed, shapes=SHAPES, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g, dtype=dtype) for s in shapes]


def _flat(gs, shapes=SHAPES):
    return torch.cat(
        [(torch.zeros(s, dtype=torch.float64) if g is None else g).reshape(-1) for g, s in zip(gs, shapes)]
    )


def _unflat(v, shapes=SHAPES):
    out, o = [], 0
    for s in shapes:
        n = torch.Size(s).numel()
        out.append(v[o : o + n].reshape(s))
        o += n
    return out


def _reference(g1, g2, beta=0.5, mode="always"):
    """Straightforward flat-vector formula (missing gradients are zeros)."""
    v1, v2 = _flat(g1), _flat(g2)
    dot = v1 @ v2
    c = dot / (v1 @ v1) if (v1 @ v1) > 0 else torch.tensor(0.0, dtype=torch.float64)
    if mode == "pcgrad" and dot >= 0:
        return v1 + beta * v2, c, dot
    return v1 + beta * (v2 - c * v1), c, dot


def _assert_list_close(a, b, tol=1e-12):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert (x is None) == (y is None)
        if x is not None:
            torch.testing.assert_close(x, y, atol=tol, rtol=0)


def test_matches_flat_reference_and_is_orthogonal():
    g1, g2 = _grads(0), _grads(1)
    for beta in (0.5, 1.3):
        out, st = gradient_surgery(g1, g2, beta=beta)
        ref, c, dot = _reference(g1, g2, beta)
        _assert_list_close(out, _unflat(ref))
        v1 = _flat(g1)
        beta_part = (_flat(out) - v1) / beta  # = g2 - c g1
        assert abs(float(beta_part @ v1)) < 1e-10
        v2 = _flat(g2)
        assert st["c"] == pytest.approx(float(c), abs=1e-12)
        assert st["dot"] == pytest.approx(float(dot), abs=1e-12)
        assert st["g1_norm"] == pytest.approx(float(v1.norm()), abs=1e-12)
        assert st["g2_norm"] == pytest.approx(float(v2.norm()), abs=1e-12)
        assert st["g_norm"] == pytest.approx(float(ref.norm()), abs=1e-12)
        assert st["cos"] == pytest.approx(float(dot / (v1.norm() * v2.norm())), abs=1e-12)
        assert st["projected"] == 1.0
    # inputs are not modified
    assert all(torch.equal(a, b) for a, b in zip(g1, _grads(0)))


def test_pcgrad_projects_only_on_conflict():
    g1 = _grads(0)
    agree = [a * 0.3 + b * 0.1 for a, b in zip(g1, _grads(1))]
    conflict = [-a * 0.3 + b * 0.1 for a, b in zip(g1, _grads(1))]
    assert float(_flat(g1) @ _flat(agree)) > 0 > float(_flat(g1) @ _flat(conflict))

    out, st = gradient_surgery(g1, agree, mode="pcgrad")
    _assert_list_close(out, [a + 0.5 * b for a, b in zip(g1, agree)])
    assert st["projected"] == 0.0 and st["c"] > 0
    out, st = gradient_surgery(g1, conflict, mode="pcgrad")
    _assert_list_close(out, _unflat(_reference(g1, conflict, mode="pcgrad")[0]))
    assert st["projected"] == 1.0
    assert abs(float((_flat(out) - _flat(g1)) @ _flat(g1))) < 1e-10
    # "always" projects the agreeing pair too
    out, _ = gradient_surgery(g1, agree)
    _assert_list_close(out, _unflat(_reference(g1, agree)[0]))
    with pytest.raises(ValueError, match="mode"):
        gradient_surgery(g1, agree, mode="sometimes")


def test_none_handling():
    g1, g2 = _grads(0), _grads(1)
    g1[2] = None  # only g2
    g2[1] = None  # only g1
    g1[4] = g2[4] = None  # neither
    out, st = gradient_surgery(g1, g2)
    assert out[4] is None
    torch.testing.assert_close(out[2], 0.5 * g2[2], atol=0, rtol=0)
    torch.testing.assert_close(out[1], g1[1], atol=0, rtol=0)  # only_g1="keep"
    _, c, dot = _reference(g1, g2)
    assert st["c"] == pytest.approx(float(c), abs=1e-12) and st["dot"] == pytest.approx(float(dot), abs=1e-12)
    for i in (0, 3):
        torch.testing.assert_close(out[i], g1[i] + 0.5 * (g2[i] - c * g1[i]), atol=1e-12, rtol=0)

    # only_g1="project" is exactly the flat formula with zeros for the missing entries
    out, _ = gradient_surgery(g1, g2, only_g1="project")
    ref = _unflat(_reference(g1, g2)[0])
    ref[4] = None
    _assert_list_close(out, ref)
    assert abs(float((_flat(out) - _flat(g1)) @ _flat(g1))) < 1e-10


def test_zero_g1_means_no_projection():
    g2 = _grads(1)
    for g1 in ([torch.zeros_like(g) for g in g2], [None] * len(g2)):
        out, st = gradient_surgery(g1, g2)
        _assert_list_close(out, [0.5 * g for g in g2])
        assert st["c"] == 0.0 and st["cos"] == 0.0 and st["g1_norm"] == 0.0


def test_group_stats_and_float32():
    g1, g2 = _grads(0), _grads(1)
    groups = {"lora": [0, 1], "projector": [2], "sam2_decoder": [3, 4], "empty": []}
    out, st = gradient_surgery(g1, g2, groups=groups)
    for name, idx in groups.items():
        a = torch.cat([g1[i].reshape(-1) for i in idx]) if idx else torch.zeros(0, dtype=torch.float64)
        b = torch.cat([g2[i].reshape(-1) for i in idx]) if idx else torch.zeros(0, dtype=torch.float64)
        o = torch.cat([out[i].reshape(-1) for i in idx]) if idx else torch.zeros(0, dtype=torch.float64)
        assert st[f"{name}/g1_norm"] == pytest.approx(float(a.norm()), abs=1e-12)
        assert st[f"{name}/g2_norm"] == pytest.approx(float(b.norm()), abs=1e-12)
        assert st[f"{name}/g_norm"] == pytest.approx(float(o.norm()), abs=1e-12)
        cos = float(a @ b / (a.norm() * b.norm())) if idx else 0.0
        assert st[f"{name}/cos"] == pytest.approx(cos, abs=1e-12)
    out32, st32 = gradient_surgery([g.float() for g in g1], [g.bfloat16() for g in g2])
    assert [o.dtype for o in out32] == [torch.float32] * len(g1)
    assert st32["cos"] == pytest.approx(st["cos"], abs=1e-2)
    # bf16 gradients: the combination is done in float32 and rounded once
    b1, b2 = [g.bfloat16() for g in g1], [g.bfloat16() for g in g2]
    outb, _ = gradient_surgery(b1, b2)
    refb = _unflat(_reference([g.double() for g in b1], [g.double() for g in b2])[0])
    for o, r in zip(outb, refb):
        assert o.dtype == torch.bfloat16
        torch.testing.assert_close(o.double(), r, rtol=2**-8, atol=1e-6)
    with pytest.raises(ValueError, match="outside"):
        gradient_surgery(g1, g2, groups={"x": [99]})
    with pytest.raises(ValueError, match="align"):
        gradient_surgery(g1, g2[:2])
    with pytest.raises(RuntimeError, match="process group"):
        gradient_surgery(g1, g2, reduce=True)


def test_collect_and_accumulate():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    params = list(model.parameters())
    x1, x2 = torch.randn(5, 3), torch.randn(5, 3)
    model(x1).pow(2).sum().backward()
    ga = collect_grads(params)
    assert all(p.grad is None for p in params) and all(g is not None for g in ga)
    model[1](torch.randn(5, 4)).sum().backward()  # only the second layer
    gb = collect_grads(params)
    assert gb[0] is None and gb[1] is None and gb[2] is not None
    model(x2).pow(2).sum().backward()
    gc = collect_grads(params)
    accumulate_(params, ga, 0.5)
    accumulate_(params, gc, 0.5)
    for p, a, c in zip(params, ga, gc):
        torch.testing.assert_close(p.grad, 0.5 * (a + c))
    accumulate_(params, gb, 1.0)  # None entries are skipped
    torch.testing.assert_close(params[0].grad, 0.5 * (ga[0] + gc[0]))
    torch.testing.assert_close(params[2].grad, 0.5 * (ga[2] + gc[2]) + gb[2])
    ga[0].zero_()  # accumulated grads do not alias the inputs
    assert params[0].grad.abs().sum() > 0


def test_dist_helpers_single_process(monkeypatch):
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    info = mdist.init_distributed()
    assert (info.rank, info.world_size, info.backend) == (0, 1, None)
    assert mdist.world_size() == 1 and mdist.is_main() and not mdist.is_initialized()
    t = torch.tensor([3.0])
    assert mdist.all_reduce_mean(t) is t and t.item() == 3.0
    mdist.barrier()
    mdist.cleanup()
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    with pytest.raises(RuntimeError, match="MASTER_ADDR"):
        mdist.init_distributed()
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(ValueError, match="WORLD_SIZE"):
        mdist.init_distributed()


# ---------------------------------------------------------------- two gloo processes


def _rank_grads(rank):
    g1, g2 = _grads(10 + rank), _grads(20 + rank)
    if rank == 0:
        g2[1] = None  # present on rank 1 only -> zeros here, averaged
        g1[3] = None  # both None on rank 0, both present on rank 1: shape comes from `params`
        g2[3] = None
    g1[4] = None  # None everywhere for loss 1 -> stays "only g2"
    return g1, g2


def _shard(rank):
    full1, full2 = _grads(30), _grads(31)
    full1[2] = None
    idx = [0, 1] if rank == 0 else [2, 3, 4]
    return [full1[i] for i in idx], [full2[i] for i in idx], idx


GROUPS = {"lora": [0, 1], "decoder": [2, 3, 4]}
SHARD_GROUPS = {0: {"lora": [0, 1], "decoder": []}, 1: {"lora": [], "decoder": [0, 1, 2]}}


def _worker(rank, tmp):
    dist.init_process_group("gloo", init_method=f"file://{tmp}/rendezvous", rank=rank, world_size=2)
    try:
        g1, g2 = _rank_grads(rank)
        params = [torch.zeros(s, dtype=torch.float64) for s in SHAPES]
        red, red_st = gradient_surgery(g1, g2, reduce=True, groups=GROUPS, params=params)
        s1, s2, _ = _shard(rank)
        sh, sh_st = gradient_surgery(s1, s2, sharded=True, groups=SHARD_GROUPS[rank])
        # the small dist helpers agree with the process group
        t = torch.tensor([float(rank), 1.0 + rank])
        mdist.all_reduce_mean(t)
        mdist.barrier()
        helpers = [
            mdist.world_size(),
            mdist.rank(),
            mdist.is_main(),
            t.tolist(),
            mdist.init_distributed().world_size,
        ]
        torch.save(
            {
                "reduced": red,
                "reduced_stats": red_st,
                "sharded": sh,
                "sharded_stats": sh_st,
                "helpers": helpers,
            },
            os.path.join(tmp, f"rank{rank}.pt"),
        )
    finally:
        dist.destroy_process_group()


def test_two_process_gloo_reduce_and_sharded(tmp_path):
    mp.spawn(_worker, args=(str(tmp_path),), nprocs=2, join=True)
    res = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    assert res[0]["helpers"] == [2, 0, True, [0.5, 1.5], 2]
    assert res[1]["helpers"] == [2, 1, False, [0.5, 1.5], 2]

    # reduce=True: equals the single-process computation on the averaged gradients
    per_rank = [_rank_grads(r) for r in range(2)]
    avg = []
    for which in (0, 1):
        lst = []
        for i, s in enumerate(SHAPES):
            got = [per_rank[r][which][i] for r in range(2)]
            lst.append(
                None
                if all(g is None for g in got)
                else sum(torch.zeros(s, dtype=torch.float64) if g is None else g for g in got) / 2
            )
        avg.append(lst)
    exp, exp_st = gradient_surgery(avg[0], avg[1], groups=GROUPS)
    assert avg[0][4] is None and exp[4] is not None
    for r in range(2):
        _assert_list_close(res[r]["reduced"], exp)
        for k, v in exp_st.items():
            assert res[r]["reduced_stats"][k] == pytest.approx(v, abs=1e-12), k

    # sharded=True: shards of one vector reproduce the full-vector result
    full1, full2 = _grads(30), _grads(31)
    full1[2] = None
    exp, exp_st = gradient_surgery(full1, full2, groups=GROUPS)
    got = res[0]["sharded"] + res[1]["sharded"]
    _assert_list_close(got, exp)
    for r in range(2):
        for k, v in exp_st.items():
            assert res[r]["sharded_stats"][k] == pytest.approx(v, abs=1e-12), k
