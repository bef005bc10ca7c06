"""Loop 1 through the real trainer on N GPUs (torchrun) vs one GPU with the same global batch.

    # one GPU, global batch 16; two GPUs (8 each), the same global batch; one GPU at 8 (weak scaling)
    python3 benchmarks/gpu_dist_loop1.py --global-batch 16 --out one_gpu_b16.json
    torchrun --nproc_per_node 2 benchmarks/gpu_dist_loop1.py --global-batch 16 --out two_gpu_b16.json
    python3 benchmarks/gpu_dist_loop1.py --global-batch 8 --out one_gpu_b8.json
    python3 benchmarks/gpu_dist_loop1.py --report one_gpu_b16.json two_gpu_b16.json one_gpu_b8.json

    # CPU smoke test of the script (gloo)
    torchrun --nproc_per_node 2 benchmarks/gpu_dist_loop1.py --preset tiny --global-batch 4 --steps 3 --T 8 --topk 16

The model (random init, built on each rank's GPU; the trainer broadcasts rank 0's weights) trains with
``maskloop.train.engine.Trainer`` and the ``loop1`` recipe — gradient all-reduce, EMA teacher, bf16
autocast, AdamW — on synthetic pairs: global sample i of step s is drawn from a generator seeded by
(s, i), and rank r takes samples r, r + N, ... (the strided sharding of the real sampler).  Loop 1's token
and Gumbel noise are drawn for the global batch and sliced per rank, so N GPUs compute what one GPU
computes, up to bf16 rounding.  LoRA dropout is set to 0 (dropout masks are per-rank draws).  The logged
loss is the global-batch mean (averaged across ranks by the trainer).  Rank 0 writes the loss curve and
the step times.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time

import torch


class SyntheticPairs:
    """Loop-1 pair batches: this rank's strided share of a deterministic global batch per step."""

    def __init__(self, model, global_batch: int, world: int, rank: int, seed: int = 0, pool: int = 32):
        if global_batch % world:
            raise ValueError(f"global batch {global_batch} is not divisible by {world} processes")
        c = model.cfg
        self.S, self.G, self.grid = c.vision.image_size, c.sam2.image_size, c.prompt_grid
        self.global_batch, self.world, self.rank, self.seed = global_batch, world, rank, seed
        self.step = 0
        # images come from a fixed pool (drawing 1024x1024 images per sample on the CPU would dominate the
        # step with torchrun's one OpenMP thread per process); regions and the pool index vary per sample
        g = torch.Generator().manual_seed(seed)
        n = pool
        self.pv = torch.randn(n, 3, self.S, self.S, generator=g)
        self.gpv = torch.randint(0, 256, (n, 3, self.G, self.G), generator=g, dtype=torch.uint8)

    def sample(self, step: int, i: int) -> dict:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + step * 10_007 + i)
        G, grid, n = self.G, self.grid, len(self.pv)
        pm = torch.zeros(grid, grid, dtype=torch.uint8)
        y, x = torch.randint(0, grid - 6, (2,), generator=g).tolist()
        h, w = torch.randint(3, 7, (2,), generator=g).tolist()
        pm[y : y + h, x : x + w] = 1
        mask = torch.nn.functional.interpolate(pm[None, None].float(), size=(G, G), mode="nearest")[0, 0]
        a, b = torch.randint(0, n, (2,), generator=g).tolist()
        return {"pixel_values1": self.pv[a], "pixel_values2": self.pv[b], "g_pixel_values1": self.gpv[a],
                "g_pixel_values2": self.gpv[b], "prompt_masks1": pm, "prompt_masks2": pm, "masks1": mask, "masks2": mask}

    def next(self) -> dict:
        rows = [self.sample(self.step, i) for i in range(self.rank, self.global_batch, self.world)]
        self.step += 1
        return {k: torch.stack([r[k] for r in rows]) for k in rows[0]}

    def __len__(self) -> int:
        return 1 << 30

    def state_dict(self) -> dict:
        return {"step": self.step}

    def load_state_dict(self, state: dict) -> None:
        self.step = state["step"]

    def skip_counts(self) -> dict:
        return {}


