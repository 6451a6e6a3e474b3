"""A network's costs: parameters, FLOPs from torch's counter, latency after warm-up (tuner.train.costs)."""

from __future__ import annotations

import torch
from torch import nn

from tuner.train.costs import count_flops, network_costs


def test_flops_are_twice_the_multiply_adds_of_each_layer() -> None:
    conv = nn.Conv2d(3, 8, kernel_size=3, padding=1, bias=False)
    assert count_flops(conv, torch.rand(1, 3, 8, 8)) == 2 * (3 * 9) * 8 * (8 * 8)
    linear = nn.Linear(10, 5)
    assert count_flops(linear, torch.rand(4, 10)) == 2 * 10 * 5 * 4  # the whole batch


def test_a_network_costs_its_size_flops_and_a_latency_per_image_and_per_batch() -> None:
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 2)
    ).train()
    costs = network_costs(model, channels=3, image_size=32, batch=64, min_seconds=0.05)
    assert costs.params_m == (3 * 16 * 9 + 16 + 16 * 2 + 2) / 1e6
    assert costs.flops_g == (2 * 27 * 16 * 32 * 32 + 2 * 16 * 2) / 1e9
    assert costs.latency_ms is not None and costs.batch_latency_ms is not None
    assert 0 < costs.latency_ms < costs.batch_latency_ms  # 64 images take longer than one
    assert (costs.batch, costs.threads, costs.device) == (64, torch.get_num_threads(), "cpu")
    assert model.training  # measured in eval mode, given back as it was


def test_size_and_flops_alone_skip_the_timing_and_channels_last_gives_the_same_count() -> None:
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten(), nn.LazyLinear(2))
    model(torch.rand(1, 1, 16, 16))
    plain = network_costs(model, channels=1, image_size=16, latency=False)
    nhwc = network_costs(model, channels=1, image_size=16, latency=False, channels_last=True)
    assert plain.latency_ms is None and plain.batch_latency_ms is None
    assert plain.flops_g == nhwc.flops_g > 0
