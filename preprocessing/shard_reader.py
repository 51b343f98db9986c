"""Reading shards safely: whitelisted members, ``.npy`` parsed without pickle, keys checked in order.

A shard is data, never code (DESIGN §8). The reader therefore accepts only the member suffixes of
the format (``shards.MEMBER_ORDER``, enforced by the walk rules of ``preprocessing.tar_walk``);
anything else -- ``.pth``, ``.pkl``, a stray ``.npz`` -- is an error naming the member. Arrays are
parsed by reading the ``.npy`` header ourselves and checking the dtype against ``ARRAY_FIELDS``
*before* touching the data, so an object array (the only kind that needs unpickling) is refused
without ever reaching ``pickle``, and a header that claims more data than the member holds cannot
make us allocate it.

``iter_tar`` works on any binary stream (a local file, an HTTP or object-store stream); ``iter_shard``
adds the dataset-folder checks: the marker exists, the tar has the marker's size, and the marker's keys
are the manifest's keys for the shard minus its failures.
"""

from __future__ import annotations

import io
import json
import tarfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np

from preprocessing.sample import MEDIA_FIELDS, SampleMeta
from preprocessing.shards import (
    ALL_ARRAY_FIELDS,
    MANIFEST_FILE,
    MEMBER_ORDER,
    REQUIRED_MEMBERS,
    ShardError,
    done_and_missing,
    read_failures,
    shard_state,
    shard_tar_path,
)
from preprocessing.tar_walk import bad_name_message, iter_sample_groups

_MAX_NPY_HEADER = 10_000


@dataclass
class ShardSample:
    key: str
    meta: SampleMeta
    sync_mp4: bytes  # decode with preprocessing.compact.decode_sync_mp4
    audio_flac: bytes  # decode with preprocessing.compact.decode_flac
    arrays: dict[str, np.ndarray]


def load_npy(data: bytes, expected: np.dtype, where: str) -> np.ndarray:
    """Parse ``.npy`` bytes whose dtype must be ``expected``; never unpickles anything."""
    stream = io.BytesIO(data)
    try:
        major, _minor = np.lib.format.read_magic(stream)
        if major == 1:
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(stream, max_header_size=_MAX_NPY_HEADER)
        elif major in (2, 3):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(stream, max_header_size=_MAX_NPY_HEADER)
        else:
            raise ValueError(f"unsupported .npy version {major}")
    except (ValueError, SyntaxError, OSError, EOFError) as exc:
        raise ShardError(f"{where}: not a valid .npy file: {exc}") from exc
    if dtype.hasobject:
        raise ShardError(f"{where}: object arrays are refused (they would need pickle)")
    if dtype != expected:
        raise ShardError(f"{where}: dtype {dtype.str}, the format stores {expected.str}")
    count = int(np.prod(shape, dtype=np.int64))
    offset = stream.tell()
    if len(data) - offset != count * dtype.itemsize:
        raise ShardError(f"{where}: header says {shape} but the member holds {len(data) - offset} data bytes")
    flat = np.frombuffer(data, dtype=dtype, count=count, offset=offset)
    return flat.reshape(shape, order="F" if fortran else "C").copy()  # writable, owns its memory


def decode_sample(key: str, members: Mapping[str, bytes], source: str) -> ShardSample:
    """Build a sample from its members (suffix -> bytes), e.g. one WebDataset sample dict's entries."""
    for suffix in members:
        if suffix not in MEMBER_ORDER:
            raise ShardError(
                f"{source}: member {key}.{suffix}: unexpected member type (allowed: {', '.join(MEMBER_ORDER)})"
            )
    missing = [s for s in REQUIRED_MEMBERS if s not in members]
    if missing:
        raise ShardError(f"{source}: sample {key} lacks member(s) {', '.join(missing)} (truncated or damaged shard)")
    try:
        meta = SampleMeta.from_json(json.loads(members["json"].decode("utf-8")))
    except (ValueError, TypeError, UnicodeDecodeError) as exc:
        raise ShardError(f"{source}: member {key}.json: unreadable metadata: {exc}") from exc
    if meta.key != key:
        raise ShardError(f"{source}: member {key}.json names key {meta.key!r}")
    arrays = {}
    for name, dtype in ALL_ARRAY_FIELDS.items():
        data = members.get(f"{name}.npy")
        if data is not None:
            arrays[name] = load_npy(data, dtype, f"{source}: member {key}.{name}.npy")
    sync_mp4, audio_flac = (members[f] for f in MEDIA_FIELDS)
    return ShardSample(key, meta, sync_mp4, audio_flac, arrays)


