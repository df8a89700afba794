"""TPU/XLA (SPMD), CUDA and CPU in one place: the only module that imports torch_xla, always inside functions.

Each entry point turns the device setting into one `Runtime` record with `resolve`; everything below it takes
that record and never detects again. On XLA with several devices, training runs under SPMD: one mesh over all
devices with ("data", "fsdp") axes, weights sharded FSDP-style (torch_xla's FSDPv2 wrapper) and every input batch
sharded along its batch axis.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import glob
import importlib.metadata
import importlib.util
import os
import random
import re
import warnings
from pathlib import Path

import numpy as np
import torch

from .config import QUANTIZATIONS

MESH_AXES = ("data", "fsdp")
MIN_TORCH_XLA = (2, 4)
"""torch_xla.sync() needs 2.4 (the Kaggle TPU image had 2.3 in mid-2024)."""
DEFAULT_DTYPES = {"xla": "bf16", "cuda": "fp16", "cpu": "fp32"}
"""Weights dtype per device: bf16 on TPU, fp16 on GPU (a T4 has no fast bf16), fp32 on CPU."""
TORCH_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclasses.dataclass(frozen=True)
class Runtime:
    """What one run executes on, decided once by `resolve`."""

    kind: str
    """"xla", "cuda" or "cpu"."""
    device: torch.device
    """Where tensors go (on CUDA the first GPU; model copies on other GPUs carry their own)."""
    dtype: torch.dtype
    """Weights dtype (DEFAULT_DTYPES unless the run asks for another)."""
    shards: int = 1
    """Ways each batch is split (the SPMD devices on XLA, else 1); batch sizes must be multiples of it."""
    main: bool = True
    """Whether this process prints and writes (process 0 of a multi-host TPU slice or torchrun)."""
    padding: str = "dynamic"
    """"buckets": a few fixed lengths, one compiled graph each (XLA); "dynamic": pad to the longest row."""

    @property
    def amp_dtype(self) -> torch.dtype | None:
        """Mixed-precision compute dtype: the weights' half dtype; None (off) for fp32 weights."""
        return self.dtype if self.dtype in (torch.bfloat16, torch.float16) else None

    def autocast(self):
        """Forward passes in `amp_dtype` (trainable LoRA weights stay fp32)."""
        return torch.autocast("cuda" if self.kind == "cuda" else self.kind, dtype=self.amp_dtype,
                              enabled=self.amp_dtype is not None)

    def inference(self):
        """No autograd for prediction; torch_xla rejects inference tensors ("Cannot set version_counter")."""
        return torch.no_grad() if self.kind == "xla" else torch.inference_mode()

    def sync(self) -> None:
        """The one sync per step: on XLA it cuts the traced graph and launches it (asynchronously)."""
        if self.kind == "xla":
            import torch_xla

            torch_xla.sync()

    def wait(self) -> None:
        """Block until queued device work is done (only for timing; never in the hot loop)."""
        if self.kind == "xla":
            import torch_xla.core.xla_model as xm

            xm.wait_device_ops()
        elif self.kind == "cuda":
            torch.cuda.synchronize()

    def to_device(self, batch: dict, device: torch.device | None = None) -> dict:
        """Move a batch of tensors to the device (or to `device`, a model copy's GPU); under SPMD shard each
        along its batch axis."""
        batch = {k: v.to(device or self.device) for k, v in batch.items()}
        mesh = setup_spmd() if self.kind == "xla" else None
        if mesh is not None:
            import torch_xla.distributed.spmd as xs

            for v in batch.values():
                xs.mark_sharding(v, mesh, (MESH_AXES,) + (None,) * (v.dim() - 1))
        return batch

    def prepare_model(self, model):
        """Move the model to the device; under SPMD shard it with FSDPv2, one wrapper per decoder layer (as
        torch_xla's FSDPv2 guide does), so weights are gathered and activations kept layer by layer.

        Trainable weights (LoRA, score head: ~14M of an 8B model's parameters) stay replicated: a checkpoint
        then reads them without gathering shards. The model's state_dict keeps its unwrapped names, so adapters
        and checkpoints load on an unwrapped model. Returns the module to call for forward passes; keep the
        original for saving adapters.
        """
        mesh = setup_spmd() if self.kind == "xla" else None
        if mesh is None:
            return model.to(self.device)
        import torch_xla.distributed.spmd as xs
        from torch_xla.distributed.fsdp.wrap import transformer_auto_wrap_policy
        from torch_xla.experimental.spmd_fully_sharded_data_parallel import SpmdFullyShardedDataParallel as FSDPv2

        def shard_logits(output, mesh):
            # the wrapper's default only knows plain tensors; transformers returns an output object
            xs.mark_sharding(output.logits, mesh, (MESH_AXES, None))

        def shard_hidden(output, mesh):
            # a decoder layer returns its hidden states (a tensor in transformers 5, a tuple before)
            hidden = output[0] if isinstance(output, tuple) else output
            xs.mark_sharding(hidden, mesh, (MESH_AXES,) + (None,) * (hidden.dim() - 1))

        def wrap_layer(module, *args, **kwargs):
            wrapped = FSDPv2(module, *args, **{**kwargs, "shard_output": shard_hidden})
            _keep_state_dict_names(wrapped)
            return wrapped

        model = model.to(self.device)
        for p in model.parameters():
            if p.requires_grad:  # FSDPv2 leaves tensors that already carry a sharding alone
                xs.mark_sharding(p, mesh, (None,) * p.dim())
        policy = functools.partial(transformer_auto_wrap_policy, transformer_layer_cls=decoder_layer_classes(model))
        return FSDPv2(model, mesh=mesh, shard_output=shard_logits, auto_wrap_policy=policy,
                      auto_wrapper_callable=wrap_layer)


