"""``selva demo`` (what ``make demo`` runs) and ``selva benchmark synth`` in miniature: the whole job through
the real engines (Ray precompute, DeepSpeed training jobs, MLflow on sqlite, generation, scoring), with a
world and step counts small enough for the suite. ``QUICK`` differs only in sizes."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from conftest import shared_dir

from pipelines.demo import run_demo
from pipelines.synth_benchmark import VARIANTS, SynthBenchmark, SynthBenchmarkConfig, SynthBenchmarkError
from pipelines.synth_world import SynthOptions
from preprocessing.compact import decode_flac

MINI = SynthBenchmarkConfig(world=SynthOptions(clips=8, test_clips=2), seeds=(0,), pretrain_steps=2,
                            encoder_steps=2, generator_steps=2, batch_size=2, sampling_steps=2, threads=1)
COMPOSITES = 4  # two held-out clips of different kinds: each asked for, both placements


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> tuple[Path, Path, str]:
    """The demo run once with MINI, with the real clips when ../shared has them (CI does)."""
    import contextlib
    import io

    out = tmp_path_factory.mktemp("demo") / "out"
    table = shared_dir() / "data" / "real" / "videos.tsv"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert run_demo(out, table, MINI) == 0
    return out, table, printed.getvalue()


def _mlflow_runs(uri: str, experiment: str) -> dict[str, dict]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    assert exp is not None, f"no MLflow experiment {experiment}"
    return {r.info.run_name: r.data.metrics for r in client.search_runs([exp.experiment_id])}


def test_every_variant_is_trained_generated_and_scored(demo):
    out, _, printed = demo
    bench = out / "synth"
    results = json.loads((bench / "results.json").read_text())
    assert set(results["variants"]) == set(VARIANTS)
    chance = results["chance"]
    assert chance["items"] == COMPOSITES and chance["sync"] == 1.0 and 0 <= chance["distractor_sync"] < 1
    for variant, entry in results["variants"].items():
        assert entry["seeds"] == [0]
        scores = json.loads((bench / "scores" / f"{variant}-seed0.json").read_text())
        assert len(scores["per_item"]) == COMPOSITES
        assert entry["sync"]["per_seed"] == [scores["sync"]] and 0 <= scores["sync"] <= 1
        assert scores["temporal_selectivity"] == pytest.approx(scores["sync"] - scores["distractor_sync"])
        flacs = sorted((bench / "generated" / variant / "seed0").rglob("*.flac"))
        assert len(flacs) == COMPOSITES
        audio, rate = decode_flac(flacs[0].read_bytes())
        assert rate == 16_000 and len(audio) == 2 * 16_000 and np.abs(audio).max() > 0
        stages = [stage for stage, _ in VARIANTS[variant]]
        assert sorted(p.name for p in (bench / "runs" / variant / "seed0").iterdir()) == sorted(stages)
    # the ablation's generator trained on text-free video features and is generated with them
    from training.generate import trained_with_text_in_encoder

    runs = bench / "runs"
    final = "seed0/generator/final/config.yaml"
    assert not trained_with_text_in_encoder(runs / "no_text_in_encoder" / final)
    assert trained_with_text_in_encoder(runs / "selva" / final)
    assert not trained_with_text_in_encoder(runs / "pretrain" / "final" / "config.yaml")

    # MLflow: every training job, and one run per variant with the table's values
    uri = f"sqlite:///{(bench / 'mlflow.db').resolve()}"
    jobs = _mlflow_runs(uri, "selva-synth")
    assert {"pretrain", "selva-seed0-encoder", "selva-seed0-generator", "no_text_in_encoder-seed0-generator",
            "no_mixing-seed0-encoder", "no_mixing-seed0-generator"} <= set(jobs)
    per_variant = _mlflow_runs(uri, "selva-synth-benchmark")
    assert set(per_variant) == set(VARIANTS)
    for variant, metrics in per_variant.items():
        assert metrics["sync_mean"] == pytest.approx(results["variants"][variant]["sync"]["mean"])

    table = (bench / "results.md").read_text()
    assert "| selva | 1 |" in table and "ground truth (chance level)" in table and "| target | met |" in table
    assert table in printed and "mlflow ui --backend-store-uri sqlite:///" in printed


def test_the_real_clips_go_through_precompute_train_and_generate(demo):
    out, table, printed = demo
    if not table.is_file():
        pytest.skip("the real clips are in ../shared (a bare clone has none)")
    flacs = sorted((out / "real" / "generated").rglob("*.flac"))
    assert len(flacs) == 2 and all(len(decode_flac(f.read_bytes())[0]) == 2 * 16_000 for f in flacs)
    assert (out / "real" / "run" / "final" / "export.json").is_file()
    assert "[2/3] the real clips" in printed and str(out / "real" / "generated") in printed


def test_a_rerun_resumes_and_other_options_are_refused(demo, capsys):
    out, table, _ = demo
    bench = out / "synth"
    finals = {p: p.stat().st_mtime_ns for p in bench.rglob("final/export.json")}
    flacs = {p: p.stat().st_mtime_ns for p in bench.rglob("generated/**/*.flac")}
    before = json.loads((bench / "results.json").read_text())
    assert run_demo(out, out / "no-real-clips.tsv", MINI) == 0
    assert "[2/3] skipped: no real clips" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in bench.rglob("final/export.json")} == finals  # nothing retrained
    assert {p: p.stat().st_mtime_ns for p in bench.rglob("generated/**/*.flac")} == flacs  # nothing regenerated
    assert json.loads((bench / "results.json").read_text())["variants"] == before["variants"]
    with pytest.raises(SynthBenchmarkError, match="made with other options.*seeds"):
        SynthBenchmark(bench, replace(MINI, seeds=(1,))).run()
    with pytest.raises(SynthBenchmarkError, match="unknown variants"):
        SynthBenchmark(bench, replace(MINI, variants=("selva", "mmaudio")))
    # the command line: the same refusal as one line, before any work
    from selva_cli.main import main

    capsys.readouterr()
    assert main(["benchmark", "synth", "--out", str(bench), "--quick"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: {bench}: made with other options")