def iter_tar(stream: BinaryIO, *, source: str, expected_keys: Sequence[str] | None = None) -> Iterator[ShardSample]:
    """Samples of a shard tar read from ``stream`` (sequentially: no seeking needed).

    The walk rules (member names, whitelist, grouping) are ``preprocessing.tar_walk``'s; here every
    breach of them is fatal. With ``expected_keys``, each sample must be the next expected key and the
    tar must hold them all; without it, only the format is checked. Every problem raises
    ``ShardError`` naming ``source``.
    """
    position = 0
    seen: set[str] = set()

    def bad_name(info: tarfile.TarInfo) -> None:
        raise ShardError(f"{source}: {bad_name_message(info.name)}")

    def check_key(key: str, name: str) -> None:
        if key in seen:
            raise ShardError(f"{source}: member {name}: sample {key} appears twice or is not contiguous")
        if expected_keys is not None:
            if position >= len(expected_keys):
                raise ShardError(f"{source}: member {name}: sample {key} beyond the {len(expected_keys)} expected")
            if key != expected_keys[position]:
                raise ShardError(
                    f"{source}: member {name}: sample {position} is {key}, "
                    f"the manifest expects {expected_keys[position]}"
                )
        seen.add(key)

    try:
        with tarfile.open(fileobj=stream, mode="r|") as tar:
            for group in iter_sample_groups(tar, bad_name):
                check_key(group.key, group.first_name)
                members: dict[str, bytes] = {}
                for member in group.members():
                    if member.problem is not None:
                        raise ShardError(f"{source}: {member.problem}")
                    handle = tar.extractfile(member.info)
                    assert handle is not None  # regular files always have content
                    members[member.field] = handle.read()
                yield decode_sample(group.key, members, source)
                position += 1
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise ShardError(f"{source}: damaged or truncated tar after {position} sample(s): {exc}") from exc
    if expected_keys is not None and position != len(expected_keys):
        raise ShardError(f"{source}: truncated: {position} sample(s), expected {len(expected_keys)}")


def manifest_keys(dataset_dir: str | Path, shard: str) -> list[str]:
    """The shard's keys in manifest (tar) order, failures included."""
    import pyarrow.parquet as pq

    table = pq.read_table(
        Path(dataset_dir) / MANIFEST_FILE, columns=["key", "index_in_shard"], filters=[("shard", "=", shard)]
    )
    pairs = sorted(zip(table.column("index_in_shard").to_pylist(), table.column("key").to_pylist(), strict=True))
    return [key for _, key in pairs]


def iter_shard(
    dataset_dir: str | Path, shard: str, *, check_manifest: bool = True, verify_sha: bool = False
) -> Iterator[ShardSample]:
    """Samples of a done shard of a dataset folder, in manifest order."""
    tar_path = shard_tar_path(dataset_dir, shard)
    state = shard_state(dataset_dir, shard, verify_sha=verify_sha)
    if not state.done or state.marker is None:
        raise ShardError(f"{tar_path}: shard is not done ({state.reason})")
    expected = list(state.marker.keys)
    if check_manifest:
        failed = {f.key for f in read_failures(dataset_dir, shard)}
        planned = [k for k in manifest_keys(dataset_dir, shard) if k not in failed]
        if planned != expected:
            pairs = zip(planned, expected, strict=False)
            first = next((i for i, (a, b) in enumerate(pairs) if a != b), min(len(planned), len(expected)))
            raise ShardError(
                f"{tar_path}: marker lists {len(expected)} key(s), the manifest minus failures {len(planned)}; "
                f"they first differ at position {first}"
            )
    with open(tar_path, "rb") as stream:
        yield from iter_tar(stream, source=str(tar_path), expected_keys=expected)


def iter_dataset(dataset_dir: str | Path) -> Iterator[ShardSample]:
    """Samples of every done shard of a dataset folder, shard after shard (manifest order), each
    checked as :func:`iter_shard` checks it; shards not done yet are left out."""
    for shard in done_and_missing(dataset_dir)[0]:
        yield from iter_shard(dataset_dir, shard)
