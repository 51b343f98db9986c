"""``selva data check``: run the real loader as N ranks x W workers would, without training.

Ranks are simulated one after another in this process (each with its own DataLoader workers):
a rank's batches depend only on (shard list, seed, epoch, rank, layout), never on the other ranks,
so running them in sequence yields exactly what N processes would, at the cost of N times the
wall-clock. The report says what a run would see: batches per rank, per-epoch coverage (unique,
repeated and missed samples), throughput, peak memory and mixing statistics. The check fails when
ranks would get different step counts or an epoch misses a sample (only checkable when the shard
markers list the keys).
"""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import psutil

from selva.mixing import MixConfig
from training.loader import LoaderConfig, TrainLoader
from training.shard_order import ShardSource


class PeakRSS:
    """Samples the memory of this process plus its children (DataLoader workers) in a thread.

    ``peak`` is the largest sum of RSS. Forked workers share the parent's pages (torch, numpy, the
    interpreter) until written, so that sum counts shared memory once per process: an upper bound.
    ``peak_pss`` sums the proportional set size instead (each shared page split between its users),
    which is what the processes really add up to; 0 where the platform does not report it.
    """

    def __init__(self, interval_s: float = 0.1):
        self.interval_s = interval_s
        self.peak = 0
        self.peak_pss = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def sample(self) -> int:
        me = psutil.Process()
        rss = pss = 0
        for process in [me, *me.children(recursive=True)]:
            try:
                rss += process.memory_info().rss
                pss += getattr(process.memory_full_info(), "pss", 0)
            except psutil.Error:  # a worker that just exited, or no access to its smaps
                pass
        self.peak, self.peak_pss = max(self.peak, rss), max(self.peak_pss, pss)
        return rss

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.sample()

    def __enter__(self) -> PeakRSS:
        self.sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()


def expected_keys(source: ShardSource) -> set[str] | None:
    """Every key the epoch should contain, from the shards' markers (None when any shard has none)."""
    keys: set[str] = set()
    for shard in source.shards:
        if shard.marker is None:
            return None
        with open(shard.marker, encoding="utf-8") as handle:
            keys.update(json.load(handle)["keys"])
    return keys


@dataclass
class EpochReport:
    epoch: int
    batches: list[int]  # per rank
    samples: int
    unique: int
    repeated: int  # samples beyond the first sight of their key
    missed: int | None  # expected keys never seen (None: keys unknown)


@dataclass
class CheckReport:
    ranks: int
    workers: int
    batch_size: int
    batches_per_epoch: int
    dataset_samples: int
    epochs: list[EpochReport] = field(default_factory=list)
    seconds: float = 0.0
    peak_rss: int = 0
    peak_pss: int = 0
    mixed: int = 0
    mixable: int = 0
    target_left: int = 0
    lam_sum: float = 0.0
    no_distinct_partner: int = 0  # drawn for mixing, left unmixed: the batch held only their prompt
    errors: Counter[str] = field(default_factory=Counter)

    @property
    def samples_per_s(self) -> float:
        return sum(e.samples for e in self.epochs) / max(self.seconds, 1e-9)

    def problems(self) -> list[str]:
        found = []
        for e in self.epochs:
            if len(set(e.batches)) > 1 or e.batches[0] != self.batches_per_epoch:
                found.append(f"epoch {e.epoch}: ranks got {e.batches} batches, expected {self.batches_per_epoch} each")
            if e.missed:
                found.append(f"epoch {e.epoch}: {e.missed} sample(s) never seen")
        return found


