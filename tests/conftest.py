"""Shared test helpers: where the read-only reference vectors live."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent

if os.environ.get("PYTEST_XDIST_WORKER"):
    # `make test` runs two workers on two cores: a second torch thread per worker only oversubscribes
    import torch

    torch.set_num_threads(1)


def shared_dir() -> Path:
    """The shared folder: ``$SELVA_SHARED`` if set, else ``<repo root>/../shared``."""
    env = os.environ.get("SELVA_SHARED")
    return Path(env) if env else REPO_ROOT.parent / "shared"


SHARED_SKIPS: set[str] = set()


def require_shared(path: Path, what: str) -> Path:
    """``path`` (inside the shared folder), or stop the test: under CI a missing shared folder is a broken
    set-up and fails loudly; on a bare clone the test is skipped, and one summary line names what
    the skipped tests need."""
    if path.exists():
        return path
    if os.environ.get("CI"):
        pytest.fail(f"{what} not found at {path}: CI always has ../shared beside the checkout")
    SHARED_SKIPS.add(what)
    pytest.skip(f"needs {what} ({path})")


def pytest_terminal_summary(terminalreporter) -> None:
    if SHARED_SKIPS:
        terminalreporter.write_line(
            f"skipped tests need the shared folder ({', '.join(sorted(SHARED_SKIPS))}): clone with ../shared "
            f"beside the checkout or set SELVA_SHARED"
        )


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    """The official reference-vector directory; tests that need it skip when it is absent."""
    path = shared_dir() / "reference"
    require_shared(path / "cases.json", "the reference vectors")  # fails under CI, else skips
    return path


@pytest.fixture(scope="session")
def reference_44k_dir() -> Path:
    """The 44.1 kHz reference-vector directory (``../shared/reference-44k``); skips when absent (fails under CI)."""
    path = shared_dir() / "reference-44k"
    require_shared(path / "cases.json", "the 44.1 kHz reference vectors")
    return path


@pytest.fixture(scope="session")
def train_world(tmp_path_factory) -> Path:
    """The generated training world (``pipelines.train_world``), written once per session: 16 train and 8
    val clips, seed 0, 4 samples per shard, tiny preset, embedded encoders. Read it, never write into it."""
    from pipelines.train_world import write_train_world

    root = tmp_path_factory.mktemp("train-world") / "dataset"
    write_train_world(root, train=16, val=8, seed=0)
    return root


@pytest.fixture(scope="session")
def tiny_export(train_world, tmp_path_factory) -> Path:
    """A tiny checkpoint from the trainer: ``selva``'s training entry point, 2 steps on ``train_world``,
    one process; returns its ``final/`` folder (an export with its encoders recorded)."""
    import subprocess
    import sys

    from tests.train_launch import REPO, explain, job_env

    out = tmp_path_factory.mktemp("tiny-export") / "run"
    cmd = [sys.executable, "-m", "training.train", "--config", "configs/train/tiny.yaml", f"dataset={train_world}",
           f"out={out}", "steps=2", "checkpoint_every=2", "loader.batch_size=2", "loader.num_workers=0",
           "validation.audio_clips=0", f"tracking_uri=sqlite:///{out.parent / 'mlflow.db'}"]
    result = subprocess.run(cmd, cwd=REPO, env=job_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, explain(result)
    return out / "final"


# The longest test files, longest first: `make test` hands whole files to two workers in collection
# order, and a long file that starts last runs alone while the other core idles (measured: 672 s with
# check-reference last; 685 s with it first and test_precompute.py, the longest under contention, third)
HEAVY_FIRST = ("test_train.py", "test_precompute.py", "test_model_reference.py", "test_demo.py",
               "test_precompute_cluster.py", "test_reference_rest.py", "test_generate.py", "test_precompute_faults.py",
               "test_precompute_realworld.py", "test_recipes.py", "test_reference_44k_check.py")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(HEAVY_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(HEAVY_FIRST)))  # stable: the rest keep their order
