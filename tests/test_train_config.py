"""The trainer's config: YAML + dotted overrides, every mistake named before any process starts."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from tests.train_launch import REPO, job_env
from training.train_config import (
    ConfigError,
    config_hash,
    flatten,
    load_config,
    redact,
    resume_fingerprint,
    to_dict,
    to_yaml,
)
from training.train_data import preflight

TINY = REPO / "configs" / "train" / "tiny.yaml"


def test_defaults_are_mmaudios_recipe_and_overrides_apply_in_order():
    cfg = load_config(None, ["dataset=/d", "out=/o"])
    o = cfg.optim
    assert (o.lr, o.betas, o.eps, o.weight_decay, o.warmup_steps, o.lr_milestones, o.lr_gamma, o.grad_clip) == (
        1e-4, (0.9, 0.95), 1e-6, 1e-6, 1000, (0.8, 0.9), 0.1, 1.0)
    assert cfg.cfg_dropout == 0.1 and cfg.zero_stage == 2 and cfg.ema.sigma_rels == (0.05, 0.1)
    cfg = load_config(TINY, ["dataset=/d", "out=/o", "optim.lr=3e-4", "optim.lr=2e-4", "optim.betas=[0.8, 0.9]",
                             "mixing.enabled=false", "init.generator=/w", "steps=7"])
    assert cfg.optim.lr == 2e-4 and cfg.optim.betas == (0.8, 0.9) and cfg.mixing.enabled is False
    assert cfg.init.generator == "/w" and cfg.steps == 7 and cfg.preset == "tiny"  # file + overrides
    assert cfg.dataset[0].path == "/d" and cfg.dataset[0].weight == 1.0


def test_mixing_follows_the_stage_unless_set():
    assert load_config(None, ["dataset=/d", "out=/o", "stage=pretrain"]).mixing.enabled is False
    assert load_config(None, ["dataset=/d", "out=/o", "stage=encoder", "init.generator=/g"]).mixing.enabled is True
    assert load_config(None, ["dataset=/d", "out=/o", "stage=pretrain", "mixing.enabled=true"]).mixing.enabled


def test_several_datasets_with_weights_from_yaml(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("dataset:\n  - {path: /a, weight: 5}\n  - /b\nout: /o\n")
    cfg = load_config(path)
    assert [(d.path, d.weight) for d in cfg.dataset] == [("/a", 5.0), ("/b", 1.0)]


@pytest.mark.parametrize(("override", "message"), [
    ("stepz=3", "unknown key stepz (override 'stepz=3')"),
    ("optim.lrr=1", "unknown key optim.lrr"),
    ("steps=abc", "steps: 'abc' is not of type int"),
    ("optim.lr=fast", "optim.lr: 'fast' is not of type float"),
    ("optim.betas=[0.9]", "optim.betas: needs 2 values, got 1"),
    ("mixing.enabled=maybe", "mixing.enabled: 'maybe' is not of type bool"),
    ("stage=stage3", "stage: 'stage3' is not one of pretrain, encoder, generator"),
    ("zero_stage=3", "zero_stage: 3 is not 1 or 2"),
    ("steps", "override 'steps' is not key=value"),
    ("stage=encoder", "init.generator: stage 'encoder' trains TextSynch through a frozen generator"),
    ("log_every=0", "log_every: must be >= 1, got 0"),
    ("optim.betas=[2, 3]", "optim.betas: each in [0, 1), got [2.0, 3.0]"),
    ("optim.lr=.inf", "optim.lr: must be finite"),
    ("optim.lr_milestones=[0.9, 0.5]", "optim.lr_milestones: must be ascending"),
    ("ema.sigma_rels=[]", "ema.sigma_rels: at least two distinct values, got []"),
    ("ema.snapshot_every=0", "ema.update_every and ema.snapshot_every: must be >= 1"),
    ("loader.num_workers=-1", "loader.num_workers: must be >= 0, got -1"),
    ("mixing.prob=2", "mixing.prob: must be in [0, 1], got 2.0"),
    ("collective_timeout_s=0", "collective_timeout_s: must be > 0"),
    ("dataset.weight=2", "dataset: give a path (dataset=DIR) or, in the config file, a list"),
    ("dataset=", "dataset: empty"),
    # values that once passed the check and crashed the job after start-up
    ("seed=-1", "seed: must be in [0, 2**63), got -1"),
    ("seed=1e20", "seed: must be in [0, 2**63)"),
    ("mixing.constant_lambda=2", "mixing.constant_lambda: must be in [min_lambda, 1 - min_lambda]"),
    ("dataset=[{path: /a, weight: 1}, {path: /b, weight: .inf}]", "dataset[].weight: weights must be finite and > 0"),
])
def test_a_wrong_key_or_value_is_named(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, ["dataset=/d", "out=/o", override])
    assert message in str(err.value)


def test_numbers_in_a_yaml_file_are_read_as_yaml_1_2_would(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("optim:\n  lr: 1e-4\n  eps: 1E-6\n")  # PyYAML (YAML 1.1) returns these as strings
    cfg = load_config(path, ["dataset=/d", "out=/o"])
    assert cfg.optim.lr == 1e-4 and cfg.optim.eps == 1e-6


def test_integers_written_as_powers_of_ten_in_a_file_are_integers(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("steps: 1e3\noptim:\n  warmup_steps: 1e2\n")  # strings to PyYAML, like lr: 1e-4
    cfg = load_config(path, ["dataset=/d", "out=/o"])
    assert (cfg.steps, cfg.optim.warmup_steps) == (1000, 100) and isinstance(cfg.steps, int)
    path.write_text("steps: 2.5e0\n")
    with pytest.raises(ConfigError, match="steps: '2.5e0' is not of type int"):
        load_config(path, ["dataset=/d", "out=/o"])


def test_a_yaml_syntax_error_is_one_line_with_its_position(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("steps: [1,\n  x: 2\n")
    with pytest.raises(ConfigError) as err:
        load_config(path, ["dataset=/d", "out=/o"])
    assert str(err.value).startswith(f"{path}: not valid YAML (line 3, column 1): ") and "\n" not in str(err.value)


def test_print_config_needs_no_dataset_or_output(capsys):
    from training.train import main

    assert main(["--config", "configs/train/tiny.yaml", "--print-config"]) == 0
    text = capsys.readouterr().out
    assert "preset: tiny" in text and "pretrain_backbone: false" in text
    with pytest.raises(ConfigError, match="dataset: no dataset given"):
        load_config("configs/train/tiny.yaml", ["out=/o"])  # a real job still needs both


def test_a_wrong_key_in_the_file_names_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("optim:\n  lr: 1e-4\n  momentum: 0.9\n")
    with pytest.raises(ConfigError, match=f"unknown key optim.momentum \\({path}\\)"):
        load_config(path, ["dataset=/d", "out=/o"])
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")


@pytest.mark.parametrize(("uri", "shown"), [
    ("https://alice:p@ss@host/x", "https://***@host/x"),
    ("http://h:9/m?access_token=T0P&api_key=K2&run=3", "http://h:9/m?access_token=***&api_key=***&run=3"),
    ("s3://b/k?X-Amz-Signature=abc&X-Amz-Credential=AK/1&x=1", "s3://b/k?X-Amz-Signature=***&X-Amz-Credential=***&x=1"),
    ("sqlite:////tmp/a@b/mlflow.db", "sqlite:////tmp/a@b/mlflow.db"),
    # passwords written raw, with characters that end a URI's authority
    ("https://alice:pa#ss@host", "https://***@host"),
    ("https://alice:p?ss@host/x", "https://***@host/x"),
    ("https://alice:p/w@host:5000/x", "https://***@host:5000/x"),
    ("https://alice:p w@host", "https://***@host"),
    ("https://TOKEN123@host/x", "https://***@host/x"),
    # host:port is no password: a later e-mail address on the line stays
    ("http://127.0.0.1:9/api failed for bob@example.org", "http://127.0.0.1:9/api failed for bob@example.org"),
])
def test_redaction_of_uris(uri, shown):
    assert redact(uri) == shown


def test_credentials_are_redacted_wherever_the_config_is_shown():
    uri = "https://alice:s3cret@mlflow.example:5000/x?token=abc"
    cfg = load_config(None, ["dataset=/d", "out=/o", f"tracking_uri={uri}"])
    assert redact(cfg.tracking_uri) == "https://***@mlflow.example:5000/x?token=***"
    for text in (to_yaml(cfg), str(flatten(to_dict(cfg)))):
        assert "s3cret" not in text and "alice" not in text and "abc" not in text
    assert cfg.tracking_uri.startswith("https://alice:s3cret@")  # the job itself still uses the real URI


def test_the_resume_fingerprint_ignores_where_and_how_often_only():
    base = ["dataset=/d", "out=/o"]
    h = config_hash(load_config(None, base))
    assert config_hash(load_config(None, [*base, "out=/elsewhere", "checkpoint_every=7", "tracking_uri=http://x",
                                          "validation.every=3", "loader.prefetch_factor=4"])) == h
    assert config_hash(load_config(None, ["dataset=/moved/d", "out=/o"])) == h  # the data is checked by content
    for changed in ("optim.lr=3e-4", "steps=5", "loader.num_workers=3", "seed=1", "stage=generator"):
        assert config_hash(load_config(None, [*base, changed])) != h, changed


def test_pretrain_backbone_only_binds_a_pretrain_resume():
    base = ["dataset=/d", "out=/o"]
    for stage in ("encoder", "generator"):
        extra = ["init.generator=/g"] if stage == "encoder" else []
        a = load_config(None, [*base, f"stage={stage}", *extra, "pretrain_backbone=true"])
        b = load_config(None, [*base, f"stage={stage}", *extra, "pretrain_backbone=false"])
        assert config_hash(a) == config_hash(b) and "pretrain_backbone" not in resume_fingerprint(a)
    a = load_config(None, [*base, "pretrain_backbone=true"])
    assert config_hash(a) != config_hash(load_config(None, [*base, "pretrain_backbone=false"]))


def test_preflight_names_a_bad_output_or_val_dataset(train_world, tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(ConfigError, match=f"out: {afile} is a file"):
        preflight(load_config(None, [f"dataset={train_world}", f"out={afile}"]))
    with pytest.raises(ConfigError, match=f"val_dataset: {tmp_path / 'nope'} does not exist"):
        preflight(load_config(None, [f"dataset={train_world}", f"out={tmp_path / 'o'}",
                                     f"val_dataset={tmp_path / 'nope'}"]))


def test_preflight_names_an_init_file_of_the_wrong_kind(train_world, tmp_path):
    """Each of these once passed the preflight and failed with a traceback after the process group."""
    from tests.test_export import tiny_modules
    from training.export import export_final

    textsynch, generator = tiny_modules()
    final = export_final(tmp_path / "run", textsynch=textsynch, generator=generator, preset_name="tiny", config={})
    db = tmp_path / "mlflow.db"
    db.write_bytes(b"SQLite format 3\x00" + bytes(100))
    deepspeed_like = tmp_path / "mp_rank_00_model_states.pt"
    torch.save({"module": generator.state_dict(), "ds_config": {"zero": 2}, "lr_scheduler": None,
                "ds_version": "0.18"}, deepspeed_like)
    cases = [
        ("init.textsynch", db, "mlflow.db: expected an export folder"),
        ("init.generator", tmp_path / "run", "run: expected an export folder"),
        ("init.generator", final / "textsynch.safetensors", "holds TextSynch weights, not Generator weights"),
        ("init.textsynch", final / "generator.safetensors", "holds Generator weights, not TextSynch weights"),
        ("init.generator", deepspeed_like, "not a flat mapping of names to tensors"),
        ("init.textsynch", final / "weights" / "generator_small_16k_sup_5.pth", "TextSynch weights of preset tiny"),
        ("init.backbone", final / "generator.safetensors", "no 'vfeat_extractor.*' keys"),
    ]
    for key, path, message in cases:
        cfg = load_config(None, [f"dataset={train_world}", f"out={tmp_path / 'o'}", f"{key}={path}"])
        with pytest.raises(ConfigError) as err:
            preflight(cfg)
        assert str(err.value).startswith((f"{key}: ", f"{key}={path}: ")) and message in str(err.value), \
            (key, path, str(err.value))
        assert "\n" not in str(err.value)
    for key, path in (("init.textsynch", final), ("init.generator", final / "generator.safetensors"),
                      ("init.generator", final / "weights" / "generator_small_16k_sup_5.pth")):
        preflight(load_config(None, [f"dataset={train_world}", f"out={tmp_path / 'o'}", f"{key}={path}"]))


def test_preflight_names_the_dataset_that_does_not_fit(train_world, tmp_path):
    with pytest.raises(ConfigError, match=f"dataset: {tmp_path / 'nope'} does not exist"):
        preflight(load_config(None, [f"dataset={tmp_path / 'nope'}", "out=/o"]))
    with pytest.raises(ConfigError, match="has no dataset.json"):
        preflight(load_config(None, [f"dataset={tmp_path}", "out=/o"]))
    with pytest.raises(ConfigError, match="was made for preset 'tiny'; this model is preset 'small_16k'"):
        preflight(load_config(None, [f"dataset={train_world}", "out=/o", "preset=small_16k"]))
    assert preflight(load_config(None, [f"dataset={train_world}", "out=/o"])).name == "tiny"
    with pytest.raises(ConfigError, match=f"init.generator: {tmp_path / 'gone'} does not exist"):
        preflight(load_config(None, [f"dataset={train_world}", "out=/o", f"init.generator={tmp_path / 'gone'}"]))


def test_preflight_refuses_a_dataset_whose_encoders_do_not_fit(train_world, tmp_path):
    import json
    import shutil

    other = tmp_path / "other"
    shutil.copytree(train_world, other)
    info = json.loads((other / "dataset.json").read_text())
    info["encoders"]["t5"] = {"name": "flan-t5-large", "dim": 1024}
    (other / "dataset.json").write_text(json.dumps(info))
    with pytest.raises(ConfigError, match="encoders.t5.dim = 1024 \\(flan-t5-large\\); preset tiny takes 64"):
        preflight(load_config(None, [f"dataset={other}", "out=/o"]))
    info["encoders"]["t5"] = {"name": "another-t5", "dim": 64}
    (other / "dataset.json").write_text(json.dumps(info))
    with pytest.raises(ConfigError, match="was made with other encoders than"):
        preflight(load_config(None, [f"dataset={train_world}", f"dataset=[{train_world}, {other}]", "out=/o"]))


def test_resume_never_sets_the_earlier_run_aside(tmp_path):
    from training.checkpoints import set_aside_previous

    for name in ("checkpoints/step-00000002", "final", "ema_snapshots"):
        (tmp_path / name).mkdir(parents=True)
    (tmp_path / "checkpoints/step-00000002/complete.json").write_text("{}")
    aside = set_aside_previous(tmp_path)
    assert aside is not None and (aside / "checkpoints/step-00000002/complete.json").is_file()
    assert not (tmp_path / "checkpoints").exists() and not (tmp_path / "final").exists()
    assert set_aside_previous(tmp_path) is None  # nothing left to move


def test_the_cli_prints_the_resolved_config_and_one_line_errors(train_world):
    def selva(*args):
        return subprocess.run([sys.executable, "-m", "selva_cli.main", "train", *args], cwd=REPO, env=job_env(),
                              capture_output=True, text=True, timeout=120)

    shown = selva("--config", str(TINY), f"dataset={train_world}", "out=/o", "tracking_uri=http://u:pw@h",
                  "--print-config")
    assert shown.returncode == 0 and "tracking_uri: http://***@h" in shown.stdout and "pw" not in shown.stdout
    assert "lr: 0.001" in shown.stdout and "enabled: true" in shown.stdout
    bad = selva("--config", str(TINY), "dataset=/no/such/dir", "out=/o")
    assert bad.returncode == 2 and bad.stderr.strip().splitlines() == ["error: dataset: /no/such/dir does not exist"]
