"""Loop-1 training step at Sa2VA-4B shape on one GPU, side by side with the plain approach.

    python3 benchmarks/gpu_loop1.py --out results.json                 # on the GPU machine
    python3 benchmarks/gpu_loop1.py --preset tiny --batches 1,2 --T 8   # CPU smoke test of the script

Random init directly on the device (bf16 frozen weights, fp32 trained weights), synthetic inputs.
Measures, for a full Loop-1 optimizer step (EMA greedy generation T tokens, forward #1, Gumbel mix,
forward #2 with SAM2, backward, AdamW, EMA update): samples/s, peak memory and the time per phase;
MFU of the forward/backward phases against the measured bf16 matmul rate (FLOPs counted with
torch's FlopCounterMode).  Then the plain parts a researcher would write, on the same inputs:
transformers ``generate(inputs_embeds=...)``, a deep-copied EMA teacher, a gather loop over k for the
Gumbel mix, and the whole step assembled from them.  Prints a table last and writes JSON.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import time
from contextlib import contextmanager, nullcontext

import torch

from maskloop.model.grounded import GroundedMLLM
from maskloop.model.presets import get_preset
from maskloop.model.prompts import build_word_tokenizer
from maskloop.recipes import loop1 as loop1_mod
from maskloop.recipes.loop1 import Loop1
from maskloop.train.ema import EMA
from maskloop.train.engine import TrainConfig
from maskloop.train.gumbel import gumbel_topk_embed

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def sync():
    if DEV.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, reps=5, warmup=2):
    for _ in range(warmup):
        fn()
    sync()
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        sync()
        ts.append(time.perf_counter() - t)
    ts.sort()
    return ts[len(ts) // 2]


def peak_rates():
    """Measured bf16 matmul TFLOP/s and device-to-device copy bandwidth (read + write) in GB/s."""
    if DEV.type != "cuda":
        return float("nan"), float("nan")
    n = 8192
    a = torch.randn(n, n, device=DEV, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=DEV, dtype=torch.bfloat16)
    t = timed(lambda: a @ b, reps=10)
    x = torch.randn(1 << 30, device=DEV, dtype=torch.bfloat16)  # 2 GiB
    y = torch.empty_like(x)
    tc = timed(lambda: y.copy_(x), reps=10)
    return 2 * n**3 / t / 1e12, 2 * x.numel() * 2 / tc / 1e9


class PhaseTimer:
    """Exclusive time per named phase: CUDA events (or wall clock) at every phase boundary.

    Phases nest (the ViT inside forward #2, the decode loop inside the teacher's generation): the time
    between two consecutive boundaries goes to the innermost open phase only, and time inside a
    :meth:`step` but in no phase goes to ``glue`` (host code between phases: prompt assembly, the
    recipe's checks and their host syncs).  The phases of a step therefore add up to the step exactly.
    """

    def __init__(self, annotate: bool = False):
        self.spans: dict[str, list] = {}
        self.side_spans: dict[str, list] = {}  # phases on a side CUDA stream: overlapped, not in the sum
        self.stack: list[str] = []
        self.last = None
        self.annotate = annotate  # also a profiler range "phase:NAME" ("side:NAME") around each phase

    def _range(self, name):
        if not self.annotate:
            return nullcontext()
        return torch.profiler.record_function(name)

    @contextmanager
    def side(self, name):
        """A phase launched on a side stream (events on that stream; the main stream's phases go on)."""
        s = self._mark()
        try:
            with self._range(f"side:{name}"):
                yield
        finally:
            self.side_spans.setdefault(name, []).append((s, self._mark()))

    @staticmethod
    def _mark():
        if DEV.type == "cuda":
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            return e
        return time.perf_counter()

    def _close(self, now):
        if self.last is not None and self.stack:
            self.spans.setdefault(self.stack[-1], []).append((self.last, now))
        self.last = now

    @contextmanager
    def __call__(self, name):
        if not self.stack:  # a phase outside step(): time it on its own
            self.stack.append("glue")
            self.last = self._mark()
            outer = True
        else:
            outer = False
        self._close(self._mark())
        self.stack.append(name)
        try:
            with self._range(f"phase:{name}"):
                yield
        finally:
            self._close(self._mark())
            self.stack.pop()
            if outer:
                self._close(self._mark())
                self.stack.pop()
                self.last = None

    @contextmanager
    def step(self):
        self.stack, self.last = ["glue"], self._mark()
        try:
            yield
        finally:
            self._close(self._mark())
            self.stack, self.last = [], None

    def totals(self, side: bool = False) -> dict[str, float]:
        sync()
        el = (lambda s, e: s.elapsed_time(e) / 1e3) if DEV.type == "cuda" else (lambda s, e: e - s)
        return {k: sum(el(s, e) for s, e in v) for k, v in (self.side_spans if side else self.spans).items()}

    def reset(self):
        self.spans, self.side_spans, self.stack, self.last = {}, {}, [], None


def on_side_stream() -> bool:
    return DEV.type == "cuda" and torch.cuda.current_stream() != torch.cuda.default_stream()


def wrap(obj, name, phase, timer):
    real = getattr(obj, name)

    def f(*a, **k):
        with timer.side(phase) if on_side_stream() else timer(phase):
            return real(*a, **k)

    setattr(obj, name, f)
    return real


def wrap_swap(ema, timer):
    """Time the EMA swap's copy-in and copy-back (the context manager's enter and exit) as ``ema_swap``."""
    real = ema.swap

    @contextmanager
    def swap():
        cm = real()
        with timer("ema_swap"):
            cm.__enter__()
        try:
            yield
        finally:
            with timer("ema_swap"):
                cm.__exit__(None, None, None)

    ema.swap = swap
    return real


def build(preset: str, T: int, topk: int):
    cfg = get_preset(preset)
    tok = build_word_tokenizer(["a", "red", "blue", "small", "large", "circle", "square", "triangle", "left", "of"])
    torch.manual_seed(0)
    with torch.device(DEV):
        model = GroundedMLLM(cfg, tok)
    model.set_trainable("default")
    model.to_training_dtype(torch.bfloat16 if DEV.type == "cuda" else torch.float32)
    model.train()
    tcfg = TrainConfig.from_mapping({"recipe": "loop1", "loop1": {"caption_len": T, "topk": topk, "lm_weight": 1.0}})
    return model, tcfg


def make_batch(model, B, seed=0, same_image=False):
    """Synthetic Loop-1 pairs; ``same_image``: image 2 is image 1 (SA-1B read as pairs), flagged as the
    collate function flags it."""
    c = model.cfg
    g = torch.Generator(device="cpu").manual_seed(seed)
    S, G, grid = c.vision.image_size, c.sam2.image_size, c.prompt_grid
    pm = torch.zeros(B, grid, grid, dtype=torch.uint8)
    for b in range(B):  # a blob of a few dozen cells per sample
        y, x = torch.randint(0, grid - 6, (2,), generator=g).tolist()
        h, w = torch.randint(3, 7, (2,), generator=g).tolist()
        pm[b, y : y + h, x : x + w] = 1
    masks = torch.nn.functional.interpolate(pm[:, None].float(), size=(G, G), mode="nearest")[:, 0]
    batch = {
        "pixel_values1": torch.randn(B, 3, S, S, generator=g),
        "pixel_values2": torch.randn(B, 3, S, S, generator=g),
        "g_pixel_values1": torch.randint(0, 256, (B, 3, G, G), generator=g, dtype=torch.uint8),
        "g_pixel_values2": torch.randint(0, 256, (B, 3, G, G), generator=g, dtype=torch.uint8),
        "prompt_masks1": pm, "prompt_masks2": pm, "masks1": masks, "masks2": masks,
    }
    if same_image:
        batch["pixel_values2"], batch["g_pixel_values2"] = batch["pixel_values1"], batch["g_pixel_values1"]
    batch = {k: v.to(DEV) for k, v in batch.items()}
    if same_image:
        batch["pixel_values2"], batch["g_pixel_values2"] = batch["pixel_values1"], batch["g_pixel_values1"]
        batch["same_image"] = True
    return batch


def autocast():
    return torch.autocast(DEV.type, dtype=torch.bfloat16, enabled=DEV.type == "cuda")


# ---------------------------------------------------------------------------------------------- plain parts


def plain_gumbel_mix(logits, E, k, tau, valid):
    """What one writes first: top-k, soft weights, then a loop over k gathering (B,T,D) rows."""
    logits = logits.float().masked_fill(~valid, float("-inf"))
    val, ids = logits.topk(k, -1)
    g = -torch.log(-torch.log(torch.rand_like(val).clamp_min(1e-20)).clamp_min(1e-20))
    y = torch.softmax((val + g) / tau, -1)
    hard = torch.nn.functional.one_hot(y.argmax(-1), k).to(y.dtype)
    w = hard - y.detach() + y
    out = 0
    for j in range(k):
        out = out + w[..., j : j + 1] * E[ids[..., j]].float()
    return out


class FullCopyEMA:
    """The plain EMA teacher: a deep copy of the whole model, every floating tensor averaged each step."""

    def __init__(self, model, decay=0.999):
        self.model, self.decay = model, decay
        decoders = model.__dict__.pop("_decoders", None)  # CUDA graphs cannot be deep-copied
        self.teacher = copy.deepcopy(model).eval()
        if decoders is not None:
            model.__dict__["_decoders"] = decoders
        self.pairs = [(t, p) for t, p in zip(self.teacher.parameters(), model.parameters()) if p.is_floating_point()]

    @torch.no_grad()
    def update(self):
        torch._foreach_lerp_([t for t, _ in self.pairs], [p.detach().to(t.dtype) for t, p in self.pairs], 1 - self.decay)

    def num_bytes(self):
        return sum(p.numel() * p.element_size() for p in self.teacher.parameters())


def _loop1(model, tcfg, ema) -> Loop1:
    recipe = Loop1(tcfg)
    recipe.setup(model, ema, seed=tcfg.seed)
    return recipe


class PlainLoop1(Loop1):
    """Loop 1 from the plain parts: deep-copied teacher + generate(), Gumbel loop over k."""

    def __init__(self, model, cfg, ema: FullCopyEMA):
        super().__init__(cfg)
        self.setup(model, ema, seed=cfg.seed)
        self.teacher = ema.teacher

    def loss(self, b):
        model, c = self.model, self.cfg.loop1
        from maskloop.model.prompts import Embeds
        from maskloop.recipes.common import noise_tokens, region_prompts, with_end

        pm1, _ = region_prompts(b, "1")
        t = self.teacher
        with torch.no_grad():
            feats = t.image_tokens(b["pixel_values1"])
            k = pm1.flatten(1).sum(1).long()
            emb, asm = t.build_inputs(t.builder.caption_parts(k), feats, pm1)
            out = t.internvl.generate(inputs_embeds=emb, attention_mask=asm.attention_mask, max_new_tokens=c.caption_len,
                                      min_new_tokens=c.caption_len, do_sample=False, pad_token_id=t.builder.pad_id)
        ids = out[:, -c.caption_len:]
        lengths = torch.full((ids.shape[0],), c.caption_len - 1, device=ids.device)
        noised = noise_tokens(ids, lengths, self.allowed, c.noise_ratio, self.gen)
        logits = model.caption_logits(b["pixel_values1"], pm1, with_end(noised, lengths, model.builder.end_id))["logits"]
        embeds = plain_gumbel_mix(logits[:, : ids.shape[1]], model.embed_matrix, c.topk, c.tau, self.allowed)
        o = model.segment(b["pixel_values2"], model.sam_features(b["g_pixel_values2"]), Embeds(embeds, lengths),
                          model.builder.seg_question(ids.shape[0], fixed=True), gt_masks=b["masks2"])
        return o["loss_mask"] + o["loss_lm"], {}


# ---------------------------------------------------------------------------------------------- measurements


#: phases outside the trainable forward/backward (MFU counts the rest of the step, glue included)
NOT_FWD_BWD = ("teacher_prefill", "teacher_merge_lora", "teacher_decode", "ema_swap", "optimizer", "ema_update")


def decode_bytes(model) -> dict:
    """Bytes one decode step must read: every decoder layer's weights (norms included) and the lm head, in
    the dtype they decode in, plus the KV cache is small and left out.  ``old`` is the figure used before
    2026-12-01: every LLM parameter, the input embedding table and the fp32 LoRA adapters included (none of
    which a merged-weight decode step reads), i.e. a looser bound."""
    layers = sum(p.numel() * 2 for n, p in model.llm.layers.named_parameters() if "lora_" not in n)
    head = model.internvl.lm_head.weight.numel() * 2 + model.llm.norm.weight.numel() * 2
    old = sum(p.numel() * p.element_size() for n, p in model.named_parameters()
              if n.startswith("internvl.model.language_model.") or n.startswith("internvl.lm_head"))
    return {"layers": layers, "head": head, "total": layers + head, "old": old}


def full_vocab(recipe):
    """Noise and the Gumbel top-k draw from the whole vocabulary, as with a real tokenizer."""
    special = torch.tensor(recipe.model.builder.special_ids, device=recipe.allowed.device)
    recipe.allowed.fill_(True)
    recipe.allowed[special] = False


#: set by set_variant: the compiled layers replay as CUDA graphs (cudagraph trees), so each step marks its start
GRAPHED = {"on": False}


def loop1_step(model, recipe, ema, opt, batch, timer=None):
    def phase(name):
        return timer(name) if timer else nullcontext()

    if GRAPHED["on"]:  # the previous step's graph outputs may be overwritten from here on
        torch.compiler.cudagraph_mark_step_begin()
    with timer.step() if timer else nullcontext():
        with autocast():
            loss, _ = recipe.loss(batch)
        with phase("backward"):
            loss.backward()
        with phase("optimizer"):
            params = [p for p in model.parameters() if p.requires_grad]
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
        with phase("ema_update"):
            ema.update()
    return loss


def set_decode(model, compiled: bool):
    """Decoders built from now on use the compiled step (the default on CUDA) or the eager graph-captured one."""
    model.__dict__.pop("_decoders", None)  # rebuilt on the next generate() with this setting
    if compiled:
        os.environ.pop("MASKLOOP_COMPILE_DECODE", None)
    else:
        os.environ["MASKLOOP_COMPILE_DECODE"] = "0"


def set_variant(model, variant: str):
    """'base': peft casting every LoRA input to fp32 and the eager graph-captured decode step (the 2026-11-24
    configuration); 'ours': the defaults; 'no_overlap': ours with image 2's encoders inline
    (``loop1.overlap_encoders: false``); 'compiled': ours + every LLM decoder layer compiled
    (``compile_layers: true``); 'compiled_all': compiled + every InternViT layer and SAM2 Hiera block
    compiled (``compile_encoders: true``); 'graphed': compiled_all with the LLM layers replayed as CUDA graphs
    (``cuda_graphs: true``: torch.compile mode "reduce-overhead"); 'graphed_all': the encoders' layers too, with
    image 2's encoders inline (one cudagraph-tree memory pool is not shared across streams).  A variant may
    carry MODIFIERS after "+"; a row whose base variant is the one applied last keeps its compiled layers."""
    variant, mods = split_variant(variant)
    # the decode switches are read when a decoder is built: rebuild the decoders when they change
    env = {"MASKLOOP_DECODE_SPLIT_K": "1" if "nosplit" in mods else None,
           "MASKLOOP_COMPILE_PREFILL": "0" if "eagerprefill" in mods else None,
           "MASKLOOP_DECODE_STOP_AHEAD": "0" if "nostop" in mods else None}
    for k, v in env.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    decode_key = (variant != "base", tuple(sorted(env.items(), key=str)))
    if CURRENT.get("decode") != decode_key:
        set_decode(model, compiled=variant != "base")
    CURRENT["decode"] = decode_key
    if CURRENT.get("variant") == variant:  # only the modifiers changed: keep the compiled layers and graphs
        return
    CURRENT["variant"] = variant
    model.set_lora_input_cast(variant == "base" or DEV.type != "cuda")
    model.uncompile()  # undo a previous variant's
    GRAPHED["on"] = variant in ("graphed", "graphed_all")
    graphs = {"mode": "reduce-overhead"}
    if variant in ("compiled", "compiled_all", "graphed", "graphed_all"):
        model.compile_llm_layers(**(graphs if GRAPHED["on"] else {}))
    if variant in ("compiled_all", "graphed", "graphed_all"):
        model.compile_encoders(**(graphs if variant == "graphed_all" else {}))


VARIANTS = ("base", "ours", "no_overlap", "compiled", "compiled_all", "graphed", "graphed_all", "plain")
INLINE_ENCODERS = ("no_overlap", "base", "graphed_all")
#: what a variant may add after a "+": image 2's encoders queued once the teacher's decoding is
#: ("late": ``loop1.overlap_start: decode``), the decode step without split-K products ("nosplit":
#: ``MASKLOOP_DECODE_SPLIT_K=1``), the teacher's prompt pass eager ("eagerprefill": ``MASKLOOP_COMPILE_PREFILL=0``),
#: every decode step run, the all-ended flags never read ("nostop": ``MASKLOOP_DECODE_STOP_AHEAD=0``), image 2 = image 1
#: in every pair, flagged ``same_image`` as collate flags single-image sources read as pairs ("sameimage")
MODIFIERS = ("late", "nosplit", "eagerprefill", "nostop", "sameimage")
CURRENT: dict = {}  # the variant and decode settings applied last (set_variant)


def split_variant(variant: str) -> tuple[str, set]:
    """'graphed+late+nosplit' -> ('graphed', {'late', 'nosplit'}), checked."""
    name, *mods = variant.split("+")
    if name not in VARIANTS:
        raise SystemExit(f"unknown variant {name!r} (one of {', '.join(VARIANTS)})")
    bad = set(mods) - set(MODIFIERS)
    if bad:
        raise SystemExit(f"unknown variant modifier(s) {sorted(bad)} (of {', '.join(MODIFIERS)})")
    return name, set(mods)


def recipe_settings(tcfg, variant: str) -> None:
    """The Loop-1 settings a variant implies: where image 2's encoders run, and when they start."""
    name, mods = split_variant(variant)
    tcfg.loop1.overlap_encoders = name not in INLINE_ENCODERS
    tcfg.loop1.overlap_start = "decode" if "late" in mods else "step"


def cudagraph_counters() -> dict:
    """Inductor's cudagraph counters (skips with their reasons, recordings) of this process so far."""
    from torch._dynamo.utils import counters

    return {k: v for k, v in counters["inductor"].items() if "cudagraph" in k}


@contextmanager
def instrumented(model, ema, timer, plain=False):
    """The step's parts wrapped to report to ``timer`` as phases (restored on exit)."""
    restore = []
    if not plain:
        from maskloop.model.fast_decode import StaticGreedyDecoder

        restore.append((model, "describe", wrap(model, "describe", "teacher_prefill", timer)))
        restore.append((StaticGreedyDecoder, "refresh_merged",
                        wrap(StaticGreedyDecoder, "refresh_merged", "teacher_merge_lora", timer)))
        restore.append((StaticGreedyDecoder, "decode", wrap(StaticGreedyDecoder, "decode", "teacher_decode", timer)))
        restore.append((model, "caption_logits", wrap(model, "caption_logits", "forward1", timer)))
        restore.append((model, "segment", wrap(model, "segment", "forward2+sam2_decoder", timer)))
        restore.append((loop1_mod, "gumbel_topk_embed", wrap(loop1_mod, "gumbel_topk_embed", "gumbel", timer)))
        restore.append((ema, "swap", wrap_swap(ema, timer)))
    # the frozen encoders, wherever they are called (the ViT inside forward #2 included)
    restore.append((model, "vision_features", wrap(model, "vision_features", "vit", timer)))
    restore.append((model, "sam_backbone", wrap(model, "sam_backbone", "sam2_encoder", timer)))
    try:
        yield
    finally:
        for obj, name, real in reversed(restore):
            if isinstance(obj, type) or obj is loop1_mod:
                setattr(obj, name, real)
            else:  # an instance attribute shadowing the class's method: drop it
                obj.__dict__.pop(name, None)


def phase_table(events, timer) -> str:
    """Markdown table of the profiled step by phase: the profiler ranges' host time and the kernel time of
    what they launched (inclusive of nested phases: the decode inside the teacher's prefill, ...), beside the
    exclusive event times of the same step."""
    rows = {}
    for e in events:
        if e.device_type.name == "CPU" and e.key.startswith(("phase:", "side:")):
            rows[e.key] = (e.count, e.cpu_time_total / 1e3, e.device_time_total / 1e3)
    excl = {**{f"phase:{k}": v for k, v in timer.totals().items()},
            **{f"side:{k}": v for k, v in timer.totals(side=True).items()}}
    out = ["| phase | calls | host ms (inclusive) | kernel ms launched (inclusive) | event ms (exclusive) |",
           "|---|---:|---:|---:|---:|"]
    for key in sorted(set(rows) | set(excl), key=lambda k: -rows.get(k, (0, 0, 0))[2]):
        n, host, dev = rows.get(key, (0, float("nan"), float("nan")))
        out.append(f"| {key} | {n} | {host:.1f} | {dev:.1f} | {excl.get(key, float('nan')) * 1e3:.1f} |")
    return "\n".join(out)


def measure_step(model, tcfg, B, reps, plain=False, variant="ours"):
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    opt = torch.optim.AdamW(params.values(), lr=1e-6, fused=DEV.type == "cuda")
    if DEV.type == "cuda":
        torch.cuda.empty_cache()
    if plain:
        ema = FullCopyEMA(model)
        recipe = PlainLoop1(model, tcfg, ema)
        full_vocab(recipe)
    else:
        ema = EMA(params, decay=0.999)
        recipe_settings(tcfg, variant)
        recipe = _loop1(model, tcfg, ema)
    full_vocab(recipe)
    timer = PhaseTimer()
    batch = make_batch(model, B, same_image="sameimage" in split_variant(variant)[1])
    if DEV.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    with instrumented(model, ema, timer, plain):
        for _ in range(3 if GRAPHED["on"] else 2):  # cudagraph trees: a warm-up run, a recording, then replays
            loop1_step(model, recipe, ema, opt, batch)
        sync()
        timer.reset()
        t = time.perf_counter()
        for _ in range(reps):
            loop1_step(model, recipe, ema, opt, batch, timer)
        sync()
        dt = (time.perf_counter() - t) / reps
    res = {"batch": B, "plain": plain, "variant": "plain" if plain else variant, "step_s": dt, "samples_per_s": B / dt,
           "peak_mem_gb": (torch.cuda.max_memory_allocated() / 1e9) if DEV.type == "cuda" else float("nan"),
           "ema_extra_gb": ema.num_bytes() / 1e9,
           "phases_s": {k: v / reps for k, v in timer.totals().items()},
           "side_phases_s": {k: v / reps for k, v in timer.totals(side=True).items()}}
    if GRAPHED["on"]:
        res["cudagraph_counters"] = cudagraph_counters()
    del opt, ema, recipe
    if DEV.type == "cuda":
        torch.cuda.empty_cache()
    return res


def overlap_check(model, tcfg, B):
    """One Loop-1 loss and its gradients with image 2's encoders on the side stream and inline, same seeds:
    the largest differences (the side stream changes where kernels run, not what they compute)."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    ema = EMA(params)
    batch = make_batch(model, B)
    out = {}
    for overlap in (True, False):
        tcfg.loop1.overlap_encoders = overlap
        recipe = _loop1(model, tcfg, ema)
        full_vocab(recipe)
        model.zero_grad(set_to_none=True)
        torch.manual_seed(0)
        recipe.gen.manual_seed(0)
        with autocast():
            loss, _ = recipe.loss(batch)
        loss.backward()
        out[overlap] = (loss.detach().float(), {n: p.grad.detach().float().clone() for n, p in params.items()
                                                if p.grad is not None})
    model.zero_grad(set_to_none=True)
    tcfg.loop1.overlap_encoders = True
    (l1, g1), (l0, g0) = out[True], out[False]
    gd = max(float((g1[n] - g0[n]).abs().max()) for n in g0)
    return {"batch": B, "loss_side": float(l1), "loss_inline": float(l0), "loss_abs_diff": float((l1 - l0).abs()),
            "grad_max_abs_diff": gd, "grad_max_abs": max(float(g.abs().max()) for g in g0.values()),
            "same_grad_names": sorted(g1) == sorted(g0)}


def count_flops(model, tcfg, B):
    """FLOPs per sample of the trainable part of the step (everything but the teacher's generation),
    and of the teacher's generation, counted separately with FlopCounterMode."""
    from torch.utils.flop_counter import FlopCounterMode

    ema = EMA({n: p for n, p in model.named_parameters() if p.requires_grad})
    recipe = _loop1(model, tcfg, ema)
    full_vocab(recipe)
    batch = make_batch(model, B)
    real = model.describe
    with torch.no_grad(), autocast(), FlopCounterMode(display=False) as fc_gen:
        from maskloop.recipes.common import region_prompts

        pm1, _ = region_prompts(batch, "1")
        generated = real(batch["pixel_values1"], pm1, max_new_tokens=tcfg.loop1.caption_len, static=False)
    model.describe = lambda *a, **k: generated
    try:
        with FlopCounterMode(display=False) as fc:
            with autocast():
                loss, _ = recipe.loss(batch)
            loss.backward()
    finally:
        model.describe = real
    model.zero_grad(set_to_none=True)
    model.train()
    return fc.get_total_flops() / B, fc_gen.get_total_flops() / B


@contextmanager
def decode_timer():
    """CUDA-event (or wall) time of each static decode loop (the T - 1 steps after the prefill)."""
    from maskloop.model.fast_decode import StaticGreedyDecoder

    real, spans = StaticGreedyDecoder.decode, []

    def decode(self, steps, before_wait=None):
        s = PhaseTimer._mark()
        ran = real(self, steps, before_wait)
        spans.append((s, PhaseTimer._mark(), ran))
        return ran

    StaticGreedyDecoder.decode = decode
    try:
        yield spans
    finally:
        StaticGreedyDecoder.decode = real


def per_step_ms(spans) -> float:
    sync()
    el = (lambda s, e: s.elapsed_time(e)) if DEV.type == "cuda" else (lambda s, e: (e - s) * 1e3)
    vals = sorted(el(s, e) / n for s, e, n in spans)
    return vals[len(vals) // 2]


def measure_generation(model, B, T):
    """Per decode step: ours (static cache + CUDA graph; the decode loop timed on its own, no prefill or
    weight merge), the graph-captured eager step, our dynamic-cache loop, transformers generate()."""
    model.eval()
    batch = make_batch(model, B, seed=1)
    pm = batch["prompt_masks1"]
    with torch.no_grad(), autocast():
        feats = model.image_tokens(batch["pixel_values1"])
        k = pm.flatten(1).sum(1).long()
        emb, asm = model.build_inputs(model.builder.caption_parts(k), feats, pm)
        gen = lambda static: model.generate(emb, asm.attention_mask, asm.position_ids, T, static=static)  # noqa: E731
        prefill = timed(lambda: model.run_llm(emb, asm.attention_mask, asm.position_ids), reps=5)
        set_decode(model, compiled=False)
        with decode_timer() as spans:
            timed(lambda: gen(True), reps=5)
        graph_ms = per_step_ms(spans[-5:])
        g_ids = gen(True).ids
        set_decode(model, compiled=True)
        with decode_timer() as spans:
            total = timed(lambda: gen(True), reps=5)
        ours_ms = per_step_ms(spans[-5:])
        loop = timed(lambda: gen(False), reps=3, warmup=1)
        hf = timed(lambda: model.internvl.generate(inputs_embeds=emb, attention_mask=asm.attention_mask, max_new_tokens=T,
                                                   min_new_tokens=T, do_sample=False, pad_token_id=model.builder.pad_id),
                   reps=3, warmup=1)
        a = gen(True).ids
        b = gen(False).ids
    model.train()
    CURRENT.pop("decode", None)  # the decoders were rebuilt here: set_variant rebuilds them again
    per = lambda total: (total - prefill) / max(T - 1, 1)  # noqa: E731
    nb = decode_bytes(model)
    return {"batch": B, "T": T, "prefill_s": prefill, "ours_total_s": total, "ours_step_ms": ours_ms,
            "graph_only_step_ms": graph_ms, "graph_only_equals_dynamic": bool(torch.equal(g_ids, b)),
            "compiled_token_agreement": float((a == b).float().mean()), "loop_step_ms": per(loop) * 1e3,
            "hf_generate_step_ms": per(hf) * 1e3, "ours_tokens_per_s": B * T / total, "hf_tokens_per_s": B * T / hf,
            "decode_read_gb": nb["total"] / 1e9, "llm_weight_gb_old": nb["old"] / 1e9,
            "static_equals_dynamic": bool(torch.equal(a, b))}


def measure_early_stop(model, B, T, ends=(8, 16, 32)):
    """The teacher's generation (prompt pass + decoding, one call) when every caption has ended by token ``e``,
    against all ``T`` steps run: random weights never pick the end token, so here the tokens the rows produce
    at step ``e`` (and at e / 2 for half the rows, so they end at different steps) are made the stop words.
    Each length is timed with the early stop (the default) and with ``MASKLOOP_DECODE_STOP_AHEAD=0``."""
    model.eval()
    batch = make_batch(model, B, seed=2)
    pm = batch["prompt_masks1"]
    out = []
    with torch.no_grad(), autocast():
        feats = model.image_tokens(batch["pixel_values1"])
        emb, asm = model.build_inputs(model.builder.caption_parts(pm.flatten(1).sum(1).long()), feats, pm)
        gen = lambda: model.generate(emb, asm.attention_mask, asm.position_ids, T, static=True)  # noqa: E731
        free = gen()
        dec = next(d for d in model.__dict__["_decoders"].values() if d.B == B)
        stop0, ahead0 = dec.stop.clone(), dec.stop_ahead
        try:
            for e in (*ends, None):
                if e is None:
                    dec.stop = stop0
                else:
                    at = [e if r % 2 == 0 else max(1, e // 2) for r in range(B)]
                    dec.stop = torch.unique(torch.stack([free.ids[r, a] for r, a in enumerate(at)]))
                row = {"batch": B, "T": T, "ends_by": e}
                for name, ahead in (("early_stop", ahead0), ("all_steps", 0)):
                    dec.stop_ahead = ahead
                    row[f"{name}_s"] = timed(gen, reps=5)
                    g = gen()
                    row[f"{name}_steps_run"] = dec.steps_run
                row["longest_caption"] = int(g.lengths.max())
                row["all_ended"] = bool(g.finished.all())
                out.append(row)
        finally:
            dec.stop, dec.stop_ahead = stop0, ahead0
    model.train()
    return out


def add_bound(r, gbps):
    """The bandwidth bound of one decode step (bytes it must read / measured copy rate) and our fraction."""
    r["bandwidth_bound_ms"] = r["decode_read_gb"] / gbps * 1e3
    r["bandwidth_bound_ms_old"] = r["llm_weight_gb_old"] / gbps * 1e3
    r["ours_fraction_of_bound"] = r["bandwidth_bound_ms"] / r["ours_step_ms"]
    r["graph_only_fraction_of_bound"] = r["bandwidth_bound_ms"] / r["graph_only_step_ms"]
    return r


def measure_gumbel(model, B=16, T=64, k=512):
    V, D = model.embed_matrix.shape
    E = model.embed_matrix
    valid = torch.ones(V, dtype=torch.bool, device=DEV)
    res = {}
    for name, fn in (("ours", lambda lg: gumbel_topk_embed(lg, E, k=k, tau=0.7, valid_ids_mask=valid)[0]),
                     ("plain_loop", lambda lg: plain_gumbel_mix(lg, E, k, 0.7, valid))):
        logits = torch.randn(B, T, V, device=DEV, dtype=torch.bfloat16 if DEV.type == "cuda" else torch.float32,
                             requires_grad=True)

        def run(fn=fn, logits=logits):
            out = fn(logits)
            out.float().square().mean().backward()

        if DEV.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
        t = timed(run, reps=5)
        res[name] = {"fwd_bwd_ms": t * 1e3,
                     "peak_extra_gb": ((torch.cuda.max_memory_allocated() - before) / 1e9) if DEV.type == "cuda" else float("nan")}
    res["shape"] = {"B": B, "T": T, "k": k, "V": V, "D": D}
    return res


def warmed_up(model, tcfg, B):
    """(recipe, EMA, optimizer, batch) for Loop-1 steps at batch B, after two steps (graphs captured, compiled)."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    opt = torch.optim.AdamW(params.values(), lr=1e-6, fused=True)
    ema = EMA(params)
    recipe = _loop1(model, tcfg, ema)
    full_vocab(recipe)
    batch = make_batch(model, B)
    for _ in range(3 if GRAPHED["on"] else 2):
        loop1_step(model, recipe, ema, opt, batch)
    sync()
    return recipe, ema, opt, batch


def profile_step(model, tcfg, B, out=None, T=64):
    """Profile one Loop-1 step and one teacher generation at batch B: top kernels by CUDA time, the kernel
    count; written to ``out`` (text) when given."""
    from torch.profiler import ProfilerActivity, profile

    recipe, ema, opt, batch = warmed_up(model, tcfg, B)
    lines = []
    timer = PhaseTimer(annotate=True)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if DEV.type == "cuda" else [])
    with instrumented(model, ema, timer), profile(activities=activities) as prof:
        loop1_step(model, recipe, ema, opt, batch, timer)
        sync()
    ev = prof.key_averages()
    kern = [e for e in ev if e.device_type.name == "CUDA"]
    cuda_total = sum(e.self_device_time_total for e in kern) / 1e3
    lines.append(f"## One Loop-1 step at B={B}: {sum(e.count for e in kern)} CUDA kernels, {cuda_total:.0f} ms of kernel time")
    lines.append("### By phase (`phase:` main stream, `side:` image 2's encoders on the side stream)")
    lines.append(phase_table(ev, timer))
    lines.append(ev.table(sort_by="self_cuda_time_total", row_limit=30, max_name_column_width=70))
    lines.append("### The same step, top host-side ops by self CPU time (what keeps the GPU waiting)")
    lines.append(ev.table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=70))
    from maskloop.recipes.common import region_prompts

    model.eval()
    pm1, _ = region_prompts(batch, "1")
    with torch.no_grad(), autocast():
        model.describe(batch["pixel_values1"], pm1, max_new_tokens=T)
        sync()
        with profile(activities=activities[1:] or activities) as prof:  # kernels only (the CPU: its ops)
            model.describe(batch["pixel_values1"], pm1, max_new_tokens=T)
            sync()
    model.train()
    ev = prof.key_averages()
    kern = [e for e in ev if e.device_type.name == "CUDA"]
    lines.append(f"## One teacher generation at B={B} (T={T}): {sum(e.count for e in kern)} CUDA kernels, "
                 f"{sum(e.self_device_time_total for e in kern) / 1e3:.1f} ms of kernel time")
    lines.append(ev.table(sort_by="self_cuda_time_total", row_limit=20, max_name_column_width=70))
    text = "\n\n".join(lines)
    print(text)
    if out:
        with open(out, "w") as f:
            f.write(text + "\n")


def sync_sites(model, tcfg, B, out=None):
    """Every host synchronisation in one Loop-1 step at batch B (``torch.cuda.set_sync_debug_mode``), by the
    innermost maskloop frame that caused it, in step order, with counts; written to ``out`` when given."""
    import traceback
    import warnings
    from collections import Counter

    recipe, ema, opt, batch = warmed_up(model, tcfg, B)
    order, counts = [], Counter()
    real = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        if "synchroniz" not in str(message):
            return real(message, category, filename, lineno, file, line)
        frames = [f for f in traceback.extract_stack()[:-1] if "/maskloop/" in f.filename or "gpu_loop1" in f.filename]
        site = frames[-1] if frames else None
        key = f"{site.filename.split('/maskloop/')[-1]}:{site.lineno} {site.line}" if site else "?"
        if key not in counts:
            order.append(key)
        counts[key] += 1

    warnings.showwarning = show
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.showwarning = show
            torch.cuda.set_sync_debug_mode("warn")
            try:
                loop1_step(model, recipe, ema, opt, batch)
            finally:
                torch.cuda.set_sync_debug_mode("default")
    finally:
        warnings.showwarning = real
    lines = [f"## Host synchronisations in one Loop-1 step at B={B}: {sum(counts.values())} at {len(order)} sites"]
    lines += [f"{counts[k]:4d}  {k}" for k in order]
    text = "\n".join(lines)
    print(text)
    if out:
        with open(out, "w") as f:
            f.write(text + "\n")


def load_compile_cache(path):
    if path and os.path.exists(path):
        import lzma

        t = time.time()
        with open(path, "rb") as f:
            info = torch.compiler.load_cache_artifacts(lzma.decompress(f.read()))
        n = {k: len(v) for k, v in vars(info).items() if isinstance(v, list)} if info is not None else {}
        print(f"compile cache {path}: loaded in {time.time() - t:.1f} s {n}", flush=True)


def save_compile_cache(path):
    if not path:
        return
    import lzma

    got = torch.compiler.save_cache_artifacts()
    if got is None:
        return
    data = lzma.compress(got[0], preset=6)
    with open(path + ".tmp", "wb") as f:
        f.write(data)
    os.replace(path + ".tmp", path)
    print(f"compile cache {path}: {len(got[0]) / 2**20:.1f} MiB -> {len(data) / 2**20:.1f} MiB", flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="sa2va-4b")
    ap.add_argument("--batches", default="1,2,4,8")
    ap.add_argument("--T", type=int, default=64)
    ap.add_argument("--topk", type=int, default=128)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--plain-batches", default="1,8")
    ap.add_argument("--gumbel", default="16,64,512")
    ap.add_argument("--out", default=None)
    ap.add_argument("--only-generation", action="store_true", help="measure generation only (e.g. with a compiled step)")
    ap.add_argument("--profile", type=int, default=0, help="profile one Loop-1 step at this batch and print the top ops")
    ap.add_argument("--profile-out", default=None, help="write the profile summary to this file")
    ap.add_argument("--profile-variant", default="ours", help="the variant profiled (see --variants)")
    ap.add_argument("--sync-sites", type=int, default=0, help="list the host syncs of one Loop-1 step at this batch")
    ap.add_argument("--compare", default="8", help="batches at which --variants are also measured")
    ap.add_argument("--variants", default="no_overlap,compiled",
                    help="comma list of: base, no_overlap, compiled, compiled_all, graphed, graphed_all")
    ap.add_argument("--compile-cache", default=None,
                    help="torch.compile's caches in one file: read first when it exists, written after each row "
                         "(xz-compressed torch.compiler.save_cache_artifacts), so a fresh machine compiles less")
    ap.add_argument("--skip", default="", help="comma list of parts to skip: flops,plain,generation,gumbel,overlap_check")
    args = ap.parse_args()
    load_compile_cache(args.compile_cache)
    torch.backends.cuda.matmul.allow_tf32 = True
    tflops, gbps = peak_rates()
    t0 = time.time()
    model, tcfg = build(args.preset, args.T, args.topk)
    meta = {"device": torch.cuda.get_device_name() if DEV.type == "cuda" else platform.processor(),
            "torch": torch.__version__, "preset": args.preset, "T": args.T, "topk": args.topk,
            "matmul_tflops": tflops, "copy_gbps": gbps, "build_s": time.time() - t0,
            "params_total": sum(p.numel() for p in model.parameters()),
            "params_trained": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "date": time.strftime("%Y-%m-%d")}
    print(json.dumps(meta), flush=True)
    results = {"meta": meta, "steps": [], "plain_steps": [], "generation": [], "gumbel": None, "flops": None,
               "overlap_check": None}

    def save():
        if args.out:
            with open(args.out, "w") as f:
                json.dump(results, f, indent=1)
        save_compile_cache(args.compile_cache)

    if args.sync_sites:
        set_variant(model, args.profile_variant)
        recipe_settings(tcfg, args.profile_variant)
        sync_sites(model, tcfg, args.sync_sites, args.profile_out)
        return
    if args.profile:
        set_variant(model, args.profile_variant)
        recipe_settings(tcfg, args.profile_variant)
        profile_step(model, tcfg, args.profile, args.profile_out, args.T)
        return
    if args.only_generation:
        for B in (1, 8):
            r = add_bound(measure_generation(model, B, args.T), gbps)
            print(f"gen B={B}: ours {r['ours_step_ms']:.2f} ms/step, bound {r['bandwidth_bound_ms']:.2f} ms -> "
                  f"{r['bandwidth_bound_ms'] / r['ours_step_ms']:.0%}; same tokens as the dynamic loop: {r['static_equals_dynamic']}")
            results["generation"].append(r)
            results.setdefault("early_stop", []).extend(measure_early_stop(model, B, args.T))
            for e in results["early_stop"][-4:]:
                print("early stop", json.dumps(e), flush=True)
            save()  # after each batch: a call's time limit keeps what is done
        return
    skip = set(filter(None, args.skip.split(",")))
    flops = teacher_flops = float("nan")
    if "flops" not in skip:
        # FlopCounterMode cannot count SDPA with grouped KV heads: count with eager attention (same FLOPs)
        attn = model.llm.config._attn_implementation
        model.llm.config._attn_implementation = "eager"
        try:
            flops, teacher_flops = count_flops(model, tcfg, 1)
        except Exception as e:  # keep the timing run alive
            print("flop counting failed:", repr(e), flush=True)
        finally:
            model.llm.config._attn_implementation = attn
    results["flops"] = {"train_per_sample": flops, "teacher_generation_per_sample": teacher_flops}
    print("flops", results["flops"], flush=True)

    def step_row(B, variant, plain=False):
        set_variant(model, "base" if plain else variant)
        try:
            r = measure_step(model, tcfg, B, max(1, args.reps - 1) if plain else args.reps, plain=plain, variant=variant)
        except torch.OutOfMemoryError:
            r = {"batch": B, "plain": plain, "variant": "plain" if plain else variant, "oom": True}
            torch.cuda.empty_cache()
        ph = r.get("phases_s", {})
        fb = r["step_s"] - sum(v for k, v in ph.items() if k in NOT_FWD_BWD) if "step_s" in r else 0
        r["phases_sum_s"] = sum(ph.values())
        if fb and not plain and tflops == tflops and flops == flops:
            r["mfu_fwd_bwd"] = flops * B / fb / (tflops * 1e12)
        (results["plain_steps"] if plain else results["steps"]).append(r)
        print("plain" if plain else "step", json.dumps(r), flush=True)
        save()

    if "overlap_check" not in skip:
        set_variant(model, "ours")
        results["overlap_check"] = overlap_check(model, tcfg, 8)
        print("overlap_check", json.dumps(results["overlap_check"]), flush=True)
        save()
    for B in [int(x) for x in args.batches.split(",") if x]:
        step_row(B, "ours")
    if "generation" not in skip:
        set_variant(model, "ours")
        for B in (1, 8):
            r = add_bound(measure_generation(model, B, args.T), gbps)
            results["generation"].append(r)
            print("gen", json.dumps(r), flush=True)
            results.setdefault("early_stop", []).extend(measure_early_stop(model, B, args.T))
            print("early stop", json.dumps(results["early_stop"][-4:]), flush=True)
            save()
    if "gumbel" not in skip:
        gB, gT, gk = (int(x) for x in args.gumbel.split(","))
        results["gumbel"] = measure_gumbel(model, gB, gT, gk)
        print("gumbel", json.dumps(results["gumbel"]), flush=True)
        save()
    if "plain" not in skip:
        for B in [int(x) for x in args.plain_batches.split(",") if x]:
            step_row(B, "plain", plain=True)
    compare = [int(x) for x in args.compare.split(",") if x]
    for variant in filter(None, args.variants.split(",")):
        for B in compare:
            step_row(B, variant)
    set_variant(model, "ours")

    # ---- table
    print(f"\n{meta['device']}  preset={args.preset}  T={args.T}  k={args.topk}  "
          f"matmul {tflops:.0f} TFLOP/s  copy {gbps:.0f} GB/s")
    print(f"train FLOPs/sample (fwd1+gumbel+fwd2+bwd) {flops / 1e12:.2f} T; teacher generation {teacher_flops / 1e12:.2f} T")
    print(f"{'B':>3} {'variant':>9} {'samp/s':>8} {'step s':>8} {'peak GB':>8} {'MFU f/b':>8}  phases (s)")
    for r in results["steps"] + results["plain_steps"]:
        if r.get("oom"):
            print(f"{r['batch']:>3} {r['variant']:>9}  OOM")
            continue
        ph = " ".join(f"{k}={v:.3f}" for k, v in r["phases_s"].items())
        print(f"{r['batch']:>3} {r['variant']:>9} {r['samples_per_s']:8.2f} {r['step_s']:8.3f} "
              f"{r['peak_mem_gb']:8.1f} {r.get('mfu_fwd_bwd', float('nan')):8.2%}  {ph}")
    for g in results["generation"]:
        print(f"gen B={g['batch']}: ours {g['ours_step_ms']:.2f} ms/step ({g['ours_tokens_per_s']:.0f} tok/s), "
              f"graph-only {g['graph_only_step_ms']:.2f}, dynamic loop {g['loop_step_ms']:.2f}, transformers generate "
              f"{g['hf_generate_step_ms']:.2f} ms/step ({g['hf_tokens_per_s']:.0f} tok/s); bound {g['bandwidth_bound_ms']:.2f} ms "
              f"-> {g['ours_fraction_of_bound']:.0%} (graph-only {g['graph_only_fraction_of_bound']:.0%}); graph-only "
              f"tokens == dynamic: {g['graph_only_equals_dynamic']}, compiled agreement {g['compiled_token_agreement']:.3f}")
    gm = results["gumbel"]
    if gm:
        print(f"gumbel {gm['shape']}: ours {gm['ours']['fwd_bwd_ms']:.1f} ms / {gm['ours']['peak_extra_gb']:.2f} GB, "
              f"loop over k {gm['plain_loop']['fwd_bwd_ms']:.1f} ms / {gm['plain_loop']['peak_extra_gb']:.2f} GB")
    ours = {r["batch"]: r for r in results["steps"] if not r.get("oom") and r["variant"] == "ours"}
    for r in results["plain_steps"]:
        if not r.get("oom") and r["batch"] in ours:
            print(f"step speed-up at B={r['batch']}: {ours[r['batch']]['samples_per_s'] / r['samples_per_s']:.2f}x; "
                  f"EMA extra memory: ours {ours[r['batch']]['ema_extra_gb']:.2f} GB vs deep copy {r['ema_extra_gb']:.2f} GB")
    print(f"trained params {meta['params_trained'] / 1e6:.1f} M ({meta['params_trained'] * 4 / 1e9:.2f} GB fp32)")


if __name__ == "__main__":
    main()
