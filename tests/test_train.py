"""The DeepSpeed trainer on 2 gloo processes: the three stages chained, MLflow, frozen parameters,
the engine's parameter set, a NaN on one rank, and data parallelism equal to one big batch.

One session-wide chain of real jobs (``stage_runs``): pretrain -> encoder (stage 1, initialised from
the pretrain export) -> generator (stage 2, TextSynch from stage 1, generator from pretrain), each 20
steps on 2 ranks, on the generated training world (tests/conftest.py ``train_world``).
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from tests.tracking_servers import closed_port, silent_server
from tests.train_launch import explain, job_env, run_job, start_job, torchrun_cmd

STEPS = 20
COMMON = [f"steps={STEPS}", "checkpoint_every=5", "loader.batch_size=2", "loader.num_workers=0",
          "loader.shuffle_buffer=8", "log_every=5", "optim.warmup_steps=5", "ema.snapshot_every=10",
          "experiment=stages"]


def stage_args(stage: str, dataset: Path, outs: dict[str, Path], out: Path, uri: str) -> list[str]:
    """The command line of one stage of the chain (the resume tests rerun the generator stage's)."""
    inits = {
        "pretrain": [],
        "encoder": [f"init.textsynch={outs['pretrain'] / 'final'}", f"init.generator={outs['pretrain'] / 'final'}"],
        # stage 2 also carries the resume tests' settings: 2 loader workers, mixing p 0.5, CFG dropout, ZeRO-2
        "generator": [f"init.textsynch={outs['encoder'] / 'final'}", f"init.generator={outs['pretrain'] / 'final'}",
                      "loader.num_workers=2", "mixing.prob=0.5", "cfg_dropout=0.1", "zero_stage=2"],
    }
    return ["--config", "configs/train/tiny.yaml", f"dataset={dataset}", f"out={out}", f"stage={stage}",
            f"tracking_uri={uri}", f"run_name={stage}", *COMMON, *inits[stage]]


@pytest.fixture(scope="session")
def stage_runs(train_world, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("stages")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    outs = {s: root / s for s in ("pretrain", "encoder", "generator")}
    for stage, out in outs.items():
        # stage 1 also shows the agreed skip: rank 1 alone produces a NaN loss at step 3
        env = job_env(SELVA_FAULT_NAN_STEP="3:1") if stage == "encoder" else None
        result = run_job(torchrun_cmd(2) + stage_args(stage, train_world, outs, out, uri), env=env, timeout=400)
        assert result.returncode == 0, explain(result)
        (out / "stdout.txt").write_text(result.stdout)
        (out / "stderr.txt").write_text(result.stderr)
    return {"uri": uri, "dataset": train_world, **outs}


def _final_state(out: Path, module: str) -> dict[str, torch.Tensor]:
    return load_file(str(out / "final" / f"{module}.safetensors"))


def _engine_keys(out: Path) -> set[str]:
    """Parameter names in DeepSpeed's own module file of the last checkpoint (what the engine holds)."""
    ckpt = out / "checkpoints" / f"step-{STEPS:08d}" / "mp_rank_00_model_states.pt"
    state = torch.load(ckpt, map_location="cpu", weights_only=False)  # DeepSpeed's file: our own, trusted
    return {k.replace("params.", "", 1).replace("__", ".") for k in state["module"]}


@pytest.mark.parametrize("stage", ["pretrain", "encoder", "generator"])
def test_each_stage_trains_its_parameters_only(stage_runs, stage):
    out = stage_runs[stage]
    marker = json.loads((out / "checkpoints" / f"step-{STEPS:08d}" / "complete.json").read_text())
    assert marker["step"] == STEPS and marker["world_size"] == 2
    engine = _engine_keys(out)
    ts, gen = _final_state(out, "textsynch"), _final_state(out, "generator")
    if stage == "pretrain":
        start_ts = start_gen = None
        # tiny.yaml keeps the random-init backbone fixed in pretrain (pretrain_backbone: false); the joint
        # set (backbone too) is trained by the DP-equivalence jobs, which use the defaults
        assert engine and all(k.startswith("generator.") for k in engine)
        assert not any(k.endswith(("latent_mean", "latent_std", "empty_string_feat")) for k in engine)
    else:
        # frozen: bit-identical to the weights the stage started from
        start_ts = _final_state(stage_runs["pretrain" if stage == "encoder" else "encoder"], "textsynch")
        start_gen = _final_state(stage_runs["pretrain"], "generator")
    if stage == "encoder":
        assert engine and all(k.startswith(("textsynch.text_proj", "textsynch.synch_text_cross_blocks",
                                            "textsynch.sup_text_feat")) for k in engine)
        assert all(torch.equal(gen[k], start_gen[k]) for k in gen), "the frozen generator changed"
        backbone = [k for k in ts if k.startswith("vfeat_extractor.")]
        assert backbone and all(torch.equal(ts[k], start_ts[k]) for k in backbone)
        trained = [k[len("textsynch."):] for k in engine]
        assert sum(not torch.equal(ts[k], start_ts[k]) for k in trained) >= len(trained) // 2
    if stage == "generator":
        assert engine and all(k.startswith("generator.") for k in engine)
        assert all(torch.equal(ts[k], start_ts[k]) for k in ts), "the frozen TextSynch changed"
        for k in ("latent_mean", "latent_std", "empty_string_feat"):
            assert torch.equal(gen[k], start_gen[k])
        changed = [k for k in gen if not torch.equal(gen[k], start_gen[k])]
        assert len(changed) >= len(engine) // 2


def test_a_nan_on_one_rank_skips_the_step_on_both(stage_runs):
    folder = stage_runs["encoder"] / "checkpoints" / f"step-{STEPS:08d}"
    states = [json.loads((folder / f"trainer-rank{r:05d}.json").read_text()) for r in (0, 1)]
    assert [s["skipped"] for s in states] == [1, 1]
    assert states[0]["losses"] == states[1]["losses"]  # the agreed per-step losses


def test_one_mlflow_run_per_job_with_params_history_and_artifacts(stage_runs):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(stage_runs["uri"])
    experiment = client.get_experiment_by_name("stages")
    runs = client.search_runs([experiment.experiment_id])
    assert sorted(r.info.run_name for r in runs) == ["encoder", "generator", "pretrain"]
    for run in runs:
        assert run.info.status == "FINISHED"
        params = run.data.params
        assert params["stage"] == run.info.run_name and params["optim.lr"] == "0.001"
        assert params["steps"] == str(STEPS) and params["optim.betas"] == "[0.9, 0.95]"
        assert run.data.tags["world_size"] == "2" and run.data.tags["nodes"] == "1"
        assert json.loads(run.data.tags["deepspeed_config"])["zero_optimization"]["stage"] == 2
        history = client.get_metric_history(run.info.run_id, "train/loss")
        assert [m.step for m in history] == [5, 10, 15, 20]
        assert all(m.value == m.value for m in history)
        for key in ("train/lr", "train/grad_norm", "train/samples_per_s", "train/data_wait_share"):
            assert client.get_metric_history(run.info.run_id, key), key
        names = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert {"resolved_config.yaml", "deepspeed_config.json", "final", "validation"} <= names
        listed = client.list_artifacts(run.info.run_id, f"validation/step-{STEPS:06d}")
        audio = {a.path.rsplit("/", 1)[-1] for a in listed}
        assert len([n for n in audio if n.endswith(".flac") and ".reference" not in n]) == 2
        assert len([n for n in audio if n.endswith(".png")]) == 4
        assert client.get_metric_history(run.info.run_id, "val/loss")[0].step == STEPS
        inputs = run.inputs.dataset_inputs
        assert len(inputs) == 1 and inputs[0].dataset.digest == json.loads(
            (stage_runs[run.info.run_name] / "checkpoints" / f"step-{STEPS:08d}" / "complete.json").read_text()
        )["dataset"]
    mixing = client.get_metric_history(next(r for r in runs if r.info.run_name == "encoder").info.run_id, "mix/rate")
    assert mixing and 0.0 < sum(m.value for m in mixing) / len(mixing) <= 1.0


def test_the_end_of_run_table_and_final_export(stage_runs):
    out = stage_runs["generator"]
    table = (out / "stdout.txt").read_text()
    assert "loss (first 10 -> last 10 steps)" in table and f"{STEPS} of {STEPS}" in table
    final = out / "final"
    assert (final / "weights" / "generator_small_16k_sup_5.pth").is_file()
    state = torch.load(final / "weights" / "generator_small_16k_sup_5.pth", map_location="cpu", weights_only=True)
    assert set(state) == set(_final_state(out, "generator"))


def test_data_parallel_equals_one_big_batch(train_world, tmp_path):
    """2 ranks x batch 2 and 1 rank x batch 4 on the same samples reach the same weights (5 steps)."""
    files = {}
    for nproc in (1, 2):
        files[nproc] = tmp_path / f"ranks{nproc}.safetensors"
        cmd = torchrun_cmd(nproc, script="tests/dp_equivalence.py") + [str(train_world), str(files[nproc]), "2"]
        result = run_job(cmd, timeout=300)
        assert result.returncode == 0, explain(result)
    one, two = load_file(str(files[1])), load_file(str(files[2]))
    assert one.keys() == two.keys()
    worst = max((one[k] - two[k]).abs().max().item() for k in one)
    assert worst <= 1e-5
    # and the comparison means something: training moved the weights far more than the tolerance
    start = load_file(str(files[2]) + ".start")
    assert max((two[k] - start[k]).abs().max().item() for k in two) > 1e-3


# ------------------------------------------------------------------------------------- resume
def _state(out: Path, step: int) -> tuple[list[dict], dict[str, torch.Tensor], dict]:
    folder = out / "checkpoints" / f"step-{step:08d}"
    ranks = [json.loads((folder / f"trainer-rank{r:05d}.json").read_text()) for r in (0, 1)]
    module = torch.load(folder / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)["module"]
    ema = torch.load(folder / "ema.pt", map_location="cpu", weights_only=True)
    return ranks, module, ema


def _close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """The largest absolute difference over the tensors of two states with the same keys."""
    assert a.keys() == b.keys()
    return max((x.float() - b[k].float()).abs().max().item() for k, x in a.items())


@pytest.fixture(scope="session")
def resumed_run(stage_runs, tmp_path_factory) -> dict[str, Any]:
    """Stage 2 of the chain again, SIGKILLed (launcher and ranks) while writing the step-15 checkpoint
    (after step 10's), then rerun with resume=auto."""
    root = tmp_path_factory.mktemp("resume")
    out = root / "generator"
    args = stage_args("generator", stage_runs["dataset"], stage_runs, out, f"sqlite:///{root / 'mlflow.db'}")
    killed = run_job(torchrun_cmd(2) + args, env=job_env(SELVA_FAULT_KILL="save:15"), timeout=400)
    leftovers = sorted(p.name for p in (out / "checkpoints").iterdir() if p.name.startswith("step-"))
    half_written = sorted(p.name for p in (out / "checkpoints" / "step-00000015").iterdir())
    # the resumed job also meets a tracking server that accepts and never answers (tracking_uri may change
    # on resume): it must train, flush for at most its deadline, exit 0 and say so once
    with silent_server() as port:
        resumed = run_job(torchrun_cmd(2) + args + ["resume=auto", f"tracking_uri=http://127.0.0.1:{port}"],
                          timeout=400)
    assert resumed.returncode == 0, explain(resumed)
    return {"out": out, "killed": killed, "leftovers": leftovers, "half_written": half_written,
            "resumed": resumed}


def test_a_kill_while_saving_leaves_an_unmarked_checkpoint_that_is_ignored(resumed_run):
    assert resumed_run["killed"].returncode != 0
    assert resumed_run["leftovers"] == ["step-00000005", "step-00000010", "step-00000015"]  # keep 2 complete
    half = resumed_run["half_written"]
    assert "trainer-rank00000.json" in half and "complete.json" not in half
    stderr = resumed_run["resumed"].stderr
    assert "resuming from" in stderr and "step-00000010 (step 10)" in stderr


def test_resume_continues_exactly(stage_runs, resumed_run):
    """Per-step losses, trained weights, EMA and every rank's loader position equal the uninterrupted run's."""
    ranks_a, module_a, ema_a = _state(stage_runs["generator"], STEPS)
    ranks_b, module_b, ema_b = _state(resumed_run["out"], STEPS)
    for a, b in zip(ranks_a, ranks_b, strict=True):
        assert len(a["losses"]) == len(b["losses"]) == STEPS
        assert max(abs(x - y) for x, y in zip(a["losses"], b["losses"], strict=True)) <= 1e-6
        assert a["loader"] == b["loader"] and a["loader"]["step"] == STEPS
    assert _close(module_a, module_b) <= 1e-6
    assert ema_a["step"] == ema_b["step"] == STEPS and ema_a["snapshots"] == ema_b["snapshots"]
    assert _close(ema_a["ema"], ema_b["ema"]) <= 1e-6
    final_a = _final_state(stage_runs["generator"], "generator")
    final_b = _final_state(resumed_run["out"], "generator")
    assert _close(final_a, final_b) <= 1e-6


def test_a_changed_config_refuses_to_resume(stage_runs, tmp_path):
    args = stage_args("generator", stage_runs["dataset"], stage_runs, stage_runs["generator"],
                      f"sqlite:///{tmp_path / 'mlflow.db'}")
    result = run_job(torchrun_cmd(2) + args + ["optim.lr=5e-4", "steps=30"], timeout=300)
    assert result.returncode != 0
    assert result.stderr.count("cannot resume exactly from") == 1  # one line, from rank 0
    assert "optim.lr: '0.001' -> '0.0005'" in result.stderr and "steps: '20' -> '30'" in result.stderr


def test_resume_from_a_copied_checkpoint_folder_of_any_name(stage_runs, tmp_path):
    """resume=PATH names a complete checkpoint, wherever it lies and whatever its folder is called (a
    copy named otherwise once crashed the job with StopIteration)."""
    import shutil
    from types import SimpleNamespace

    from training.train_config import load_config
    from training.train_data import dataset_fingerprint
    from training.trainer import _pick_checkpoint

    source = stage_runs["generator"] / "checkpoints" / f"step-{STEPS:08d}"
    copy = tmp_path / "mycopy"
    shutil.copytree(source, copy)
    args = stage_args("generator", stage_runs["dataset"], stage_runs, tmp_path / "elsewhere", stage_runs["uri"])
    cfg = load_config(args[1], [a for a in args[2:] if "=" in a] + [f"resume={copy}"])
    found = _pick_checkpoint(cfg, SimpleNamespace(world_size=2), dataset_fingerprint(cfg))
    assert found.folder == copy and found.step == STEPS
    (copy / "complete.json").unlink()
    from training.checkpoints import ResumeError

    with pytest.raises(ResumeError, match=f"resume={copy}: not a complete checkpoint"):
        _pick_checkpoint(cfg, SimpleNamespace(world_size=2), dataset_fingerprint(cfg))


def test_the_entry_point_takes_pre_emption_signals_before_its_heavy_imports():
    """SIGTERM during start-up (torch and DeepSpeed take seconds to import) must be kept, not fatal:
    when ``main`` parses its arguments, the handler is in place and nothing heavy is imported yet."""
    probe = ("import signal, sys, training.train as t\n"
             "parse = t.build_parser\n"
             "def spy(*a, **k):\n"
             "    heavy = [m for m in ('torch', 'deepspeed', 'mlflow') if m in sys.modules]\n"
             "    print(heavy, signal.getsignal(signal.SIGTERM).__qualname__)\n"
             "    return parse(*a, **k)\n"
             "t.build_parser = spy\n"
             "t.main(['--config', 'configs/train/tiny.yaml', '--print-config'])\n")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120,
                            cwd=Path(__file__).resolve().parent.parent)
    first = result.stdout.splitlines()[0].split()
    assert first == ["[]", "install_signal_handlers.<locals>.request_stop"], result.stdout[:300] + result.stderr


def test_a_silent_tracking_server_costs_the_exit_flush_only(resumed_run):
    stderr = resumed_run["resumed"].stderr
    assert stderr.count("warning: MLflow tracking at http://127.0.0.1:") == 1, stderr[-3000:]


def test_too_many_non_finite_steps_in_a_row_stop_the_run(train_world, tmp_path):
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "training.train", "--config", "configs/train/tiny.yaml", f"dataset={train_world}",
           f"out={out}", "steps=10", "checkpoint_every=2", "max_bad_steps=3", "loader.batch_size=2",
           "loader.num_workers=0", "validation.audio_clips=0", f"tracking_uri=http://127.0.0.1:{closed_port()}"]
    result = run_job(cmd, env=job_env(SELVA_FAULT_NAN_STEP="3+:0"), timeout=300)
    assert result.returncode == 1, explain(result)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "3 steps in a row had a non-finite loss or gradient (last at step 6)" in errors[0]
    kept = sorted(p.name for p in (out / "checkpoints").iterdir() if p.name.startswith("step-"))
    assert kept == ["step-00000002", "step-00000004"]  # none written after the stop; keep_checkpoints 2
    state = json.loads((out / "checkpoints" / "step-00000004" / "trainer-rank00000.json").read_text())
    assert state["skipped"] == 1 and state["bad_in_row"] == 1
    assert not (out / "final").exists()