def resolve(device: str | None = "auto", dtype="auto", compile_cache=None) -> Runtime:
    """The run's Runtime from its settings: `device` auto | xla | cuda | cpu, `dtype` auto | bf16 | fp16 | fp32.

    On XLA this also switches SPMD on (several devices), which must happen before any XLA tensor exists, and
    opens the persistent compile cache in the folder `compile_cache` (None: off; see `open_compile_cache`).
    """
    kind = detect() if device in (None, "auto") else device
    if kind not in DEFAULT_DTYPES:
        raise ValueError(f"device={device!r}: use auto, xla, cuda or cpu")
    torch_dtype = resolve_dtype(dtype, kind)
    if kind == "xla":
        _check_torch_xla()
        import torch_xla
        import torch_xla.runtime as xr

        if compile_cache:
            open_compile_cache(compile_cache)
        mesh = setup_spmd()
        return Runtime("xla", torch_xla.device(), torch_dtype, shards=1 if mesh is None else int(mesh.size()),
                       main=xr.process_index() == 0, padding="buckets")
    if kind == "cuda" and not torch.cuda.is_available():
        raise ValueError("device=cuda, but torch sees no GPU: use device=auto or device=cpu")
    return Runtime(kind, torch.device(kind), torch_dtype, main=int(os.environ.get("RANK", "0")) == 0)


def open_compile_cache(folder) -> bool:
    """Keep XLA's compiled graphs in `folder` so that a later process (a resumed Kaggle session) can reuse them.

    torch_xla reads the setting when the process compiles its first graph (creating tensors does not count);
    after that the cache is fixed for the process: returns False (and warns when `folder` differs) then.
    Note: torch_xla up to at least 2.9 writes the cache but fails to read executables back on TPU and CPU
    (pytorch/xla#9094; metric PersistentCacheDeserializeFailure); `CompileWatch` warns when that happens.
    """
    import torch_xla
    import torch_xla.runtime as xr

    folder = str(Path(folder).resolve())
    if torch_xla._XLAC._xla_computation_cache_is_initialized():
        if os.environ.get("XLA_PERSISTENT_CACHE_PATH") != folder:
            warnings.warn(f"XLA already compiled in this process, so its compile cache cannot move to {folder} "
                          "now; set compile_cache before anything runs on the device (restart the notebook)")
        return False
    Path(folder).mkdir(parents=True, exist_ok=True)
    xr.initialize_cache(folder, readonly=False)
    return True


def resolve_dtype(dtype, kind: str) -> torch.dtype:
    """A torch dtype from "auto"/None (the device's default), "bf16", "fp16", "fp32" or a torch dtype."""
    if isinstance(dtype, torch.dtype):
        return dtype
    name = DEFAULT_DTYPES[kind] if dtype in (None, "auto") else dtype
    if name not in TORCH_DTYPES:
        raise ValueError(f"dtype={dtype!r}: use auto, bf16, fp16 or fp32")
    return TORCH_DTYPES[name]


def check_quantization(quantization, kind: str) -> None:
    """bitsandbytes runs on CUDA (and, for tests, the CPU): refuse anything else before the model loads."""
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"quantization={quantization!r}: use None, '8bit' or '4bit'")
    if quantization and kind == "xla":
        raise ValueError("bitsandbytes quantization does not run on TPU/XLA: use quantization=None there "
                         "(bf16 weights, sharded over the devices)")