def run(args) -> None:
    from gpu_loop1 import full_vocab  # the benchmark beside this one (the script's folder is on sys.path)

    from maskloop.model.grounded import GroundedMLLM
    from maskloop.model.presets import get_preset
    from maskloop.model.prompts import build_word_tokenizer
    from maskloop.train import dist
    from maskloop.train.engine import TrainConfig, Trainer

    info = dist.init_distributed()
    world, rank = dist.world_size(), dist.rank()
    cfg = get_preset(args.preset)
    cfg.lora.dropout = 0.0
    tok = build_word_tokenizer(["a", "red", "blue", "small", "large", "circle", "square", "triangle", "left", "of"])
    torch.manual_seed(0)
    with torch.device(info.device):
        model = GroundedMLLM(cfg, tok)
    per_rank = args.global_batch // world
    with tempfile.TemporaryDirectory() as tmp:
        tcfg = TrainConfig.from_mapping({
            "recipe": "loop1", "model": args.preset, "run_dir": tmp, "steps": args.steps, "batch_size": per_rank,
            "accumulation": 1, "lr": args.lr, "warmup_ratio": 0.0, "weight_decay": 0.0, "log_every": 1,
            "ckpt_every": 0, "progress": False, "loop1": {"caption_len": args.T, "topk": args.topk, "refer_ratio": 0.0},
            "seed": 0, "distributed": args.distributed, "activation_checkpointing": args.activation_checkpointing})
        tr = Trainer(tcfg, model=model, streams={"pairs": SyntheticPairs(model, args.global_batch, world, rank)})
        full_vocab(tr.recipe)  # noise and the Gumbel top-k draw from the whole vocabulary, as with a real tokenizer
        times = []
        for step in range(args.steps):  # the body of Trainer.fit, timed per step
            if info.device.type == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            logs = tr.train_step()
            if info.device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
            tr.logger.log(tr.step, logs, times[-1], tr.streams, tr.counters)  # all ranks: the global-mean loss (an all-gather of the scalars)
            if rank == 0 and (step % 5 == 0 or step == args.steps - 1):
                print(f"step {step + 1}/{args.steps}: loss {tr.history[-1]['loss']:.4f}, {times[-1]:.3f} s", flush=True)
        if tr.logger.writer is not None:  # flush the TensorBoard log before its temporary run directory goes
            tr.logger.writer.close()
    timed = times[args.warmup:]
    step_s = statistics.median(timed) if timed else float("nan")
    if rank == 0:
        res = {"preset": args.preset, "world_size": world, "global_batch": args.global_batch, "per_gpu_batch": per_rank,
               "steps": args.steps, "T": args.T, "topk": args.topk, "lr": args.lr,
               "device": torch.cuda.get_device_name() if info.device.type == "cuda" else "cpu",
               "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
               "loss": [h["loss"] for h in tr.history], "loss_mask": [h.get("loop1/loss_mask") for h in tr.history],
               "grad_norm": [h["grad_norm"] for h in tr.history], "step_times_s": times,
               "median_step_s": step_s, "samples_per_s": args.global_batch / step_s,
               "peak_mem_gb": torch.cuda.max_memory_allocated() / 1e9 if info.device.type == "cuda" else float("nan")}
        print(json.dumps({k: v for k, v in res.items() if k not in ("step_times_s",)}), flush=True)
        if args.out:
            with open(args.out, "w") as f:
                json.dump(res, f, indent=1)
    dist.cleanup()


def report(paths: list[str]) -> None:
    """Compare the runs: loss curves (same global batch) and scaling efficiency."""
    runs = [json.load(open(p)) for p in paths]
    one = {r["global_batch"]: r for r in runs if r["world_size"] == 1}
    print(f"{'GPUs':>4} {'global B':>8} {'per GPU':>7} {'step s':>8} {'samples/s':>10} {'peak GB':>8}")
    for r in runs:
        print(f"{r['world_size']:>4} {r['global_batch']:>8} {r['per_gpu_batch']:>7} {r['median_step_s']:8.3f} "
              f"{r['samples_per_s']:10.2f} {r['peak_mem_gb']:8.1f}")
    for r in runs:
        if r["world_size"] == 1:
            continue
        n = r["world_size"]
        ref = one.get(r["global_batch"])
        if ref:
            a, b = torch.tensor(ref["loss"]), torch.tensor(r["loss"])
            rel = ((a - b).abs() / a.abs().clamp_min(1e-6))
            print(f"loss curve, {n} GPUs vs 1 GPU at global batch {r['global_batch']} over {len(a)} steps: "
                  f"max rel diff {float(rel.max()):.2e}, mean {float(rel.mean()):.2e}; "
                  f"first/last loss 1 GPU {float(a[0]):.4f}/{float(a[-1]):.4f}, {n} GPUs {float(b[0]):.4f}/{float(b[-1]):.4f}")
            print(f"strong scaling (same global batch {r['global_batch']}): "
                  f"{r['samples_per_s'] / (n * ref['samples_per_s']):.1%}")
        weak = one.get(r["per_gpu_batch"])
        if weak:
            print(f"weak scaling (per-GPU batch {r['per_gpu_batch']}): {r['samples_per_s'] / (n * weak['samples_per_s']):.1%}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="sa2va-1b")
    ap.add_argument("--global-batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5, help="steps left out of the timing")
    ap.add_argument("--T", type=int, default=64)
    ap.add_argument("--topk", type=int, default=128)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--distributed", default="none", choices=["none", "ddp", "fsdp"],
                    help="the Trainer's data parallelism (fsdp / ddp need torchrun)")
    ap.add_argument("--activation-checkpointing", action="store_true")
    ap.add_argument("--out", default=None)
    ap.add_argument("--report", nargs="+", default=None, help="compare result JSONs instead of running")
    args = ap.parse_args()
    if args.report:
        report(args.report)
    else:
        run(args)


if __name__ == "__main__":
    main()
