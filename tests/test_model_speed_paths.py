"""Speed-path switches keep the arithmetic: LoRA input casts under autocast, regional compilation,
the compiled-decode switch (tiny preset, CPU)."""

import pytest
import torch
from conftest import make_tiny, tiny_batch
from torch.utils._python_dispatch import TorchDispatchMode

from maskloop.model.fast_decode import compile_decode_enabled


class CountCopies(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in (torch.ops.aten._to_copy.default, torch.ops.aten.copy_.default):
            self.n += 1
        return func(*args, **(kwargs or {}))


def _caption_step(model, autocast: bool):
    model.zero_grad(set_to_none=True)
    pv, _, _ = tiny_batch(model, B=2)
    pm = torch.zeros(2, 8, 8)
    pm[0, :2, :3] = 1
    pm[1, 4:, 5:] = 1
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast), CountCopies() as counter:
        out = model.caption_logits(pv, pm, model.builder.caption_answer(["a red circle", "small blue square"]))
        out["loss_lm"].backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out["loss_lm"].detach(), grads, counter.n


def _model_with_nonzero_lora():
    model = make_tiny()
    model.set_trainable("default")
    torch.manual_seed(1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:  # B starts at zero; make the adapters contribute
                p.normal_(0, 0.05)
    model.train()
    return model


def test_lora_input_cast_is_skipped_under_autocast_with_identical_values():
    model = _model_with_nonzero_lora()
    model.to_training_dtype(torch.bfloat16)  # frozen bf16, trained fp32: turns the LoRA input cast off
    n_lora = model.set_lora_input_cast(False)
    assert n_lora == model.cfg.llm.num_layers * len(model.cfg.lora.target_modules)
    loss_off, grads_off, copies_off = _caption_step(model, autocast=True)
    model.set_lora_input_cast(True)  # peft's default: bf16 input -> fp32 -> (autocast) bf16 again
    loss_on, grads_on, copies_on = _caption_step(model, autocast=True)
    assert torch.equal(loss_off, loss_on)
    assert grads_off.keys() == grads_on.keys() and any("lora_A" in k for k in grads_off)
    for k in grads_on:
        assert torch.equal(grads_off[k], grads_on[k]), k
    # forward: one cast to fp32 per adapted projection; backward: its gradient cast back
    assert copies_on - copies_off >= 2 * n_lora, (copies_on, copies_off)


def test_to_training_dtype_fp32_keeps_the_input_cast():
    model = _model_with_nonzero_lora()
    model.to_training_dtype(torch.float32)
    flags = [m.cast_input_dtype_enabled for m in model.llm.modules() if hasattr(m, "cast_input_dtype_enabled")]
    assert flags and all(flags)
    model.to_training_dtype(torch.bfloat16)
    flags = [m.cast_input_dtype_enabled for m in model.llm.modules() if hasattr(m, "cast_input_dtype_enabled")]
    assert not any(flags)


def test_regionally_compiled_layers_match_eager():
    model = _model_with_nonzero_lora()
    loss_e, grads_e, _ = _caption_step(model, autocast=False)
    assert model.compile_llm_layers(backend="aot_eager") == model.cfg.llm.num_layers
    loss_c, grads_c, _ = _caption_step(model, autocast=False)
    torch.testing.assert_close(loss_c, loss_e, rtol=1e-5, atol=1e-6)
    assert grads_c.keys() == grads_e.keys()
    for k in grads_e:
        torch.testing.assert_close(grads_c[k], grads_e[k], rtol=1e-4, atol=1e-6, msg=k)
    torch._dynamo.reset()


def test_compile_decode_switch(monkeypatch):
    monkeypatch.delenv("MASKLOOP_COMPILE_DECODE", raising=False)
    assert compile_decode_enabled(torch.device("cpu")) is False  # eager step on the CPU by default
    monkeypatch.setenv("MASKLOOP_COMPILE_DECODE", "1")
    assert compile_decode_enabled(torch.device("cpu")) is True
    monkeypatch.setenv("MASKLOOP_COMPILE_DECODE", "0")
    assert compile_decode_enabled(torch.device("cuda")) is False
    monkeypatch.setenv("MASKLOOP_COMPILE_DECODE", "yes")
    with pytest.raises(ValueError, match="0 or 1"):
        compile_decode_enabled(torch.device("cuda"))


def test_decode_split_and_prefill_switches(monkeypatch):
    """``MASKLOOP_DECODE_SPLIT_K`` (4 by default, an integer >= 1) and ``MASKLOOP_COMPILE_PREFILL`` (0 / 1)
    reach the decoder; bad values are refused with the variable's name."""
    from maskloop.model.fast_decode import StaticGreedyDecoder, decode_split_k

    monkeypatch.delenv("MASKLOOP_DECODE_SPLIT_K", raising=False)
    assert decode_split_k() == 4
    for bad in ("0", "two", "-1"):
        monkeypatch.setenv("MASKLOOP_DECODE_SPLIT_K", bad)
        with pytest.raises(ValueError, match="MASKLOOP_DECODE_SPLIT_K"):
            decode_split_k()
    monkeypatch.setenv("MASKLOOP_DECODE_SPLIT_K", "2")
    model = _model_with_nonzero_lora()
    dec = StaticGreedyDecoder(model, batch=1, max_len=64, use_graph=False)
    assert dec.split == 2 and dec.prefill_fn == dec._prefill  # not compiled: compile=False
    monkeypatch.setenv("MASKLOOP_COMPILE_PREFILL", "0")
    dec = StaticGreedyDecoder(model, batch=1, max_len=64, use_graph=False, compile=True)
    assert dec.prefill_fn == dec._prefill and dec.step_fn != dec._step  # the step compiled, the prompt's pass not
    monkeypatch.setenv("MASKLOOP_COMPILE_PREFILL", "maybe")
    with pytest.raises(ValueError, match="MASKLOOP_COMPILE_PREFILL"):
        StaticGreedyDecoder(model, batch=1, max_len=64, use_graph=False, compile=True)


def test_fused_decode_weights_are_the_merged_projections():
    """q/k/v and gate/up concatenated, each row block W + s * B @ A of its own projection (biases too)."""
    from maskloop.model.fast_decode import StaticGreedyDecoder

    model = _model_with_nonzero_lora()
    dec = StaticGreedyDecoder(model, batch=2, max_len=64, use_graph=False)
    dec.refresh_merged()
    for layer, entry in zip(model.llm.layers, dec.groups):
        a, mlp = layer.self_attn, layer.mlp
        for group, mods in (("qkv", [a.q_proj, a.k_proj, a.v_proj]), ("o", [a.o_proj]),
                            ("gate_up", [mlp.gate_proj, mlp.up_proj]), ("down", [mlp.down_proj])):
            want_w, want_b = [], []
            for m in mods:  # peft's own merge arithmetic: W + scaling * B @ A
                d = m.base_layer.weight + m.scaling["default"] * m.lora_B["default"].weight @ m.lora_A["default"].weight
                want_w.append(d)
                b = m.base_layer.bias
                want_b.append(b if b is not None else torch.zeros(d.shape[0]))
            weight, bias, _, _ = entry[group]
            torch.testing.assert_close(weight, torch.cat(want_w), rtol=1e-6, atol=1e-6)
            if bias is not None:
                torch.testing.assert_close(bias, torch.cat(want_b))
            x = torch.randn(3, weight.shape[1])
            for out, m in zip(dec._proj(list(model.llm.layers).index(layer), group, x), mods, strict=True):
                torch.testing.assert_close(out, m(x), rtol=1e-5, atol=1e-5)  # the adapted module's own forward


def test_split_k_decode_products_equal_one_matmul():
    """The decode step's q/k/v, o and down products as partial products over slices of K (batched matmul over
    views of the fused weight) equal the one-matmul product; gate/up and the prompt's pass keep one matmul."""
    from maskloop.model.fast_decode import StaticGreedyDecoder

    class CountBmm(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.n += func is torch.ops.aten.bmm.default
            return func(*args, **(kwargs or {}))

    model = _model_with_nonzero_lora()
    dec = StaticGreedyDecoder(model, batch=2, max_len=64, use_graph=False)
    dec.refresh_merged()
    assert dec.split == 4
    g = torch.Generator().manual_seed(0)
    for group in ("qkv", "o", "gate_up", "down"):
        weight = dec.groups[1][group][0]
        x = torch.randn(3, 1, weight.shape[1], generator=g)
        with CountBmm() as c:
            split = dec._proj(1, group, x, split_k=True)
        one = dec._proj(1, group, x)
        assert c.n == (0 if group == "gate_up" else 1), group
        for a, b in zip(split, one, strict=True):
            assert a.shape == b.shape
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    dec.split = 1
    with CountBmm() as c:
        dec._proj(1, "down", torch.randn(3, 1, dec.groups[1]["down"][0].shape[1]), split_k=True)
    assert c.n == 0


def test_decoding_calls_on_queued_once_after_its_steps():
    """``generate(on_queued=)`` (static decoder and plain loop): the hook runs once, after the decode steps are
    queued on the static path, and the tokens are those without it."""
    from maskloop.model.fast_decode import StaticGreedyDecoder

    model = _model_with_nonzero_lora().eval()
    B, L = 2, 5
    emb = torch.randn(B, L, model.cfg.llm.hidden_size, generator=torch.Generator().manual_seed(2))
    mask, pos = torch.ones(B, L, dtype=torch.long), torch.arange(L)[None].expand(B, L)
    steps, seen = [], []
    real = StaticGreedyDecoder.decode

    def decode(self, n, before_wait=None):
        steps.append(n)
        return real(self, n, before_wait)

    StaticGreedyDecoder.decode = decode
    try:
        with torch.no_grad():
            for static in (True, False):
                want = model.generate(emb, mask, pos, 6, static=static).ids
                steps.clear()
                got = model.generate(emb, mask, pos, 6, static=static, on_queued=lambda ev: seen.append((ev, list(steps))))
                assert torch.equal(got.ids, want)
    finally:
        StaticGreedyDecoder.decode = real
    assert seen == [(None, [5]), (None, [])]


def _stop_run(steps: int, ended_after: int | None, every: int, ahead: int) -> int:
    """Decode steps the early stop should run: the first flag that says "every row ended" is the one recorded
    at the first multiple of ``every`` at or after ``ended_after``; it is read after the first multiple of
    ``every`` that is ``ahead`` or more steps later; nothing is read once all ``steps`` are queued."""
    if ahead == 0 or ended_after is None:
        return steps
    first = -(-ended_after // every) * every
    read = first + -(-ahead // every) * every
    return read if read < steps else steps


def test_static_decoding_stops_early_once_every_row_ended_with_the_same_outputs(monkeypatch):
    """Once every row has ended, the static decoder stops ``stop_ahead``-and-a-bit steps later; its tokens,
    lengths and end flags are those of all the steps (``MASKLOOP_DECODE_STOP_AHEAD``; 0 runs every step)."""
    from maskloop.model.fast_decode import StaticGreedyDecoder, decode_stop_ahead

    model = _model_with_nonzero_lora().eval()
    B, L, T = 3, 5, 40
    emb = torch.randn(B, L, model.cfg.llm.hidden_size, generator=torch.Generator().manual_seed(4))
    mask, pos = torch.ones(B, L, dtype=torch.long), torch.arange(L)[None].expand(B, L)
    mask[2, :2] = 0  # one left-padded row
    pos = (mask.cumsum(1) - 1).clamp(min=0)
    dec = StaticGreedyDecoder(model, batch=B, max_len=64, use_graph=False)
    dec.stop_ahead = 0
    free = dec.run(emb, mask, pos, T)[0]
    assert dec.steps_run == T - 1
    ran = []
    assert [_stop_run(39, e, 4, a) for e, a in ((3, 4), (4, 4), (5, 1), (1, 12), (30, 8), (33, 4))] == [8, 8, 12, 16, 39, 39]
    # make rows end at different steps: a token each row produces there becomes a stop word
    for ends in ((3, 9, 6), (1, 2, 2), (20, 5, 30), (36, 38, 37)):
        dec.stop = torch.tensor(sorted({int(free[r, e]) for r, e in enumerate(ends)}))
        dec.stop_ahead = 0
        want = dec.run(emb, mask, pos, T)
        assert dec.steps_run == T - 1 and bool(want[2].all())
        ended_after = int(want[1].max())  # a row's stop word is its token number `length`, decode step `length`
        for ahead in (1, 4, 8, 12, 100):
            dec.stop_ahead = ahead
            got = dec.run(emb, mask, pos, T)
            for a, b in zip(got, want, strict=True):
                assert torch.equal(a, b), (ends, ahead)
            assert dec.steps_run == _stop_run(T - 1, ended_after, dec.CHECK_EVERY, ahead), (ends, ahead)
            ran.append(dec.steps_run)
    assert min(ran) <= 8 and max(ran) == T - 1  # stopped early, or not, as the flags said
    dec.stop = torch.tensor([-1])  # no row ever ends: every step runs
    dec.stop_ahead = 4
    dec.run(emb, mask, pos, T)
    assert dec.steps_run == T - 1
    # on_queued runs before the host first waits for a flag (after the steps queued by then), else at the end
    count, seen = [0], []
    real_step = dec.step_fn

    def counted():
        count[0] += 1
        return real_step()

    dec.step_fn = counted
    for ahead, want in ((8, 12), (5, 12), (1, 8), (0, T - 1), (100, T - 1)):  # the first flag: at step 4
        dec.stop_ahead, count[0] = ahead, 0
        dec.run(emb, mask, pos, T, on_queued=lambda ev: seen.append(count[0]))
        assert seen.pop() == want and not seen, ahead

    monkeypatch.delenv("MASKLOOP_DECODE_STOP_AHEAD", raising=False)
    assert decode_stop_ahead() == 12
    monkeypatch.setenv("MASKLOOP_DECODE_STOP_AHEAD", "0")
    assert StaticGreedyDecoder(model, batch=1, max_len=64, use_graph=False).stop_ahead == 0
    for bad in ("-1", "soon", "1.5"):
        monkeypatch.setenv("MASKLOOP_DECODE_STOP_AHEAD", bad)
        with pytest.raises(ValueError, match="MASKLOOP_DECODE_STOP_AHEAD"):
            decode_stop_ahead()


def test_merge_graph_key_follows_what_the_merge_reads():
    """The captured LoRA merge (CUDA) is replayed while its key holds: in-place updates of the weights (training,
    the EMA swap) keep it; a weight given new storage or another scale changes it."""
    from maskloop.model.fast_decode import StaticGreedyDecoder

    model = _model_with_nonzero_lora()
    dec = StaticGreedyDecoder(model, batch=2, max_len=64, use_graph=False)
    key = dec._merge_reads()
    q = model.llm.layers[0].self_attn.q_proj
    with torch.no_grad():
        q.lora_A["default"].weight.add_(1.0)  # in place: the same addresses
    assert dec._merge_reads() == key
    q.lora_B["default"].weight.data = q.lora_B["default"].weight.data.clone()  # new storage
    key2 = dec._merge_reads()
    assert key2 != key
    q.scaling["default"] *= 2
    assert dec._merge_reads() != key2


def test_decoder_without_lora_holds_no_weight_copy_and_decodes_alike():
    """A model without adapters decodes from its own weights (no fused copy) with the dynamic loop's tokens."""
    import copy

    from conftest import WORDS

    from maskloop.model.grounded import GroundedMLLM
    from maskloop.model.presets import get_preset
    from maskloop.model.prompts import build_word_tokenizer

    cfg = copy.deepcopy(get_preset("tiny"))
    cfg.lora = None
    torch.manual_seed(5)
    model = GroundedMLLM(cfg, build_word_tokenizer(WORDS)).eval()
    B, L = 2, 6
    emb = torch.randn(B, L, cfg.llm.hidden_size, generator=torch.Generator().manual_seed(1))
    mask, pos = torch.ones(B, L, dtype=torch.long), torch.arange(L)[None].expand(B, L)
    with torch.no_grad():
        a = model.generate(emb, mask, pos, 8, static=False)
        b = model.generate(emb, mask, pos, 8, static=True)
    assert torch.equal(a.ids, b.ids)
    dec = next(iter(model.__dict__["_decoders"].values()))
    assert all(w is None for entry in dec.groups for w, *_ in entry.values())


def test_grouped_decode_attention_equals_sdpa_with_gqa():
    from maskloop.model.fast_decode import StaticGreedyDecoder

    model = _model_with_nonzero_lora()
    dec = StaticGreedyDecoder(model, batch=3, max_len=64, use_graph=False)
    g = torch.Generator().manual_seed(0)
    for t in dec.k + dec.v:
        t.normal_(generator=g)
    valid = torch.rand(3, 64, generator=g) < 0.6
    valid[:, 0] = True
    q = torch.randn(3, dec.H, 1, dec.hd, generator=g)
    mask = valid[:, None, None, :]
    out = dec._attend(q, 1, mask, 0.3)
    ref = torch.nn.functional.scaled_dot_product_attention(q, dec.k[1], dec.v[1], attn_mask=mask, scale=0.3,
                                                           enable_gqa=True)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)


def test_compiled_encoders_match_eager():
    """Regionally compiled InternViT layers and SAM2 Hiera blocks give the eager features."""
    model = make_tiny()
    model.eval()
    pv, g, _ = tiny_batch(model, B=2)
    with torch.no_grad():
        vit_e, sam_e = model.vision_features(pv), model.sam_features(g)
        n = model.compile_encoders(backend="aot_eager")
        assert n == model.cfg.vision.num_layers + sum(model.cfg.sam2.hiera_stages)
        vit_c, sam_c = model.vision_features(pv), model.sam_features(g)
    torch.testing.assert_close(vit_c, vit_e, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(sam_c.embed, sam_e.embed, rtol=1e-5, atol=1e-6)
    for a, b in zip(sam_c.high_res, sam_e.high_res):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    torch._dynamo.reset()


def test_static_prefill_equals_the_transformers_forward_with_left_padding():
    """The prompt through the merged decode weights: the last hidden state and every layer's keys / values
    equal transformers' forward with its dynamic cache (LoRA active, rows left-padded by 0 / 3 slots)."""
    from transformers import DynamicCache

    from maskloop.model.fast_decode import StaticGreedyDecoder, _cache_kv

    model = _model_with_nonzero_lora().eval()
    B, L = 2, 9
    g = torch.Generator().manual_seed(3)
    emb = torch.randn(B, L, model.cfg.llm.hidden_size, generator=g)
    mask = torch.ones(B, L, dtype=torch.long)
    mask[1, :3] = 0  # row 1 left-padded
    pos = (mask.cumsum(1) - 1).clamp(min=0)
    dec = StaticGreedyDecoder(model, batch=B, max_len=64, use_graph=False)
    with torch.no_grad():
        dec.refresh_merged()
        got = dec._prefill(emb, mask, pos)
        cache = DynamicCache(config=model.llm.config)
        want = model.run_llm(emb, mask, pos, cache)[:, -1]
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    for i in range(len(dec.k)):
        keys, values = _cache_kv(cache, i)
        for b in range(B):  # the padded slots differ (never attended to); the prompt's own must agree
            ok = mask[b].bool()
            torch.testing.assert_close(dec.k[i][b, :, :L][:, ok], keys[b][:, ok], rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(dec.v[i][b, :, :L][:, ok], values[b][:, ok], rtol=1e-4, atol=1e-5)


def test_each_compiled_family_keeps_its_own_cache_and_layers_share_one_graph():
    """LLM layers, ViT layers and SAM2 blocks compile their own class's forward: separate dynamo caches (one
    shared ``__call__`` would put them in one cache with one 8-variant budget), one entry for all layers of
    a class at one input shape."""
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list
    from transformers.modeling_layers import GradientCheckpointingLayer

    from maskloop.model.grounded import _own_forward

    torch._dynamo.reset()
    model = make_tiny()
    model.eval()
    pv, g, _ = tiny_batch(model, B=2)
    model.compile_encoders(backend="eager")
    model.compile_llm_layers(backend="eager")
    with torch.no_grad():
        model.vision_features(pv)
        model.sam_features(g)
        model.run_llm(torch.randn(2, 5, model.cfg.llm.hidden_size), torch.ones(2, 5, dtype=torch.long),
                      torch.arange(5)[None].expand(2, 5))
    families = (("llm", model.llm.layers), ("vit", model.vision.encoder.layer),
                ("sam2", model.sam.sam.vision_encoder.backbone.blocks))
    own = {name: _own_forward(mods[0]).__code__ for name, mods in families}
    assert len(set(own.values())) == 3
    entries = {name: len(_debug_get_cache_entry_list(code)) for name, code in own.items()}
    assert entries["llm"] == 1 < len(model.llm.layers), entries
    assert entries["vit"] == 1 < len(model.vision.encoder.layer), entries
    assert entries["sam2"] >= 1, entries
    # nothing compiled under the code every layer shares (transformers' __call__ / forward wrapper)
    shared = {GradientCheckpointingLayer.__call__.__code__} | {type(mods[0]).forward.__code__ for _, mods in families}
    assert all(c.co_filename.endswith(f"models/{n}/modeling_{n}.py") for c, n in
               zip(own.values(), ("qwen2", "internvl", "sam2"))), own
    assert not any(_debug_get_cache_entry_list(c) for c in shared - set(own.values()))
    model.uncompile()
    assert all("forward" not in m.__dict__ for m in model.llm.layers)
    torch._dynamo.reset()


def test_padding_prompts_to_a_length_multiple_keeps_the_loss_and_gradients():
    """Left padding up to a multiple of 16 (pad_length_to) changes the shapes, not the caption loss or grads."""
    model = _model_with_nonzero_lora()
    model.eval()  # no LoRA dropout: the two runs see the same arithmetic
    widths, real = [], model.build_inputs

    def build_inputs(*a, **k):
        emb, asm = real(*a, **k)
        widths.append(emb.shape[1])
        return emb, asm

    model.build_inputs = build_inputs
    loss_a, grads_a, _ = _caption_step(model, autocast=False)
    model.length_multiple = 16
    loss_b, grads_b, _ = _caption_step(model, autocast=False)
    assert widths[-1] % 16 == 0 and widths[-1] > widths[0] and widths[0] % 16, widths  # it did pad
    torch.testing.assert_close(loss_b, loss_a, rtol=1e-5, atol=1e-6)
    assert grads_a.keys() == grads_b.keys()
    for k in grads_a:
        torch.testing.assert_close(grads_b[k], grads_a[k], rtol=1e-4, atol=1e-6, msg=k)


def test_run_llm_gives_transformers_its_own_padding_mask_ready_made(monkeypatch):
    """``run_llm`` hands the LLM the 4-D causal & key-padding mask transformers would build for SDPA (whose
    creation reads the padding mask on the host): transformers' mask creation is skipped, and the hidden states
    equal transformers' own forward from the 2-D mask (bit for bit with a padded row, as the same mask is
    used; within rounding without padding, where transformers drops the mask for ``is_causal``).

    Follows transformers' ``src/transformers/masking_utils.py`` (5.24): a 4-D mask is returned as-is by
    ``_preprocess_mask_arguments`` (l. 818; 5.17 l. 812), ``sdpa_mask`` builds ``causal_mask_function``
    (``kv_idx <= q_idx``, l. 78) and'ed with ``padding_mask_function`` (``padding_mask[batch_idx, kv_idx]``,
    l. 175), after ``_ignore_causal_mask_sdpa`` read ``fast_all(padding_mask)`` on the host (l. 292)."""
    import transformers.masking_utils as mu

    from maskloop.model.sequence import causal_padding_mask

    model = _model_with_nonzero_lora().eval()
    B, L = 3, 7
    emb = torch.randn(B, L, model.cfg.llm.hidden_size, generator=torch.Generator().manual_seed(3))
    mask = torch.ones(B, L, dtype=torch.long)
    mask[1, :3] = 0
    mask[2, :1] = 0
    pos = (mask.cumsum(1) - 1).clamp(min=0)
    built = []
    real = mu.sdpa_mask
    monkeypatch.setattr(mu, "sdpa_mask", lambda *a, **k: built.append(1) or real(*a, **k))
    if "sdpa" in mu.ALL_MASK_ATTENTION_FUNCTIONS._global_mapping:
        monkeypatch.setitem(mu.ALL_MASK_ATTENTION_FUNCTIONS._global_mapping, "sdpa", mu.sdpa_mask)
    with torch.no_grad():
        theirs = model.llm(inputs_embeds=emb, attention_mask=mask, position_ids=pos).last_hidden_state
        assert built, "transformers' own mask creation is what the reference runs"
        built.clear()
        ours = model.run_llm(emb, mask, pos)
        assert not built
        assert torch.equal(ours, theirs)
        full = torch.ones(B, L, dtype=torch.long)
        plain = torch.arange(L)[None].expand(B, L)
        torch.testing.assert_close(model.run_llm(emb, full, plain),
                                   model.llm(inputs_embeds=emb, attention_mask=full, position_ids=plain).last_hidden_state,
                                   rtol=1e-5, atol=1e-5)
    m = causal_padding_mask(mask)
    assert m.shape == (B, 1, L, L) and m.dtype == torch.bool
    for b in range(B):  # the definition, one query and key at a time
        for i in range(L):
            for j in range(L):
                assert bool(m[b, 0, i, j]) == (j <= i and bool(mask[b, j])), (b, i, j)
    model.llm.config._attn_implementation = "eager"  # an additive float mask there: left to transformers
    try:
        with torch.no_grad():
            assert torch.equal(model.run_llm(emb, mask, pos),
                               model.llm(inputs_embeds=emb, attention_mask=mask, position_ids=pos).last_hidden_state)
    finally:
        model.llm.config._attn_implementation = "sdpa"
