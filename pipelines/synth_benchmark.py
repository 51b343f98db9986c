"""``selva benchmark synth``: the synthetic proof that selection works, end to end through the real pipeline.

One folder holds the whole comparison; every step is a job a user would run by hand, nothing special-cased::

    DIR/world/                 selva synth            clips (mp4 + table) and the composite test set
    DIR/dataset/               selva precompute       shards (local Ray, embedded encoders)
    DIR/runs/pretrain/         selva train            stage pretrain: the generator on single clips (the
                                                      MMAudio stand-in every variant starts from)
    DIR/runs/V/seedS/STAGE/    selva train            each variant's stages, per training seed
    DIR/generated/V/seedS/     selva generate --manifest DIR/world/test/benchmark
    DIR/scores/V-seedS.json    training.synth_score   sync, distractor sync, selectivities, per item
    DIR/results.md, .json      the table: mean and spread over seeds per variant, the measured chance level
    DIR/mlflow.db              every training job's run, and one run per variant with the table's values

Variants (``VARIANTS``): ``selva`` (stage 1 ``encoder`` then stage 2 ``generator``, mixing on), the
MMAudio-style ablation ``no_text_in_encoder`` (stage 2 only, ``text_in_encoder=false``: text reaches only
the generator) and ``no_mixing`` (both stages, ``mixing.enabled=false``). Why one shared ``pretrain``: the
paper's SELVA and its MMAudio baseline start from the same released MMAudio weights; the seeds vary what
each variant trains on top of them.

Kill and rerun with the same options: a finished step is skipped (an export's ``final/`` exists, generated
files exist), a training job resumes from its last checkpoint (``resume=auto``), the precompute from its
markers. ``DIR/benchmark.json`` records the options; other options are refused (a new folder, please).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from pipelines.synth_world import SynthOptions, write_synth
from preprocessing.shards import write_json_atomic

REPO_ROOT = Path(__file__).resolve().parent.parent
# stage -> overrides, in training order; each stage starts from the one before (train_learning's chain)
VARIANTS: dict[str, tuple[tuple[str, tuple[str, ...]], ...]] = {
    "selva": (("encoder", ()), ("generator", ())),
    "no_text_in_encoder": (("generator", ("text_in_encoder=false",)),),
    "no_mixing": (("encoder", ("mixing.enabled=false",)), ("generator", ("mixing.enabled=false",))),
}


class SynthBenchmarkError(RuntimeError):
    """A step failed (the message names it and its log) or the folder was made with other options."""


@dataclass(frozen=True)
class SynthBenchmarkConfig:
    """What the comparison runs. Steps are optimizer steps of batch ``batch_size``; ``extra`` are
    ``key=value`` overrides given to every training job (after the config file and ours)."""

    world: SynthOptions = field(default_factory=lambda: SynthOptions(clips=256, test_clips=16))
    seeds: tuple[int, ...] = (0, 1, 2)
    variants: tuple[str, ...] = tuple(VARIANTS)
    pretrain_steps: int = 3500
    encoder_steps: int = 2000
    generator_steps: int = 600
    batch_size: int = 8
    lr: float = 1e-3
    # stage 1 trains only TextSynch's text path, which has something to learn on mixed clips only (on a
    # single clip there is nothing to select): every batch mixed. Its text projection starts tiny (outputs
    # of norm ~0.03 at init), so at 1e-3 the features did not depend on the prompt after 300 steps and
    # barely after 800; at 5e-3 they did after 800 and selected after 2000 (docs/benchmarks.md)
    encoder_lr: float = 5e-3
    encoder_mixing_prob: float = 1.0
    train_config: str = "configs/train/tiny.yaml"
    sampling_steps: int = 25
    cfg: float = 4.5
    generate_batch: int = 16
    threads: int = 2  # torch threads of each training job and of generation
    extra: tuple[str, ...] = ()

    def check(self) -> None:
        unknown = sorted(set(self.variants) - set(VARIANTS))
        if unknown or not self.variants:
            raise SynthBenchmarkError(f"unknown variants {unknown}; choose from {', '.join(VARIANTS)}")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise SynthBenchmarkError(f"seeds must be distinct and at least one; got {self.seeds}")
        if min(self.pretrain_steps, self.encoder_steps, self.generator_steps, self.batch_size) < 1:
            raise SynthBenchmarkError("steps and batch size must be >= 1")
        if min(self.lr, self.encoder_lr) <= 0 or not 0 <= self.encoder_mixing_prob <= 1:
            raise SynthBenchmarkError("learning rates must be > 0 and the mixing probability in [0, 1]")


#: the short version ``make demo`` runs: one seed, a small world, few steps (minutes on 2 cores)
QUICK = SynthBenchmarkConfig(world=SynthOptions(clips=64, test_clips=8), seeds=(0,), pretrain_steps=300,
                             encoder_steps=60, generator_steps=60, sampling_steps=10)


def _job_env(threads: int) -> dict[str, str]:
    # the job's own settings, not the caller's: a user's MLFLOW_* would send every run elsewhere, and
    # fault-injection variables of the tests must not leak in
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "SELVA_FAULT"))}
    env.update(PYTHONPATH=str(REPO_ROOT), OMP_NUM_THREADS=str(threads), TQDM_DISABLE="1", PYTHONUNBUFFERED="1",
               TORCHDYNAMO_DISABLE="1")  # fmt: skip
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(name, None)
    return env


def run_logged(cmd: list[str], log_dir: Path, what: str, threads: int) -> None:
    """Run ``cmd`` with its output in ``log_dir/{stdout,stderr}.txt``; SynthBenchmarkError on failure."""
    log_dir.mkdir(parents=True, exist_ok=True)
    with open(log_dir / "stdout.txt", "a") as out, open(log_dir / "stderr.txt", "a") as err:
        code = subprocess.run(cmd, cwd=REPO_ROOT, env=_job_env(threads), stdout=out, stderr=err).returncode
    if code != 0:
        tail = (log_dir / "stderr.txt").read_text(errors="replace").strip().splitlines()[-1:] or ["(no output)"]
        raise SynthBenchmarkError(f"{what} failed (exit {code}): {tail[0]} (log: {log_dir / 'stderr.txt'})")


def train_command(c: SynthBenchmarkConfig, dataset: Path, out: Path, stage: str, steps: int, seed: int,
                  tracking_uri: str, run_name: str, overrides: tuple[str, ...] = ()) -> list[str]:
    """The ``python -m training.train`` command line of one job (what ``selva train`` runs): the config
    file, then the benchmark's settings, then ``overrides`` (inits, the variant's), then ``c.extra``."""
    return [sys.executable, "-m", "training.train", "--config", c.train_config, f"dataset={dataset}", f"out={out}",
            f"stage={stage}", f"steps={steps}", f"seed={seed}", f"checkpoint_every={max(1, steps // 2)}",
            "keep_checkpoints=1", f"log_every={max(1, steps // 10)}", f"loader.batch_size={c.batch_size}",
            "loader.num_workers=0", f"optim.lr={c.lr}", f"ema.snapshot_every={max(1, steps // 10)}",
            "validation.batches=0", "validation.audio_clips=0", f"tracking_uri={tracking_uri}",
            "experiment=selva-synth", f"run_name={run_name}", *overrides, *c.extra]  # fmt: skip


def generate_into(export: Path, items: list, out: Path, *, steps: int, cfg: float, batch_size: int = 8,
                  threads: int = 2) -> Any:
    """``selva generate --manifest``'s library path for ``items`` with ``export`` into ``out`` (seed 0): the
    settings recorded (a rerun with others is refused), finished items skipped. Returns the BatchReport."""
    import torch
    from transformers.utils import logging as hf_logging

    from training.generate import load_model
    from training.generate_batch import check_settings, run_items

    torch.set_num_threads(threads)
    hf_logging.disable_progress_bar()  # a "Loading weights" bar per text tower is noise in these logs
    check_settings(out, {"checkpoint": str(export.resolve()), "steps": steps, "cfg": cfg, "seed": 0, "weights": None})
    return run_items(load_model(export), items, out, steps=steps, cfg=cfg, seed=0, batch_size=batch_size)


class SynthBenchmark:
    """The comparison in ``out`` (module doc); ``run()`` does what is missing and returns the results."""

    def __init__(self, out: str | Path, config: SynthBenchmarkConfig = SynthBenchmarkConfig(),
                 log: Callable[[str], None] = print) -> None:
        config.check()
        self.out, self.config, self.log = Path(out), config, log
        self.world, self.dataset = self.out / "world", self.out / "dataset"
        self.tracking_uri = f"sqlite:///{(self.out / 'mlflow.db').resolve()}"
        self.timings: dict[str, float] = {}

    # ---- bookkeeping --------------------------------------------------------------------------
    def _claim_folder(self) -> None:
        record = json.loads(json.dumps(asdict(self.config)))  # tuples as lists, as the file holds them
        marker = self.out / "benchmark.json"
        if marker.is_file():
            before = json.loads(marker.read_text())
            if before != record:
                changed = sorted(k for k in record if before.get(k) != record[k])
                raise SynthBenchmarkError(f"{self.out}: made with other options ({', '.join(changed)} differ; "
                                          f"{marker}); use a new folder or the same options")
            return
        if self.out.exists() and any(self.out.iterdir()):
            raise SynthBenchmarkError(f"{self.out}: exists, is not empty and holds no benchmark.json")
        self.out.mkdir(parents=True, exist_ok=True)
        write_json_atomic(marker, record)

    def _timed(self, name: str, step: Callable[[], object]) -> object:
        began = time.perf_counter()
        result = step()
        self.timings[name] = self.timings.get(name, 0.0) + time.perf_counter() - began
        return result

    # ---- steps --------------------------------------------------------------------------------
    def make_world(self) -> None:
        summary = write_synth(self.world, self.config.world)
        self.log(f"world: {summary['clips']} clips, {summary['composites']} test composites -> {self.world}")

    def precompute(self) -> None:
        from pipelines.precompute import PrecomputeConfig, run_precompute
        from preprocessing.shards import read_dataset_info

        # one shard per 16 clips: a few shards to run in parallel, and few enough to start quickly
        report = run_precompute(PrecomputeConfig(input=str(self.world / "clips.tsv"), out=str(self.dataset),
                                                 workers=2, samples_per_shard=16, seed=self.config.world.seed,
                                                 max_failed_fraction=0.0, progress=False))  # fmt: skip
        # the dataset's counts, not this run's: a rerun that had nothing to do wrote no clip
        held = read_dataset_info(self.dataset).ok_samples
        self.log(f"precompute: {held} clips in shards ({report.ok} this run), {report.failed} failed this run "
                 f"-> {self.dataset}")

    def train(self, out: Path, stage: str, steps: int, seed: int, inits: tuple[str, ...],
              overrides: tuple[str, ...], run_name: str) -> Path:
        """One ``selva train`` job; returns its ``final/`` export. Skipped when ``final/`` exists."""
        final = out / "final"
        if (final / "export.json").is_file():
            return final
        cmd = train_command(self.config, self.dataset, out, stage, steps, seed, self.tracking_uri, run_name,
                            (*inits, *overrides))
        began = time.perf_counter()
        run_logged(cmd, out, f"training job {run_name}", self.config.threads)
        self.log(f"trained {run_name}: {steps} steps in {time.perf_counter() - began:.0f} s -> {final}")
        return final

    def train_variant(self, variant: str, seed: int, pretrain: Path) -> Path:
        """The variant's stages for one seed; returns the last stage's export."""
        textsynch = generator = pretrain
        for stage, overrides in VARIANTS[variant]:
            c = self.config
            steps, own = (c.encoder_steps, (f"optim.lr={c.encoder_lr}", f"mixing.prob={c.encoder_mixing_prob}")) \
                if stage == "encoder" else (c.generator_steps, ())
            inits = (f"init.textsynch={textsynch}", f"init.generator={generator}", *own)
            final = self.train(self.out / "runs" / variant / f"seed{seed}" / stage, stage, steps, seed, inits,
                               overrides, f"{variant}-seed{seed}-{stage}")
            if stage == "encoder":
                textsynch = final  # stage 2 takes TextSynch from stage 1 and the generator from pretrain
            else:
                textsynch = generator = final
        return final

    def generate(self, export: Path, out: Path) -> None:
        from training.generate_batch import items_from_benchmark

        c = self.config
        items = items_from_benchmark(self.world / "test" / "benchmark")
        if all((out / i.folder / f"{i.name}.flac").is_file() for i in items):
            return  # skip loading the model: nothing to generate
        report = generate_into(export, items, out, steps=c.sampling_steps, cfg=c.cfg, batch_size=c.generate_batch,
                               threads=c.threads)
        if report.failed:
            raise SynthBenchmarkError(f"generation into {out} failed for {sum(report.failed.values())} items: "
                                      f"{report.failures[0]}")

    def score(self, generated: Path, name: str) -> dict:
        from training.synth_score import score_folder

        scores = score_folder(generated, self.world / "test" / "benchmark", self.world / "test" / "clips.tsv")
        write_json_atomic(self.out / "scores" / f"{name}.json", scores)
        return scores

    # ---- the whole comparison -------------------------------------------------------------------
    def run(self) -> dict:
        from pipelines.synth_report import chance_level, summarise_variants, write_results

        c = self.config
        self._claim_folder()
        self._timed("world", self.make_world)
        self._timed("precompute", self.precompute)
        pretrain = self._timed("train", lambda: self.train(
            self.out / "runs" / "pretrain", "pretrain", c.pretrain_steps, c.world.seed, (), (), "pretrain"))
        scores: dict[str, dict[int, dict]] = {}
        for variant in c.variants:
            for seed in c.seeds:
                export = self._timed("train", lambda v=variant, s=seed: self.train_variant(v, s, pretrain))
                generated = self.out / "generated" / variant / f"seed{seed}"
                self._timed("generate", lambda e=export, g=generated: self.generate(e, g))
                result = self._timed("score", lambda g=generated, v=variant, s=seed: self.score(g, f"{v}-seed{s}"))
                scores.setdefault(variant, {})[seed] = result
                self.log(f"{variant} seed {seed}: sync {result['sync']:.3f}, distractor "
                         f"{result['distractor_sync']:.3f}, pitch {result['pitch_selectivity']:.3f}")
        chance = chance_level(self.world)
        results = {"config": json.loads(json.dumps(asdict(c))), "chance": chance,
                   "variants": summarise_variants(scores), "timings_s": self.timings}  # fmt: skip
        write_results(self.out, results, self.tracking_uri)
        return results


def config_with(base: SynthBenchmarkConfig, **changes: object) -> SynthBenchmarkConfig:
    """``base`` with the given fields replaced (``None`` values ignored); world fields by name too."""
    world_fields = {k: v for k, v in changes.items() if k in ("clips", "test_clips") and v is not None}
    rest = {k: v for k, v in changes.items() if k not in world_fields and v is not None}
    return replace(base, world=replace(base.world, **world_fields), **rest)
