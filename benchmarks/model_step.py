"""Training-step cost of TextSynch + generator per stage, against a forward-only pass.

    .venv/bin/python benchmarks/model_step.py [--preset tiny] [--batch 2] [--steps 10]

One training step = TextSynch encoding of a (B, T, 3, S, S) clip batch + generator flow prediction
+ flow-matching loss + backward, with the stage's parameters trainable. The baseline is the same
forward pass under ``torch.inference_mode`` in the same run, so the ratio says what training adds.
Prints a table; record results in docs/benchmarks.md. Not a test: no thresholds here.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from selva.flow_matching import FlowMatching
from selva.presets import get_preset
from selva.stages import Stage, set_trainable


def make_batch(preset, batch: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    seq = preset.seq
    return {
        "video": torch.rand(batch, seq.sync_num_frames, 3, preset.frame_size, preset.frame_size, generator=g) * 2 - 1,
        "t5": torch.randn(batch, 16, preset.textsynch.text_dim, generator=g),
        "mask": torch.ones(batch, 16, dtype=torch.bool),
        "clip_text": torch.randn(batch, preset.generator.text_seq_len, preset.generator.text_dim, generator=g),
        "data": torch.randn(batch, seq.latent_seq_len, preset.generator.latent_dim, generator=g),
        "noise": torch.randn(batch, seq.latent_seq_len, preset.generator.latent_dim, generator=g),
        "t": FlowMatching.sample_t(batch, g),
    }


def loss_fn(textsynch, generator, b: dict[str, torch.Tensor]) -> torch.Tensor:
    fm = FlowMatching()
    sync = textsynch(b["video"], b["t5"], b["mask"])
    x_t = fm.interpolate(b["noise"], b["data"], b["t"])
    v = generator(x_t, generator.empty_clip_sequence(len(x_t)), sync, b["clip_text"], b["t"])
    return fm.loss(v, b["noise"], b["data"]).mean()


def timed(fn, steps: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()

    preset = get_preset(args.preset)
    torch.manual_seed(0)
    textsynch, generator = preset.build_textsynch(), preset.build_generator()
    batch = make_batch(preset, args.batch)

    def forward_only() -> None:
        with torch.inference_mode():
            loss_fn(textsynch, generator, batch)

    baseline = timed(forward_only, args.steps)
    rows = [("forward only (baseline)", baseline)]
    for stage in (Stage.ENCODER, Stage.GENERATOR):
        params = set_trainable(textsynch, generator, stage)
        opt = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.95), weight_decay=1e-6)

        def train_step(opt=opt, params=params) -> None:
            opt.zero_grad(set_to_none=True)
            loss_fn(textsynch, generator, batch).backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()

        rows.append((f"train step, stage {stage.value}", timed(train_step, args.steps)))

    print(f"preset {preset.name}, batch {args.batch}, {torch.get_num_threads()} threads, median of {args.steps}")
    print(f"{'measurement':<28} {'s/step':>8} {'ratio':>7}")
    for name, secs in rows:
        print(f"{name:<28} {secs:>8.3f} {secs / baseline:>7.2f}")


if __name__ == "__main__":
    main()
