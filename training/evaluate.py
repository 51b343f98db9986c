"""``selva evaluate``'s computation: run each embedder over the paired files, compute every metric
overall and per group, and write ``metrics.json``.

Metric names are av-benchmark's where it has the metric (``FD-PASST``, ``KL-PASST-softmax``,
``ISC-PASST-mean``/``-std``, ``LAION-CLAP-Score``); KAD, which it does not have, is
``KAD-<EMBEDDER>``. Per embedder output:

| output | metrics | pairs? |
|---|---|---|
| vectors (PaSST 768-d) | FD (generated vs reference statistics), KAD | set vs set |
| vectors (CLAP 512-d audio) | KAD-CLAP | set vs set |
| frames (VGGish 128-d per 0.96 s) | FD-VGG over the frames of all files | set vs set |
| logits (527 AudioSet classes) | KL(reference ‖ generated), IS of the generated files | KL per pair |
| CLAP text vs audio | LAION-CLAP-Score: mean cosine(prompt, generated audio) | per pair |

A metric that cannot be computed for a group (too few files for 10 IS splits, a near-singular
covariance, ...) is recorded as ``{"error": "<metric>: <cause>"}`` and listed in ``errors``; the
others are still computed.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from training import metrics as M
from training.embedders import AudioEmbedder, ClapEmbedder, Embeddings
from training.evaluate_data import Pairing, groups, load_audio

FORMAT = "selva-evaluate/1"
LABELS = {"clap": "CLAP", "passt": "PASST", "vggish": "VGG"}  # metric-name part per embedder (av-benchmark spelling)
LOAD_WINDOW = 8  # batches of waveforms held in memory at once
PLACEMENT_SOURCE = "the metadata's placement (or target_position) column, else the name's _left/_right ending"


@dataclass
class EmbedderRun:
    """One embedder's outputs for the paired files, in the pairing's order."""

    embedder: AudioEmbedder
    generated: Embeddings
    reference: Embeddings
    text: np.ndarray | None = None  # (N, D) prompt embeddings, CLAP only
    seconds: float = 0.0


@dataclass
class Report:
    """What metrics.json holds (see :meth:`as_json`)."""

    pairing: Pairing
    generated_root: str
    reference_root: str
    duration_s: float | None
    runs: list[EmbedderRun]
    metrics: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)  # group -> name -> entry
    per_file: dict[str, dict[str, float]] = field(default_factory=dict)  # paired metric -> key -> value
    errors: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "generated": self.generated_root,
            "reference": self.reference_root,
            "layout": self.pairing.layout,
            "pairs": len(self.pairing.items),
            "duration_s": self.duration_s,
            "placement": (PLACEMENT_SOURCE if self.pairing.placement_known
                          else "unknown: neither the metadata nor the names give it"
                          if self.pairing.layout == "benchmark" else "unknown: a flat reference has no metadata.csv"),
            "embedders": {run.embedder.name: {"model": run.embedder.model, "weights": run.embedder.weights.path,
                                              "sha256": run.embedder.weights.sha256,
                                              "sample_rate": run.embedder.sample_rate,
                                              "seconds": round(run.seconds, 3)} for run in self.runs},
            "metrics": self.metrics,
            "per_file": self.per_file,
            "errors": self.errors,
            "notes": self.notes,
        }

    def flat_metrics(self) -> dict[str, float]:
        """``<group>/<metric>`` -> value, for MLflow (errors left out)."""
        return {f"{group}/{name}": entry["value"] for group, entries in self.metrics.items()
                for name, entry in entries.items() if "value" in entry}


def embed_files(embedder: AudioEmbedder, paths: Sequence[Path], duration_s: float | None,
                progress: Callable[[int], None] | None = None) -> Embeddings:
    """Run ``embedder`` over ``paths``, keeping their order. Files are read a window of
    ``LOAD_WINDOW`` batches at a time (15k VGGSound files at 48 kHz would not fit in memory at
    once), and each batch holds waveforms of one length only: a model that pools over time must
    not see another file's padding (av-benchmark runs variable-length files one at a time)."""
    vectors: list[np.ndarray | None] = [None] * len(paths)
    logits: list[np.ndarray | None] = [None] * len(paths)
    frames: list[np.ndarray | None] = [None] * len(paths)
    window = max(1, embedder.batch_size) * LOAD_WINDOW
    for first in range(0, len(paths), window):
        waves = {i: load_audio(paths[i], embedder.sample_rate, duration_s)
                 for i in range(first, min(first + window, len(paths)))}
        by_length: dict[int, list[int]] = {}
        for i, wave in waves.items():
            by_length.setdefault(wave.size, []).append(i)
        for indices in by_length.values():
            for start in range(0, len(indices), max(1, embedder.batch_size)):
                chunk = indices[start:start + max(1, embedder.batch_size)]
                out = embedder.embed([waves[i] for i in chunk])
                for row, i in enumerate(chunk):
                    vectors[i] = None if out.vectors is None else out.vectors[row]
                    logits[i] = None if out.logits is None else out.logits[row]
                    frames[i] = None if out.frames is None else out.frames[row]
                if progress:
                    progress(len(chunk))
    return Embeddings(vectors=None if vectors[0] is None else np.stack(vectors),
                      logits=None if logits[0] is None else np.stack(logits),
                      frames=None if frames[0] is None else frames)


