"""``selva data check``: the real loader as N ranks x W workers, its report and its exit status."""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import pytest
from test_loader import corrupt

from pipelines.synth import write_synthetic_dataset
from training import data_check_cli
from training.data_check import CheckReport, EpochReport


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> tuple[Path, list[str]]:
    root = tmp_path_factory.mktemp("check") / "data"
    return root, write_synthetic_dataset(root, 22, 5)


def selva_data(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="selva")
    data_check_cli.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return args.func(args)


def test_check_reports_a_healthy_dataset(dataset, capsys):
    root, _ = dataset
    argv = ["data", "check", str(root), "--ranks", "2", "--workers", "2", "--batch", "2", "--epochs", "2"]
    assert selva_data([*argv, "--mix-prob", "0.5"]) == 0
    out = capsys.readouterr().out
    assert "22 samples in 5 shard(s); 2 rank(s) x 2 worker(s), batch 2 -> 6 batches per rank" in out
    assert "24 slots, 2 spare" in out
    rows = [line.split() for line in out.splitlines() if line.strip()[:1].isdigit() and "each" in line]
    assert [r[:2] + r[3:] for r in rows] == [["0", "6", "24", "22", "2", "0"], ["1", "6", "24", "22", "2", "0"]]
    assert "samples/s" in out and "peak RSS" in out and "result: OK" in out
    mixing = next(line for line in out.splitlines() if line.startswith("mixing:"))
    assert "% of samples mixed" in mixing and "target left" in mixing and "mean lambda" in mixing


def test_check_fails_when_an_epoch_misses_a_sample(dataset, tmp_path, capsys):
    root = tmp_path / "data"
    shutil.copytree(dataset[0], root)
    corrupt(root, dataset[1])
    assert selva_data(["data", "check", str(root), "--workers", "0", "--batch", "4", "--mix-prob", "0"]) == 1
    out = capsys.readouterr().out
    assert "data errors (counted and skipped): sample 2" in out
    assert "PROBLEM: epoch 0: 2 sample(s) never seen" in out and "result: FAILED" in out
    assert "mixing: off" in out


def test_check_refuses_what_it_cannot_open(dataset, tmp_path, capsys):
    assert selva_data(["data", "check", str(tmp_path)]) == 2
    assert "without dataset.json is not a dataset" in capsys.readouterr().err
    shard = str(dataset[0] / "shards" / "train-000000.tar")
    assert (
        selva_data(["data", "check", f"pipe:cat {shard}", "--workers", "0", "--batch", "2", "--samples-per-epoch", "5"])
        == 0
    )
    out = capsys.readouterr().out
    assert "(count given, not from markers)" in out and " n/a" in out


def test_unequal_steps_are_a_problem():
    report = CheckReport(ranks=2, workers=1, batch_size=2, batches_per_epoch=3, dataset_samples=11)
    report.epochs = [EpochReport(0, [3, 3], 12, 11, 1, 0), EpochReport(1, [3, 2], 10, 10, 0, 1)]
    assert report.problems() == [
        "epoch 1: ranks got [3, 2] batches, expected 3 each",
        "epoch 1: 1 sample(s) never seen",
    ]


def test_mixing_lines_never_contradict_each_other():
    from training.data_check import CheckReport, mixing_lines

    def lines(**counts) -> list[str]:
        return mixing_lines(CheckReport(1, 2, 2, 3, 6, **counts))

    some = lines(mixable=6, mixed=4, target_left=2, lam_sum=2.0, no_distinct_partner=2)
    assert some == [
        "mixing: 66.7% of samples mixed; target left 50.0% / right 50.0%; mean lambda 0.500",
        "mixing: 2 sample(s) left unmixed: every other sample of their batch had the same prompt",
    ]
    assert lines(mixable=6, no_distinct_partner=6) == [
        "mixing: 6 sample(s) left unmixed: every other sample of their batch had the same prompt"
    ]
    assert lines(mixable=6) == ["mixing: on, but no sample was mixed (a batch of 1 has no partner to mix with)"]
    assert lines() == ["mixing: off"]
