"""Engine and recipes on the tiny preset: Loop-1 gradient path, resume, DDP vs 1 process, logging."""

import json

import pytest
import torch
import torch.multiprocessing as mp
from conftest import free_port as _free_port
from conftest import join_group as _join_group

from maskloop.config import ConfigError
from maskloop.recipes import loop1 as loop1_mod
from maskloop.train.engine import TrainConfig, Trainer


def shapes_data(n=16):
    return {
        "refer": [{"kind": "shapes_refer", "n": n}],
        "caption": [{"kind": "shapes_caption", "n": n}],
        "pairs": [{"kind": "shapes_pairs", "n": n}],
        "dam": [{"kind": "shapes_caption", "n": n}],
    }


def make_cfg(recipe, run_dir, **kw):
    base = {"recipe": recipe, "run_dir": str(run_dir), "steps": 4, "batch_size": 2, "accumulation": 1,
            "ckpt_every": 0, "log_every": 1, "caption_len": 6, "topk": 8, "progress": False, "lr": 1e-3,
            "data": shapes_data(), "warmup_ratio": 0.0}
    base.update(kw)
    return TrainConfig.from_mapping(base)


def _lora_grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if "lora_" in n and p.grad is not None}


def test_loop1_mask_loss_reaches_the_captioner_through_gumbel(tmp_path, monkeypatch):
    torch.manual_seed(0)
    tr = Trainer(make_cfg("loop1", tmp_path, refer_ratio=0.0, data={"pairs": shapes_data()["pairs"]}))
    model = tr.model
    batch = {k: v for k, v in tr._batches().items()}
    assert "pairs" in batch

    def grads_of(recipe_seed):
        model.zero_grad(set_to_none=True)
        tr.recipe.gen.manual_seed(recipe_seed)
        tr.recipe.rng.seed(recipe_seed)
        loss, _ = tr.recipe.loss(batch["pairs"])
        loss.backward()
        return _lora_grads(model)

    # the logits of forward #1 receive gradient from the mask loss
    captured = {}
    real = loop1_mod.gumbel_topk_embed

    def spy(logits, *a, **k):
        logits.retain_grad()
        captured["logits"] = logits
        return real(logits, *a, **k)

    monkeypatch.setattr(loop1_mod, "gumbel_topk_embed", spy)
    with_path = grads_of(1)
    assert captured["logits"].grad is not None and captured["logits"].grad.abs().sum() > 0

    # cutting the Gumbel path (embeddings detached) changes the LoRA gradients
    def cut(*a, **k):
        e, ids = real(*a, **k)
        return e.detach(), ids

    monkeypatch.setattr(loop1_mod, "gumbel_topk_embed", cut)
    without = grads_of(1)
    assert set(with_path) == set(without)
    diff = sum(float((with_path[n] - without[n]).abs().sum()) for n in with_path)
    assert diff > 1e-6
    # frozen parts never receive gradient
    for g in ("vision", "llm_base", "sam2_encoder"):
        assert all(p.grad is None for _, p in model.parameter_groups()[g])


def _loop1_pair(tmp_path):
    """A Loop-1 trainer on pairs only and one batch whose image 2 differs from image 1."""
    torch.manual_seed(0)
    tr = Trainer(make_cfg("loop1", tmp_path, refer_ratio=0.0, data={"pairs": shapes_data()["pairs"]}))
    b = dict(tr._batches()["pairs"])
    for k in ("pixel_values2", "g_pixel_values2", "masks2", "prompt_masks2"):
        b[k] = b[k].flip(-1)
    return tr, tr.model, b


def _seeded_loss_and_grads(tr, b):
    """Loop 1's loss and every gradient from the same seeds."""
    tr.model.zero_grad(set_to_none=True)
    tr.recipe.gen.manual_seed(3)
    tr.recipe.rng.seed(3)
    torch.manual_seed(3)
    loss, _ = tr.recipe.loss(b)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in tr.model.named_parameters() if p.grad is not None}