def run_embedders(pairing: Pairing, embedders: Sequence[AudioEmbedder], duration_s: float | None,
                  show_progress: bool = True) -> list[EmbedderRun]:
    """Embed the generated and the reference files with every embedder (and the prompts with CLAP)."""
    from tqdm import tqdm

    items = pairing.items
    runs = []
    for embedder in embedders:
        start = time.perf_counter()
        with tqdm(total=2 * len(items), desc=f"evaluate: {embedder.name}", unit="file", file=sys.stderr,
                  disable=not show_progress) as bar:
            gen = embed_files(embedder, [it.generated for it in items], duration_s, bar.update)
            ref = embed_files(embedder, [it.reference for it in items], duration_s, bar.update)
        text = None
        if isinstance(embedder, ClapEmbedder):
            prompts = sorted({it.prompt for it in items if it.prompt})
            if prompts:
                table = dict(zip(prompts, embedder.embed_text(prompts), strict=True))
                text = np.stack([table[it.prompt] if it.prompt else np.full_like(table[prompts[0]], np.nan)
                                 for it in items])
        runs.append(EmbedderRun(embedder, gen, ref, text, time.perf_counter() - start))
    return runs


def compute_metrics(report: Report) -> None:
    """Fill ``report.metrics``, ``per_file`` and ``errors`` from its embedder runs."""
    keys = [it.key for it in report.pairing.items]
    for group, idx in groups(report.pairing).items():
        entries = report.metrics.setdefault(group, {})
        for run in report.runs:
            common = {"embedder": run.embedder.name, "weights": run.embedder.weights.path,
                      "sha256": run.embedder.weights.sha256, "files": len(idx)}
            for name, fn, args in _metric_calls(run, idx, keys, report, group):
                try:
                    entry = fn(*args)
                    if not np.isfinite(entry["value"]):
                        raise M.MetricError(f"{name}: the value is {entry['value']}")
                    entries[name] = {**entry, **common}
                except M.MetricError as err:
                    entries[name] = {"error": str(err), **common}
                    report.errors.append(f"{err} [{group}]")


def _metric_calls(run: EmbedderRun, idx: list[int], keys: list[str], report: Report, group: str):
    """(metric name, function, arguments) for every metric this embedder's outputs allow."""
    label = LABELS[run.embedder.name]
    gen, ref = run.generated, run.reference
    calls: list[tuple[str, Callable[..., dict[str, Any]], tuple]] = []
    if gen.vectors is not None and run.embedder.name != "clap":  # FD-CLAP is no standard metric
        calls.append((f"FD-{label}", _fd, (gen.vectors[idx], ref.vectors[idx], f"FD-{label}")))
    if gen.vectors is not None:
        calls.append((f"KAD-{label}", _kad, (ref.vectors[idx], gen.vectors[idx], f"KAD-{label}")))
    if gen.frames is not None:  # av-benchmark: all 0.96 s frames of all files, not per-file means
        calls.append((f"FD-{label}", _fd_frames, ([gen.frames[i] for i in idx], [ref.frames[i] for i in idx],
                                                  f"FD-{label}")))
    if gen.logits is not None:
        kl = f"KL-{label}-softmax"
        calls.append((kl, _kl, (ref.logits[idx], gen.logits[idx], kl, keys, idx, report, group)))
        for stat in ("mean", "std"):
            calls.append((f"ISC-{label}-{stat}", _isc, (gen.logits[idx], f"ISC-{label}", stat)))
    if run.text is not None:
        calls.append(("LAION-CLAP-Score", _clap, (run.text[idx], gen.vectors[idx], keys, idx, report, group)))
    return calls


