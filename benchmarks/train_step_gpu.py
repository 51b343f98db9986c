"""Stage-1 and stage-2 training steps of ``small_16k`` on one GPU in bf16 autocast: the prepared device check.

Needs only torch and this repository on ``PYTHONPATH`` (no DeepSpeed, Ray or MLflow: the device machine
has none), random weights and random inputs of the official shapes, so it measures the model's cost,
not the data's. Per stage: samples/s, peak memory, and the MFU of the backbone + TextSynch forward
(FLOPs counted by ``torch.utils.flop_counter`` on one forward, over the measured forward time and the
card's dense bf16 peak, ``--peak-tflops``; H200/H100 SXM: 989). The step is the trainer's objective
(training/objective.py) with a plain AdamW, fp32 master weights, grad clip 1.0.

    PYTHONPATH=. python benchmarks/train_step_gpu.py --preset small_16k --batch 8 --steps 10

On a CPU it runs too (``--preset tiny``), which is how it was checked before a GPU was lent.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from selva.presets import get_preset
from training.objective import SelvaObjective, set_stage_trainable


def inputs(preset, batch: int, device: torch.device) -> dict:
    seq = preset.seq
    frames = int(round(preset.duration * 25))
    s = preset.frame_size
    g = torch.Generator().manual_seed(0)
    cpu = {
        "key": [f"clip{i}" for i in range(batch)],
        "video": torch.rand(batch, frames, 3, s, s, generator=g) * 2 - 1,
        "t5": torch.randn(batch, 24, preset.textsynch.text_dim, generator=g),
        "t5_mask": torch.ones(batch, 24, dtype=torch.bool),
        "clip_text": torch.randn(batch, 77, preset.generator.text_dim, generator=g),
        "latent_mean": torch.randn(batch, seq.latent_seq_len, preset.generator.latent_dim, generator=g),
        "latent_std": torch.rand(batch, seq.latent_seq_len, preset.generator.latent_dim, generator=g) * 0.1,
    }
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in cpu.items()}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure(stage: str, args, device: torch.device) -> dict:
    preset = get_preset(args.preset)
    torch.manual_seed(0)
    ts, gen = preset.build_textsynch().to(device), preset.build_generator().to(device)
    with torch.no_grad():  # "trained" weights: the zero-initialised outputs would pass no gradient
        for p in (*ts.parameters(), *gen.parameters()):
            p.add_(torch.randn_like(p) * 0.02)
    named = set_stage_trainable(ts, gen, stage)
    objective = SelvaObjective(ts, gen, stage=stage, text_in_encoder=True, cfg_dropout=0.1, seed=0)
    optimizer = torch.optim.AdamW([p for _, p in named], lr=1e-4, betas=(0.9, 0.95), eps=1e-6, weight_decay=1e-6)
    batch = inputs(preset, args.batch, device)
    bf16 = device.type == "cuda"
    autocast = lambda: torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)  # noqa: E731

    def step(i: int) -> None:
        with autocast():
            loss, _, _ = objective.loss(batch, i)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for _, p in named], 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for i in range(args.warmup):
        step(i)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    sync(device)
    t0 = time.perf_counter()
    for i in range(args.steps):
        step(args.warmup + i)
    sync(device)
    step_s = (time.perf_counter() - t0) / args.steps

    # the video side's forward alone: FLOPs counted once, time measured over repetitions
    with torch.no_grad(), autocast():
        with FlopCounterMode(display=False) as counter:
            objective.sync_features(batch)
        flops = counter.get_total_flops()
        sync(device)
        t0 = time.perf_counter()
        for _ in range(args.steps):
            objective.sync_features(batch)
        sync(device)
        fwd_s = (time.perf_counter() - t0) / args.steps
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    return {"stage": stage, "step_ms": step_s * 1e3, "samples_per_s": args.batch / step_s, "peak_gb": peak,
            "video_fwd_tflop": flops / 1e12, "video_fwd_ms": fwd_s * 1e3,
            "mfu": flops / fwd_s / (args.peak_tflops * 1e12) if device.type == "cuda" else float("nan")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="small_16k")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak of the card")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    card = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    print(f"{card}, torch {torch.__version__}, preset {args.preset}, batch {args.batch}, "
          f"{'bf16 autocast' if device.type == 'cuda' else 'fp32'}")
    print("| stage | step ms | samples/s | peak GiB | backbone+TextSynch fwd TFLOP | fwd ms | MFU |")
    print("|---|---|---|---|---|---|---|")
    for stage in ("encoder", "generator"):
        r = measure(stage, args, device)
        print(f"| {r['stage']} | {r['step_ms']:.1f} | {r['samples_per_s']:.2f} | {r['peak_gb']:.1f} | "
              f"{r['video_fwd_tflop']:.2f} | {r['video_fwd_ms']:.1f} | {r['mfu']:.2%} |")
        if device.type == "cuda":
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