# ------------------------------------------------------------------------------------- two nodes
def _launch_two_nodes(args: list[str], port: int) -> list[subprocess.Popen]:
    return [start_job(torchrun_cmd(1, nodes=(2, node, port)) + args) for node in (0, 1)]


def _wait_all(jobs: list[subprocess.Popen], timeout: float = 400) -> list[tuple[int, str, str]]:
    results = []
    for job in jobs:
        stdout, stderr = job.communicate(timeout=timeout)
        results.append((job.returncode, stdout, stderr))
    return results


def test_two_nodes_one_run_one_checkpoint_series_and_sigterm(train_world, tmp_path):
    """Two torchrun launchers (node ranks 0 and 1, one rendezvous) train tiny; SIGTERM to the node-1 rank
    alone makes both ranks checkpoint and exit 0 (Slurm pre-emption); a relaunch with resume=auto
    finishes into the same MLflow run and the same checkpoint series."""
    import psutil

    out, uri = tmp_path / "out", f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = ["--config", "configs/train/tiny.yaml", f"dataset={train_world}", f"out={out}", "stage=pretrain",
            "steps=12", "checkpoint_every=3", "loader.batch_size=2", "loader.num_workers=0", "log_every=3",
            "validation.audio_clips=0", f"tracking_uri={uri}", "experiment=nodes", "run_name=two-nodes"]
    jobs = _launch_two_nodes(args, closed_port())
    first = out / "checkpoints" / "step-00000003" / "complete.json"
    deadline = time.monotonic() + 300
    while not first.is_file():
        assert all(j.poll() is None for j in jobs), _wait_all(jobs)
        assert time.monotonic() < deadline, "no checkpoint at step 3"
        time.sleep(0.2)
    workers = psutil.Process(jobs[1].pid).children()
    assert len(workers) == 1
    workers[0].send_signal(signal.SIGTERM)
    stopped = _wait_all(jobs)
    assert [code for code, _, _ in stopped] == [0, 0], stopped
    assert "stop signal: checkpoint at step" in stopped[0][2]
    series = sorted(p.name for p in (out / "checkpoints").iterdir() if p.name.startswith("step-"))
    stop_step = int(series[-1][len("step-"):])
    assert 3 < stop_step < 12 and (out / "checkpoints" / series[-1] / "complete.json").is_file()

    finished = _wait_all(_launch_two_nodes([*args, "resume=auto"], closed_port()))
    assert [code for code, _, _ in finished] == [0, 0], finished
    assert f"(step {stop_step})" in finished[0][2]
    marker = json.loads((out / "checkpoints" / "step-00000012" / "complete.json").read_text())
    assert marker["world_size"] == 2

    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("nodes").experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert runs[0].data.tags["nodes"] == "2" and runs[0].data.tags["world_size"] == "2"
    steps = [m.step for m in client.get_metric_history(runs[0].info.run_id, "train/loss")]
    assert steps[-1] == 12 and 3 in steps and marker["run_id"] == runs[0].info.run_id
