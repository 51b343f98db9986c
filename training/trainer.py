"""The training loop: one :class:`Trainer` per process, all ranks in lock step.

Per optimizer step: ``grad_accum`` micro-batches (forward = the loss inside DeepSpeed's engine,
backward, ``engine.step()``), then one small all-reduce that carries the loss sum, the finite count
and the flag "a stop signal arrived here", so every rank takes the same decisions at
the same step (no rank waits at a collective the others skipped). Then the EMA update (rank 0, every
step: a skipped step leaves the weights unchanged and the EMA counts optimizer steps), metrics (rank 0,
through the non-blocking tracker), a checkpoint when due or when SIGTERM/SIGUSR1 arrived
(Slurm's pre-emption signals), validation when due.
"""

from __future__ import annotations

import os
import signal
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from selva.mixing import MixConfig
from training import checkpoints as ck
from training.engine import World, build_engine, deepspeed_config, lr_at, set_lr, use_bf16
from training.objective import SelvaObjective, TrainedParameters, set_stage_trainable
from training.stop_signal import stop_requested
from training.train_config import TrainConfig, config_hash, resume_fingerprint, to_dict
from training.train_data import build_batches, dataset_fingerprint
from training.train_models import build_models, ema_module

# test hooks (tests/test_train.py): "STEP:RANK" makes that rank's loss NaN at that step ("STEP+:RANK": from it on);
# "step:N" / "save:N" SIGKILLs the whole process group (launcher included) after step N, or while the
# checkpoint of step N is half written (before its marker): a pre-emption at the worst moment.
NAN_FAULT_ENV = "SELVA_FAULT_NAN_STEP"
KILL_FAULT_ENV = "SELVA_FAULT_KILL"


def _kill_fault(where: str, step: int, rank: int) -> None:
    if rank == 0 and os.environ.get(KILL_FAULT_ENV) == f"{where}:{step}":
        os.killpg(os.getpgid(0), signal.SIGKILL)


class TrainingStopped(RuntimeError):
    """Training cannot go on (too many non-finite steps); the last good checkpoint is kept."""


@dataclass
class StepStats:
    """Running totals between two log lines (rank 0's view of the all-reduced values)."""

    loss_sum: float = 0.0
    samples: int = 0
    steps: int = 0
    data_wait_s: float = 0.0
    step_s: float = 0.0
    timed_steps: int = 0  # every step of the interval, skipped ones too (step_s covers them all)
    batches: int = 0
    grad_norms: list[float] = field(default_factory=list)
    mix: dict[str, float] = field(default_factory=dict)  # sums over batches

    def reset(self) -> None:
        self.__init__()  # type: ignore[misc]


def find_resume(cfg: TrainConfig, world: World, dataset_fp: str) -> ck.Found | None:
    """The checkpoint to resume (``cfg.resume``: auto / never / a folder), or None; raises
    :class:`training.checkpoints.ResumeError` when it cannot be resumed exactly. Rank 0 decides and
    every rank gets the same answer (or the same refusal); cheap, so it runs before the modules and
    the engine are built."""
    answer: list[Any] = [None]
    if world.is_main:
        try:
            answer[0] = _pick_checkpoint(cfg, world, dataset_fp)
        except ck.ResumeError as err:
            answer[0] = err
    dist.broadcast_object_list(answer, src=0)
    if isinstance(answer[0], BaseException):
        raise answer[0]
    return answer[0]


def _pick_checkpoint(cfg: TrainConfig, world: World, dataset_fp: str) -> ck.Found | None:
    root = Path(cfg.out) / "checkpoints"
    if cfg.resume == "never":
        ck.set_aside_previous(Path(cfg.out))
        return None
    if cfg.resume == "auto":
        found = ck.complete_checkpoints(root)
        if not found:
            return None
        chosen = found[-1]
    else:
        chosen = ck.read_checkpoint(Path(cfg.resume))
        if chosen is None:
            raise ck.ResumeError(f"resume={cfg.resume}: not a complete checkpoint (no readable {ck.MARKER} in it)")
    ck.check_resumable(chosen, world_size=world.world_size, config_hash=config_hash(cfg),
                       config=resume_fingerprint(cfg), dataset_fingerprint=dataset_fp)
    return chosen