def test_loop1_encoders_ahead_give_the_inline_loss_and_gradients(tmp_path):
    """Image 2's frozen encoders run first (on CUDA on a side stream): the loss and every gradient equal
    the inline path that encodes image 2 inside forward #2 (image 2 made different from image 1)."""
    tr, model, b = _loop1_pair(tmp_path)
    assert any(p.requires_grad for p in model.parameters()) and not any(p.requires_grad for p in model.vision.parameters())
    ahead_loss, ahead = _seeded_loss_and_grads(tr, b)
    real = model.segment

    def inline(pv, sam_feats, expr, question, gt_masks=None, image_feats=None, **kw):
        return real(pv, model.sam_features(b["g_pixel_values2"]), expr, question, gt_masks=gt_masks, **kw)

    model.segment = inline
    try:
        ref_loss, ref = _seeded_loss_and_grads(tr, b)
    finally:
        del model.segment
    torch.testing.assert_close(ahead_loss, ref_loss, rtol=0, atol=0)
    assert ahead.keys() == ref.keys() and any("sam.sam.mask_decoder" in n for n in ref)
    for n in ref:
        torch.testing.assert_close(ahead[n], ref[n], rtol=1e-6, atol=1e-7, msg=n)


def test_loop1_same_images_read_by_the_frozen_vit_once_give_the_same_loss_and_gradients(tmp_path):
    """A pair batch whose every image 2 is its image 1 (``same_image``): the frozen ViT runs once and forward #2
    takes forward #1's image tokens; loss and gradients equal the two-pass step on the same batch."""
    tr, model, b = _loop1_pair(tmp_path)
    b["pixel_values2"] = b["pixel_values1"]
    b.pop("num_tiles2", None)
    if "num_tiles1" in b:
        b["num_tiles2"] = b["num_tiles1"]
    calls = []
    real = model.vision_features
    model.vision_features = lambda pv: calls.append(pv.shape[0]) or real(pv)
    try:
        b["same_image"] = False
        ref_loss, ref = _seeded_loss_and_grads(tr, b)
        twice = len(calls)
        calls.clear()
        b["same_image"] = True
        once_loss, once = _seeded_loss_and_grads(tr, b)
    finally:
        del model.vision_features
    assert (twice, len(calls)) == (2, 1)
    torch.testing.assert_close(once_loss, ref_loss, rtol=0, atol=0)
    assert once.keys() == ref.keys() and any("projector" in n for n in ref)
    for n in ref:
        torch.testing.assert_close(once[n], ref[n], rtol=1e-6, atol=1e-7, msg=n)


def test_loop1_encoders_started_with_the_decoding_give_the_same_loss_and_gradients(tmp_path):
    """``loop1.overlap_start: decode``: image 2's encoders are launched from inside the teacher's generation,
    once its decoding is queued, in the step's own train and grad mode (not the teacher's eval / no-grad);
    the loss and every gradient equal those of the launch at the step's start."""
    tr, model, b = _loop1_pair(tmp_path)
    calls, inside = [], []
    real_backbone, real_generate = model.sam_backbone, model.generate

    def backbone(*a, **k):
        calls.append((bool(inside), model.training, torch.is_grad_enabled()))
        return real_backbone(*a, **k)

    def generate(*a, **k):
        inside.append(1)
        try:
            return real_generate(*a, **k)
        finally:
            inside.pop()

    model.sam_backbone, model.generate = backbone, generate

    def run(start):
        tr.recipe.cfg.loop1.overlap_start = start
        return _seeded_loss_and_grads(tr, b)

    try:
        step_loss, step = run("step")
        assert calls == [(False, True, True)]
        calls.clear()
        late_loss, late = run("decode")
        assert calls == [(True, True, True)]  # inside generate(), yet in train mode with grad on
        assert model.training
    finally:
        del model.sam_backbone, model.generate
    torch.testing.assert_close(late_loss, step_loss, rtol=0, atol=0)
    assert late.keys() == step.keys()
    for n in step:
        torch.testing.assert_close(late[n], step[n], rtol=0, atol=0, msg=n)


