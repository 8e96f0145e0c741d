"""Host-to-device copies that do not wait for the device.

A copy from ordinary (pageable) host memory to a CUDA device waits until the stream has caught up,
i.e. until the forward still running has finished. Async scheduling plans step N + 1 while step N
runs, so its inputs go through pinned memory with non_blocking=True instead (torch keeps the pinned
buffer alive until its copy is done). On any other device this is a plain `.to`.
"""
from __future__ import annotations

import torch


def to_device(tensor: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    if torch.device(device).type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


def host_tensor(values, device: torch.device | str) -> torch.Tensor:
    """torch.tensor(values) on `device`, copied without waiting for the device."""
    return to_device(torch.tensor(values), device)
