"""The text stage of the precompute job: each distinct prompt encoded once per dataset, on the actors.

Runs after the actors have loaded their encoders and before any shard: the prompts of the shards to
do that the store (``preprocessing.prompt_store``) does not hold yet are split into chunks and
encoded on the actors, one chunk per call, in parallel; the empty prompt is encoded once as well.
Shard workers then read features from the store, so a label used by 1000 clips costs one encoder
call, not one per worker (the per-worker cache alone encoded it once on every worker, and again
on every restarted one). A rerun encodes only prompts that no finished chunk holds.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence

from preprocessing.manifest import ManifestRow
from preprocessing.prompt_store import (
    TEXT_DIR,
    PromptStore,
    empty_prompt_files,
    has_empty_prompt,
    remove_orphan_arrays,
)
from preprocessing.shards import read_dataset_info, write_dataset_info

CHUNK_PROMPTS = 256  # prompts per chunk file at most (~70 MB of float16 features at the official widths)


def plan_chunks(prompts: Sequence[str], workers: int, size: int = CHUNK_PROMPTS) -> list[list[str]]:
    """Sorted ``prompts`` in contiguous chunks: at least one per worker (parallelism), at most ``size`` each."""
    ordered = sorted(set(prompts))
    if not ordered:
        return []
    count = min(len(ordered), max(workers, math.ceil(len(ordered) / size)))
    step = math.ceil(len(ordered) / count)
    return [ordered[i : i + step] for i in range(0, len(ordered), step)]


def encode_prompts(dataset_dir: str, rows: Sequence[ManifestRow], actors: Sequence) -> tuple[int, int, float]:
    """Encode the prompts of ``rows`` missing from the store, and the empty prompt, on ``actors``.

    Returns (prompts encoded, prompts already stored, seconds). Exceptions from the actors propagate
    (the caller turns them into a job error); chunks finished before are kept for the rerun.
    """
    import ray  # here, not at the top: record_text_features serves writers that run without Ray

    started = time.perf_counter()
    remove_orphan_arrays(dataset_dir)  # arrays of a chunk whose writer was killed before its index
    stored = PromptStore(dataset_dir).prompts()
    needed = {row.text for row in rows}
    missing = sorted(needed - stored)
    refs = []
    if not has_empty_prompt(dataset_dir):
        refs.append(actors[0].store_empty_prompt.remote(dataset_dir))
    for i, chunk in enumerate(plan_chunks(missing, len(actors))):
        refs.append(actors[i % len(actors)].store_prompts.remote(dataset_dir, chunk))
    results = ray.get(refs)
    encoded = sum(r for r in results if isinstance(r, int))
    record_text_features(dataset_dir)
    return encoded, len(needed & stored), time.perf_counter() - started


def record_text_features(dataset_dir: str) -> None:
    """Name the empty-prompt files and summarise the store in ``dataset.json`` (the driver is its one writer)."""
    info = read_dataset_info(dataset_dir)
    store = PromptStore(dataset_dir)
    info.empty_prompt = empty_prompt_files() if has_empty_prompt(dataset_dir) else {}
    info.prompt_store = {"folder": TEXT_DIR, "prompts": len(store.prompts()), "chunks": store.chunks}
    write_dataset_info(dataset_dir, info)