class Trainer:
    def __init__(self, cfg: TrainConfig, world: World, *, batches: Any = None, tracker: Any = None,
                 dataset_fp: str | None = None):
        """``batches``: an iterator of batches to use instead of the datasets' loaders (tests of the
        engine feed fixed batches this way); ``tracker``: a started :class:`training.tracking.Tracker`
        (rank 0) or None."""
        self.cfg, self.world = cfg, world
        self.out = Path(cfg.out)
        self.ckpt_root = self.out / "checkpoints"
        self.tracker = tracker
        torch.manual_seed(cfg.seed)  # the same fresh initialisation on every rank
        self.models = build_models(cfg)
        ts, gen = self.models.textsynch.to(world.device), self.models.generator.to(world.device)
        self.named = set_stage_trainable(ts, gen, cfg.stage, pretrain_backbone=cfg.pretrain_backbone)
        self.objective = SelvaObjective(ts, gen, stage=cfg.stage, text_in_encoder=cfg.text_in_encoder,
                                        cfg_dropout=cfg.cfg_dropout, seed=cfg.seed)
        self.trained = TrainedParameters(self.named, self.objective)
        self.engine, self.optimizer = build_engine(cfg, world, self.trained)
        self.bf16 = use_bf16(cfg, world.device)
        mixing = bool(cfg.mixing.enabled)
        mix = MixConfig(prob=cfg.mixing.prob if mixing else 0.0, alpha=cfg.mixing.alpha,
                        constant_lambda=cfg.mixing.constant_lambda, min_lambda=cfg.mixing.min_lambda, seed=cfg.seed)
        self.batches = batches if batches is not None else build_batches(
            cfg, rank=world.rank, world_size=world.world_size, device=world.device, mix=mix)
        # rank 0 only: ZeRO-1/2 keeps identical full weights on every rank, and the snapshot folder is shared
        self.ema = (ema_module(cfg, self.models, [n for n, _ in self.named], self.out / "ema_snapshots")
                    if cfg.ema.enabled and world.is_main else None)
        self.step = 0  # optimizer steps done
        self.skipped = 0
        self.bad_in_row = 0
        self.run_id: str | None = None
        # names this job across resumes (checkpoint markers, the MLflow run's tag "selva_job"): a job stopped
        # before a checkpoint learned the run's id still finds its run when resumed (rank 0's value counts)
        self.job_id = uuid.uuid4().hex
        self.config_hash = config_hash(cfg)
        # the caller may already hold it (train.py computes it once, for the resume decision)
        self.dataset_fp = dataset_fp or (dataset_fingerprint(cfg) if batches is None else "fixed-batches")
        from training.validation import Validator

        self.validator = Validator(cfg, self.objective, rank=world.rank, world_size=world.world_size,
                                   device=world.device, out_dir=self.out)
        self.losses: list[float] = []  # per-step mean loss over all ranks (what tests compare)
        self.val_metrics: dict[str, float] = {}
        self.validated_at = -1
        self._waited_for_run_id = False
        self.stats = StepStats()

    # ------------------------------------------------------------------------------ signals
    @property
    def stop_requested(self) -> bool:
        return stop_requested()

    # ------------------------------------------------------------------------------ one step
    def _nan_fault(self) -> bool:
        spec = os.environ.get(NAN_FAULT_ENV, "")
        if not spec:
            return False
        step, rank = spec.split(":")
        onwards = step.endswith("+")  # "3+:0": every step from 3 on
        first = int(step.rstrip("+"))
        return int(rank) == self.world.rank and (self.step >= first if onwards else self.step == first)

    def train_step(self) -> tuple[float, bool]:
        """One optimizer step over ``grad_accum`` micro-batches; returns (this rank's mean loss, applied)."""
        losses = []
        for micro in range(self.cfg.grad_accum):
            t0 = time.perf_counter()
            batch = next(self.batches)
            self.stats.data_wait_s += time.perf_counter() - t0
            micro_step = self.step * self.cfg.grad_accum + micro
            loss, per_sample, _ = self.engine(batch, micro_step)
            if self._nan_fault():
                loss = loss * float("nan")
            self.engine.backward(loss)
            self.engine.step()
            losses.append(float(loss.detach()))
            self.stats.samples += len(per_sample)
            self.stats.batches += 1
            if "mix" in batch:
                for k, v in batch["mix"].stats().items():
                    self.stats.mix[k] = self.stats.mix.get(k, 0.0) + v
        return sum(losses) / len(losses), self.engine.was_step_applied()

    def _agree(self, loss: float) -> tuple[float, bool]:
        """All-reduce (loss sum, finite count, stop signal) so every rank decides alike."""
        finite = loss == loss and abs(loss) != float("inf")
        t = torch.tensor([loss if finite else 0.0, float(finite), float(self.stop_requested)], dtype=torch.float64)
        dist.all_reduce(t)
        n = int(t[1])
        mean = float(t[0]) / n if n else float("nan")
        return mean, bool(t[2] > 0)

    # ------------------------------------------------------------------------------ checkpoints
    def save_checkpoint(self) -> Path:
        folder = self.ckpt_root / ck.tag(self.step)
        if self.world.is_main:
            if folder.exists():  # a folder left by a save that was killed: start it afresh
                import shutil

                shutil.rmtree(folder)
            self.ckpt_root.mkdir(parents=True, exist_ok=True)
        dist.barrier()
        self.engine.save_checkpoint(str(self.ckpt_root), tag=folder.name, save_latest=False)
        state = {
            "step": self.step, "skipped": self.skipped, "bad_in_row": self.bad_in_row,
            "loader": self.batches.state_dict() if hasattr(self.batches, "state_dict") else None,
            "rng": ck.rng_state(), "losses": self.losses,
        }
        ck.write_json_atomic(ck.rank_file(folder, self.world.rank), state)
        if self.world.is_main and self.ema is not None:
            self.ema.save(folder / "ema.pt")
        _kill_fault("save", self.step, self.world.rank)
        # every rank learns the MLflow run id, recorded in the marker so a resumed job continues the run;
        # a short wait the first time only (the tracker's thread creates the run; an outage costs ≤ 5 s)
        run_id = None
        if self.world.is_main and self.tracker is not None:
            run_id = self.tracker.run_id
            if run_id is None and self.run_id is None and not self._waited_for_run_id:
                self._waited_for_run_id = True  # once per job: an outage must not cost every checkpoint
                run_id = self.tracker.wait_run_id(5.0)
        ids = [run_id]
        dist.broadcast_object_list(ids, src=0)  # also the barrier: every rank's files are on disk
        self.run_id = ids[0] or self.run_id
        if self.world.is_main:
            marker = {
                "step": self.step, "world_size": self.world.world_size, "config_hash": self.config_hash,
                "config": resume_fingerprint(self.cfg), "dataset": self.dataset_fp, "run_id": self.run_id,
                "job_id": self.job_id, "time": time.time(),
            }
            ck.write_json_atomic(folder / ck.MARKER, marker)
            ck.clean_incomplete(self.ckpt_root, self.cfg.keep_checkpoints)
        dist.barrier()
        return folder

    def load_checkpoint(self, found: ck.Found) -> None:
        self.engine.load_checkpoint(str(found.folder.parent), tag=found.folder.name, load_module_strict=True,
                                    load_optimizer_states=True, load_lr_scheduler_states=False)
        state = ck.json.loads(ck.rank_file(found.folder, self.world.rank).read_text())
        self.step, self.skipped, self.bad_in_row = state["step"], state["skipped"], state["bad_in_row"]
        self.losses = list(state["losses"])
        if state["loader"] is not None and hasattr(self.batches, "load_state_dict"):
            self.batches.load_state_dict(state["loader"])
        ck.set_rng_state(state["rng"])
        if self.ema is not None:
            self.ema.load(found.folder / "ema.pt", step=self.step)
        self.run_id = found.marker.get("run_id")
        self.job_id = found.marker.get("job_id") or self.job_id

    # ------------------------------------------------------------------------------ the loop
    def run(self, *, on_step=None, on_log=None) -> dict[str, Any]:
        """Train to ``cfg.steps``; returns the end-of-run summary. Raises TrainingStopped after
        ``max_bad_steps`` non-finite steps in a row (the last good checkpoint stays)."""
        cfg = self.cfg
        t_start, step_start = time.perf_counter(), self.step
        while self.step < cfg.steps:
            set_lr(self.optimizer, lr_at(cfg, self.step))
            t0 = time.perf_counter()
            local_loss, applied = self.train_step()
            self.stats.step_s += time.perf_counter() - t0
            self.stats.timed_steps += 1
            loss, stop_signal = self._agree(local_loss)
            if self.ema is not None:  # also after a skipped step (weights unchanged): EMA counts optimizer steps
                self.ema.update(self.step + 1)
            if applied:
                self.bad_in_row = 0
            else:
                self.skipped += 1
                self.bad_in_row += 1
            self.losses.append(loss)
            self.step += 1
            if on_step is not None:
                on_step(self.step, loss)
            if applied and loss == loss:
                self.stats.loss_sum += loss
                self.stats.steps += 1
            norm = self.engine.get_global_grad_norm()
            if norm is not None and applied:
                self.stats.grad_norms.append(float(norm))
            if self.bad_in_row >= cfg.max_bad_steps:
                raise TrainingStopped(
                    f"{self.bad_in_row} steps in a row had a non-finite loss or gradient (last at step {self.step}); "
                    f"stopped. The last good checkpoint is under {self.ckpt_root}")
            _kill_fault("step", self.step, self.world.rank)
            if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                self.log_metrics(on_log)
            due = self.step % cfg.checkpoint_every == 0 or self.step == cfg.steps
            if due or stop_signal:
                self.save_checkpoint()
            if not stop_signal and self.validator.due(self.step):
                self.validate()
            if stop_signal:
                if self.world.is_main:
                    print(f"stop signal: checkpoint at step {self.step} written; resume with resume=auto",
                          file=sys.stderr, flush=True)
                return {"stopped_at": self.step, "signal": True}
        if self.validated_at != self.step and self.validator.due(self.step):
            self.validate()  # resumed from the last checkpoint: the end-of-run validation is still owed
        elapsed = time.perf_counter() - t_start
        return {"steps": self.step - step_start, "elapsed_s": elapsed, "skipped": self.skipped,
                "final_loss": self.losses[-1] if self.losses else float("nan")}

    def validate(self) -> dict[str, float]:
        """Val loss (every rank takes part) and val audio (rank 0), logged to MLflow."""
        metrics, files = self.validator.run(self.step)
        self.validated_at = self.step
        if self.tracker is not None:
            if metrics:
                self.tracker.log_metrics(metrics, step=self.step)
            for path in files:  # written once per step folder, never rewritten: safe to upload later
                self.tracker.log_artifact(str(path), f"validation/{path.parent.name}")
        self.val_metrics = metrics
        return metrics

    def count_nodes(self) -> int:
        """Distinct (host, node rank) pairs over all ranks: launchers disagree on which variables they set."""
        import socket

        gathered: list[Any] = [None] * self.world.world_size
        dist.all_gather_object(gathered, (socket.gethostname(), self.world.node_rank))
        return len(set(gathered))

    def system_metrics(self) -> dict[str, float]:
        """Per-node system metrics, gathered to rank 0 (every rank takes part: a collective).

        Each rank reports its process memory (and GPU memory); the node's figures are summed over its
        ranks, with the host's CPU and memory use from one of them. Collected whatever the tracking
        server does, so an outage loses only the values the tracker could not send."""
        import psutil

        proc = psutil.Process()
        mine = {"node": self.world.node_rank, "rss_gb": proc.memory_info().rss / 2**30,
                "cpu_percent": psutil.cpu_percent(interval=None), "host_mem_percent": psutil.virtual_memory().percent}
        if torch.cuda.is_available():
            mine["gpu_peak_gb"] = torch.cuda.max_memory_allocated() / 2**30
            try:  # needs NVML (pynvml); without it the node simply has no utilisation figure
                mine["gpu_util_percent"] = float(torch.cuda.utilization())
            except Exception:  # noqa: BLE001 - a missing optional library, not an error of the run
                pass
        gathered: list[Any] = [None] * self.world.world_size
        dist.all_gather_object(gathered, mine)
        out: dict[str, float] = {}
        for item in gathered:
            prefix = f"system/node{item['node']}/"
            for key in ("rss_gb", "gpu_peak_gb"):
                if key in item:
                    out[prefix + key] = out.get(prefix + key, 0.0) + item[key]
            for key in ("cpu_percent", "host_mem_percent", "gpu_util_percent"):
                if key in item:
                    out[prefix + key] = item[key]
        return out

    def log_metrics(self, on_log=None) -> None:
        s = self.stats
        metrics = {
            "train/loss": s.loss_sum / max(1, s.steps),
            "train/lr": lr_at(self.cfg, self.step - 1),
            "train/samples_per_s": s.samples * self.world.world_size / max(s.step_s, 1e-9),
            "train/step_time_s": s.step_s / max(1, s.timed_steps),  # a partial interval (end, resume) too
            "train/data_wait_share": s.data_wait_s / max(s.step_s, 1e-9),
            "train/skipped_steps": float(self.skipped),
        }
        if s.grad_norms:
            metrics["train/grad_norm"] = sum(s.grad_norms) / len(s.grad_norms)
        metrics.update({k: v / max(1, s.batches) for k, v in s.mix.items()})
        errors = getattr(self.batches, "error_counts", {}) or {}
        metrics["data/skipped_samples"] = float(errors.get("sample", 0) + errors.get("shard", 0))
        metrics.update(self.system_metrics())
        if self.tracker is not None:
            self.tracker.log_metrics(metrics, step=self.step)
        if on_log is not None:
            on_log(self.step, metrics)
        s.reset()

    def export(self) -> Path:
        """Rank 0: ``out/final/`` with the EMA weights of the trained modules (training/export.py)."""
        from preprocessing.shards import read_dataset_info
        from training.export import export_final

        ema = self.ema.export_weights() if self.ema is not None else None
        # the preflight made all datasets agree; batches given by a test come from no dataset
        encoders = read_dataset_info(self.cfg.dataset[0].path).encoders if self.dataset_fp != "fixed-batches" else None
        export_final(self.out, textsynch=self.models.textsynch, generator=self.models.generator,
                     preset_name=self.cfg.preset, config=to_dict(self.cfg), ema_weights=ema,
                     ema_sigma_rel=self.cfg.ema.export_sigma_rel if ema is not None else None, encoders=encoders)
        return self.out / "final"

    def resolved(self) -> dict[str, Any]:
        return {"config": to_dict(self.cfg), "deepspeed": deepspeed_config(self.cfg, self.world),
                "bf16_autocast": self.bf16}
