"""Learning on the generated training world: does each stage's loss drop, and does the model use its conditions?

Writes a world dataset (``pipelines.train_world``: K=4 kinds, each clip's square flashes at its event
frames and its kind's tone sounds exactly then; prompts name the kind), then runs the real trainer,
one subprocess per stage (``python -m training.train --config configs/train/tiny.yaml ...``), for the
chain ``pretrain`` -> ``encoder`` (stage 1, both modules from pretrain) -> ``generator`` (stage 2,
TextSynch from stage 1, generator from pretrain). Each stage's training loss per step comes from its
last checkpoint's ``trainer-rank00000.json``; the table gives the mean of the first and last 20 steps.

After each stage its export (``out/final``, EMA weights) is evaluated on the val split, in eval mode,
with fixed draws (``training.objective.draw(keys, shape, seed=r, micro_step=-1, cfg_dropout=0)`` for
r in ``range(--draws)``), the flow-matching loss per sample averaged over the draws, under:

* ``true``: the sample's own video (``MixConfig(prob=0)``: normalised only) and prompt;
* ``prompt shuffled``: the t5 / t5_mask / clip_text of another sample of the batch with a *different*
  kind (a derangement), the video kept;
* ``video shuffled``: the frames of another sample of the batch with a different kind (colour and
  timing wrong), the prompt kept;
* ``video shuffled, same kind``: the frames of the other sample of the same kind (colour right,
  event timing wrong): whether the model follows the flashes at all;
* ``mixed, true prompt`` / ``mixed, partner's prompt``: every sample mixed (``MixConfig(prob=1)``,
  a fixed mixing generator) with a partner of another prompt; the target keeps its latent, the
  condition is its own prompt or the partner's. Selecting the prompted object is what stage 1 learns.

Margins are paired per clip: (condition − true) averaged over the clip's draws, mean ± standard error
over the val clips, and the share of clips where the condition's loss is higher.

    PYTHONPATH=. OMP_NUM_THREADS=2 .venv/bin/python benchmarks/train_learning.py --out /tmp/learn
    ... --steps 800 300 300 --batch 8 --lr 1e-3   # the defaults (docs/benchmarks.md)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

STAGES = ("pretrain", "encoder", "generator")
CONDITIONS = ("true", "prompt_shuffled", "video_shuffled", "video_same_kind", "mixed_true", "mixed_partner")
LABELS = {
    "true": "true conditions",
    "prompt_shuffled": "prompt shuffled (other kind)",
    "video_shuffled": "video shuffled (other kind)",
    "video_same_kind": "video shuffled (same kind: timing only)",
    "mixed_true": "mixed clip, true prompt",
    "mixed_partner": "mixed clip, partner's prompt",
}
# (condition, reference): the paired margins reported
MARGINS = (("prompt_shuffled", "true"), ("video_shuffled", "true"), ("video_same_kind", "true"),
           ("mixed_partner", "mixed_true"))
EDGE = 20  # steps averaged at each end of a loss curve
EVAL_BATCH = 8
EVAL_MIX_SEED = 12345  # the fixed mixing generator of the mixed val batches


# ------------------------------------------------------------------------------------------- training
def stage_command(stage: str, dataset: Path, outs: dict[str, Path], args: argparse.Namespace) -> list[str]:
    inits = {
        "pretrain": [],
        "encoder": [f"init.textsynch={outs['pretrain'] / 'final'}", f"init.generator={outs['pretrain'] / 'final'}"],
        "generator": [f"init.textsynch={outs['encoder'] / 'final'}", f"init.generator={outs['pretrain'] / 'final'}"],
    }
    steps = args.steps[STAGES.index(stage)]
    return [sys.executable, "-m", "training.train", "--config", "configs/train/tiny.yaml", f"dataset={dataset}",
            f"out={outs[stage]}", f"stage={stage}", f"steps={steps}", f"checkpoint_every={steps}",
            "keep_checkpoints=1", f"log_every={max(10, steps // 10)}", f"loader.batch_size={args.batch}",
            f"loader.num_workers={args.workers}", f"optim.lr={args.lr}", f"optim.warmup_steps={args.warmup}",
            f"ema.snapshot_every={max(1, steps // 10)}", "validation.batches=0", "validation.audio_clips=0",
            f"run_name=learning-{stage}", *inits[stage], *args.extra]


def train_stage(stage: str, dataset: Path, outs: dict[str, Path], args: argparse.Namespace) -> dict:
    cmd = stage_command(stage, dataset, outs, args)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "SELVA_FAULT"))}
    env.update(PYTHONPATH=str(REPO_ROOT), OMP_NUM_THREADS=str(args.threads), TQDM_DISABLE="1", PYTHONUNBUFFERED="1")
    print("$ " + " ".join(cmd[1:]), file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    result = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    out = outs[stage]
    out.mkdir(parents=True, exist_ok=True)
    (out / "stdout.txt").write_text(result.stdout)
    (out / "stderr.txt").write_text(result.stderr)
    if result.returncode != 0:
        raise SystemExit(f"{stage} failed (exit {result.returncode}):\n{result.stderr[-3000:]}")
    ckpts = sorted((out / "checkpoints").glob("step-*/trainer-rank00000.json"))
    losses = json.loads(ckpts[-1].read_text())["losses"]
    first, last = losses[:EDGE], losses[-EDGE:]
    return {"steps": len(losses), "wall_s": wall, "losses": losses,
            "first20": float(np.mean(first)), "last20": float(np.mean(last)),
            "first20_sd": float(np.std(first, ddof=1)), "last20_sd": float(np.std(last, ddof=1))}


# ------------------------------------------------------------------------------------------ evaluation
def derangement(kinds: list[str], rng: np.random.Generator, *, same: bool) -> list[int] | None:
    """A permutation p of the batch with kinds[p[i]] != kinds[i] (``same``: == and p[i] != i, but for a
    kind met once in the batch, whose samples keep p[i] == i and are left out of that condition), or None."""
    n = len(kinds)
    if same:  # a cycle within each kind
        p = list(range(n))
        for kind in sorted(set(kinds)):
            group = [int(i) for i in rng.permutation([i for i in range(n) if kinds[i] == kind])]
            for k, i in enumerate(group):
                p[i] = group[(k + 1) % len(group)]
        return p
    for _ in range(10000):
        p = rng.permutation(n)
        if all(kinds[p[i]] != kinds[i] for i in range(n)):
            return [int(x) for x in p]
    return None


def _take(batch: dict, keys: tuple[str, ...], index: list[int]) -> dict:
    return {**batch, **{k: batch[k][index] for k in keys}}


PROMPT_KEYS = ("t5", "t5_mask", "clip_text")


def evaluate(final: Path, stage: str, dataset: Path, draws: int) -> tuple[dict, int]:
    """Per-clip losses (averaged over ``draws`` fixed draws) under each condition, and the clip count."""
    from selva.mixing import MixConfig, apply_to_batch, mixing_generator
    from training.dataset_stats import configure_generator
    from training.export import load_export
    from training.loader import LoaderConfig, build_loader
    from training.objective import SelvaObjective, draw

    class FixedSync(SelvaObjective):
        """The objective's own loss, with the sync features computed once per condition, not per draw."""

        def sync_features(self, batch: dict) -> torch.Tensor:
            return batch["_sync"] if "_sync" in batch else super().sync_features(batch)

    textsynch, generator = load_export(final, "tiny")
    configure_generator(generator, dataset)
    textsynch.eval()
    generator.eval()
    objective = FixedSync(textsynch, generator, stage=stage, text_in_encoder=True, cfg_dropout=0.0, seed=0)
    loader = build_loader(dataset, LoaderConfig(batch_size=EVAL_BATCH, num_workers=0, shuffle_buffer=0, seed=0),
                          split="val", mix=None)
    rng = np.random.default_rng(0)
    per_clip: dict[str, dict[str, float]] = {c: {} for c in CONDITIONS}
    with torch.no_grad():
        for bi, batch in enumerate(loader.epoch_batches()):
            kinds = list(batch["text"])
            plain = apply_to_batch(batch, MixConfig(prob=0.0), mixing_generator(0, bi, 0))
            mixed = apply_to_batch(batch, MixConfig(prob=1.0, seed=EVAL_MIX_SEED),
                                   mixing_generator(EVAL_MIX_SEED, bi, 0))
            other, same = derangement(kinds, rng, same=False), derangement(kinds, rng, same=True)
            info = mixed["mix"]
            ok_mix = [bool(info.mixed[i]) for i in range(len(kinds))]
            partner = [int(info.partner[i]) if ok_mix[i] else i for i in range(len(kinds))]
            moved = {"true": None, "mixed_true": None, "mixed_partner": None, "prompt_shuffled": other,
                     "video_shuffled": other, "video_same_kind": same}
            conds = {"true": plain, "mixed_true": mixed, "mixed_partner": _take(mixed, PROMPT_KEYS, partner)}
            if other is not None:
                conds["prompt_shuffled"] = _take(plain, PROMPT_KEYS, other)
                conds["video_shuffled"] = _take(plain, ("video",), other)
            if same is not None:
                conds["video_same_kind"] = _take(plain, ("video",), same)
            shape = tuple(batch["latent_mean"].shape[1:])
            fixed = [draw(batch["key"], shape, r, -1, cfg_dropout=0.0) for r in range(draws)]
            for name, cond in conds.items():
                cond = {**cond, "_sync": objective.sync_features(cond)}
                total = torch.zeros(len(kinds), dtype=torch.float64)
                for d in fixed:
                    total += objective.loss(cond, -1, draws=d)[1].double().cpu()
                for i, key in enumerate(batch["key"]):
                    if name.startswith("mixed") and not ok_mix[i]:
                        continue  # no partner of another prompt in the batch: not a mixed clip
                    if moved[name] is not None and moved[name][i] == i:
                        continue  # the only sample of its kind in the batch: nothing to swap with
                    per_clip[name].setdefault(key, float(total[i]) / draws)
    n = len(per_clip["true"])
    return per_clip, n


