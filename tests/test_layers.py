"""ChannelLastConv1d: the CPU im2col route computes exactly what ``nn.Conv1d`` computes."""

from __future__ import annotations

import pytest
import torch

from selva.layers import ChannelLastConv1d


@pytest.mark.parametrize(("kernel", "padding", "bias"), [(7, 3, True), (3, 1, False), (1, 0, True), (4, 1, True)])
def test_cpu_route_equals_nn_conv1d_in_float64(kernel, padding, bias):
    torch.manual_seed(0)
    conv = ChannelLastConv1d(5, 6, kernel_size=kernel, padding=padding, bias=bias).double()
    x = torch.randn(2, 11, 5, dtype=torch.float64, requires_grad=True)
    ours = conv(x)
    reference = torch.nn.Conv1d.forward(conv, x.transpose(1, 2)).transpose(1, 2)
    assert ours.shape == reference.shape == (2, 11 + 2 * padding - kernel + 1, 6)
    torch.testing.assert_close(ours, reference, rtol=0, atol=1e-13)
    # gradients too: training takes the same route
    grads = torch.autograd.grad(ours.square().sum(), (x, conv.weight))
    expected = torch.autograd.grad(reference.square().sum(), (x, conv.weight))
    for got, want in zip(grads, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


def test_other_convolutions_keep_nn_conv1d():
    conv = ChannelLastConv1d(4, 4, kernel_size=3, padding=1, stride=2).double()
    x = torch.randn(1, 9, 4, dtype=torch.float64)
    torch.testing.assert_close(conv(x), torch.nn.Conv1d.forward(conv, x.transpose(1, 2)).transpose(1, 2))
    assert list(conv.state_dict()) == ["weight", "bias"]  # the official key names
