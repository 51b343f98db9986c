"""``selva benchmark build``: the command line of ``training.benchmark_build`` (docs/benchmark.md)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from training.benchmark_plan import DEFAULT_PARTNERS


def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "benchmark",
        help="build a VGG-MonoAudio-style test set, or run the synthetic proof (synth)",
        description="Test sets for selective generation: two single-source clips side by side, the model "
        "asked for one of them by its label (docs/benchmark.md).",
    )
    actions = parser.add_subparsers(dest="benchmark_command", metavar="ACTION")
    build = actions.add_parser(
        "build",
        help="composites, references and metadata from a table of single-source clips",
        description="Write DIR/intra_class/ and DIR/inter_class/ (mixed/*.mp4, target_audio/*.flac, "
        "metadata.csv) from a clip table (id, label, optional path, start, duration, category). "
        "intra_class pairs need the category column: same category, different label. Rows that cannot "
        "be used are printed, listed in DIR/rejected.csv, and skipped.",
    )
    build.add_argument("--clips", required=True, metavar="TABLE", help="clip table (TSV, CSV or Parquet)")
    build.add_argument("--out", required=True, metavar="DIR", help="benchmark folder to write")
    build.add_argument("--seed", type=int, default=0, help="partner choice seed (default 0)")
    build.add_argument("--duration", type=float, default=8.0, help="seconds per clip (default 8)")
    build.add_argument("--partners", type=int, default=DEFAULT_PARTNERS,
                       help=f"partners per target and subset (default {DEFAULT_PARTNERS}); a pair gives 2 composites")
    build.add_argument("--frame-size", type=int, default=224,
                       help="pixels per side of each half (even; default 224, the sync encoder's input)")
    build.add_argument("--sample-rate", type=int, default=16_000,
                       help="reference and composite audio rate in Hz: the model's (default 16000; 44100 for the "
                            "44.1 kHz presets)")
    build.add_argument("--media-root", help="where relative paths resolve (default: the table's folder)")
    build.add_argument("--text-column", help="the prompt column when the table has several")
    build.add_argument("--reciprocal", action="store_true",
                       help="ask every composite for each of its two objects (a drawn pair A-B also gives B-A)")
    build.set_defaults(func=_run_build)
    _add_synth(actions)
    parser.set_defaults(func=lambda args: (parser.print_help(), 2)[1])


def _run_build(args: argparse.Namespace) -> int:
    from training.benchmark_build import BuildOptions, build_benchmark

    options = BuildOptions(
        duration=args.duration, seed=args.seed, partners=args.partners, frame_size=args.frame_size,
        media_root=args.media_root, text_column=args.text_column, reciprocal=args.reciprocal,
        sample_rate=args.sample_rate,
    )  # fmt: skip
    result = build_benchmark(args.clips, args.out, options)
    total = sum(result.items.values())
    print(f"{result.out}: {result.clips} clips -> " + ", ".join(f"{k} {v}" for k, v in result.items.items())
          + f" composites; {len(result.rejected)} rows rejected (rejected.csv)")
    if total == 0:
        print("error: no composite could be built (need at least two usable clips with different labels)")
        return 1
    return 0


def _add_synth(actions: Any) -> None:
    synth = actions.add_parser(
        "synth",
        help="the synthetic proof: world -> precompute -> train (SELVA and two ablations) -> generate -> score",
        description="Run the whole comparison of docs/benchmarks.md in one folder: selva synth, selva precompute, "
        "selva train (pretrain once; per variant and seed its stages), selva generate --manifest on the held-out "
        "composites, and the scores (sync, distractor sync, selectivities) as DIR/results.md and .json plus one "
        "MLflow run per variant (DIR/mlflow.db). A killed run resumes when started again with the same options.",
    )
    synth.add_argument("--out", required=True, type=Path,
                       help="benchmark folder (new, or one made with the same options)")
    synth.add_argument("--quick", action="store_true", help="the short version make demo runs (1 seed, few steps)")
    synth.add_argument("--seeds", type=int, nargs="+", help="training seeds (default 0 1 2; --quick: 0)")
    synth.add_argument("--variants", nargs="+", help="variants to run (default: selva no_text_in_encoder no_mixing)")
    for name in ("pretrain", "encoder", "generator"):
        synth.add_argument(f"--{name}-steps", type=int, help=f"optimizer steps of stage {name}")
    synth.add_argument("--encoder-lr", type=float, help="learning rate of stage encoder (default 5e-3)")
    synth.add_argument("--encoder-mixing-prob", type=float,
                       help="share of mixed clips in stage encoder's batches (default 1.0)")
    synth.add_argument("--clips", type=int, help="training clips of the world")
    synth.add_argument("--test-clips", type=int, help="held-out clips (composites: 4 per clip and partner)")
    synth.add_argument("--sampling-steps", type=int, help="Euler steps of generation")
    synth.add_argument("--set", dest="extra", nargs="+", default=[], metavar="KEY=VALUE",
                       help="overrides for every training job, after the stage's own (e.g. optim.lr=2e-3)")
    synth.set_defaults(func=_run_synth)


def _run_synth(args: argparse.Namespace) -> int:
    from pipelines.synth_benchmark import QUICK, SynthBenchmark, SynthBenchmarkConfig, config_with
    from pipelines.synth_report import markdown

    config = config_with(QUICK if args.quick else SynthBenchmarkConfig(),
                         seeds=tuple(args.seeds) if args.seeds else None,
                         variants=tuple(args.variants) if args.variants else None,
                         pretrain_steps=args.pretrain_steps, encoder_steps=args.encoder_steps,
                         generator_steps=args.generator_steps, encoder_lr=args.encoder_lr,
                         encoder_mixing_prob=args.encoder_mixing_prob, clips=args.clips, test_clips=args.test_clips,
                         sampling_steps=args.sampling_steps, extra=tuple(args.extra) or None)  # fmt: skip
    results = SynthBenchmark(args.out, config).run()
    print(markdown(results), end="")
    print(f"results: {args.out / 'results.md'}, {args.out / 'results.json'}; runs: mlflow ui --backend-store-uri "
          f"sqlite:///{(args.out / 'mlflow.db').resolve()}")
    return 0
