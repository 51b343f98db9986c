"""Which clip was a worker decoding when its process died: a breadcrumb per shard.

A clip that segfaults FFmpeg or blows the worker's memory kills the process, so nothing in the
process can record it; the driver only sees the actor die. Before each clip the worker therefore
leaves the clip's key in ``shards/.{shard}.clip.tmp`` (replaced atomically: a reader never sees half
a key) and removes it when the shard's decoding is over. After a death the driver takes the
breadcrumb: a key blames that clip; no file means the worker died outside a clip (loading encoders,
encoding, writing), which is the shard's infrastructure retry as before.

The name is hidden and ends with ``TMP_SUFFIX``, so ``remove_stale_temporaries`` deletes one left by
a killed job and it never counts as a dataset file.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

from preprocessing.shards import TMP_SUFFIX


def breadcrumb_path(dataset_dir: str | Path, shard: str) -> Path:
    return Path(dataset_dir) / "shards" / f".{shard}.clip{TMP_SUFFIX}"


def leave(dataset_dir: str | Path, shard: str, key: str) -> None:
    """Record that the worker now decodes ``key``. No fsync: the page cache outlives the process,
    and a lost node loses the blame only (the shard is then retried as an unexplained death)."""
    path = breadcrumb_path(dataset_dir, shard)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{uuid.uuid4().hex}{TMP_SUFFIX}")
    tmp.write_text(key, encoding="utf-8")
    os.replace(tmp, path)


def clear(dataset_dir: str | Path, shard: str) -> None:
    breadcrumb_path(dataset_dir, shard).unlink(missing_ok=True)


def take(dataset_dir: str | Path, shard: str) -> str | None:
    """The key the worker was decoding when it died (None: it died outside a clip); removes the file."""
    path = breadcrumb_path(dataset_dir, shard)
    try:
        key = path.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        return None
    path.unlink(missing_ok=True)
    return key or None
