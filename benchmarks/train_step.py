"""What DeepSpeed costs per training step, and how much of a step waits on data.

    .venv/bin/python benchmarks/train_step.py [--preset tiny] [--stage encoder] [--batch 8] [--steps 20]
                                              [--dataset DIR]

(a) **Step overhead.** The real ``Trainer.train_step`` (DeepSpeed engine, ZeRO stage as configured,
1-process gloo world, torch AdamW) against a plain PyTorch loop doing the same work: the same modules
built the same way (same seed), ``SelvaObjective.loss``, ``loss.backward()``, ``clip_grad_norm_(1.0)``,
``torch.optim.AdamW`` with the same hyper-parameters (``foreach=False`` as in training/engine.py). Both
see the same fixed batches (taken once from the real loader, mixing on) and the same micro-step
indices, in interleaved repetitions (the order alternates). The two models must stay equal: the
largest parameter difference after the run is printed as a check that the work is the same. A phase
table (forward / backward / step) says where any overhead goes; the run loop's own extras (the
per-step all-reduce of loss and flags, the EMA update) are timed apart and are not in the ratio.

(b) **Data-wait share.** A fresh Trainer on the real loader (``training.train_data.build_batches``,
``--workers`` workers, mixing p 0.5 on every stage): the time ``train_step`` waits on the next batch
over the total step time, for ``--steps`` steps after ``--warmup`` warm-up steps (the trainer's
``train/data_wait_share`` metric, measured the same way).

Without ``--dataset`` the training world (pipelines/train_world.py, 16 train clips) is generated into
a temporary folder. Prints tables; record results in docs/benchmarks.md. Not a test: no thresholds.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import tempfile
import time
from pathlib import Path

import torch

from selva.mixing import MixConfig
from training.engine import init_world
from training.objective import SelvaObjective, set_stage_trainable
from training.train_config import load_config
from training.train_data import build_batches
from training.train_models import build_models
from training.trainer import Trainer

CONFIG = Path(__file__).resolve().parent.parent / "configs" / "train" / "tiny.yaml"


class PlainLoop:
    """The baseline: the trainer's modules and loss, trained by hand."""

    def __init__(self, cfg):
        torch.manual_seed(cfg.seed)  # as Trainer.__init__: the same fresh initialisation
        models = build_models(cfg)
        self.named = set_stage_trainable(models.textsynch, models.generator, cfg.stage,
                                         pretrain_backbone=cfg.pretrain_backbone)
        self.params = [p for _, p in self.named]
        self.objective = SelvaObjective(models.textsynch, models.generator, stage=cfg.stage,
                                        text_in_encoder=cfg.text_in_encoder, cfg_dropout=cfg.cfg_dropout,
                                        seed=cfg.seed)
        o = cfg.optim
        self.clip = o.grad_clip
        self.optimizer = torch.optim.AdamW(self.params, lr=o.lr, betas=tuple(o.betas), eps=o.eps,
                                           weight_decay=o.weight_decay, foreach=False)
        self.phases = {"forward": [], "backward": [], "step": []}

    def step(self, batch: dict, micro_step: int) -> float:
        t0 = time.perf_counter()
        loss, _, _ = self.objective.loss(batch, micro_step)
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(self.params, self.clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        t3 = time.perf_counter()
        for name, dt in zip(self.phases, (t1 - t0, t2 - t1, t3 - t2), strict=True):
            self.phases[name].append(dt)
        return float(loss.detach())


def deepspeed_phases(trainer: Trainer, batch: dict, micro_step: int, phases: dict) -> None:
    """One step through the same three engine calls as ``Trainer.train_step``, each timed."""
    t0 = time.perf_counter()
    loss, _, _ = trainer.engine(batch, micro_step)
    t1 = time.perf_counter()
    trainer.engine.backward(loss)
    t2 = time.perf_counter()
    trainer.engine.step()
    float(loss.detach())
    t3 = time.perf_counter()
    for name, dt in zip(phases, (t1 - t0, t2 - t1, t3 - t2), strict=True):
        phases[name].append(dt)


def ms(values: list[float]) -> float:
    return 1000 * statistics.median(values)


def overhead(cfg, world, args, batches: list[dict]) -> None:
    trainer = Trainer(cfg, world, batches=itertools.cycle(batches))
    plain = PlainLoop(cfg)
    ds_t, plain_t, extras_t = [], [], []
    ds_phases = {"forward": [], "backward": [], "step": []}
    for i in range(args.warmup + args.steps):
        batch = batches[i % len(batches)]
        order = ("ds", "plain") if i % 2 == 0 else ("plain", "ds")
        for who in order:
            t0 = time.perf_counter()
            if who == "ds":
                trainer.step = i  # the micro-step index the plain loop gets too
                loss, _ = trainer.train_step()
                t1 = time.perf_counter()
                trainer._agree(loss, False)  # the rest of Trainer.run's per-step work
                if trainer.ema is not None:
                    trainer.ema.update(i + 1)
                if i >= args.warmup:
                    ds_t.append(t1 - t0)
                    extras_t.append(time.perf_counter() - t1)
            else:
                plain.step(batch, i)
                if i >= args.warmup:
                    plain_t.append(time.perf_counter() - t0)
    diff = max(float((p - q).detach().abs().max()) for (_, p), (_, q) in zip(trainer.named, plain.named, strict=True))
    norm = trainer.engine.get_global_grad_norm()

    # where the time goes: the engine's three calls against the plain loop's three phases, interleaved
    plain.phases = {k: [] for k in ds_phases}
    n = trainer.step + 1
    for i in range(n, n + args.steps):
        batch = batches[i % len(batches)]
        deepspeed_phases(trainer, batch, i, ds_phases)
        plain.step(batch, i)

    base = ms(plain_t)
    print(f"\n(a) step overhead: preset {cfg.preset}, stage {cfg.stage}, batch {cfg.loader.batch_size}, "
          f"ZeRO-{cfg.zero_stage}, {torch.get_num_threads()} torch threads, median of {args.steps} "
          f"interleaved steps after {args.warmup} warm-up")
    print(f"{'measurement':<44} {'ms/step':>9} {'ratio':>7}")
    print(f"{'plain PyTorch loop (baseline)':<44} {base:>9.1f} {1.0:>7.3f}")
    print(f"{'Trainer.train_step (DeepSpeed)':<44} {ms(ds_t):>9.1f} {ms(ds_t) / base:>7.3f}")
    print(f"{'  + run loop extras (all-reduce, EMA)':<44} {ms(extras_t):>9.1f} {ms(extras_t) / base:>7.3f}")
    print(f"overhead (median ratio - 1): {100 * (ms(ds_t) / base - 1):+.1f}%; "
          f"(sum ratio - 1): {100 * (sum(ds_t) / sum(plain_t) - 1):+.1f}%")
    print(f"same work: max |param difference| after {args.warmup + args.steps} steps = {diff:.2e}; "
          f"engine.get_global_grad_norm() = {norm}")
    print(f"\nphases, median ms over {args.steps} steps  {'DeepSpeed':>10} {'plain':>9} {'diff':>8}")
    for name in ds_phases:
        d, p = ms(ds_phases[name]), ms(plain.phases[name])
        print(f"  {name:<36} {d:>10.1f} {p:>9.1f} {d - p:>+8.1f}")


def data_wait(cfg, world, args) -> None:
    trainer = Trainer(cfg, world)  # the real loader: build_batches with mixing
    step_s = 0.0
    for i in range(args.warmup + args.steps):
        if i == args.warmup:
            trainer.stats.reset()
            step_s = 0.0
        trainer.step = i
        t0 = time.perf_counter()
        trainer.train_step()
        step_s += time.perf_counter() - t0
    wait = trainer.stats.data_wait_s
    print(f"\n(b) data wait: real loader, {cfg.loader.num_workers} workers, mixing p {cfg.mixing.prob}, "
          f"{args.steps} steps after {args.warmup} warm-up")
    print(f"  step time {1000 * step_s / args.steps:.1f} ms/step, of which waiting on the next batch "
          f"{1000 * wait / args.steps:.1f} ms: data-wait share {wait / step_s:.3f} "
          f"({trainer.stats.samples / step_s:.1f} samples/s)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--stage", default="encoder", choices=("pretrain", "encoder", "generator"))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=20, help="measured steps (after --warmup)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--fixed-batches", type=int, default=4, help="distinct batches cycled in (a)")
    parser.add_argument("--dataset", type=Path, help="a dataset folder; default: generate the training world")
    parser.add_argument("--init-generator", default="", help="init.generator (e.g. a pretrain run's final/): a "
                        "fresh generator's zeroed output layer gives stage encoder an exactly zero gradient")
    parser.add_argument("--only", choices=("overhead", "data-wait"), help="run one part only")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="train-step-") as tmp:
        dataset = args.dataset
        if dataset is None:
            from pipelines.train_world import write_train_world

            t0 = time.perf_counter()
            dataset = Path(tmp) / "world"
            write_train_world(dataset, train=16, val=8)
            print(f"generated the training world in {time.perf_counter() - t0:.1f} s: {dataset}")
        cfg = load_config(CONFIG, [
            f"dataset={dataset}", f"out={tmp}/out", f"preset={args.preset}", f"stage={args.stage}",
            f"loader.batch_size={args.batch}", f"loader.num_workers={args.workers}",
            "mixing.enabled=true", "mixing.prob=0.5", "optim.warmup_steps=0",
            f"init.generator={args.init_generator}",
        ])
        world = init_world(cfg)
        if args.only != "data-wait":
            source = build_batches(cfg, rank=0, world_size=1, device=world.device,
                                   mix=MixConfig(prob=cfg.mixing.prob, seed=cfg.seed))
            batches = [next(source) for _ in range(args.fixed_batches)]
            del source
            overhead(cfg, world, args, batches)
        if args.only != "overhead":
            cfg.out = f"{tmp}/out-data"
            data_wait(cfg, world, args)
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
