"""Post-hoc EMA tracker: the power-function EMA update, exact resume, stale snapshots, synthesis."""

from __future__ import annotations

import io
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from training.ema import EMAConfig, PostHocEMATracker

TRAINED = ["2.weight", "2.bias"]  # layer 0 stays frozen, as the backbone does in stage 1


def make_module(dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)).to(dtype)
    module[0].requires_grad_(False)
    return module


def params_at(step: int, module: nn.Module) -> dict[str, torch.Tensor]:
    """The trained parameters after optimizer step ``step``: a pure function of the step, like a seeded run."""
    named = dict(module.named_parameters())
    gen = torch.Generator().manual_seed(1000 + step)
    return {n: torch.randn(named[n].shape, generator=gen, dtype=torch.float64) for n in TRAINED}


def train(module: nn.Module, tracker: PostHocEMATracker, first: int, last: int) -> None:
    named = dict(module.named_parameters())
    for step in range(first, last + 1):
        with torch.no_grad():
            for name, value in params_at(step, module).items():
                named[name].copy_(value)
        tracker.update(step)


def snapshot_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def karras_gamma(sigma_rel: float) -> float:
    """Solve the paper's sigma_rel(gamma) = sqrt((g+1) / ((g+2)^2 (g+3))) by bisection (independent of the library)."""
    lo, hi = 0.0, 1e6
    for _ in range(200):
        mid = (lo + hi) / 2
        s = math.sqrt((mid + 1) / ((mid + 2) ** 2 * (mid + 3)))
        lo, hi = (mid, hi) if s > sigma_rel else (lo, mid)
    return lo


def test_ema_follows_the_power_function_update(tmp_path):
    module = make_module()
    tracker = PostHocEMATracker(module, EMAConfig(snapshot_every=100), tmp_path / "snap")
    assert tracker.param_names == TRAINED
    train(module, tracker, 1, 5)
    for sigma_rel in (0.05, 0.1):
        gamma = karras_gamma(sigma_rel)
        expected = {n: torch.zeros_like(v) for n, v in params_at(1, module).items()}
        for k in range(1, 6):
            # ema-pytorch's beta on its k-th update is (1 - 1/(k+1))^(gamma+1): the paper's (1 - 1/t)^(gamma+1)
            # one step later (as if the weights before step 1 equalled those after it); the first update
            # copies the weights, so its beta does not matter (0 here)
            beta = (1 - 1 / (k + 1)) ** (gamma + 1) if k > 1 else 0.0
            for name, value in params_at(k, module).items():
                expected[name] = beta * expected[name] + (1 - beta) * value
        got = tracker.current_weights(sigma_rel)
        assert set(got) == set(TRAINED)  # the frozen layer is not tracked
        for name in TRAINED:
            torch.testing.assert_close(got[name].double(), expected[name], atol=1e-6, rtol=0)
    # the two profiles really differ: the narrower one follows the latest weights more closely
    latest = params_at(5, module)["2.weight"]
    narrow, wide = tracker.current_weights(0.05)["2.weight"], tracker.current_weights(0.1)["2.weight"]
    assert not torch.allclose(narrow, wide)
    assert (narrow.double() - latest).norm() < (wide.double() - latest).norm()


def test_bf16_module_is_averaged_in_float32(tmp_path):
    module = make_module(torch.bfloat16)
    tracker = PostHocEMATracker(module, EMAConfig(snapshot_every=100), tmp_path / "snap")
    train(module, tracker, 1, 3)
    gamma = karras_gamma(0.1)
    expected = torch.zeros(2, 4, dtype=torch.float64)
    for k in range(1, 4):
        beta = (1 - 1 / (k + 1)) ** (gamma + 1) if k > 1 else 0.0
        expected = beta * expected + (1 - beta) * params_at(k, module)["2.weight"].bfloat16().double()
    got = tracker.current_weights(0.1)["2.weight"]
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), expected, atol=1e-6, rtol=0)


def test_resume_equals_an_uninterrupted_run(tmp_path):
    cfg = EMAConfig(snapshot_every=3)
    module_a = make_module()
    uninterrupted = PostHocEMATracker(module_a, cfg, tmp_path / "a")
    train(module_a, uninterrupted, 1, 10)

    module_b = make_module()
    first = PostHocEMATracker(module_b, cfg, tmp_path / "b")
    train(module_b, first, 1, 6)
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)  # what the trainer's checkpoint holds
    del first
    module_b = make_module()  # a new process: the trainer restores the module from its checkpoint (here: a
    resumed = PostHocEMATracker(module_b, cfg, tmp_path / "b")  # pure function of the step)
    resumed.load_state_dict(torch.load(io.BytesIO(buffer.getvalue()), weights_only=True))
    assert resumed.step == 6
    train(module_b, resumed, 7, 10)

    for sigma_rel in cfg.sigma_rels:
        a, b = uninterrupted.current_weights(sigma_rel), resumed.current_weights(sigma_rel)
        assert all(torch.equal(a[n], b[n]) for n in TRAINED)
    assert sorted(snapshot_bytes(tmp_path / "a")) == ["0.3.pt", "0.6.pt", "0.9.pt", "1.3.pt", "1.6.pt", "1.9.pt"]
    assert snapshot_bytes(tmp_path / "a") == snapshot_bytes(tmp_path / "b")
    assert resumed.snapshots == uninterrupted.snapshots
    a, b = uninterrupted.synthesize(0.07), resumed.synthesize(0.07)
    assert all(torch.equal(a[n], b[n]) for n in TRAINED)


