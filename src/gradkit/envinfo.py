"""Versions and hardware, for bug reports and benchmark headers (``gradkit env``)."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import sys
from typing import Any

import torch

__all__ = ["collect", "format_env"]

_PACKAGES = ("gradkit", "torch", "numpy", "tqdm", "matplotlib", "scikit-learn", "Pillow")


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def collect() -> dict[str, Any]:
    """Facts about this machine and its software that affect results and speed."""
    versions: dict[str, str | None] = {}
    for name in _PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    cuda = torch.cuda.is_available()
    return {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda_available": cuda,
        "cuda_version": torch.version.cuda,
        "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if cuda else [],
        "packages": versions,
        "GRADKIT_DATA": os.environ.get("GRADKIT_DATA"),
    }


def format_env(info: dict[str, Any] | None = None) -> str:
    """``collect()`` as aligned ``key: value`` lines."""
    info = info or collect()
    lines = []
    for key, value in info.items():
        if key == "packages":
            for pkg, ver in value.items():
                lines.append(f"{pkg:>15}: {ver or 'not installed'}")
        else:
            lines.append(f"{key:>15}: {value}")
    return "\n".join(lines)
