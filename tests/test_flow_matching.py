from __future__ import annotations

import torch

from selva.flow_matching import FlowMatching


def test_interpolation_endpoints_and_target():
    fm = FlowMatching()
    noise, data = torch.randn(3, 5, 4), torch.randn(3, 5, 4)
    assert torch.equal(fm.interpolate(noise, data, torch.zeros(3)), noise)
    assert torch.allclose(fm.interpolate(noise, data, torch.ones(3)), data)
    # the target is the time derivative of the interpolation path
    t = torch.full((3,), 0.3)
    eps = 1e-3
    numeric = (fm.interpolate(noise, data, t + eps) - fm.interpolate(noise, data, t - eps)) / (2 * eps)
    assert torch.allclose(numeric, fm.target(noise, data), atol=1e-3)


def test_loss_is_zero_for_the_true_velocity_and_per_sample():
    fm = FlowMatching()
    noise, data = torch.randn(2, 7, 3), torch.randn(2, 7, 3)
    assert torch.equal(fm.loss(fm.target(noise, data), noise, data), torch.zeros(2))
    wrong = fm.target(noise, data).clone()
    wrong[1] += 1.0
    loss = fm.loss(wrong, noise, data)
    assert loss[0] == 0 and torch.isclose(loss[1], torch.tensor(1.0))


def test_logit_normal_t_is_seeded_and_inside_the_unit_interval():
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    t1, t2 = FlowMatching.sample_t(1000, g1), FlowMatching.sample_t(1000, g2)
    assert torch.equal(t1, t2)
    assert 0 < t1.min() and t1.max() < 1 and abs(t1.mean().item() - 0.5) < 0.05


def test_euler_integrates_a_straight_path_exactly_on_the_float32_grid():
    fm = FlowMatching(num_steps=25)
    grid = fm.time_grid()
    assert grid.dtype == torch.float32 and len(grid) == 26 and grid[0] == 0 and grid[-1] == 1
    noise, data = torch.randn(2, 6, 3, dtype=torch.float64), torch.randn(2, 6, 3, dtype=torch.float64)
    times, steps = [], []

    def velocity(t, x):
        times.append(t)
        return data - noise

    out = fm.to_data(velocity, noise, on_step=lambda i, v: steps.append(i))
    assert torch.allclose(out, data, atol=1e-6)
    assert out.dtype == torch.float64
    assert steps == list(range(25))
    assert all(t.dtype == torch.float32 for t in times) and torch.equal(torch.stack(times), grid[:-1])