def summarise(per_clip: dict[str, dict[str, float]]) -> dict:
    out: dict = {"mean": {}, "margins": {}}
    for name, values in per_clip.items():
        if values:
            out["mean"][name] = float(np.mean(list(values.values())))
    for cond, ref in MARGINS:
        keys = sorted(set(per_clip[cond]) & set(per_clip[ref]))
        if len(keys) < 2:
            continue
        d = np.array([per_clip[cond][k] - per_clip[ref][k] for k in keys])
        ref_mean = float(np.mean([per_clip[ref][k] for k in keys]))
        out["margins"][f"{cond}-{ref}"] = {
            "mean": float(d.mean()), "se": float(d.std(ddof=1) / math.sqrt(len(d))), "n": len(d),
            "higher_share": float((d > 0).mean()), "relative": float(d.mean()) / ref_mean,
        }
    return out


# ----------------------------------------------------------------------------------------------- report
def table(results: dict) -> str:
    lines = ["| stage | steps | train loss, first 20 | last 20 | drop | wall (train job) | eval |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for stage in STAGES:
        r = results["stages"].get(stage)
        if r is None:
            continue
        t = r["train"]
        lines.append(f"| {stage} | {t['steps']} | {t['first20']:.3f} ± {t['first20_sd']:.3f} | "
                     f"{t['last20']:.3f} ± {t['last20_sd']:.3f} | {1 - t['last20'] / t['first20']:.0%} | "
                     f"{t['wall_s']:.0f} s | {r['eval_s']:.0f} s |")
    lines += ["", "Val loss (mean over clips of the mean over draws) after each stage:", "",
              "| condition | " + " | ".join(s for s in STAGES if s in results["stages"]) + " |",
              "|---|" + "---:|" * len(results["stages"])]
    for name in CONDITIONS:
        row = [f"{results['stages'][s]['eval']['mean'].get(name, float('nan')):.4f}" for s in STAGES
               if s in results["stages"]]
        lines.append(f"| {LABELS[name]} | " + " | ".join(row) + " |")
    lines += ["", "Paired margins, (condition − reference) per clip: mean ± s.e. (share of clips higher; "
              "relative to the reference):", "",
              "| margin | " + " | ".join(s for s in STAGES if s in results["stages"]) + " |",
              "|---|" + "---:|" * len(results["stages"])]
    for cond, ref in MARGINS:
        cells = []
        for s in STAGES:
            if s not in results["stages"]:
                continue
            m = results["stages"][s]["eval"]["margins"].get(f"{cond}-{ref}")
            cells.append("n/a" if m is None else
                         f"{m['mean']:+.4f} ± {m['se']:.4f} ({m['higher_share']:.0%}; {m['relative']:+.1%})")
        lines.append(f"| {LABELS[cond]} − {LABELS[ref].split(',')[0] if ref == 'true' else 'true prompt'} | "
                     + " | ".join(cells) + " |")
    lines += stage_changes(results)
    return "\n".join(lines)


def _paired(a: dict[str, float], b: dict[str, float]) -> dict | None:
    """(a − b) over the clips both hold: mean, s.e., count, share of clips where a is lower."""
    keys = sorted(set(a) & set(b))
    if len(keys) < 2:
        return None
    d = np.array([a[k] - b[k] for k in keys])
    ref = float(np.mean([b[k] for k in keys]))
    return {"mean": float(d.mean()), "se": float(d.std(ddof=1) / math.sqrt(len(d))), "n": len(d),
            "lower_share": float((d < 0).mean()), "relative": float(d.mean()) / ref}


def stage_changes(results: dict) -> list[str]:
    """Val loss of each stage's export minus that of the weights it started from, paired per clip (the
    same clips, draws and mixes): stage 1 starts from pretrain's export, stage 2 from stage 1's (its
    TextSynch, and the pretrain generator that stage 1 left unchanged)."""
    stages = results["stages"]
    pairs = [(s, p) for s, p in (("encoder", "pretrain"), ("generator", "encoder")) if s in stages and p in stages]
    if not pairs:
        return []
    lines = ["", "Val loss change over each stage, paired per clip (export − the weights the stage started "
             "from): mean ± s.e. (share of clips lower; relative):", "",
             "| condition | " + " | ".join(s for s, _ in pairs) + " |", "|---|" + "---:|" * len(pairs)]
    for name in ("true", "mixed_true"):
        cells = []
        for s, p in pairs:
            m = _paired(stages[s]["eval"]["per_clip"][name], stages[p]["eval"]["per_clip"][name])
            cells.append("n/a" if m is None else
                         f"{m['mean']:+.4f} ± {m['se']:.4f} ({m['lower_share']:.0%}; {m['relative']:+.1%})")
        lines.append(f"| {LABELS[name]} | " + " | ".join(cells) + " |")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="a new folder: the world and the three runs")
    parser.add_argument("--train", type=int, default=64, help="train clips of the world")
    parser.add_argument("--val", type=int, default=32, help="val clips of the world")
    parser.add_argument("--steps", type=int, nargs=3, default=[800, 300, 300], metavar=("PRETRAIN", "ENCODER", "GEN"))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--workers", type=int, default=0, help="loader.num_workers of the jobs")
    parser.add_argument("--threads", type=int, default=2, help="OMP_NUM_THREADS of the jobs")
    parser.add_argument("--draws", type=int, default=8, help="fixed draws per val clip and condition")
    parser.add_argument("--stages", nargs="+", default=list(STAGES), choices=STAGES,
                        help="stages to run (earlier ones must already be in --out)")
    parser.add_argument("--extra", nargs="*", default=[], help="more key=value overrides for every job")
    parser.add_argument("--json", type=Path, help="where to write the results (default: OUT/learning.json)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if min(args.steps) < 2 * EDGE:
        print(f"note: a stage of fewer than {2 * EDGE} steps: its first and last {EDGE} steps overlap, so the "
              "train-loss drop of that stage reads low", file=sys.stderr)

    from pipelines.train_world import write_train_world

    t_all = time.perf_counter()
    dataset = args.out / "world"
    results: dict = {"settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                     "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores",
                     "stages": {}}
    path = args.json or args.out / "learning.json"
    if path.is_file():  # stages of an earlier call into the same folder (--stages runs a part of the chain)
        results["stages"] = {s: r for s, r in json.loads(path.read_text())["stages"].items() if s not in args.stages}
    t0 = time.perf_counter()
    if not (dataset / "dataset.json").is_file():
        write_train_world(dataset, train=args.train, val=args.val, samples_per_shard=EVAL_BATCH)
    results["world_s"] = time.perf_counter() - t0
    outs = {s: args.out / s for s in STAGES}
    for stage in args.stages:
        train = train_stage(stage, dataset, outs, args)
        t0 = time.perf_counter()
        per_clip, n = evaluate(outs[stage] / "final", stage, dataset, args.draws)
        results["stages"][stage] = {"train": train, "eval": {**summarise(per_clip), "clips": n,
                                                            "per_clip": per_clip},
                                    "eval_s": time.perf_counter() - t0}
        print(f"{stage}: train {train['first20']:.3f} -> {train['last20']:.3f} in {train['wall_s']:.0f} s; "
              f"eval {results['stages'][stage]['eval']['mean']}", file=sys.stderr, flush=True)
        path.write_text(json.dumps(results, indent=1))
    results["total_s"] = time.perf_counter() - t_all
    text = table(results)
    print(text)
    print(f"\nworld {results['world_s']:.0f} s, total {results['total_s']:.0f} s, {results['machine']}")
    path.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
