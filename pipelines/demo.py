"""``selva demo`` (what ``make demo`` runs): the main job from clips to scored audio, on the embedded
default, with no downloads.

1. **The synthetic proof, short version** (``selva benchmark synth --quick``): a world of flashing,
   sounding squares as mp4 files -> ``selva precompute`` (local Ray) -> ``selva train`` (pretrain, then
   SELVA's two stages and the two ablations, one seed, few steps) -> ``selva generate --manifest`` on
   held-out composites -> the score table (sync, distractor sync, selectivities). The full comparison
   (three seeds, more steps) is the same command without ``--quick`` (docs/benchmarks.md).
2. **The two real VGGSound clips**, when ``../shared/data/real`` is beside the checkout (or ``--input``
   names a clip table): precompute -> a few training steps -> generate each clip's sound from its label.
   A user who cloned the project alone has no such folder; the demo then says so and skips this part.
3. Where everything is: shards, the MLflow store and its ``mlflow ui`` command, the generated files,
   the table.

Rerunning with the same ``--out`` resumes: finished steps are skipped.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pipelines.synth_benchmark import SynthBenchmarkConfig

DEFAULT_INPUT = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "real" / "videos.tsv"
REAL_TRAIN_STEPS = 20


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "demo", help="run the main job end to end on the embedded default (no downloads)",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--input", default=str(DEFAULT_INPUT),
                   help="clip table of real clips (default: the two real clips in ../shared, if there)")
    p.add_argument("--out", default="demo-out", help="output folder (default demo-out/)")
    p.set_defaults(func=run)
    return p


def real_clips(table: Path, out: Path, uri: str, config: SynthBenchmarkConfig, log: Any = print) -> list[Path]:
    """Precompute ``table``'s clips, train ``REAL_TRAIN_STEPS`` pretrain steps on them, generate each clip's
    sound from its own label; returns the generated flac files."""
    from pipelines.precompute import PrecomputeConfig, run_precompute
    from pipelines.synth_benchmark import generate_into, run_logged, train_command
    from preprocessing.shards import read_dataset_info
    from training.generate_batch import items_from_table

    dataset, run = out / "dataset", out / "run"
    report = run_precompute(PrecomputeConfig(input=str(table), out=str(dataset), workers=2, progress=False))
    samples = read_dataset_info(dataset).ok_samples  # this run's and before
    log(f"  precompute: {samples} clips in shards, {report.failed} failed this run -> {dataset}")
    if samples == 0:
        return []
    if not (run / "final" / "export.json").is_file():
        settings = replace(config, batch_size=min(config.batch_size, samples))
        run_logged(train_command(settings, dataset, run, "pretrain", REAL_TRAIN_STEPS, 0, uri, "real-clips"),
                   run, "training on the real clips", settings.threads)
    log(f"  trained {REAL_TRAIN_STEPS} steps (a few: the point is that every stage runs) -> {run / 'final'}")
    items, rejected = items_from_table(table)
    for line in rejected:
        log(f"  rejected: {line}")
    generated = out / "generated"
    report = generate_into(run / "final", items, generated, steps=10, cfg=4.5, threads=config.threads)
    for line in report.failures:
        log(f"  failed: {line}")
    return sorted(generated.rglob("*.flac"))


def run(args: argparse.Namespace) -> int:
    from pipelines.synth_benchmark import QUICK

    return run_demo(Path(args.out), Path(args.input), QUICK)


def run_demo(out: Path, table: Path, config: SynthBenchmarkConfig) -> int:
    """The demo with ``config`` as its synthetic benchmark (``QUICK`` from the command line; the tests give a
    smaller one). Exit code 0, or 1 when real clips were given and none could be generated."""
    from pipelines.synth_benchmark import SynthBenchmark
    from pipelines.synth_report import markdown

    started = time.perf_counter()
    print(f"[1/3] the synthetic proof, short version: selva benchmark synth --quick --out {out / 'synth'}")
    bench = SynthBenchmark(out / "synth", config, log=lambda line: print(f"  {line}", flush=True))
    results = bench.run()

    generated: list[Path] = []
    if table.is_file():
        print(f"[2/3] the real clips of {table}: precompute -> train {REAL_TRAIN_STEPS} steps -> generate")
        generated = real_clips(table, out / "real", bench.tracking_uri, config,
                               log=lambda line: print(line, flush=True))
    else:
        print(f"[2/3] skipped: no real clips at {table} (clone with ../shared beside the checkout, or pass "
              "--input TABLE with your own clips)")

    print("[3/3] where everything is")
    synth = out / "synth"
    print(f"  clips and test set:   {synth / 'world'}")
    print(f"  shards:               {synth / 'dataset' / 'shards'}" + (
        f", {out / 'real' / 'dataset' / 'shards'}" if generated else ""))
    print(f"  exports:              {synth / 'runs'}/*/final")
    print(f"  generated audio:      {synth / 'generated'}" + (f", {out / 'real' / 'generated'}" if generated else ""))
    print(f"  MLflow store:         {synth / 'mlflow.db'}   (mlflow ui --backend-store-uri {bench.tracking_uri})")
    print(f"  score table:          {synth / 'results.md'}")
    print()
    print(markdown(results), end="")
    print(f"done in {time.perf_counter() - started:.0f} s")
    return 0 if not table.is_file() or generated else 1

