"""``selva generate --manifest``: a whole list, in batches, resumable, split over ranks.

Items come from a clip table (``id``, a text column, optional ``path``/``start``/``duration`` and
``negative``; precompute's reader) or from a benchmark folder (``training.benchmark_read``: each
subset's ``mixed/`` videos with their prompts and partner labels as negative prompts). Each item's
outputs are ``OUT/[<subset>/]<name>.{flac,mp4,png}``; the FLAC is written last, so an item whose FLAC
exists is finished and a rerun skips it. A failed item gets ``OUT/failures/<name>.json`` (its
reason), is counted and the list goes on; a rerun tries it again and removes the record when it
succeeds. Ranks (``torchrun``: ``RANK``/``WORLD_SIZE``) take every WORLD_SIZE-th item of the list in
its order, and each item's noise comes from the run's seed and its name (``generate.item_seed``), so
the outputs do not depend on the number of ranks, the batch an item lands in or the resumes.
"""

from __future__ import annotations

import json
import math
import os
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from preprocessing.errors import Rejected
from training.generate import (
    GenerationError,
    GenerationModel,
    GenerationRequest,
    check_duration,
    check_name,
    generate_batch,
    item_seed,
    write_outputs,
)


@dataclass(frozen=True)
class BatchItem:
    name: str  # output file stem
    folder: str  # subfolder of OUT ("" or a benchmark subset)
    video: Path
    prompt: str
    negative: str | None = None
    start: float = 0.0
    duration: float | None = None

    @property
    def key(self) -> str:
        return f"{self.folder}/{self.name}" if self.folder else self.name


@dataclass
class BatchReport:
    done_before: int = 0
    generated: int = 0
    failed: Counter[str] = field(default_factory=Counter)  # reason kind -> count
    failures: list[str] = field(default_factory=list)  # one line each
    rejected_rows: list[str] = field(default_factory=list)  # table rows that became no item

    def table(self) -> str:
        lines = [f"generated {self.generated}, already done {self.done_before}, failed {sum(self.failed.values())}"
                 + (f", rejected rows {len(self.rejected_rows)}" if self.rejected_rows else "")]
        lines += [f"  {kind}: {n}" for kind, n in sorted(self.failed.items())]
        return "\n".join(lines)


SETTINGS_FILE = "generate.json"  # the settings a folder's outputs were made with
REJECTED_FILE = "rejected-rows.json"  # under failures/: the table rows that became no item, rewritten per run


def check_settings(out: str | os.PathLike, settings: dict) -> None:
    """Record ``settings`` (checkpoint, steps, cfg, seed, ...) in ``OUT/generate.json``, or refuse a
    folder whose outputs were made with others: a rerun skips finished items, so mixing settings in
    one folder would go unnoticed. Raises GenerationError naming what changed."""
    out = Path(out)
    path = out / SETTINGS_FILE
    if path.is_file():
        before = json.loads(path.read_text())
        changed = [f"{key} {before.get(key)!r} -> {value!r}" for key, value in settings.items()
                   if before.get(key) != value]  # fmt: skip
        if changed:
            raise GenerationError(f"{out}: its outputs were made with other settings ({'; '.join(changed)}); a "
                                  "rerun keeps finished items, so use a new --out or the same settings")
        return
    out.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # ranks may race here: same content, atomic rename
    tmp.write_text(json.dumps(settings, indent=1, sort_keys=True) + "\n")
    tmp.replace(path)


def record_rejected_rows(out: str | os.PathLike, lines: list[str]) -> None:
    """``OUT/failures/rejected-rows.json``: every table row of this run that became no item, with why."""
    path = Path(out) / "failures" / REJECTED_FILE
    if not lines:
        path.unlink(missing_ok=True)
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"rejected_rows": lines}, indent=1) + "\n")
    tmp.replace(path)


