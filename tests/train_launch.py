"""Launching real training jobs from the tests: torchrun (gloo, CPU) and ``selva train`` subprocesses.

Every job runs in its own process group (``start_new_session``), so a test can kill a whole job
(launcher and ranks) as a pre-emption does, and nothing of it outlives the test.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def job_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "SELVA_FAULT"))}
    env.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", TQDM_DISABLE="1")
    # Nothing here compiles, but DeepSpeed's ZeRO optimizer check imports its Muon kernels, whose
    # torch.compile decorators load the inductor (~4 s per rank, every job); this makes them no-ops
    env["TORCHDYNAMO_DISABLE"] = "1"
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    env.update(extra)
    return env


def torchrun_cmd(nproc: int, *, module: str = "training.train", script: str | None = None,
                 nodes: tuple[int, int, int] | None = None) -> list[str]:
    """``nodes`` = (nnodes, node_rank, port): one launcher of a multi-node job on this machine."""
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}"]
    if nodes is None:
        cmd.append("--standalone")
    else:
        nnodes, node_rank, port = nodes
        cmd += [f"--nnodes={nnodes}", f"--node_rank={node_rank}", "--master_addr=127.0.0.1",
                f"--master_port={port}"]
    return cmd + ([script] if script else ["-m", module])


def run_job(cmd: list[str], *, timeout: float = 300, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=REPO, env=env or job_env(), capture_output=True, text=True, timeout=timeout,
                          start_new_session=True)


def start_job(cmd: list[str], *, env: dict[str, str] | None = None) -> subprocess.Popen:
    return subprocess.Popen(cmd, cwd=REPO, env=env or job_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)


def explain(result: subprocess.CompletedProcess) -> str:
    return f"exit {result.returncode}\n--- stdout\n{result.stdout[-4000:]}\n--- stderr\n{result.stderr[-6000:]}"