def run_check(
    source: ShardSource,
    cfg: LoaderConfig,
    *,
    ranks: int,
    epochs: int,
    mix: MixConfig | None,
    progress: Callable[[str], None] | None = None,
) -> CheckReport:
    """Iterate ``epochs`` epochs on every rank; gather coverage, speed, memory and mixing stats."""
    probe = TrainLoader(source, cfg, rank=0, world_size=ranks)
    report = CheckReport(ranks, probe.workers, cfg.batch_size, probe.batches_per_epoch, source.samples_per_epoch)
    wanted = expected_keys(source)
    seen = [Counter() for _ in range(epochs)]
    batches = [[0] * ranks for _ in range(epochs)]
    began = time.perf_counter()
    with PeakRSS() as rss:
        for rank in range(ranks):
            loader = TrainLoader(source, cfg, rank=rank, world_size=ranks, mix=mix)
            for epoch in range(epochs):
                for batch in loader.epoch_batches():
                    batches[epoch][rank] += 1
                    seen[epoch].update(batch["key"])
                    info = batch.get("mix")
                    if info is not None:
                        report.mixable += int(info.mixed.numel())
                        report.mixed += int(info.mixed.sum())
                        report.target_left += int(info.target_left.sum())
                        report.lam_sum += float(info.lam[info.mixed].sum())
                        report.no_distinct_partner += int(info.no_distinct_partner.sum())
                if progress is not None:
                    progress(f"rank {rank} epoch {epoch}: {batches[epoch][rank]} batches")
            report.errors.update(loader.error_counts)
    report.seconds = time.perf_counter() - began
    report.peak_rss, report.peak_pss = rss.peak, rss.peak_pss
    for epoch in range(epochs):
        counts = seen[epoch]
        total = sum(counts.values())
        missed = len(wanted - set(counts)) if wanted is not None else None
        report.epochs.append(EpochReport(epoch, batches[epoch], total, len(counts), total - len(counts), missed))
    return report


def format_report(report: CheckReport, source: ShardSource) -> list[str]:
    slots = report.batches_per_epoch * report.ranks * report.batch_size
    spare = slots - report.dataset_samples
    lines = [
        f"{report.dataset_samples} samples in {len(source.shards)} shard(s)"
        f"{'' if source.counts_known else ' (count given, not from markers)'}; {report.ranks} rank(s) x "
        f"{report.workers} worker(s), batch {report.batch_size} -> {report.batches_per_epoch} batches per rank "
        f"per epoch ({slots} slots, {spare} spare: re-drawn, so expect that many repeats)",
        f"{'epoch':>5} {'batches/rank':>14} {'samples':>8} {'unique':>7} {'repeated':>9} {'missed':>7}",
    ]
    for e in report.epochs:
        per_rank = ",".join(map(str, e.batches)) if len(set(e.batches)) > 1 else f"{e.batches[0]} each"
        missed = "n/a" if e.missed is None else str(e.missed)
        lines.append(f"{e.epoch:>5} {per_rank:>14} {e.samples:>8} {e.unique:>7} {e.repeated:>9} {missed:>7}")
    errors = ", ".join(f"{k} {v}" for k, v in sorted(report.errors.items())) or "none"
    lines.append(f"data errors (counted and skipped): {errors}")
    lines.append(
        f"throughput: {report.samples_per_s:.1f} samples/s over {report.seconds:.1f} s "
        f"(ranks run one after another in this process)"
    )
    pss = f"; PSS {report.peak_pss / 2**20:.1f} MiB, shared pages counted once" if report.peak_pss else ""
    lines.append(f"peak RSS: {report.peak_rss / 2**20:.1f} MiB (this process + its DataLoader workers{pss})")
    lines += mixing_lines(report)
    return lines


def mixing_lines(report: CheckReport) -> list[str]:
    """What mixing did: the share mixed and its balance, samples left unmixed for want of a partner
    with another prompt, or why nothing was mixed."""
    lines: list[str] = []
    if report.mixable and report.mixed:
        share = report.mixed / report.mixable
        left = report.target_left / report.mixed
        lam = report.lam_sum / report.mixed
        lines.append(
            f"mixing: {100 * share:.1f}% of samples mixed; target left {100 * left:.1f}% / right "
            f"{100 * (1 - left):.1f}%; mean lambda {lam:.3f}"
        )
    if report.no_distinct_partner:
        lines.append(
            f"mixing: {report.no_distinct_partner} sample(s) left unmixed: every other sample of their batch "
            f"had the same prompt"
        )
    if report.mixable and not report.mixed and not report.no_distinct_partner:
        lines.append("mixing: on, but no sample was mixed (a batch of 1 has no partner to mix with)")
    elif not report.mixable:
        lines.append("mixing: off")
    return lines
