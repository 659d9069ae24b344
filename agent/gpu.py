"""GPU utilisation from nvidia-smi, where the node has it."""

from __future__ import annotations

import asyncio
import shutil
from dataclasses import dataclass

from services.infra.aio import within


@dataclass(frozen=True)
class GpuReading:
    available: bool
    """nvidia-smi exists on this node."""
    utilization: float | None = None
    """Mean utilisation over the node's GPUs, percent."""
    failed: bool = False


def parse_nvidia_smi(output: str) -> float:
    """`nvidia-smi --query-gpu=utilization.gpu --format=csv,noheader,nounits`: one line per GPU."""
    values = [float(line.strip()) for line in output.splitlines() if line.strip()]
    if not values:
        raise ValueError("no GPUs listed")
    return sum(values) / len(values)


async def read_gpu(timeout: float = 2.0, binary: str = "nvidia-smi") -> GpuReading:
    path = shutil.which(binary)
    if path is None:
        return GpuReading(available=False)
    try:
        proc = await asyncio.create_subprocess_exec(
            path, "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL)
    except OSError:
        return GpuReading(available=True, failed=True)
    try:
        out, _ = await within(proc.communicate(), timeout)
        if proc.returncode != 0:
            return GpuReading(available=True, failed=True)
        return GpuReading(available=True, utilization=parse_nvidia_smi(out.decode()))
    except (ValueError, TimeoutError):
        if proc.returncode is None:  # a hung nvidia-smi must not pile up
            proc.kill()
            await proc.wait()
        return GpuReading(available=True, failed=True)