def detect() -> str:
    """Return "xla", "cuda" or "cpu": xla when torch_xla is installed and PJRT_DEVICE is set or a TPU is present.

    PJRT_DEVICE=CPU does not count: importing torch_xla sets it by itself (transformers and peft import it when
    installed). For XLA on a CPU, as the tests do, ask for it: device="xla".
    """
    if importlib.util.find_spec("torch_xla") is not None and (
        os.environ.get("PJRT_DEVICE", "CPU").upper() != "CPU" or os.environ.get("TPU_ACCELERATOR_TYPE")
        or glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*")
    ):
        return "xla"
    return "cuda" if torch.cuda.is_available() else "cpu"


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


@functools.lru_cache(maxsize=None)
def setup_spmd():
    """Switch on SPMD with a (1, N) mesh over all N devices and set it as the global mesh; None for one device.

    Must run before any XLA tensor exists (torch_xla segfaults at the next sharded op otherwise), which is why
    `resolve` calls it. Cached: later calls return the same mesh.
    """
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


def enable_gradient_checkpointing(model, kind: str) -> None:
    """Recompute each decoder layer's activations in the backward pass (less memory, ~30% slower).

    On XLA each decoder layer's forward is wrapped with torch_xla's `checkpoint_module` (what its FSDPv2 guide
    puts inside each layer's wrapper): it hands torch_xla's checkpoint a bound method, so the layer's weights
    join the optimization barrier that keeps XLA from merging the recomputation into the forward pass.
    transformers' own `gradient_checkpointing_enable()` fails on XLA (it looks up `torch.xla`), and its
    per-layer function is a `functools.partial`, which loses that barrier. Elsewhere torch's checkpoint.
    """
    if kind == "xla":
        from torch_xla.distributed.fsdp.utils import checkpoint_module

        classes = decoder_layer_classes(model)
        for module in model.modules():
            if isinstance(module, classes):
                checkpoint_module(module)
        # reentrant checkpointing only back-propagates into layers whose inputs require grad (LoRA freezes embeddings)
        model.enable_input_require_grads()
        return
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


def decoder_layer_classes(model) -> tuple:
    """The classes of the model's repeated blocks (decoder layers; BERT's encoder layers): the classes named in
    transformers' `_no_split_modules` whose instances are items of a ModuleList."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    names = set(getattr(base, "_no_split_modules", None) or ())
    # a list item's name ends in its index (after sharding, in the index and the FSDPv2 wrapper's attribute)
    classes = {type(m) for name, m in model.named_modules()
               if type(m).__name__ in names and re.search(r"\.\d+(\._orig_module)?$", name)}
    if not classes:  # older transformers name none for some models (BERT under 4.44): the longest block list's
        lists = [m for m in base.modules() if isinstance(m, torch.nn.ModuleList) and len(m)]
        classes = {type(max(lists, key=len)[0])} if lists else set()
    if not classes:
        raise ValueError(f"{type(base).__name__} names no decoder-layer class (_no_split_modules={sorted(names)}); "
                         "sharding per layer and gradient checkpointing need one: use a transformers model")
    return tuple(classes)


def _keep_state_dict_names(wrapper) -> None:
    """Hide an FSDPv2 layer wrapper from state_dict names ("layers.0._orig_module.x" -> "layers.0.x"), both
    ways, so adapters and checkpoints written from a sharded model load on a plain one and back."""
    inner = "_orig_module."

    def drop(module, state_dict, prefix, local_metadata):
        for key in [k for k in state_dict if k.startswith(prefix + inner)]:
            state_dict[prefix + key[len(prefix + inner):]] = state_dict.pop(key)

    def add(module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        for key in [k for k in state_dict if k.startswith(prefix) and not k.startswith(prefix + inner)]:
            state_dict[prefix + inner + key[len(prefix):]] = state_dict.pop(key)

    wrapper.register_state_dict_post_hook(drop)
    wrapper.register_load_state_dict_pre_hook(add)


def to_cpu(obj, kind: str):
    """A nested structure (dicts, lists, tuples) of tensors with every tensor copied to the CPU; on XLA all of
    them in one device-to-host transfer (one per tensor otherwise: ~900 for an 8B model's adapter and optimizer)."""
    if kind == "xla":
        import torch_xla.core.xla_model as xm

        # xm.save's own path: syncs pending work once, then fetches every XLA tensor in one call
        return xm._maybe_convert_to_cpu(obj)
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: to_cpu(v, kind) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_cpu(v, kind) for v in obj)
    return obj