def test_loop1_skips_a_batch_whose_teacher_caption_is_empty(tmp_path):
    """An empty teacher caption (read once the forward passes are queued) raises TeacherOutputError with
    its count, and the same batch with every caption non-empty gives a loss."""
    from maskloop.model.grounded import Generated

    torch.manual_seed(0)
    tr = Trainer(make_cfg("loop1", tmp_path, refer_ratio=0.0, data={"pairs": shapes_data()["pairs"]}))
    model, b = tr.model, dict(tr._batches()["pairs"])
    real = model.describe

    def describe(*a, **kw):
        g = real(*a, **kw)
        lengths = g.lengths.clamp(min=1)
        lengths[1] = 0
        return Generated(g.ids, lengths, g.finished)

    model.describe = describe
    try:
        with pytest.raises(loop1_mod.TeacherOutputError, match="produced 1 empty caption"):
            tr.recipe.loss(b)
    finally:
        del model.describe
    loss, _ = tr.recipe.loss(b)
    assert torch.isfinite(loss)


def _state(tr):
    return ({k: v.detach().clone() for k, v in tr.params.items()},
            {k: v.clone() for k, v in tr.ema.state_dict()["shadow"].items()})


def test_resume_gives_identical_weights_and_ema(tmp_path):
    kw = dict(steps=6, ema_decay=0.9)
    torch.manual_seed(0)
    straight = Trainer(make_cfg("dual", tmp_path / "a", **kw))
    straight.fit()
    torch.manual_seed(0)
    first = Trainer(make_cfg("dual", tmp_path / "b", ckpt_every=3, **kw))
    first.fit(3)
    torch.manual_seed(99)  # a fresh process: different initial RNG, same config
    second = Trainer(make_cfg("dual", tmp_path / "b", ckpt_every=3, **kw))
    second.resume(tmp_path / "b" / "checkpoints")
    assert second.step == 3
    second.fit()
    (pa, ea), (pb, eb) = _state(straight), _state(second)
    for k in pa:
        torch.testing.assert_close(pa[k], pb[k], rtol=0, atol=0, msg=k)
    for k in ea:
        torch.testing.assert_close(ea[k], eb[k], rtol=0, atol=0, msg=k)




def _ddp_worker(rank, world, port, run_dir, out, variant):
    _join_group(rank, world, port)
    torch.manual_seed(0)
    tr = Trainer(ddp_cfg(run_dir, batch_size=2, variant=variant))
    tr.fit()
    if rank == 0:
        torch.save({"params": {k: v.detach() for k, v in tr.params.items()},
                    "loss": [h["loss"] for h in tr.history]}, out)
    torch.distributed.destroy_process_group()


def ddp_cfg(run_dir, batch_size, variant):
    # fixed-length LM target ("Sure, [SEG].") and per-mask mean losses: the global mean is the mean of rank means
    return make_cfg("loop1", run_dir, steps=2, batch_size=batch_size, variant=variant, refer_ratio=0.0,
                    data={"pairs": [{"kind": "shapes_pairs", "n": 8}]}, lr=1e-2, log_every=1)


@pytest.mark.parametrize("variant", ["generate", "gumbel"])
def test_ddp_two_processes_match_one_process_same_global_batch(tmp_path, variant):
    """Same global batch: 2 processes x 2 == 1 process x 4, weights and logged (global-mean) loss curve.

    With the Gumbel variant this holds only because token noise and Gumbel noise are drawn for the
    global batch from a stream shared by the ranks and sliced per rank."""
    torch.manual_seed(0)
    single = Trainer(ddp_cfg(tmp_path / "single", batch_size=4, variant=variant))
    single.fit()
    out = tmp_path / "ddp.pt"
    mp.spawn(_ddp_worker, args=(2, _free_port(), str(tmp_path / "ddp"), str(out), variant), nprocs=2, join=True)
    ddp = torch.load(out)
    for k, p in single.params.items():
        torch.testing.assert_close(ddp["params"][k], p.detach(), rtol=1e-4, atol=1e-5, msg=k)
    torch.testing.assert_close(torch.tensor(ddp["loss"]), torch.tensor([h["loss"] for h in single.history]),
                               rtol=1e-5, atol=1e-6)
    init = Trainer(ddp_cfg(tmp_path / "init", batch_size=4, variant=variant))  # same seed: the initial weights
    moved = sum(float((init.params[k] - single.params[k]).abs().sum()) for k in init.params)
    assert moved > 0  # the comparison is between trained weights, not two copies of the initialisation


