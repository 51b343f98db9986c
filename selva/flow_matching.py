"""Conditional flow matching: the training loss and the Euler sampler, shared by training and inference.

Convention (official): t = 0 is noise and t = 1 is data; x_t = (1 - t) * noise + t * data and the
network predicts the velocity data - noise. Training draws t from a logit-normal (sigmoid of a
standard normal); inference integrates with Euler on ``linspace(0, 1, steps + 1)`` built in float32.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

Velocity = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class FlowMatching:
    min_sigma: float = 0.0
    num_steps: int = 25

    # -- training ---------------------------------------------------------------------------------
    @staticmethod
    def sample_t(
        batch: int, generator: torch.Generator | None = None, device: torch.device | str = "cpu"
    ) -> torch.Tensor:
        """Logit-normal timesteps: sigmoid(N(0, 1))."""
        return torch.sigmoid(torch.randn(batch, generator=generator, device=device))

    def interpolate(self, noise: torch.Tensor, data: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        t = t.view(-1, *([1] * (data.dim() - 1)))
        return (1 - (1 - self.min_sigma) * t) * noise + t * data

    def target(self, noise: torch.Tensor, data: torch.Tensor) -> torch.Tensor:
        return data - (1 - self.min_sigma) * noise

    def loss(self, predicted: torch.Tensor, noise: torch.Tensor, data: torch.Tensor) -> torch.Tensor:
        """Per-sample mean squared velocity error, shape (B,)."""
        dims = list(range(1, predicted.dim()))
        return (predicted - self.target(noise, data)).pow(2).mean(dim=dims)

    # -- inference --------------------------------------------------------------------------------
    def time_grid(self) -> torch.Tensor:
        # float32 on purpose: the official grid is float32 (0.04 * k rounded for 25 steps)
        return torch.linspace(0, 1 - self.min_sigma, self.num_steps + 1, dtype=torch.float32)

    def to_data(
        self, velocity: Velocity, noise: torch.Tensor, on_step: Callable[[int, torch.Tensor], None] | None = None
    ) -> torch.Tensor:
        """Integrate from t = 0 (noise) to t = 1 (data) with Euler steps.

        ``velocity(t, x)`` receives t as a 0-d float32 tensor; ``on_step(i, v)`` sees each velocity.
        """
        grid = self.time_grid()
        x = noise
        for i in range(self.num_steps):
            t, t_next = grid[i], grid[i + 1]
            v = velocity(t, x)
            if on_step is not None:
                on_step(i, v)
            x = x + (t_next - t) * v
        return x