def items_from_table(
    path: str | os.PathLike, media_root: str | os.PathLike | None = None, text_column: str | None = None
) -> tuple[list[BatchItem], list[str]]:
    """Items of a clip table and one line per row that cannot become one. Each item's outputs are named
    by its ``id`` (so they pair with references named by id: ``selva evaluate``); a repeated id is a
    rejected row. ``path`` defaults to ``<id>.mp4`` beside the table (``media_root`` if given), as
    precompute resolves it; ``start`` (>= 0) and ``duration`` (generation's rule) are checked here, so
    a bad cell rejects its row, not the run."""
    from preprocessing.input_table import read_input_table

    table = read_input_table(path, text_column=text_column)
    root = Path(media_root) if media_root is not None else Path(path).parent
    items, rejected, seen = [], [], {}
    for row in table.rows:
        values = row.values
        ident = str(values.get("id") or "").strip()
        prompt = str(values.get(table.text_column) or "").strip()
        where = f"{path} row {row.row}" + (f" (line {row.line})" if row.line is not None else "")
        if row.problem or not ident or not prompt:
            rejected.append(f"{where}: {row.problem or ('no id' if not ident else 'empty prompt')}")
            continue
        try:
            start = float(values.get("start") or 0.0)
            duration = float(values["duration"]) if values.get("duration") not in (None, "") else None
            if not (math.isfinite(start) and start >= 0):
                raise ValueError(f"start {start:g} is not a number of seconds >= 0")
            if duration is not None:
                check_duration(duration)
            check_name(ident)
        except (ValueError, GenerationError) as err:
            rejected.append(f"{where} id={ident!r}: {err}")
            continue
        if ident in seen:
            rejected.append(f"{where} id={ident!r}: the id of row {seen[ident]} again (outputs are named by id: "
                            "give each video and prompt its own id)")
            continue
        seen[ident] = row.row
        video = Path(str(values.get("path") or f"{ident}.mp4"))
        video = video if video.is_absolute() else root / video
        negative = str(values.get("negative") or "").strip() or None
        items.append(BatchItem(ident, "", video, prompt, negative, start, duration))
    return items, rejected


def items_from_benchmark(root: str | os.PathLike) -> list[BatchItem]:
    """One item per composite of a benchmark folder: the target's label as the prompt, the partner's
    as the negative prompt where the metadata gives it; outputs under the subset's name."""
    from training.benchmark_read import read_benchmark

    return [BatchItem(item.name, item.subset, Path(item.video), item.label, item.negative)
            for item in read_benchmark(root)]


def _failure_file(out: Path, item: BatchItem) -> Path:
    return out / "failures" / (item.key.replace("/", "__") + ".json")


def _record_failure(out: Path, item: BatchItem, kind: str, message: str) -> None:
    path = _failure_file(out, item)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({"item": item.key, "video": str(item.video), "prompt": item.prompt, "kind": kind,
                               "message": message}, indent=1) + "\n")
    tmp.replace(path)


def _batches(items: list[BatchItem], size: int) -> Iterable[list[BatchItem]]:
    """Consecutive items with one duration, at most ``size`` each."""
    batch: list[BatchItem] = []
    for item in items:
        if batch and (len(batch) == size or batch[-1].duration != item.duration):
            yield batch
            batch = []
        batch.append(item)
    if batch:
        yield batch


def run_items(
    model: GenerationModel, items: list[BatchItem], out_dir: str | os.PathLike, *, steps: int = 25, cfg: float = 4.5,
    seed: int = 0, batch_size: int = 8, rank: int = 0, world_size: int = 1,
    on_item: Callable[[int], None] | None = None,
) -> BatchReport:
    """Generate this rank's share of ``items`` that is not finished yet. A batch that fails as a whole
    (one unreadable video stops its decode) is retried item by item, so one bad input costs only itself."""
    out = Path(out_dir)
    report = BatchReport()
    mine = items[rank::world_size]
    todo = []
    for item in mine:
        if (out / item.folder / f"{item.name}.flac").is_file():
            report.done_before += 1
        else:
            todo.append(item)
    if on_item is not None and report.done_before:
        on_item(report.done_before)

    def request(item: BatchItem) -> GenerationRequest:
        return GenerationRequest(item.video, item.prompt, item.negative, item.start, item.duration, steps, cfg,
                                 item_seed(seed, item.key))

    def attempt(batch: list[BatchItem]) -> None:
        generated = generate_batch(model, [request(i) for i in batch])
        for item, result in zip(batch, generated, strict=True):
            write_outputs(result, request(item), out / item.folder, item.name)
            _failure_file(out, item).unlink(missing_ok=True)
            report.generated += 1

    for batch in _batches(todo, batch_size):
        try:
            attempt(batch)
        except Exception as err:  # noqa: BLE001 - one item's failure, whatever it is, must not end a 15k-item run
            if len(batch) == 1:
                kind = err.reason.value if isinstance(err, Rejected) else type(err).__name__
                text = err.message if isinstance(err, Rejected) else str(err)  # a Rejected's str repeats its kind
                message = text.splitlines()[0] if text else type(err).__name__
                _record_failure(out, batch[0], kind, message)
                report.failed[kind] += 1
                report.failures.append(f"{batch[0].key}: {kind}: {message}")
            else:
                for item in batch:  # find the bad one(s); the rest are generated
                    sub = run_items(model, [item], out, steps=steps, cfg=cfg, seed=seed, batch_size=1)
                    report.generated += sub.generated
                    report.failed.update(sub.failed)
                    report.failures += sub.failures
        if on_item is not None:
            on_item(len(batch))
    return report
