"""``selva evaluate``: arguments, the checks made before any work, the printed summary, MLflow."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the job's modules import torch and PyAV: only when the subcommand runs (fast --help)
    from training.evaluate_data import Pairing

EXPERIMENT = "selva-evaluate"
TRACKING_DEADLINE_S = 10.0  # the most a finished evaluation waits for its tracking at exit

#: the file (or folder, for clap) each embedder looks for under --weights DIR when given no path
DEFAULT_WEIGHTS = {
    "clap": "laion-clap-htsat-base",
    "passt": "passt-s-f128-p16-s10-ap.476-swa.pt",
    "panns": "Cnn14_16k_mAP=0.438.pth",
    "vggish": "vggish-10086976.pth",
    "imagebind": "imagebind_huge.pth",
    "desync": "synchformer_state_dict.pth",
}

DESCRIPTION = """\
Score generated audio against references with the metrics av-benchmark defines (FD, KL, IS on
PaSST; FD on VGGish frames; the LAION-CLAP score against each prompt) plus KAD, from local
embedder weights only.

Every generated file must pair with a reference by name; unpaired, duplicated and unreadable files
are listed, all of them, and nothing is computed. A reference folder in the benchmark layout
(REF/<subset>/target_audio, metadata.csv) expects GEN/<subset>/<name>.flac and reports every metric
overall, per subset and per placement. Embedders: NAME=PATH, or NAME alone with --weights DIR
holding its default name (docs/evaluate.md). Exit status 1 when a metric could not be computed
(each cause on one line; the others are still written).
"""


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "evaluate", help="generated audio vs references -> metrics.json (FD, KL, IS, KAD, CLAP score)",
        description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--generated", required=True,
                   help="folder of generated .flac/.wav (GEN/<subset>/<name> for a benchmark reference)")
    p.add_argument("--reference", required=True, help="folder of reference audio, or a benchmark root")
    p.add_argument("--metadata", help="file_name,label table: the prompts of a flat reference folder")
    p.add_argument("--videos", help="folder of <name>.mp4 input videos of a flat reference (IB-Score, DeSync)")
    p.add_argument("--embedders", nargs="+", metavar="NAME[=PATH]",
                   help=f"embedders to use, of {', '.join(DEFAULT_WEIGHTS)} (default: every available one whose "
                        "default file is under --weights)")
    p.add_argument("--weights", help="folder holding the embedders' weights under their default names")
    p.add_argument("--out", required=True, help="metrics.json to write")
    p.add_argument("--duration", type=float, default=8.0,
                   help="seconds of each file to score, as av-benchmark's --audio_length (default 8; shorter "
                        "files are not padded)")
    p.add_argument("--batch-size", dest="batch_size", type=int, default=16, help="files per embedder call")
    p.add_argument("--device", default="auto", help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    p.add_argument("--mlflow", action="store_true", help="log the metrics to MLflow (never blocks the job)")
    p.add_argument("--mlflow-uri", dest="mlflow_uri",
                   help="tracking URI (default: MLFLOW_TRACKING_URI, else sqlite mlflow.db next to --out)")
    p.set_defaults(func=run)
    return p


def resolve_embedders(specs: list[str] | None, weights_dir: str | None) -> list[tuple[str, str | None]]:
    """``NAME=PATH`` / ``NAME`` specs -> [(name, path or None)], checked; every problem on one line
    each, raised together as EvaluationError before anything is loaded."""
    from training.embedders import AVAILABLE, EmbedderUnavailable, check_embedder
    from training.evaluate_data import EvaluationError

    root = Path(weights_dir) if weights_dir else None
    if specs is None:
        if root is None:
            raise EvaluationError("name the embedders: --embedders NAME=PATH ..., or --weights DIR holding "
                                  f"{', '.join(DEFAULT_WEIGHTS[n] for n in AVAILABLE)}")
        chosen = [(n, str(root / DEFAULT_WEIGHTS[n])) for n in AVAILABLE if (root / DEFAULT_WEIGHTS[n]).exists()]
        if not chosen:
            names = ", ".join(DEFAULT_WEIGHTS[n] for n in AVAILABLE)
            raise EvaluationError(f"--weights {root} holds none of {names}")
        specs = [f"{n}={p}" for n, p in chosen]
    resolved: list[tuple[str, str | None]] = []
    problems = []
    for spec in specs:
        name, _, path = spec.partition("=")
        name = name.strip().lower()
        if not path and root is not None and name in DEFAULT_WEIGHTS:
            path = str(root / DEFAULT_WEIGHTS[name])
        if name in (n for n, _ in resolved):
            problems.append(f"{name}: given twice")
            continue
        try:
            check_embedder(name, path or None)
        except EmbedderUnavailable as err:
            problems.append(str(err))
        resolved.append((name, path or None))
    if problems:
        raise EvaluationError("\n".join([f"{len(problems)} embedder(s) cannot be used:",
                                         *(f"  {p}" for p in problems)]))
    return resolved


def _device(name: str) -> str:
    if name != "auto":
        return name
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def run(args: argparse.Namespace) -> int:
    from training.embedders import load_embedder
    from training.evaluate import Report, compute_metrics, run_embedders, write_json
    from training.evaluate_data import lengths_summary, pair_files

    embedders = resolve_embedders(args.embedders, args.weights)
    pairing = pair_files(args.generated, args.reference, args.metadata, args.videos)
    if any(name == "clap" for name, _ in embedders):
        _require_prompts(pairing, args.metadata)
    seconds = pairing.seconds
    Path(args.out).resolve().parent.mkdir(parents=True, exist_ok=True)  # the default MLflow store lives there
    tracker = _start_tracking(args, pairing, embedders) if args.mlflow else None
    status = "FAILED"
    try:
        device = _device(args.device)
        models = [load_embedder(name, path, device, args.batch_size) for name, path in embedders]
        runs = run_embedders(pairing, models, args.duration, args.progress)
        report = Report(pairing, str(Path(args.generated).resolve()), str(Path(args.reference).resolve()),
                        args.duration, runs)
        short = sorted(str(p) for p, s in seconds.items() if s + 1e-9 < args.duration)
        if short:  # av-benchmark scores them as they are; say so, the value may be meant otherwise
            report.notes.append(f"{len(short)} file(s) shorter than --duration {args.duration:g} s are scored "
                                f"unpadded (first: {short[0]})")
        compute_metrics(report)
        payload = report.as_json()
        payload["lengths"] = {"generated": lengths_summary(seconds[it.generated] for it in pairing.items),
                              "reference": lengths_summary(seconds[it.reference] for it in pairing.items)}
        write_json(args.out, payload)
        print(summary_table(report))
        print(f"wrote {args.out}")
        for line in report.errors:
            print(f"error: {line}", file=sys.stderr)
        if tracker is not None:
            tracker.log_metrics(report.flat_metrics())
            tracker.log_artifact(args.out)
        status = "FINISHED"
        return 1 if report.errors else 0
    finally:
        _finish_tracking(tracker, status)


def _require_prompts(pairing: Pairing, metadata: str | None) -> None:
    from training.evaluate_data import EvaluationError

    missing = [it for it in pairing.items if not it.prompt]
    if not missing:
        return
    where = ("its subset's metadata.csv" if pairing.layout == "benchmark"
             else f"--metadata {metadata}" if metadata else "a --metadata file_name,label table (none given)")
    raise EvaluationError("\n".join([f"the CLAP score needs a prompt for every file; {len(missing)} have none in "
                                     f"{where}:", *(f"  {it.key}" for it in missing)]))


def summary_table(report) -> str:
    """One row per metric, one column per group: what a person reads after the run."""
    groups = list(report.metrics)
    names = list(dict.fromkeys(name for entries in report.metrics.values() for name in entries))
    width = max(len(n) for n in names) if names else 6
    lines = [f"{'metric':<{width}}  " + "  ".join(f"{g:>22}" for g in groups)]
    for name in names:
        cells = []
        for g in groups:
            entry = report.metrics[g].get(name, {})
            cells.append(f"{entry['value']:>22.4f}" if "value" in entry else f"{'error' if entry else '-':>22}")
        lines.append(f"{name:<{width}}  " + "  ".join(cells))
    return "\n".join(lines)


def _start_tracking(args: argparse.Namespace, pairing: Pairing, embedders: list[tuple[str, str | None]]):
    from training.tracking import Tracker, TrackingConfig

    out_dir = Path(args.out).resolve().parent
    uri = args.mlflow_uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{out_dir / 'mlflow.db'}"
    # with the default sqlite store next to the output, artifacts go beside it, not to ./mlruns
    artifacts = (out_dir / "mlartifacts").as_uri() if uri.startswith("sqlite:") else None
    tracker = Tracker(TrackingConfig(uri=uri, artifact_location=artifacts))
    params = {"generated": str(Path(args.generated).resolve()), "reference": str(Path(args.reference).resolve()),
              "layout": pairing.layout, "pairs": len(pairing.items), "duration_s": args.duration,
              "out": str(Path(args.out).resolve())}
    params.update({f"embedder.{name}": str(Path(path).resolve()) for name, path in embedders if path})
    tracker.start_run(EXPERIMENT, f"evaluate {Path(args.generated).resolve().name}", params=params)
    return tracker


def _finish_tracking(tracker, status: str) -> None:
    if tracker is None:
        return
    summary = tracker.close(TRACKING_DEADLINE_S, status)
    problem = summary.problem(TRACKING_DEADLINE_S)
    if problem:
        print(f"warning: {problem}; metrics.json is not affected", file=sys.stderr)
    else:
        print(f"logged to MLflow at {summary.uri} (run {summary.run_id})")
