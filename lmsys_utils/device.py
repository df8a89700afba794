"""TPU/XLA (SPMD), CUDA and CPU in one place: the only module that imports torch_xla, always inside functions.

On XLA with several devices, training runs under SPMD: one mesh over all devices with ("data", "fsdp") axes,
weights sharded FSDP-style (torch_xla's FSDPv2 wrapper) and every input batch sharded along its batch axis.
"""

from __future__ import annotations

import functools
import glob
import importlib.util
import os

import torch

MESH_AXES = ("data", "fsdp")


def detect() -> str:
    """Return "xla", "cuda" or "cpu": xla when torch_xla is installed and PJRT_DEVICE is set or a TPU is present.

    PJRT_DEVICE=CPU does not count: importing torch_xla sets it by itself (transformers and peft import it when
    installed). For XLA on a CPU, as the tests do, ask for it: device_kind="xla" / Config.device="xla".
    """
    if importlib.util.find_spec("torch_xla") is not None and (
        os.environ.get("PJRT_DEVICE", "CPU").upper() != "CPU" or os.environ.get("TPU_ACCELERATOR_TYPE")
        or glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*")
    ):
        return "xla"
    return "cuda" if torch.cuda.is_available() else "cpu"


def get_device(kind: str | None = None) -> torch.device:
    """The device tensors go to. On XLA this also switches SPMD on (when there are several devices)."""
    kind = kind or detect()
    if kind == "xla":
        setup_spmd()
        import torch_xla

        return torch_xla.device()
    return torch.device("cuda" if kind == "cuda" else "cpu")


def memory_target(kind: str) -> str:
    """This machine as a target of the memory plan (lmsys_utils.memory): TPU chips, GPUs of N GB, or CPU RAM."""
    if kind == "xla":
        import torch_xla.runtime as xr

        # v3-8 and v5e-8 both have 16 GB per device; XLA on a CPU (tests, smoke runs) uses RAM
        return "cpu" if xr.device_type() == "CPU" else "tpu-v3-8"
    if kind == "cuda":
        n = torch.cuda.device_count()
        usable_gb = torch.cuda.get_device_properties(0).total_memory / 1e9 * 0.94  # CUDA context and allocator
        return f"{n}xgpu:{usable_gb:.1f}" if n > 1 else f"gpu:{usable_gb:.1f}"
    return "cpu"


def default_dtype(kind: str) -> torch.dtype:
    """bf16 on TPU, fp16 on GPU (a T4 has no fast bf16), fp32 on CPU."""
    return {"xla": torch.bfloat16, "cuda": torch.float16}.get(kind, torch.float32)


def sync(kind: str) -> None:
    """The one sync per step: on XLA it cuts the traced graph and launches it (asynchronously)."""
    if kind == "xla":
        import torch_xla

        torch_xla.sync()


def wait(kind: str) -> None:
    """Block until queued device work is done (only for timing; never in the hot loop)."""
    if kind == "xla":
        import torch_xla.core.xla_model as xm

        xm.wait_device_ops()
    elif kind == "cuda":
        torch.cuda.synchronize()


def is_main_process() -> bool:
    """True on the one process that prints and writes (process 0 of a multi-host TPU slice or torchrun)."""
    if detect() == "xla":
        import torch_xla.runtime as xr

        return xr.process_index() == 0
    return int(os.environ.get("RANK", "0")) == 0


@functools.lru_cache(maxsize=None)
def setup_spmd():
    """Switch on SPMD with a (1, N) mesh over all N devices and set it as the global mesh; None for one device.

    Must run before any XLA tensor exists (torch_xla segfaults at the next sharded op otherwise), which is why
    `get_device("xla")` calls it. Cached: later calls return the same mesh.
    """
    import numpy as np
    import torch_xla.distributed.spmd as xs
    import torch_xla.runtime as xr

    n = xr.global_runtime_device_count()
    if n == 1:
        return None
    xr.use_spmd()
    # all devices on the fsdp axis: an 8B model's bf16 weights (15 GB) only fit when split over all of them
    mesh = xs.Mesh(np.arange(n), (1, n), MESH_AXES)
    xs.set_global_mesh(mesh)
    return mesh


