"""The process group and the DeepSpeed engine: who this process is, and what trains.

**Launchers.** ``torchrun`` and ``deepspeed`` set ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``/
``MASTER_ADDR``/``MASTER_PORT``; under ``srun`` the Slurm variables are mapped to them (the batch
script exports ``MASTER_ADDR``/``MASTER_PORT``, docs/training.md); with none of them the job is one
process on a free local port (``selva train``).

**Precision.** MMAudio trains with bf16 *autocast* and fp32 master weights, no loss scaling (MMAudio
issue 49). DeepSpeed's ``bf16`` mode casts the module's weights to bf16 instead, so it is not used:
its ``torch_autocast`` setting is (forward under ``torch.autocast(bfloat16)``, weights, gradients,
optimizer state and gradient all-reduce in fp32: ``lower_precision_safe_modules`` is empty so no
gradient is communicated in bf16). On CPU the default is plain fp32.

**Non-finite steps.** With fp32 master weights DeepSpeed's ZeRO-1/2 optimizer computes the global
gradient norm (all-reduced over ranks) and skips the step on every rank when it is not finite; the
trainer reads ``engine.was_step_applied()``. A NaN on one rank thus skips the step everywhere, and no
rank waits at a collective the others skipped.

**Collective timeouts.** The process group is created with ``collective_timeout_s``: a rank that
hangs makes its peers fail with a timeout error instead of waiting forever.
"""

from __future__ import annotations

import datetime
import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist

from training.train_config import TrainConfig


@dataclass(frozen=True)
class World:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def node_rank(self) -> int:
        """Which node this process runs on (``GROUP_RANK`` from torchrun, else ``NODE_RANK``/``SLURM_NODEID``)."""
        for name in ("GROUP_RANK", "NODE_RANK", "SLURM_NODEID"):
            if os.environ.get(name, "").isdigit():
                return int(os.environ[name])
        return 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launcher_environment() -> None:
    """Fill the torch.distributed variables from Slurm's, or for a single local process."""
    env = os.environ
    if "RANK" not in env and "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        env["RANK"], env["WORLD_SIZE"] = env["SLURM_PROCID"], env["SLURM_NTASKS"]
        env.setdefault("LOCAL_RANK", env.get("SLURM_LOCALID", "0"))
        if "MASTER_ADDR" not in env:
            raise RuntimeError("under srun, export MASTER_ADDR (and MASTER_PORT) in the batch script: "
                               "see docs/training.md")
    if "RANK" not in env:
        env.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
        env.setdefault("MASTER_PORT", str(_free_port()))
    env.setdefault("MASTER_PORT", "29500")


def init_world(cfg: TrainConfig) -> World:
    """Create the process group (NCCL on GPUs, gloo on CPU) with the collective timeout."""
    import deepspeed
    import deepspeed.ops

    launcher_environment()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device, backend = torch.device("cuda", local_rank), "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
        # DeepSpeed would JIT-compile its shared-memory CPU all-reduce on first use (a C++ toolchain
        # and ~2 minutes); gloo does the job for the CPU runs this project makes (tests, laptops).
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    if not dist.is_initialized():
        deepspeed.init_distributed(
            dist_backend=backend,
            auto_mpi_discovery=False,
            timeout=datetime.timedelta(seconds=cfg.collective_timeout_s),
        )
    return World(dist.get_rank(), dist.get_world_size(), local_rank, device)


def use_bf16(cfg: TrainConfig, device: torch.device) -> bool:
    if cfg.precision == "auto":
        return device.type == "cuda"
    return cfg.precision == "bf16"


def deepspeed_config(cfg: TrainConfig, world: World) -> dict:
    """The DeepSpeed config this job runs with (logged as an artifact and a tag)."""
    bf16 = use_bf16(cfg, world.device)
    return {
        "train_micro_batch_size_per_gpu": cfg.loader.batch_size,
        "gradient_accumulation_steps": cfg.grad_accum,
        "train_batch_size": cfg.loader.batch_size * cfg.grad_accum * world.world_size,
        "gradient_clipping": cfg.optim.grad_clip,
        "zero_optimization": {"stage": cfg.zero_stage, "contiguous_gradients": True, "overlap_comm": False},
        "torch_autocast": {"enabled": bf16, "dtype": "bfloat16", "lower_precision_safe_modules": []},
        "steps_per_print": 2**31 - 1,  # the trainer reports progress itself
        "wall_clock_breakdown": False,
        "zero_allow_untested_optimizer": False,
    }


def build_engine(cfg: TrainConfig, world: World, model: torch.nn.Module):
    """``deepspeed.initialize`` on ``model`` (the trained parameters only) with torch's AdamW.

    torch's AdamW (not DeepSpeed's FusedAdam, which would be JIT-compiled) keeps the update identical to
    a plain PyTorch loop; ZeRO-1/2 partitions its state. Weight decay applies to every trained tensor,
    as in MMAudio. The learning rate is set by the trainer before every step (training/schedule.py).
    """
    import deepspeed

    o = cfg.optim
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay,
        foreach=False,  # one code path on every device: the plain loop of benchmarks/train_step.py
    )
    engine, optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer,
                                                  config=deepspeed_config(cfg, world))
    return engine, optimizer


def lr_at(cfg: TrainConfig, step: int) -> float:
    """MMAudio's schedule: linear warm-up over ``warmup_steps`` from 0, then ×``lr_gamma`` at each
    milestone (fractions of ``steps``). ``step`` counts optimizer steps from 0."""
    o = cfg.optim
    lr = o.lr * min(1.0, (step + 1) / o.warmup_steps) if o.warmup_steps > 0 else o.lr
    for fraction in o.lr_milestones:
        if step >= int(fraction * cfg.steps):
            lr *= o.lr_gamma
    return lr


def set_lr(optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