def _fd(gen: np.ndarray, ref: np.ndarray, metric: str) -> dict[str, Any]:
    result = M.fd_from_embeddings(gen, ref, metric)
    entry: dict[str, Any] = {"value": result.value}
    if result.eps_added:
        entry["note"] = f"sqrtm was not finite: {M.FD_EPS:g}*I added to both covariances (as av-benchmark)"
    if result.note:
        entry["note"] = (entry.get("note", "") + "; " if "note" in entry else "") + result.note
    return entry


def _fd_frames(gen: list[np.ndarray], ref: list[np.ndarray], metric: str) -> dict[str, Any]:
    width = next((f.shape[1] for f in gen + ref if f.ndim == 2), 0)
    stacked = [np.concatenate(part) if part else np.zeros((0, width)) for part in (gen, ref)]
    entry = _fd(stacked[0], stacked[1], metric)
    entry["frames"] = {"generated": int(stacked[0].shape[0]), "reference": int(stacked[1].shape[0])}
    return entry


KAD_FEW_FILES = 100  # below this, a KAD value gets a note on its noise (identical 5-file sets gave -16)


def _kad(ref: np.ndarray, gen: np.ndarray, metric: str) -> dict[str, Any]:
    result = M.kernel_audio_distance(ref, gen, metric=metric)
    entry = {"value": result.value, "bandwidth": result.bandwidth, "bandwidth_source": result.bandwidth_source,
             "kernel": "gaussian", "scale": M.KAD_SCALE, "estimator": "unbiased MMD^2"}
    if min(len(ref), len(gen)) < KAD_FEW_FILES:
        entry["note"] = (f"{min(len(ref), len(gen))} files per set: the unbiased estimate's sampling noise is of "
                         "the order of real differences (it can be negative); compare KAD only between sets of "
                         f"equal size, {KAD_FEW_FILES} files or more")
    return entry


def _kl(ref: np.ndarray, gen: np.ndarray, metric: str, keys: list[str], idx: list[int], report: Report,
        group: str) -> dict[str, Any]:
    value = M.kl_softmax(ref, gen, metric)
    if group == "overall":  # per pair: the same formula on one pair at a time
        report.per_file[metric] = {keys[i]: M.kl_softmax(ref[j:j + 1], gen[j:j + 1], metric)
                                   for j, i in enumerate(idx)}
    return {"value": value, "direction": "KL(reference || generated)"}


def _isc(logits: np.ndarray, metric: str, stat: str) -> dict[str, Any]:
    result = M.inception_score(logits, metric=metric)
    return {"value": result.mean if stat == "mean" else result.std, "splits": result.splits, "seed": M.IS_SEED}


def _clap(text: np.ndarray, audio: np.ndarray, keys: list[str], idx: list[int], report: Report,
          group: str) -> dict[str, Any]:
    missing = [keys[i] for j, i in enumerate(idx) if np.isnan(text[j]).any()]
    if missing:
        raise M.MetricError(f"LAION-CLAP-Score: {len(missing)} file(s) have no prompt in the metadata "
                            f"(first: {missing[0]})")
    scores = M.cosine_scores(text, audio)
    if group == "overall":
        report.per_file["LAION-CLAP-Score"] = {keys[i]: float(s) for i, s in zip(idx, scores, strict=True)}
    return {"value": float(scores.mean()), "text": "the metadata label of each pair", "scale": 1.0}


def write_json(path: str | os.PathLike, payload: dict[str, Any]) -> None:
    """Write atomically (temporary name, then rename): a crash never leaves half a metrics.json."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=False, allow_nan=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)