def test_snapshots_after_the_resumed_step_are_dropped(tmp_path):
    cfg = EMAConfig(snapshot_every=2)
    reference_module = make_module()
    reference = PostHocEMATracker(reference_module, cfg, tmp_path / "ref")
    train(reference_module, reference, 1, 10)

    module = make_module()
    killed = PostHocEMATracker(module, cfg, tmp_path / "run")
    train(module, killed, 1, 5)
    checkpoint = killed.state_dict()
    train(module, killed, 6, 8)  # snapshots 6 and 8 written, then the run dies before its next checkpoint
    (tmp_path / "run" / "0.10.pt.tmp").write_bytes(b"half a file")  # killed mid-write
    assert {"0.6.pt", "1.8.pt"} <= set(snapshot_bytes(tmp_path / "run"))

    resumed = PostHocEMATracker(module, cfg, tmp_path / "run")
    resumed.load_state_dict(checkpoint)
    assert sorted(snapshot_bytes(tmp_path / "run")) == ["0.2.pt", "0.4.pt", "1.2.pt", "1.4.pt"]
    train(module, resumed, 6, 10)
    assert snapshot_bytes(tmp_path / "run") == snapshot_bytes(tmp_path / "ref")
    a, b = reference.synthesize(), resumed.synthesize()
    assert all(torch.equal(a[n], b[n]) for n in TRAINED)


def test_folder_and_step_mistakes_are_refused(tmp_path):
    cfg = EMAConfig(snapshot_every=2)
    module = make_module()
    tracker = PostHocEMATracker(module, cfg, tmp_path / "snap")
    with pytest.raises(ValueError, match="update for step 2, but the tracker has seen 0 steps"):
        tracker.update(2)
    train(module, tracker, 1, 4)
    state = tracker.state_dict()
    with pytest.raises(FileExistsError, match="already holds EMA snapshots"):
        PostHocEMATracker(make_module(), cfg, tmp_path / "snap").update(1)
    with pytest.raises(ValueError, match="sigma_rels, update_every, snapshot_every"):
        PostHocEMATracker(make_module(), EMAConfig(sigma_rels=(0.05, 0.2), snapshot_every=2),
                          tmp_path / "snap").load_state_dict(state)
    (tmp_path / "snap" / "0.2.pt").unlink()
    with pytest.raises(FileNotFoundError, match=r"missing from .*: 0\.2\.pt"):
        PostHocEMATracker(make_module(), cfg, tmp_path / "snap").load_state_dict(state)
    with pytest.raises(ValueError, match="at least two distinct"):
        EMAConfig(sigma_rels=(0.05,))


def test_synthesize_gives_the_module_keys_and_matches_the_library(tmp_path):
    module = make_module()
    before = PostHocEMATracker(module, EMAConfig(snapshot_every=3), tmp_path / "empty").synthesize()
    assert all(torch.equal(before[n], module.state_dict()[n]) for n in TRAINED)  # no update yet: the weights

    tracker = PostHocEMATracker(module, EMAConfig(snapshot_every=3), tmp_path / "snap")
    train(module, tracker, 1, 9)  # step 9 is a snapshot step: the library sees the same points
    shapes = {k: v.shape for k, v in module.state_dict().items()}
    ours = tracker.synthesize(0.07)
    assert set(ours) == set(TRAINED) and all(ours[k].shape == shapes[k] for k in ours)
    library = tracker._ema.synthesize_ema_model(sigma_rel=0.07).ema_model.state_dict()
    for name in TRAINED:
        torch.testing.assert_close(ours[name], library[name.replace(".", "/")], atol=1e-5, rtol=1e-5)
    # a tracked profile at the current step is reproduced exactly by the least-squares combination
    train(module, tracker, 10, 10)  # not a snapshot step: the live EMAs join the fit
    for sigma_rel in (0.05, 0.1):
        synth, live = tracker.synthesize(sigma_rel), tracker.current_weights(sigma_rel)
        for name in TRAINED:
            torch.testing.assert_close(synth[name], live[name], atol=1e-5, rtol=0)
