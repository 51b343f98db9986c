"""Two datasets compared as docs/shard-format.md "What identical means" defines it."""

from __future__ import annotations

import json
from pathlib import Path

from preprocessing.prompt_store import PromptStore
from preprocessing.shards import done_and_missing, read_failures, read_marker


def assert_identical(a: Path, b: Path) -> None:
    """docs/shard-format.md 'What identical means': tars as bytes, markers except timings, failures
    by content; dataset.json except media_root (a local folder for one, a URL for the other)."""
    assert (a / "manifest.parquet").read_bytes() == (b / "manifest.parquet").read_bytes()
    shards = done_and_missing(a)[0]
    assert done_and_missing(b) == (shards, [])
    for shard in shards:
        assert (a / "shards" / f"{shard}.tar").read_bytes() == (b / "shards" / f"{shard}.tar").read_bytes(), shard
        ma, mb = read_marker(a, shard), read_marker(b, shard)
        assert {**ma.__dict__, "timings": None} == {**mb.__dict__, "timings": None}
        assert read_failures(a, shard) == read_failures(b, shard)
    info_a, info_b = (json.loads((d / "dataset.json").read_text()) for d in (a, b))
    for info in (info_a, info_b):  # the store's split into chunk files follows --workers; its content must not
        info["prompt_store"].pop("chunks")
    assert {**info_a, "media_root": None} == {**info_b, "media_root": None}
    store_a, store_b = PromptStore(a), PromptStore(b)
    assert store_a.prompts() == store_b.prompts()
    for text in store_a.prompts():
        assert [x.tobytes() for x in store_a.get(text)] == [x.tobytes() for x in store_b.get(text)], text
    assert [p for p in b.rglob("*") if ".tmp" in p.name] == []  # no temporary or breadcrumb left
