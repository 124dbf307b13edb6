"""Where code runs: the device and dtype a user names, torchrun's process group, and the model inside wrappers.

Every command that takes `--device` resolves it here, and every process started by torchrun finds its rank here.
"""

from __future__ import annotations

import contextlib
import os

import torch
import torch.distributed as dist

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """auto | cpu | cuda | cuda:N -> a torch.device; auto takes CUDA when present, `cuda` the process's local GPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        name = f"cuda:{local_rank}"
    if name != "cpu" and not name.startswith("cuda"):
        raise ValueError(f"--device {name!r}: expected auto, cpu, cuda or cuda:N")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available on this machine; use --device cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name!r}: expected auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        count = torch.cuda.device_count()
        raise ValueError(f"--device {name}: this machine has {count} GPU(s), cuda:0 to cuda:{count - 1}")
    return device


def resolve_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ValueError(f"--dtype {name!r}: expected one of {', '.join(DTYPES)}")
    return DTYPES[name]


def autocast(device: torch.device, dtype: torch.dtype):
    """Mixed precision for bf16/fp16 on `device`; fp32 runs as is."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def to_device(batch: dict, device: torch.device) -> dict:
    """A batch dict with its tensors moved to `device` (other values as they are). Copies to a GPU are queued
    (non_blocking): from a loader's pinned memory they run while the host goes on queueing the step's work."""
    return {
        key: value.to(device, non_blocking=True) if isinstance(value, torch.Tensor) else value
        for key, value in batch.items()
    }


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside DistributedDataParallel and torch.compile wrappers."""
    while True:
        if hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def device_of(module: torch.nn.Module) -> torch.device:
    """The device of a module's first parameter (CPU for a module without parameters)."""
    parameter = next(module.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


@contextlib.contextmanager
def eval_mode(*modules: torch.nn.Module):
    """Puts modules (unwrapped) in eval mode for the block and restores their modes after it; yields the first."""
    modules = tuple(unwrap(module) for module in modules)
    modes = [module.training for module in modules]
    for module in modules:
        module.eval()
    try:
        yield modules[0]
    finally:
        for module, mode in zip(modules, modes):
            module.train(mode)


# ------------------------------------------------------------------------------------------ torchrun


def distributed_context() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from torchrun's environment; (0, 1, 0) in a plain process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0"))


def init_distributed(device: torch.device) -> None:
    """Joins torchrun's process group (nccl on CUDA, gloo on CPU); nothing in a plain process."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        if device.type == "cuda":
            # nccl's collectives and barrier() run on the current device: without this every process would open
            # a context on GPU 0 and the barriers would name the wrong GPU.
            torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def is_gathering() -> bool:
    """True while training under torch.distributed with several processes: a contrastive loss gathers features."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1 and torch.is_grad_enabled()
