"""Greedy decoding with a static KV cache, captured once as a CUDA graph.

The plain loop (transformers' dynamic cache, one Python-driven forward per token) is launch-bound at
small batch: each step issues hundreds of kernels and a host sync.  Here the prompt is prefilled through
the same per-call decode weights (below), its K/V written straight into preallocated buffers of a bucketed
length (``MASKLOOP_STATIC_PREFILL=0``: prefilled by the transformers model and copied; compiled on CUDA with the
step, ``MASKLOOP_COMPILE_PREFILL=0``: eager), and one
decode step — embedding, every decoder layer (the model's own norms and rotary embedding; q/k/v and gate/up
each one matmul over a per-call copy of their weights with the LoRA update merged in), attention over the
static cache, the lm head, argmax and the bookkeeping of finished rows — reads and writes only those buffers.  On CUDA that step is ``torch.compile``d (by default;
``MASKLOOP_COMPILE_DECODE=0`` keeps it eager), captured as a graph and replayed up to T times without
waiting for the device (the steps after every row has ended are skipped, :meth:`StaticGreedyDecoder.decode`);
on the CPU it simply runs eagerly (same arithmetic).
"""

from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F

from maskloop.errors import ConfigError
from maskloop.model.sequence import causal_padding_mask


def _cache_kv(cache, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(keys, values) (B, kvH, L, hd) of one layer of a transformers DynamicCache (any 5.x layout)."""
    if hasattr(cache, "layers"):
        return cache.layers[layer].keys, cache.layers[layer].values
    return cache.key_cache[layer], cache.value_cache[layer]


def _env_flag(name: str) -> bool | None:
    flag = os.environ.get(name, "").strip()
    if flag in ("0", "1"):
        return flag == "1"
    if flag:
        raise ConfigError(f"{name} must be 0 or 1, got {flag!r} (unset it for the default)")
    return None


def _env_int(name: str, default: int, minimum: int) -> int:
    flag = os.environ.get(name, "").strip() or str(default)
    if not flag.isdigit() or int(flag) < minimum:
        raise ConfigError(f"{name} must be an integer >= {minimum}, got {flag!r} (unset it for the default, {default})")
    return int(flag)


def decode_split_k() -> int:
    """How many slices of K the decode step's q/k/v, o and down products are split into (``MASKLOOP_DECODE_SPLIT_K``,
    default 4; 1 turns it off).  See :meth:`StaticGreedyDecoder._proj`."""
    return _env_int("MASKLOOP_DECODE_SPLIT_K", 4, 1)


def decode_stop_ahead() -> int:
    """How many decode steps the host keeps queued beyond the newest "has every row ended?" flag it reads
    (``MASKLOOP_DECODE_STOP_AHEAD``, default 12; 0 runs every step).  See :meth:`StaticGreedyDecoder.decode`."""
    return _env_int("MASKLOOP_DECODE_STOP_AHEAD", 12, 0)


def compile_decode_enabled(device: torch.device) -> bool:
    """Whether the static decode step is ``torch.compile``d: on CUDA by default (``MASKLOOP_COMPILE_DECODE``
    = ``0`` / ``1`` overrides; compiling needs Triton, so without it the eager step is used)."""
    flag = _env_flag("MASKLOOP_COMPILE_DECODE")
    if flag is not None:
        return flag
    if torch.device(device).type != "cuda":
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


class StaticGreedyDecoder:
    """Decoder state for one (batch, bucketed length) shape; reusable across calls of that shape."""

    BUCKET = 64

    def __init__(self, model, batch: int, max_len: int, use_graph: bool, compile: bool = False):
        from transformers.models.qwen2.modeling_qwen2 import apply_rotary_pos_emb

        self.model = model
        self.llm = model.llm
        self._rope = apply_rotary_pos_emb
        cfg = self.llm.config
        dev = model.embed_matrix.device
        dtype = model.embed_matrix.dtype
        self.B, self.Lmax = batch, max_len
        self.H = cfg.num_attention_heads
        self.KV = cfg.num_key_value_heads
        self.hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.H
        n = cfg.num_hidden_layers
        self.k = [torch.zeros(batch, self.KV, max_len, self.hd, device=dev, dtype=dtype) for _ in range(n)]
        self.v = [torch.zeros_like(t) for t in self.k]
        self.valid = torch.zeros(batch, max_len, dtype=torch.bool, device=dev)
        self.tok = torch.zeros(batch, dtype=torch.long, device=dev)
        self.pos = torch.zeros(batch, 1, dtype=torch.long, device=dev)
        self.cur = torch.zeros(1, dtype=torch.long, device=dev)
        self.t = torch.zeros(1, dtype=torch.long, device=dev)
        self.done = torch.zeros(batch, dtype=torch.bool, device=dev)
        self.lengths = torch.zeros(batch, dtype=torch.long, device=dev)
        self.banned = torch.zeros(model.internvl.lm_head.weight.shape[0], dtype=torch.bool, device=dev)
        self.stop = torch.tensor(model.builder.stop_ids, dtype=torch.long, device=dev)  # single-token stop words
        self.ids = None
        self.use_graph = use_graph and dev.type == "cuda"
        if compile:
            # every (batch, length) decoder traces the same function once: keep dynamo from falling back to
            # eager after its default 8 variants (a run that decodes at several batch sizes needs more)
            from torch._dynamo import config as dynamo_config

            dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, 64)
        self.step_fn = torch.compile(self._step, dynamic=False) if compile else self._step
        # the prompt's pass is compiled with the step (``MASKLOOP_COMPILE_PREFILL=0``: eager); its length varies
        # from call to call, so after the first length dynamo compiles it once for any length
        compile_prefill = compile and _env_flag("MASKLOOP_COMPILE_PREFILL") is not False
        self.prefill_fn = torch.compile(self._prefill, dynamic=None) if compile_prefill else self._prefill
        self.split = decode_split_k()
        self.stop_ahead = decode_stop_ahead()
        self.steps_run = 0  # decode steps the last call ran (after token 0)
        self.graph = None
        self.T = 0
        # the prompt through the decode weights into the static cache (MASKLOOP_STATIC_PREFILL=0: through the
        # transformers forward and its dynamic cache, then copied)
        self.prefill_static = os.environ.get("MASKLOOP_STATIC_PREFILL", "1").strip() != "0"
        # LoRA merged into the weights for decoding (W + s * B @ A, refreshed every call), and the projections
        # that read one input concatenated into one weight: q/k/v -> one matmul, gate/up -> one matmul.  A
        # decode step then runs four matmuls a layer (each reading its whole weight once) instead of seven
        # plus the adapters' kernels; at batch 1-16 every matmul is bandwidth- and launch-bound.  A group
        # without any adapter (a model without LoRA: a published checkpoint at inference) keeps its own
        # weights, one matmul per projection, so decoding never holds a second copy of a frozen LLM.
        self.groups = []  # per layer: {group: (fused weight or None, fused bias or None, [(module, base, rows)], sizes)}
        for layer in self.llm.layers:
            a, mlp = layer.self_attn, layer.mlp
            spec = {"qkv": [a.q_proj, a.k_proj, a.v_proj], "o": [a.o_proj], "gate_up": [mlp.gate_proj, mlp.up_proj],
                    "down": [mlp.down_proj]}
            entry = {}
            for g, mods in spec.items():
                bases = [getattr(m, "base_layer", m) for m in mods]
                rows, off = [], 0
                for m, b in zip(mods, bases):
                    rows.append((m, b, slice(off, off + b.weight.shape[0])))
                    off += b.weight.shape[0]
                sizes = tuple(b.weight.shape[0] for b in bases)
                weight = bias = None
                if any(hasattr(m, "lora_A") for m in mods):
                    weight = torch.empty(off, bases[0].weight.shape[1], device=dev, dtype=bases[0].weight.dtype)
                    if any(b.bias is not None for b in bases):
                        bias = torch.zeros(off, device=dev, dtype=weight.dtype)
                entry[g] = (weight, bias, rows, sizes)
            self.groups.append(entry)

    def _merge_reads(self) -> tuple:
        """What the merge reads: every tensor's storage address, the adapters and scales in use, autocast."""
        key = [torch.is_autocast_enabled("cuda")]
        for entry in self.groups:
            for weight, _bias, rows, _ in entry.values():
                if weight is None:
                    continue
                for mod, base, _ in rows:
                    key += [base.weight.data_ptr(), None if base.bias is None else base.bias.data_ptr()]
                    for name in (list(mod.active_adapters) if hasattr(mod, "lora_A") else []):
                        key += [name, mod.scaling[name], mod.lora_A[name].weight.data_ptr(),
                                mod.lora_B[name].weight.data_ptr(), mod.lora_A[name].weight.dtype]
        return tuple(key)

    @torch.no_grad()
    def refresh_merged(self) -> None:
        """Copy the current weights (LoRA merged) into the fused decode weights.

        On CUDA with graphs, the merge (a few hundred small kernels) is captured once and replayed: the
        weights it reads are updated in place (training, the EMA swap), so their addresses stay; it is
        captured again whenever any address, adapter or scale changed."""
        if not any(w is not None for entry in self.groups for w, *_ in entry.values()):
            return None  # no adapters: decoding reads the model's own weights, nothing to merge
        if not self.use_graph:
            return self._merge()
        key = self._merge_reads()
        if getattr(self, "_merge_graph", None) is None or self._merge_key != key:
            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):
                self._merge()  # warm-up (cuBLAS workspace) on a side stream
            torch.cuda.current_stream().wait_stream(s)
            self._merge_graph, self._merge_key = torch.cuda.CUDAGraph(), key
            with torch.cuda.graph(self._merge_graph):
                self._merge()
        self._merge_graph.replay()

    def _merge(self) -> None:
        for entry in self.groups:
            for weight, bias, rows, _ in entry.values():
                if weight is None:
                    continue
                for mod, base, r in rows:
                    w = weight[r]  # a contiguous row block
                    if bias is not None and base.bias is not None:
                        bias[r].copy_(base.bias)
                    names = list(mod.active_adapters) if hasattr(mod, "lora_A") else []
                    if not names:
                        w.copy_(base.weight)
                    for j, name in enumerate(names):  # the first one writes W + s B A in one pass (no copy of W first)
                        A, B = mod.lora_A[name].weight.to(w.dtype), mod.lora_B[name].weight.to(w.dtype)
                        if j == 0:
                            torch.addmm(base.weight, B, A, alpha=mod.scaling[name], out=w)
                        else:
                            w.addmm_(B, A, alpha=mod.scaling[name])

    def _proj(self, i: int, group: str, x: torch.Tensor, split_k: bool = False) -> tuple[torch.Tensor, ...]:
        """The outputs of a group's projections (q, k, v / o / gate, up / down) for input ``x``.

        ``split_k`` (the decode step, a few rows of input): the fused product of q/k/v, o and down is taken as
        ``self.split`` partial products over slices of K, one batched matmul over views of the same weight
        (fp32 partial sums on CUDA), added in fp32 by the kernel that reads them.  At batch 1-16 one matmul
        of these shapes covers too few tiles to keep the whole memory system busy (an H200 reads 1.4-1.7 TB/s
        for q/k/v and o, 2.7 TB/s for down at the 4B shape; split in 4: 1.75-1.95 and 3.3 TB/s,
        ``benchmarks/gpu_decode_kernels.py``).  gate/up has tiles enough and keeps one matmul."""
        weight, bias, rows, sizes = self.groups[i][group]
        if weight is None:
            return tuple(F.linear(x, base.weight, base.bias) for _, base, _ in rows)
        s = self.split
        N, K = weight.shape
        if not split_k or s == 1 or group == "gate_up" or K % s:
            return F.linear(x, weight, bias).split(sizes, -1)
        lead = x.shape[:-1]
        xs = x.reshape(-1, s, K // s).transpose(0, 1)  # (s, M, K/s): views, no copy
        ws = weight.view(N, s, K // s).permute(1, 2, 0)  # (s, K/s, N)
        if x.is_cuda and weight.dtype in (torch.bfloat16, torch.float16):
            part = torch.bmm(xs.to(weight.dtype), ws, out_dtype=torch.float32)
        else:
            part = torch.bmm(xs.to(weight.dtype), ws).float()
        y = part.sum(0)
        if bias is not None:
            y = y + bias.float()
        return y.to(x.dtype).view(*lead, N).split(sizes, -1)

    def _attend(self, q: torch.Tensor, i: int, mask: torch.Tensor, scale: float) -> torch.Tensor:
        """One query a row over the static cache: q (B, H, 1, hd) -> (B, H, 1, hd).

        The query heads of one KV head are grouped (B, KV, G, hd) so each cached K/V row is read once,
        with fp32 softmax; ``mask`` (B, 1, 1, Lmax) is True at the filled slots."""
        B, H, _, hd = q.shape
        k, v = self.k[i], self.v[i]  # (B, KV, Lmax, hd)
        qg = q.reshape(B, self.KV, H // self.KV, hd)
        s = torch.matmul(qg, k.transpose(-1, -2)).float() * scale  # (B, KV, G, Lmax)
        s = s.masked_fill(~mask, float("-inf"))
        o = torch.matmul(torch.softmax(s, -1).to(v.dtype), v)  # (B, KV, G, hd)
        return o.reshape(B, H, 1, hd)

    @staticmethod
    def bucket(n: int) -> int:
        return int(math.ceil(n / StaticGreedyDecoder.BUCKET) * StaticGreedyDecoder.BUCKET)

    # -- one decode step: reads/writes only the preallocated buffers
    def _step(self) -> None:
        m, llm, B = self.model, self.llm, self.B
        pad_id = m.builder.pad_id
        x = m.embed_tokens(self.tok[:, None])  # (B, 1, D)
        cos, sin = llm.rotary_emb(x, self.pos)
        self.valid.index_fill_(1, self.cur, True)
        mask = self.valid[:, None, None, :]  # (B, 1, 1, Lmax)
        nq = self.H * self.hd
        for i, layer in enumerate(llm.layers):
            a = layer.self_attn
            h = layer.input_layernorm(x)
            q, k, v = self._proj(i, "qkv", h, split_k=True)
            q = q.view(B, 1, self.H, self.hd).transpose(1, 2)
            k = k.reshape(B, 1, self.KV, self.hd).transpose(1, 2)
            v = v.reshape(B, 1, self.KV, self.hd).transpose(1, 2)
            q, k = self._rope(q, k, cos, sin)
            self.k[i].index_copy_(2, self.cur, k.to(self.k[i].dtype))
            self.v[i].index_copy_(2, self.cur, v.to(self.v[i].dtype))
            o = self._attend(q, i, mask, a.scaling)
            x = x + self._proj(i, "o", o.transpose(1, 2).reshape(B, 1, nq), split_k=True)[0]
            h = layer.post_attention_layernorm(x)
            gate, up = self._proj(i, "gate_up", h)
            x = x + self._proj(i, "down", layer.mlp.act_fn(gate) * up, split_k=True)[0]
        nxt = m.lm_logits(llm.norm(x)[:, 0]).masked_fill(self.banned, float("-inf")).argmax(-1)  # (B,)
        nxt = torch.where(self.done, torch.full_like(nxt, pad_id), nxt)
        self.ids.index_copy_(1, self.t, nxt[:, None])
        is_stop = torch.isin(nxt, self.stop)
        self.lengths.add_((~self.done & ~is_stop).long())
        self.done.logical_or_(is_stop)
        self.tok.copy_(nxt)
        self.pos.add_(1)
        self.cur.add_(1)
        self.t.add_(1)

    def _prefill(self, x: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        """The prompt (B, L, D) through the decoder layers with the decode weights (LoRA merged, q/k/v and
        gate/up fused), its keys / values written straight into the static cache; returns the final-normed
        hidden state of the last position (B, D).

        Same arithmetic as the transformers forward: causal attention over the prompt's non-padded keys
        (SDPA, grouped-query); a left-padding query also sees itself, so its row stays finite (its key /
        value slot is masked out of every later step)."""
        llm, (B, L, _) = self.llm, x.shape
        cos, sin = llm.rotary_emb(x, position_ids)
        mask = causal_padding_mask(attention_mask) | torch.eye(L, dtype=torch.bool, device=x.device)  # (B, 1, L, L)
        nq = self.H * self.hd
        for i, layer in enumerate(llm.layers):
            a = layer.self_attn
            h = layer.input_layernorm(x)
            q, k, v = self._proj(i, "qkv", h)
            q = q.view(B, L, self.H, self.hd).transpose(1, 2)
            k = k.reshape(B, L, self.KV, self.hd).transpose(1, 2)
            v = v.reshape(B, L, self.KV, self.hd).transpose(1, 2)
            q, k = self._rope(q, k, cos, sin)
            self.k[i][:, :, :L].copy_(k)
            self.v[i][:, :, :L].copy_(v)
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=a.scaling, enable_gqa=self.KV != self.H)
            x = x + self._proj(i, "o", o.transpose(1, 2).reshape(B, L, nq))[0]
            h = layer.post_attention_layernorm(x)
            gate, up = self._proj(i, "gate_up", h)
            x = x + self._proj(i, "down", layer.mlp.act_fn(gate) * up)[0]
        return llm.norm(x[:, -1])

    def _first(self, hidden_last: torch.Tensor) -> None:
        """Token 0 from the prefill's last hidden state (B, D)."""
        m = self.model
        nxt = m.lm_logits(hidden_last).masked_fill(self.banned, float("-inf")).argmax(-1)
        self.ids[:, 0] = nxt
        is_stop = torch.isin(nxt, self.stop)
        self.lengths.copy_((~is_stop).long())
        self.done.copy_(is_stop)
        self.tok.copy_(nxt)
        self.t.fill_(1)

    @torch.no_grad()
    def run(self, inputs_embeds, attention_mask, position_ids, max_new_tokens: int, banned=None, on_queued=None):
        """Decode ``max_new_tokens`` greedily; ``banned`` (V,) bool ids are never picked.

        ``on_queued(prefilled)`` is called once, as soon as the decoding is queued on the device up to where the
        host first waits for it (the early stop's first read, :meth:`decode`; else after the last step), before
        the outputs are copied; ``prefilled`` is a CUDA event recorded on the current stream
        where the prompt's pass ends (None on the CPU), so work on another stream can start there on the device
        while the host launched it after the decode steps."""
        from transformers import DynamicCache

        m = self.model
        B, L, _ = inputs_embeds.shape
        if L + max_new_tokens > self.Lmax:
            raise ValueError(f"prompt {L} + {max_new_tokens} new tokens exceed the decoder's {self.Lmax} slots")
        self.refresh_merged()
        if self.prefill_static:
            hidden = self.prefill_fn(inputs_embeds, attention_mask, position_ids)
        else:  # transformers' own forward, its dynamic cache copied into the static one
            cache = DynamicCache(config=self.llm.config)
            hidden = m.run_llm(inputs_embeds, attention_mask, position_ids, cache)[:, -1]
            for i in range(len(self.k)):
                keys, values = _cache_kv(cache, i)
                self.k[i][:, :, :L].copy_(keys)
                self.v[i][:, :, :L].copy_(values)
            del cache
        queued = on_queued is not None and inputs_embeds.is_cuda
        prefilled = torch.cuda.current_stream().record_event() if queued else None
        if banned is None:
            self.banned.zero_()
        else:
            self.banned.copy_(banned)
        self.valid.zero_()
        self.valid[:, :L] = attention_mask.bool()
        self.pos.copy_(position_ids[:, -1:] + 1)
        self.cur.fill_(L)
        if self.ids is None or self.ids.shape[1] != max_new_tokens:
            self.ids = torch.full((B, max_new_tokens), m.builder.pad_id, dtype=torch.long, device=self.tok.device)
            self.graph, self.T = None, max_new_tokens
        self.ids.fill_(m.builder.pad_id)
        self._first(hidden)
        if max_new_tokens > 1:
            if self.use_graph and max_new_tokens >= 4 and self.graph is None:
                self._capture()
                # the capture ran warm-up steps: redo this call's state
                return self.run(inputs_embeds, attention_mask, position_ids, max_new_tokens, banned, on_queued)
            self.decode(max_new_tokens - 1, before_wait=None if on_queued is None else lambda: on_queued(prefilled))
        elif on_queued is not None:
            on_queued(prefilled)
        return self.ids.clone(), self.lengths.clone(), self.done.clone()

    CHECK_EVERY = 4  # decode steps between two "has every row ended?" flags

    def decode(self, steps: int, before_wait=None) -> int:
        """Up to ``steps`` decode steps from the current buffers (graph replays on CUDA); returns how many ran.

        Once every row has ended, the remaining steps only write padding, so they are skipped: every
        :attr:`CHECK_EVERY` steps the all-ended flag is copied to the host without waiting (a pinned buffer and
        an event on CUDA), and the host reads a flag only when ``stop_ahead`` more steps are queued behind it.
        The device therefore never waits for the host, the host stays that many steps ahead of the device
        (room to queue what follows the decoding), and at most ``stop_ahead + CHECK_EVERY - 1`` steps run past
        the end of the longest caption.  The tokens, lengths and end flags are those of all ``steps`` steps.
        ``stop_ahead`` 0 (``MASKLOOP_DECODE_STOP_AHEAD=0``) runs every step and reads nothing.  ``before_wait()``
        is called once: before the host first reads a flag, or after the last step if it reads none."""
        step = self.graph.replay if self.graph is not None else self.step_fn
        every, ahead = self.CHECK_EVERY, self.stop_ahead
        pending = []  # (steps queued when the flag was recorded, ended flag, event or None)
        # pinned, from torch's caching host allocator: a block is not handed out again while copies into it are queued
        host = torch.empty(steps // every + 1, dtype=torch.bool, pin_memory=True) if ahead and self.done.is_cuda else None
        run, ended = 0, False
        while run < steps and not ended:
            n = steps - run if ahead == 0 else min(every, steps - run)
            for _ in range(n):
                step()
            run += n
            if ahead == 0 or run >= steps:
                break
            pending.append((run, *self._ended_flag(None if host is None else host[run // every])))
            while pending and run - pending[0][0] >= ahead and not ended:
                if before_wait is not None:
                    before_wait()
                    before_wait = None
                _, flag, event = pending.pop(0)
                if event is not None:
                    event.synchronize()
                ended = bool(flag)
        if before_wait is not None:
            before_wait()
        self.steps_run = run
        return run

    def _ended_flag(self, host: torch.Tensor | None) -> tuple[torch.Tensor, object]:
        """Whether every row has ended, as queued now: (host tensor, CUDA event to wait for, or None).  On CUDA
        the flag is copied into ``host`` (one pinned element) without waiting."""
        ended = self.done.all()
        if host is None:
            return ended, None  # the CPU ran everything before it already
        host.copy_(ended, non_blocking=True)
        return host, torch.cuda.current_stream().record_event()

    def _capture(self) -> None:
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        amp = torch.is_autocast_enabled("cuda")
        dtype = torch.get_autocast_dtype("cuda")
        # warm-up and capture under the same autocast state (cache off, as capture needs): a compiled step
        # is then traced once per decoder, not twice
        with torch.cuda.stream(s), torch.autocast("cuda", dtype=dtype, enabled=amp, cache_enabled=False):
            for _ in range(2):  # warm-up on a side stream (allocator, cuBLAS handles, compilation)
                self.step_fn()
        torch.cuda.current_stream().wait_stream(s)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph), torch.autocast("cuda", dtype=dtype, enabled=amp, cache_enabled=False):
            self.step_fn()