EXPECTED = {
    "loop1": ["loss", "loop1/loss_mask", "loop1/loss_bce", "loop1/loss_dice", "loop1/loss_seg_lm", "refer/loss_mask"],
    "loop2": ["loss", "loop2/loss_caption", "loop2/loss_seg_lm", "loop2/empty_pred_masks"],
    "dual": ["loss1", "loss2", "surgery/cos", "surgery/g1_norm", "surgery/g2_norm", "surgery/c",
             "surgery/lora/g1_norm", "surgery/projector/g2_norm", "surgery/sam2_decoder/g1_norm",
             "surgery/text_hidden_fcs/g1_norm"],
}
COMMON = ["lr", "grad_norm", "samples_per_s", "skipped_steps", "data_skipped/dam"]


@pytest.mark.parametrize("recipe", ["loop1", "loop2", "dual"])
def test_short_runs_log_every_scalar(tmp_path, recipe):
    torch.manual_seed(0)
    tr = Trainer(make_cfg(recipe, tmp_path, steps=3, accumulation=2, ckpt_every=3, refer_ratio=0.5))
    tr.fit()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 3
    keys = set().union(*rows)
    want = EXPECTED[recipe] + [k for k in COMMON if not k.startswith("data_skipped") or recipe != "loop1"]
    missing = [k for k in want if k not in keys]
    assert not missing, missing
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))
    assert (tmp_path / "checkpoints" / "latest").exists()
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)


def test_nonfinite_steps_are_skipped_then_stop(tmp_path, monkeypatch):
    torch.manual_seed(0)
    tr = Trainer(make_cfg("loop2", tmp_path, steps=5, max_nonfinite=2))
    before = {k: v.detach().clone() for k, v in tr.params.items()}
    real = tr.recipe.step

    def nan_step(batches):
        out = real(batches)
        out.objectives = [o * float("nan") for o in out.objectives]
        out.logs["loss"] = float("nan")
        return out

    tr.recipe.step = nan_step
    tr.train_step()
    assert tr.counters["skipped_steps"] == 1
    assert all(torch.equal(before[k], v) for k, v in tr.params.items())
    tr.train_step()
    with pytest.raises(RuntimeError, match="non-finite"):
        tr.train_step()


def _failing_rank_worker(rank, world, port, run_dir, out):
    from maskloop.recipes.loop1 import TeacherOutputError

    _join_group(rank, world, port)
    tr = Trainer(ddp_cfg(run_dir, batch_size=2, variant="generate"))
    real = tr.recipe.step
    calls = []

    def step(batches):  # rank 1's teacher "produces an empty caption" on its first micro-step only
        calls.append(1)
        if rank == 1 and len(calls) == 1:
            raise TeacherOutputError("empty caption (test)")
        return real(batches)

    tr.recipe.step = step
    tr.fit()
    torch.save({"params": {k: v.detach() for k, v in tr.params.items()}, "history": tr.history}, f"{out}.{rank}")
    torch.distributed.destroy_process_group()


def test_ddp_a_failing_rank_skips_the_step_on_every_rank(tmp_path):
    """One rank's recipe failure must not leave the other rank alone in a collective (a hang) or let it
    step the optimizer alone (diverged weights): the skip is decided across ranks."""
    ctx = mp.get_context("spawn")
    port = _free_port()
    procs = [ctx.Process(target=_failing_rank_worker, args=(r, 2, port, str(tmp_path / "run"), str(tmp_path / "out")))
             for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=240)
    hung = [p for p in procs if p.is_alive()]
    for p in hung:
        p.terminate()
    assert not hung, "a rank hung in a collective"
    assert all(p.exitcode == 0 for p in procs)
    r0, r1 = torch.load(f"{tmp_path / 'out'}.0"), torch.load(f"{tmp_path / 'out'}.1")
    for k in r0["params"]:
        assert torch.equal(r0["params"][k], r1["params"][k]), k
    for h in (r0["history"], r1["history"]):
        assert [x["skipped_steps"] for x in h] == [1, 1]  # step 1 skipped everywhere, step 2 trained
        assert h[0]["skipped_micro/teacher_empty"] == 1  # counted once (on rank 1), summed over ranks


