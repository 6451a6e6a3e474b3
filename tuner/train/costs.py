"""What a network costs to run: its parameters, its FLOPs per image and its latency on a device.

FLOPs come from torch's own counter (``torch.utils.flop_counter``: twice the multiply-adds of every
convolution, matrix product and attention, as papers count them). Latency is the median wall time of
a forward pass in inference mode after warm-up, for one image and for one batch, at the process's
thread count (recorded with it: latency on 1 thread and on 16 are different numbers).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


@dataclass(frozen=True)
class Costs:
    params_m: float  # parameters, millions (trainable or not)
    flops_g: float  # forward FLOPs for one image, billions
    latency_ms: float | None = None  # one image
    batch_latency_ms: float | None = None  # one batch of ``batch`` images
    batch: int = 1
    threads: int = 1
    device: str = "cpu"


def count_flops(model: nn.Module, example: torch.Tensor) -> int:
    """Forward FLOPs of ``model`` on ``example`` (its whole batch)."""
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        model(example)
    return int(counter.get_total_flops())


def median_latency_ms(model: nn.Module, example: torch.Tensor, *, warmup: int = 3, min_seconds: float = 0.2) -> float:
    """The median milliseconds of ``model(example)`` over at least ``min_seconds`` (and 5 runs) after
    ``warmup`` runs; CUDA is synchronised around each run, so the time is the kernels', not the launch's."""
    cuda = example.device.type == "cuda"
    times: list[float] = []
    with torch.inference_mode():
        for _ in range(warmup):
            model(example)
        spent = 0.0
        while len(times) < 5 or spent < min_seconds:
            if cuda:
                torch.cuda.synchronize(example.device)
            start = time.perf_counter()
            model(example)
            if cuda:
                torch.cuda.synchronize(example.device)
            times.append(time.perf_counter() - start)
            spent += times[-1]
    return 1000.0 * statistics.median(times)


def network_costs(
    model: nn.Module,
    *,
    channels: int,
    image_size: int,
    batch: int = 1,
    latency: bool = True,
    channels_last: bool = False,
    min_seconds: float = 0.2,
) -> Costs:
    """Size, FLOPs per image and (``latency``) the latency of one image and of ``batch`` images, on the
    device the model is on, in eval mode (restored afterwards)."""
    param = next(model.parameters())
    device = param.device
    was_training = model.training
    model.eval()
    try:
        fmt = torch.channels_last if channels_last else torch.contiguous_format

        def images(n: int) -> torch.Tensor:
            x = torch.rand(n, channels, image_size, image_size, device=device, dtype=param.dtype)
            return x.contiguous(memory_format=fmt)

        example = images(1)
        flops = count_flops(model, example)
        params = sum(p.numel() for p in model.parameters())
        one = many = None
        if latency:
            one = median_latency_ms(model, example, min_seconds=min_seconds)
            many = one
            if batch > 1:
                many = median_latency_ms(model, images(batch), min_seconds=min_seconds)
    finally:
        model.train(was_training)
    return Costs(
        params_m=params / 1e6,
        flops_g=flops / 1e9,
        latency_ms=one,
        batch_latency_ms=many,
        batch=batch,
        threads=torch.get_num_threads(),
        device=str(device),
    )