def compile_count() -> int:
    """Graphs XLA has compiled so far in this process.

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


class CompileWatch:
    """Tells the compiles XLA is expected to do from recompiles, which cost minutes each on a TPU, and warns
    once with the likely cause. Off XLA it does nothing.

    Expected: every compile of the warm-up steps; after them, the step that first sends a training batch of a
    bucket width (one graph per bucket); the first evaluation of each row set (one graph per bucket width).
    """

    def __init__(self, runtime: Runtime, widths=None):
        """`widths`: the bucket lengths training batches are padded to (None: one fixed shape)."""
        self.on = runtime.kind == "xla"
        self.widths = set(widths or ())
        self.expected = None
        self.warning = None
        self.pending = False
        """A new bucket's batch went to the device: the next sync's compiles are expected."""
        self._shapes, self._evals = set(), set()

    def warmed_up(self) -> None:
        """Every compile so far was expected (the first steps)."""
        if not self.on:
            return
        self.expected, self._shapes = compile_count(), set()
        import torch_xla.debug.metrics as met

        if met.counter_value("PersistentCacheDeserializeFailure"):
            warnings.warn(f"XLA's compile cache in {os.environ.get('XLA_PERSISTENT_CACHE_PATH')} holds graphs this "
                          "torch_xla cannot read back (pytorch/xla#9094), so it recompiled them; set "
                          "compile_cache=None to stop writing it", stacklevel=2)

    def saw(self, batch: dict) -> None:
        """A training batch went to the device: the first one of a bucket width after warm-up makes the
        compiles of the next sync (`syncing`) expected."""
        if self.expected is None or "labels" not in batch:
            return
        shape = tuple(batch["input_ids"].shape)
        if shape[-1] in self.widths and shape not in self._shapes:
            self._shapes.add(shape)
            self.pending = True

    @contextlib.contextmanager
    def syncing(self):
        """Around the step's sync: when a new bucket's batch went out, the graphs it compiles are expected."""
        before = compile_count() if self.on and self.pending else None
        yield
        if before is not None:
            self.expected += compile_count() - before
        self.pending = False

    @contextlib.contextmanager
    def evaluation(self, rows: int | None = None):
        """The first evaluation of a row set (`rows`: its size) compiles its own graphs: expected once."""
        before = compile_count() if self.on else 0
        yield
        if self.on and self.expected is not None and rows not in self._evals:
            self.expected += compile_count() - before
            self._evals.add(rows)

    def check(self, step: int) -> str | None:
        """The warning (once) when XLA compiled more graphs than expected; None otherwise."""
        if not self.on or self.expected is None or self.warning is not None:
            return None
        extra = compile_count() - self.expected
        if extra <= 0:
            return None
        self.warning = (
            f"XLA compiled {extra} new graph(s) after warm-up (noticed at step {step}); each costs a compile "
            "(minutes on a TPU). Likely cause: a batch whose shape is none of the bucket shapes (pad batches to "
            "the bucket lengths and drop the last partial batch), a host read of a device tensor inside the step "
            "(.item(), float(), print), or a Python value that changes each step traced into the graph.")
        warnings.warn(self.warning, stacklevel=2)
        return self.warning

    def counters(self, step: int) -> dict | None:
        """Compiles and host transfers so far, for the history (XLA only)."""
        return {"step": step, "compiles": compile_count(), "transfers": transfer_count()} if self.on else None


def get_rng_state(kind: str) -> dict:
    """Every random state a resumed run needs to draw the same dropout masks."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if kind == "cuda":
        state["cuda"] = torch.cuda.get_rng_state_all()
    if kind == "xla":
        import torch_xla.core.xla_model as xm

        state["xla"] = xm.get_rng_state()
    return state


def set_rng_state(state: dict, kind: str) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if kind == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state_all(state["cuda"])
    if kind == "xla" and "xla" in state:
        import torch_xla.core.xla_model as xm

        xm.set_rng_state(state["xla"])


def _check_torch_xla() -> None:
    version = importlib.metadata.version("torch_xla")
    if tuple(int(x) for x in version.split(".")[:2]) < MIN_TORCH_XLA:
        raise ValueError(f"torch_xla {version} is too old: lmsys-utils needs torch_xla >= "
                           f"{'.'.join(map(str, MIN_TORCH_XLA))} with its matching torch; upgrade the pair or use "
                           "a newer Kaggle TPU image")