def num_data_shards(kind: str) -> int:
    """How many ways each batch is split (the batch size must be a multiple of it)."""
    if kind != "xla":
        return 1
    mesh = setup_spmd()
    return 1 if mesh is None else int(mesh.size())


def prepare_model(model, kind: str):
    """Move the model to the device; under SPMD wrap it in FSDPv2 (weights sharded over the fsdp axis).

    Returns the module to call for forward passes; keep the original for saving adapters.
    """
    device = get_device(kind)
    mesh = setup_spmd() if kind == "xla" else None
    if mesh is None:
        return model.to(device)
    import torch_xla.distributed.spmd as xs
    from torch_xla.experimental.spmd_fully_sharded_data_parallel import SpmdFullyShardedDataParallel

    def shard_logits(output, mesh):
        # the wrapper's default only knows plain tensors; transformers returns an output object
        xs.mark_sharding(output.logits, mesh, (MESH_AXES, None))

    return SpmdFullyShardedDataParallel(model.to(device), mesh=mesh, shard_output=shard_logits)


def to_device(batch: dict, kind: str) -> dict:
    """Move a batch of tensors to the device; under SPMD shard each along its batch axis."""
    device = get_device(kind)
    batch = {k: v.to(device) for k, v in batch.items()}
    mesh = setup_spmd() if kind == "xla" else None
    if mesh is not None:
        import torch_xla.distributed.spmd as xs

        for v in batch.values():
            xs.mark_sharding(v, mesh, (MESH_AXES,) + (None,) * (v.dim() - 1))
    return batch


def autocast(kind: str, dtype: torch.dtype | None):
    """Mixed precision for forward passes in `dtype` (bf16 on TPU, fp16 on GPU); None: off (fp32 weights)."""
    return torch.autocast("cuda" if kind == "cuda" else kind, dtype=dtype, enabled=dtype is not None)


def enable_gradient_checkpointing(model, kind: str) -> None:
    """Recompute each decoder layer's activations in the backward pass (less memory, ~30% slower).

    transformers' `gradient_checkpointing_enable()` fails on XLA (it looks up `torch.xla`), so the checkpoint
    function is set on the layers directly: torch_xla's own on XLA, torch's elsewhere.
    """
    if kind == "xla":
        from torch_xla.utils.checkpoint import checkpoint

        func = functools.partial(checkpoint, use_reentrant=True)
        # reentrant checkpointing only back-propagates into layers whose inputs require grad (LoRA freezes embeddings)
        model.enable_input_require_grads()
    else:
        from torch.utils.checkpoint import checkpoint

        func = functools.partial(checkpoint, use_reentrant=False)
    found = False
    for module in model.modules():
        if hasattr(module, "gradient_checkpointing"):
            module.gradient_checkpointing = True
            module._gradient_checkpointing_func = func
            found = True
    if not found:
        raise ValueError(f"{type(model).__name__} does not support gradient checkpointing; set "
                         "gradient_checkpointing=False")


def compile_count() -> int:
    """Graphs XLA has compiled so far in this process (0 off XLA).

    Counts real compiles only: under SPMD each host read of a sharded result adds a cheap cached compile to
    the CompileTime metric, which would set off the recompilation guard for nothing.
    """
    import torch_xla.debug.metrics as met

    return int(met.counter_value("UncachedCompile") or 0)


def transfer_count() -> int:
    """Device-to-host transfers so far in this process (XLA only)."""
    import torch_xla.debug.metrics as met

    data = met.metric_data("TransferFromDeviceTime")
    return int(data[0]) if data else 0


def get_rng_state(kind: str) -> dict:
    """Every random state a resumed run needs to draw the same dropout masks."""
    import random

    import numpy as np

    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if kind == "cuda":
        state["cuda"] = torch.cuda.get_rng_state_all()
    if kind == "xla":
        import torch_xla.core.xla_model as xm

        state["xla"] = xm.get_rng_state()
    return state


def set_rng_state(state: dict, kind: str) -> None:
    import random

    import numpy as np

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if kind == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state_all(state["cuda"])
    if kind == "xla" and "xla" in state:
        import torch_xla.core.xla_model as xm

        xm.set_rng_state(state["xla"])