def test_sft_trains_the_streams_its_data_names(tmp_path):
    from maskloop.config import ConfigError

    data = shapes_data(8)
    torch.manual_seed(0)
    both = Trainer(make_cfg("sft", tmp_path / "both", steps=1, data={k: data[k] for k in ("refer", "caption")}))
    assert set(both.streams) == {"refer", "caption"}
    assert {"loss_mask", "loss_caption"} <= set(both.train_step())
    refer = Trainer(make_cfg("sft", tmp_path / "refer", steps=1, data={"refer": data["refer"]}))
    assert set(refer.streams) == {"refer"}
    logs = refer.train_step()
    assert "loss_mask" in logs and "loss_caption" not in logs
    assert float(logs["loss"]) == pytest.approx(float(logs["loss_mask"]) + float(logs["loss_lm"]), rel=1e-5)
    with pytest.raises(ConfigError, match="at least one"):
        Trainer(make_cfg("sft", tmp_path / "none", steps=1, data={"pairs": data["pairs"]}))


def test_pad_length_to_reaches_the_model_and_defaults_with_cuda_graphs(tmp_path):
    tr = Trainer(make_cfg("sft", tmp_path / "a", pad_length_to=8, steps=1))
    assert tr.model.length_multiple == 8
    assert Trainer(make_cfg("sft", tmp_path / "b", steps=1)).model.length_multiple == 1
    graphs = Trainer(make_cfg("sft", tmp_path / "c", steps=1, compile_layers=True, cuda_graphs=True))
    assert graphs.model.length_multiple == 32
    assert not graphs._graphs  # on the CPU the compiled layers run without graphs
    graphs.model.uncompile()
    with pytest.raises(ConfigError, match="pad_length_to"):
        make_cfg("sft", tmp_path / "d", pad_length_to=0)


def test_cuda_graphs_grads_leave_the_graph_pool_and_train_the_same(tmp_path):
    """With cuda_graphs the grads a backward created are copied out (the graphs' pool is overwritten by the
    next micro-step's replays); the steps stay the same.  (On the CPU the layers run without graphs; the
    copying is switched on by hand.)"""
    def run(graphs, d):
        torch.manual_seed(0)
        tr = Trainer(make_cfg("sft", tmp_path / d, steps=1, accumulation=2))
        tr._graphs = graphs
        made = {}
        for name, p in tr.params.items():
            def hook(p, name=name):
                made.setdefault(name, p.grad)

            p.register_post_accumulate_grad_hook(hook)
        real = tr._optimizer_step
        kept = {}

        def step(**kw):
            kept.update({n: p.grad for n, p in tr.params.items() if p.grad is not None})
            return real(**kw)

        tr._optimizer_step = step
        tr.train_step()
        return tr, made, kept

    plain, made0, kept0 = run(False, "a")
    graphed, made1, kept1 = run(True, "b")
    assert made1 and kept1.keys() == kept0.keys()
    # the first micro-step's grads are the backward's own tensors without graphs, copies with them
    assert all(kept0[n] is made0[n] for n in made0)
    assert not any(kept1[n].data_ptr() == made1[n].data_ptr() for n in made1)
    for n in kept0:
        torch.testing.assert_close(kept1[n], kept0[n], rtol=1e-5, atol=1e-7, msg=n)
    for (n, a), b in zip(plain.params.items(), graphed.params.values()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7, msg=n)


def test_collect_grads_clone_copies():
    from maskloop.train.surgery import collect_grads

    p = torch.nn.Parameter(torch.ones(3))
    p.grad = torch.full((3,), 2.0)
    g = p.grad
    (c,) = collect_grads([p], clone=True)
    assert p.grad is None and torch.equal(c, g) and c.data_ptr() != g.data_ptr()
