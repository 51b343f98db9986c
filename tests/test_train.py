"""The DeepSpeed trainer on 2 gloo processes: the three stages chained, MLflow, frozen parameters,
the engine's parameter set, a NaN on one rank, and data parallelism equal to one big batch.

One session-wide chain of real jobs (``stage_runs``): pretrain -> encoder (stage 1, initialised from
the pretrain export) -> generator (stage 2, TextSynch from stage 1, generator from pretrain), each 20
steps on 2 ranks, on the generated training world (tests/conftest.py ``train_world``).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.train_launch import explain, job_env, run_job, torchrun_cmd

STEPS = 20
COMMON = [f"steps={STEPS}", "checkpoint_every=10", "loader.batch_size=2", "loader.num_workers=0",
          "loader.shuffle_buffer=8", "log_every=5", "optim.warmup_steps=5", "ema.snapshot_every=10",
          "experiment=stages"]


@pytest.fixture(scope="session")
def stage_runs(train_world, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("stages")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    outs = {s: root / s for s in ("pretrain", "encoder", "generator")}
    inits = {
        "pretrain": [],
        "encoder": [f"init.textsynch={outs['pretrain'] / 'final'}", f"init.generator={outs['pretrain'] / 'final'}"],
        "generator": [f"init.textsynch={outs['encoder'] / 'final'}", f"init.generator={outs['pretrain'] / 'final'}"],
    }
    for stage, out in outs.items():
        args = ["--config", "configs/train/tiny.yaml", f"dataset={train_world}", f"out={out}", f"stage={stage}",
                f"tracking_uri={uri}", f"run_name={stage}", *COMMON, *inits[stage]]
        # stage 1 also shows the agreed skip: rank 1 alone produces a NaN loss at step 3
        env = job_env(SELVA_FAULT_NAN_STEP="3:1") if stage == "encoder" else None
        result = run_job(torchrun_cmd(2) + args, env=env, timeout=400)
        assert result.returncode == 0, explain(result)
        (out / "stdout.txt").write_text(result.stdout)
        (out / "stderr.txt").write_text(result.stderr)
    return {"uri": uri, **outs}


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
        assert engine and all(k.startswith(("textsynch.vfeat_extractor.", "generator.")) for k in engine)
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
        assert {"resolved_config.yaml", "deepspeed_config.json", "final"} <= names
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
