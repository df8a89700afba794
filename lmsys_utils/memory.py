"""Will it fit, and how long will it take? Exact parameter counts from a config (meta device), a per-device
peak-memory plan and a wall-time estimate, each with a verdict and the cheapest change that makes a setup fit
(memory: the device; time: Kaggle's 9-hour session); `check_fits` lets train/predict refuse early."""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
import warnings
from pathlib import Path

import numpy as np
import torch
from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as peft_defaults
from transformers import AutoConfig, AutoModelForSequenceClassification, PretrainedConfig

from .auth import resolve_token

from .batching import rows_per_batch
from .device import DEFAULT_DTYPES, check_quantization
from .model import LORA_TARGETS

GB = 1e9
HBM_GB = 16 * 2**30 / GB
HEADROOM = 0.9
"""On GPU/CPU a plan fits when its peak is at most this share of the usable memory (the estimate is within
~25% of measured). On TPU the whole memory counts: XLA plans memory when it compiles (rematerialising
activations where needed) and reports an out-of-memory error then, not after hours of training."""
TARGETS = {  # name -> (devices, usable GB per device, backend)
    "tpu-v3-8": (8, HBM_GB, "xla"),
    "tpu-v5e-8": (8, HBM_GB, "xla"),
    "t4": (1, 15.0, "cuda"),
    "2xt4": (2, 15.0, "cuda"),
}
CPU_RUNTIME_GB = 1.0
"""Python + torch + transformers resident before any model exists (measured ~0.6-0.9 GB)."""
DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
ADAM_BYTES_PER_PARAM = 16
"""Trainable LoRA parameters are fp32: weight, gradient and AdamW's two moments."""
# LoRA modules that read the same input: with no dropout they share one saved tensor
INPUT_GROUPS = {"q_proj": "attn_in", "k_proj": "attn_in", "v_proj": "attn_in", "o_proj": "attn_out",
                "gate_proj": "mlp_in", "up_proj": "mlp_in", "down_proj": "mlp_mid"}


class DoesNotFitError(ValueError):
    """The planned setup needs more memory than the target has; the message says what to change."""


@dataclasses.dataclass
class MemoryPlan:
    """Peak memory per device (GB) for one setup, its verdict, and the cheapest fix when it does not fit."""

    settings: dict
    """The inputs the plan was made for (target, dtype, quantization, batch_size, max_length, ...)."""
    params: int
    """Exact parameter count of the 3-way classifier."""
    devices: int
    capacity_gb: float
    """Usable memory per device."""
    placement: str
    """single | fsdp (sharded over all devices) | replicate (one copy per GPU) | split (layers over GPUs)."""
    weights_gb: float
    lora_gb: float
    """LoRA weights (+ gradients and AdamW states when training)."""
    activations_gb: float
    """Saved activations and the largest transient of one layer (eager attention holds B x heads x L x L)."""
    logits_gb: float
    overhead_gb: float
    """Runtime memory that exists before the model (CPU: Python and libraries)."""
    total_gb: float
    fits: bool
    reason: str
    advice: str | None = None
    """The cheapest change that makes it fit, in words (None when it fits or nothing does)."""
    fix: dict | None = None
    """That change as plan_memory arguments, e.g. {"quantization": "8bit"}."""

    def __str__(self) -> str:
        return format_plan(self)


def load_config(config_or_path, token: str | None = None):
    """A transformers config from a config object, a local dir / config.json, or a hub id (config.json only)."""
    if isinstance(config_or_path, PretrainedConfig):
        return config_or_path
    path = Path(str(config_or_path)).expanduser()
    if path.exists():
        if path.is_dir() and not (path / "config.json").is_file():
            raise FileNotFoundError(f"no config.json in {path}: point at the model folder that holds it")
        return AutoConfig.from_pretrained(str(path))
    try:
        return AutoConfig.from_pretrained(str(config_or_path), token=resolve_token(token))
    except OSError as e:
        raise ValueError(f"could not read the config of {config_or_path!r} ({type(e).__name__}): pass a local "
                         "folder with config.json, or check the name and your access with "
                         "`python -m lmsys_utils preflight`") from None


def count_parameters(config_or_path, token: str | None = None) -> int:
    """Exact parameter count of the 3-label sequence classifier, built on the meta device (no weights)."""
    return architecture(config_or_path, token)["params"]


def architecture(config_or_path, token: str | None = None) -> dict:
    """Sizes the plan needs, read off the meta-device model: params, linear shapes per layer, norms, dims."""
    config = load_config(config_or_path, token)
    return dict(_architecture(config.to_json_string(use_diff=False)))


@functools.lru_cache(maxsize=16)
def _architecture(config_json: str) -> tuple:
    raw = json.loads(config_json)
    config = AutoConfig.for_model(raw.pop("model_type"), **raw)
    config.num_labels = 3
    with torch.device("meta"):
        model = AutoModelForSequenceClassification.from_config(config)
    layers = max((m for m in model.modules() if isinstance(m, torch.nn.ModuleList)), key=len)
    layer_params = sum(p.numel() for p in layers[0].parameters())
    linears = {name.rsplit(".", 1)[-1]: (m.in_features, m.out_features)
               for name, m in layers[0].named_modules() if isinstance(m, torch.nn.Linear)}
    quantizable = sum(i * o for i, o in linears.values()) * len(layers)
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    info = dict(
        params=sum(p.numel() for p in model.parameters()),
        model_type=config.model_type,
        layers=len(layers),
        layer_params=layer_params,
        quantizable_params=quantizable,
        quantizable_rows=sum(o for _, o in linears.values()) * len(layers),
        largest_linear=max(i * o for i, o in linears.values()),
        linears=linears,
        norms_per_layer=sum("norm" in type(m).__name__.lower() for m in layers[0].modules()),
        hidden=config.hidden_size,
        heads=heads,
        kv_heads=getattr(config, "num_key_value_heads", None) or heads,
        head_dim=head_dim,
        intermediate=getattr(config, "intermediate_size", 4 * config.hidden_size),
        softcap=bool(getattr(config, "attn_logit_softcapping", None)),
        # what the model runs: eager where the logits are softcapped (model.load_classifier asks for it: sdpa
        # cannot softcap), else what transformers picks for the class
        attention="eager" if getattr(config, "attn_logit_softcapping", None) else model.config._attn_implementation,
        masks=len(set(getattr(config, "layer_types", None) or ["full_attention"])),  # Gemma-2: full + sliding
    )
    return tuple(info.items())


def default_lora_targets(model_type: str) -> tuple:
    """The module names `model.add_lora` adapts by default for an architecture."""
    return tuple(LORA_TARGETS.get(model_type) or peft_defaults.get(model_type, ()))


def parse_target(target: str) -> tuple[int, float, str]:
    """(devices, usable GB per device, backend) for "tpu-v3-8", "tpu-v5e-8", "t4", "2xt4", "gpu:NN",
    "2xgpu:NN" or "cpu"/"cpu:NN" (NN = usable GB; plain "cpu" reads the available RAM)."""
    name = target.lower().strip()
    if name in TARGETS:
        return TARGETS[name]
    m = re.fullmatch(r"(?:(\d+)x)?gpu:(\d+(?:\.\d+)?)", name)
    if m:
        return int(m.group(1) or 1), float(m.group(2)), "cuda"
    m = re.fullmatch(r"cpu(?::(\d+(?:\.\d+)?))?", name)
    if m:
        return 1, float(m.group(1)) if m.group(1) else _available_ram_gb(), "cpu"
    raise ValueError(f"unknown memory target {target!r}: use one of {', '.join(TARGETS)}, gpu:NN, 2xgpu:NN, "
                     "cpu or cpu:NN (NN = usable GB per device)")


def _available_ram_gb() -> float:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024 / GB
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GB


def plan_memory(config_or_path, target: str = "t4", dtype: str = "auto", quantization: str | None = None,
                training: bool = False, batch_size: int = 8, max_length: int = 1024, lora_r: int = 16,
                lora_targets=None, lora_dropout: float = 0.05, gradient_checkpointing: bool = False,
                placement: str | None = None, attention: str | None = None, kv_cache: bool = False,
                token: str | None = None, advise: bool = True) -> MemoryPlan:
    """Estimate peak memory per device for training (LoRA + AdamW) or predicting, with a verdict.

    Args:
        config_or_path: a transformers config, a local model folder / config.json, or a hub id.
        target: see `parse_target`.
        dtype: auto (bf16 on TPU, fp16 on GPU, fp32 on CPU), fp32, bf16 or fp16: weights and compute.
        quantization: None, "8bit" or "4bit" (bitsandbytes; linear layers only, GPU or CPU).
        batch_size: training: rows per step across all devices (FSDP/replicas share them);
            predicting: rows per batch of each model copy.
        max_length: padded tokens per row (the worst case of dynamic padding).
        lora_targets: module names LoRA adapts (None: the default of `model.add_lora`).
        placement: None picks: fsdp on TPU; on several GPUs one copy per GPU when a copy fits, else split.
        attention: "eager" (materialises B x heads x L x L scores) or "sdpa"; None: eager on TPU (model.py
            asks for it there), else what transformers picks for the model class (Gemma-2: eager).
        kv_cache: count the keys/values of all layers that a forward with `use_cache=True` keeps. The plan
            assumes False: training, evaluation and prediction pass `use_cache=False`.
    """
    devices, capacity, backend = parse_target(target)
    if dtype == "auto":
        dtype = DEFAULT_DTYPES[backend]
    if dtype not in DTYPE_BYTES:
        raise ValueError(f"dtype {dtype!r} is not one of auto, fp32, bf16, fp16")
    check_quantization(quantization, backend)
    if placement not in (None, "single", "fsdp", "replicate", "split") or (
            placement in ("replicate", "split") and (devices < 2 or backend != "cuda")):
        raise ValueError(f"placement {placement!r} does not suit target {target!r}: use None (the plan picks), "
                         "or 'replicate' / 'split' on several GPUs")
    info = architecture(config_or_path, token)
    if lora_targets is None:
        lora_targets = default_lora_targets(info["model_type"])
    settings = dict(target=target, dtype=dtype, quantization=quantization, training=training,
                    batch_size=batch_size, max_length=max_length, lora_r=lora_r,
                    lora_targets=tuple(lora_targets), lora_dropout=lora_dropout,
                    gradient_checkpointing=gradient_checkpointing, placement=placement,
                    attention=attention or ("eager" if backend == "xla" else info["attention"]), kv_cache=kv_cache)
    if placement is None:
        placement = "fsdp" if backend == "xla" else "single" if devices == 1 else "replicate"
        if placement == "replicate" and not _estimate(info, settings, devices, capacity, backend, placement)["fits"]:
            placement = "split"
    settings["placement"] = placement
    plan = MemoryPlan(settings=settings, **_estimate(info, settings, devices, capacity, backend, placement))
    if not plan.fits and advise:
        plan.fix, plan.advice = _cheapest_fix(config_or_path, settings, backend, devices, token)
    return plan


def _estimate(info: dict, s: dict, devices: int, capacity: float, backend: str, placement: str) -> dict:
    b = DTYPE_BYTES[s["dtype"]]
    h, m, layers = info["hidden"], info["intermediate"], info["layers"]
    heads_dim = info["heads"] * info["head_dim"]
    length = s["max_length"]

    other = info["params"] - info["quantizable_params"]
    q = info["quantizable_params"]
    weights = {None: q * b,
               "8bit": q + 4 * info["quantizable_rows"],  # int8 + one fp32 scale per output row
               "4bit": q / 2 + q / 64 * 4}[s["quantization"]] + other * b  # nf4 + fp32 absmax per 64-block

    r = s["lora_r"]
    shapes = [info["linears"][t] for t in s["lora_targets"] if t in info["linears"]]
    lora_params = r * sum(i + o for i, o in shapes) * layers + h * 3  # + the trained copy of the score head
    lora = lora_params * (ADAM_BYTES_PER_PARAM if s["training"] else 4)

    # rows each device works on at once
    shard = devices if placement == "fsdp" or (placement == "replicate" and s["training"]) else 1
    rows = -(-s["batch_size"] // shard)
    tokens = rows * length
    eager = s["attention"] == "eager"
    # eager attention keeps the softmax in fp32 and its cast; XLA fuses these into one compute-dtype copy
    score_bytes = b if backend == "xla" else 4 + (b if b < 4 else 0)
    scores = info["heads"] * length * (score_bytes + (b if info["softcap"] else 0)) if eager else 0

    # bytes per token the largest transient of one layer holds (forward, its backward, or a recompute):
    # the residual stream and norm output, plus the MLP's gate/up/product or the attention's scores
    transient = 3 * b * h + max(4 * b * m, 4 * b * heads_dim + (scores + b * info["heads"] * length if eager else 0))
    if s["quantization"] == "8bit":  # int8 matmul: fp16 + int8 copies of the input, int32 accumulator
        transient += max(3 * i + 4 * o for i, o in info["linears"].values())
    mask = (b if eager else 1) * length * info["masks"]  # a B x 1 x L x L mask per kind of layer
    if s["training"]:
        saved = _saved_per_layer(info, s, b, scores, fused=backend == "xla")
        if s["gradient_checkpointing"]:
            per_token = b * h * layers + saved  # layer inputs, and one layer recomputed in the backward
        else:
            layers_here = -(-layers // devices) if placement == "split" else layers
            per_token = saved * layers_here
        per_token += transient + mask + 4 * h + 2 * b * h  # final norm and the score head's input
    else:
        per_token = transient + mask + 2 * b * h
    if s["kv_cache"]:  # keys and values of every layer (of this device's layers when split) until the end
        cached_layers = -(-layers // devices) if placement == "split" else layers
        per_token += 2 * b * info["kv_heads"] * info["head_dim"] * cached_layers
    # bitsandbytes 4-bit dequantizes one weight matrix at a time to compute with it
    activations = per_token * tokens + (info["largest_linear"] * b if s["quantization"] == "4bit" else 0)
    logits = tokens * 3 * (b + 4)

    if placement == "fsdp":
        gathered = 2 * info["layer_params"] * b  # the current and the prefetched layer, all-gathered
        weights, lora = weights / devices + gathered, lora / devices
    elif placement == "split":
        weights = other * b + (weights - other * b) * -(-layers // devices) / layers
    overhead = CPU_RUNTIME_GB * GB if backend == "cpu" else 0
    total = weights + lora + activations + logits + overhead
    share = 1.0 if backend == "xla" else HEADROOM
    limit = share * capacity * GB
    fits = total <= limit
    where = {"single": "", "fsdp": f" sharded over {devices} devices", "replicate": " per model copy",
             "split": f" split across {devices} GPUs"}[placement]
    reason = (f"peak {total / GB:.1f} GB per device{where} is {'within' if fits else 'over'} "
              f"{limit / GB:.1f} GB ({share:.0%} of {capacity:.3g} GB usable)")
    return dict(params=info["params"], devices=devices, capacity_gb=capacity, placement=placement,
                weights_gb=weights / GB, lora_gb=lora / GB, activations_gb=activations / GB,
                logits_gb=logits / GB, overhead_gb=overhead / GB, total_gb=total / GB, fits=fits, reason=reason)


def _saved_per_layer(info: dict, s: dict, b: int, scores: float, fused: bool) -> float:
    """Bytes per token one decoder layer keeps for the backward pass (base frozen, LoRA trained).

    Eager PyTorch keeps RMSNorm's fp32 input copy and key/value repeated to all heads; XLA (`fused`) keeps
    compute-dtype inputs and broadcasts key/value instead of copying them.
    """
    h, m, heads_dim, r = info["hidden"], info["intermediate"], info["heads"] * info["head_dim"], s["lora_r"]
    kv_dim = info["kv_heads"] * info["head_dim"]
    saved = info["norms_per_layer"] * (b if fused else 4) * h
    saved += b * (heads_dim + 2 * kv_dim) if fused else 3 * b * heads_dim  # query, key, value
    saved += scores if scores else b * heads_dim + 4 * info["heads"]  # eager: softmax; sdpa: output, logsumexp
    saved += 3 * b * m  # MLP: gate input, activation output, up output
    if s["quantization"] == "8bit":  # bitsandbytes' int8 matmul keeps its input when gradients flow through
        saved += b * (3 * h + m)
    groups = set()
    for name in s["lora_targets"]:
        if name not in info["linears"]:
            continue
        d_in = info["linears"][name][0]
        if s["lora_dropout"] > 0:
            saved += (b + 1) * d_in + b * r  # dropped copy of the input + its mask
        elif INPUT_GROUPS.get(name, name) not in groups:
            groups.add(INPUT_GROUPS.get(name, name))
            saved += b * d_in + b * r
    return saved


def _cheapest_fix(config_or_path, settings: dict, backend: str, devices: int, token) -> tuple:
    """Try changes from cheapest (smaller batch) to costliest (shorter text); describe the first that fits."""
    s = settings
    batches = [{"batch_size": s["batch_size"] // 2 ** i} for i in range(1, 12) if s["batch_size"] // 2 ** i >= 1]
    steps = [batches]
    if s["training"] and not s["gradient_checkpointing"]:
        steps.append([{"gradient_checkpointing": True}] + [{"gradient_checkpointing": True, **x} for x in batches])
    if devices > 1 and backend == "cuda" and s["placement"] != "split":
        steps.append([{"placement": "split"}] + [{"placement": "split", **x} for x in batches])
    if backend != "xla":
        for quant in ("8bit", "4bit"):
            if s["quantization"] == "4bit" or (s["quantization"] == "8bit" and quant == "8bit"):
                continue
            extra = [{}, {"gradient_checkpointing": True}] if s["training"] else [{}]
            steps.append([{"quantization": quant, **e, **x} for e in extra for x in [{}] + batches])
    lengths = [{"max_length": s["max_length"] // 2 ** i} for i in range(1, 4) if s["max_length"] // 2 ** i >= 128]
    steps.append([{**x, "batch_size": 1, "gradient_checkpointing": s["training"]} for x in lengths])
    for step in steps:
        for change in step:
            trial = {**s, **change}
            trial.pop("target"), trial.pop("attention")
            plan = plan_memory(config_or_path, s["target"], attention=s["attention"], token=token, advise=False,
                               **trial)
            if plan.fits:
                return change, _describe(s, change, plan)
    return None, None


def _describe(s: dict, change: dict, plan: MemoryPlan) -> str:
    parts = []
    if "quantization" in change:
        parts.append(f"load the weights in {change['quantization']} (quantization={change['quantization']!r})")
    if "placement" in change:
        parts.append("split one model across the GPUs (device_map) instead of one copy per GPU")
    if change.get("gradient_checkpointing") and not s["gradient_checkpointing"]:
        parts.append("turn on gradient_checkpointing (about 30% slower)")
    if "batch_size" in change and change["batch_size"] != s["batch_size"]:
        keep = (f" with grad_accum x{s['batch_size'] // change['batch_size']} to keep {s['batch_size']} rows "
                "per step" if s["training"] else "")
        parts.append(f"batch_size {s['batch_size']} -> {change['batch_size']}{keep}")
    if "max_length" in change:
        parts.append(f"max_length {s['max_length']} -> {change['max_length']} (truncates more text)")
    return " + ".join(parts) + f": peak {plan.total_gb:.1f} GB per device"


def plan_from_config(config, target: str, training: bool, quantization: str | None = None,
                     token: str | None = None) -> MemoryPlan:
    """The plan for a run's `Config` (train: its batch; predict: rows of max_length in predict_batch_tokens)."""
    batch = config.batch_size if training else rows_per_batch(config.predict_batch_tokens, config.max_length)
    return plan_memory(config.model, target, dtype=config.dtype, quantization=quantization or config.quantization,
                       training=training, batch_size=batch, max_length=config.max_length, lora_r=config.lora_r,
                       lora_targets=config.lora_targets, lora_dropout=config.lora_dropout,
                       gradient_checkpointing=config.gradient_checkpointing, token=token)


def format_plan(plan: MemoryPlan) -> str:
    """A short printable verdict: setup, per-device breakdown, fits or not and why, the cheapest fix."""
    s = plan.settings
    precision = s["quantization"] or s["dtype"]
    what = "training" if s["training"] else "predicting"
    how = {"single": "", "fsdp": ", FSDP-sharded", "replicate": ", one copy per GPU",
           "split": ", one model split across the GPUs"}[plan.placement]
    lines = [
        f"{_count(plan.params)} params, {precision}, {what} on {s['target']} ({plan.devices} x "
        f"{plan.capacity_gb:.3g} GB{how}), batch {s['batch_size']} x {s['max_length']} tokens, "
        f"{s['attention']} attention{', gradient checkpointing' if s['gradient_checkpointing'] else ''}, "
        + ("KV cache of all layers (use_cache=True)" if s["kv_cache"] else "no KV cache (use_cache=False)"),
        f"  per device: weights {plan.weights_gb:.2f} + LoRA {plan.lora_gb:.2f} + activations "
        f"{plan.activations_gb:.2f} + logits {plan.logits_gb:.3f}"
        + (f" + runtime {plan.overhead_gb:.1f}" if plan.overhead_gb else "") + f" = {plan.total_gb:.1f} GB",
        f"  {'FITS' if plan.fits else 'DOES NOT FIT'}: {plan.reason}",
    ]
    if not plan.fits:
        lines.append(f"  cheapest fix: {plan.advice or 'none found: use a smaller model or a bigger device'}")
    return "\n".join(lines)


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n:,}"


def check_fits(plan: MemoryPlan, force: bool = False) -> MemoryPlan:
    """Raise DoesNotFitError for a plan that does not fit, unless forced (then only warn)."""
    if plan.fits:
        return plan
    message = f"this setup is not expected to fit in memory:\n{format_plan(plan)}"
    if not force:
        raise DoesNotFitError(message + "\nchange the setup as suggested, or force it (force=True / --force) "
                                        "to try anyway")
    warnings.warn(message + "\n(forced: trying anyway)", stacklevel=2)
    return plan


# --- time plan --------------------------------------------------------------------------------------------

TIME_LIMIT_H = 9.0
"""Kaggle's limit for a notebook session and for a code-competition submission (ANCHORS.md)."""
GPU_PEAK_TFLOPS = {"t4": 65.0, "p100": 18.7, "v100": 125.0, "a10": 125.0, "l4": 121.0, "a100": 312.0,
                   "h100": 989.0}
"""Dense fp16/bf16 peak per GPU from NVIDIA's datasheets (tensor cores; the P100 has none)."""
PEAK_TFLOPS = {
    "tpu-v3-8": 61.5,  # per core: 123 TFLOP/s bf16 per v3 chip of two cores (Cloud TPU v3 page), 8 cores
    "tpu-v5e-8": 197.0,  # per chip: 197 TFLOP/s bf16 (Cloud TPU v5e page), 8 chips
    "t4": GPU_PEAK_TFLOPS["t4"],
    "2xt4": GPU_PEAK_TFLOPS["t4"],
}
"""Peak TFLOP/s per device of the named targets (a target's devices work in parallel)."""
UTILIZATION = {
    # LoRA under FSDP on a v3-8: every layer's weights are all-gathered each step and eager attention is
    # memory-bound, so a third of peak, give or take; issue 13 estimates 2.5-3.5 s per 16 x 1024 step, the 2024
    # notebook ran ~1,800 such steps in ~2 h with its compiles. Not calibrated on v5e (faster chips, same
    # gathers: probably lower)
    "xla": (0.25, 0.40),
    "cuda": (0.25, 0.35),  # fp16 on a T4: large matmuls reach ~60% of peak, attention and norms much less
    # bitsandbytes int8 (outlier decomposition, int8 casts of every input): the 2024 notebook's 25k rows in ~4.5 h
    # on 2x T4 at 1024 fixed is ~17% of peak, a later variant's 10k rows in 65 min ~29%
    "cuda-8bit": (0.15, 0.30),
    "cuda-4bit": (0.15, 0.25),  # nf4 is dequantized before every matmul
    "cpu": (0.10, 0.30),
}
"""Assumed (low, high) share of peak FLOP/s a run reaches: a guess, printed with every estimate."""
COMPILE_MIN = (5.0, 15.0)
"""Minutes XLA takes to compile one graph of an 8B model (a user saw 300 s for the first step; issue 13
estimates 10-30 min for the first two steps). Not scaled with model size: smaller models compile faster."""
PADDINGS = ("fixed", "buckets", "sorted", "longest")


@dataclasses.dataclass
class TimePlan:
    """Estimated wall time of a training or prediction run (FLOPs / (peak x assumed utilization)), with
    Kaggle's session limit as the verdict and the cheapest change that fits when it does not."""

    settings: dict
    """The inputs the plan was made for (target, training, rows, max_length, padding, epochs, tta, ...)."""
    params: int
    """Exact parameter count of the 3-way classifier."""
    matmul_params: int
    """Weights of the decoder layers' linear layers and the score head: 2 FLOPs per token each, forward."""
    lora_params: int
    rows: float
    """Rows the run pushes through the model: x epochs when training, x2 with TTA."""
    tokens: float
    """Tokens those rows are padded to (what the device computes on)."""
    real_tokens: float | None
    """Their real tokens; None when no lengths were given (then tokens assume max_length per row)."""
    flops: float
    """Training or prediction FLOPs."""
    eval_flops: float
    """Evaluation FLOPs during training."""
    attention_share: float
    """Share of all FLOPs spent in the attention scores (grows with length squared)."""
    peak_tflops: float
    """Peak of all devices that work at once (a model split across GPUs counts one)."""
    utilization: tuple
    """(low, high) assumed share of that peak."""
    compile_hours: tuple
    """(low, high) XLA compile time, one graph per padded shape (0 on GPU/CPU)."""
    hours: tuple
    """(low, high) estimated wall time: compile + FLOPs / (peak x utilization high, then low)."""
    seconds_per_step: tuple | None
    """(low, high) seconds per optimizer step when training."""
    verdict: str
    """fits | may not fit | does not fit, within the limit (the high estimate decides "fits")."""
    limit_hours: float = TIME_LIMIT_H
    notes: list = dataclasses.field(default_factory=list)
    """Assumptions the inputs forced (e.g. no token lengths: every row counted at max_length)."""
    advice: str | None = None
    """The cheapest change that brings the high estimate within the limit, in words."""
    fix: dict | None = None
    """That change as plan_time arguments."""

    @property
    def fits(self) -> bool:
        return self.verdict == "fits"

    def __str__(self) -> str:
        return format_time_plan(self)


def peak_tflops_of(name) -> float:
    """Peak TFLOP/s of a GPU by name ("t4", "NVIDIA A100-SXM4-80GB", ...) or a number."""
    try:
        return float(name)
    except ValueError:
        pass
    key = str(name).lower()
    for gpu, tflops in GPU_PEAK_TFLOPS.items():
        if re.search(rf"(?<![a-z0-9]){gpu}(?![0-9])", key):
            return tflops
    raise ValueError(f"unknown GPU {name!r} for the time plan: pass its dense fp16/bf16 peak in TFLOP/s as "
                     f"peak_tflops (--peak-tflops), or one of {', '.join(GPU_PEAK_TFLOPS)}")


def padded_tokens(max_length: int, padding: str, lengths=None, mean_tokens: float | None = None,
                  batch_size: int = 8, buckets=None, seed: int = 0) -> tuple:
    """(mean padded tokens per row, mean of their squares, mean real tokens or None, note or None).

    Args:
        lengths: real token count per row of a sample (clipped to max_length, as encoding truncates there).
        mean_tokens: the mean real tokens per row, when no lengths are at hand (sorted padding only).
        padding: fixed (every row max_length), buckets (each row padded to the smallest bucket that holds it),
            sorted (length-sorted batches of `batch_size` padded to their longest row, as prediction runs),
            longest (shuffled batches padded to their longest row, as GPU training runs).
    """
    if padding not in PADDINGS:
        raise ValueError(f"padding {padding!r} is not one of {', '.join(PADDINGS)}")
    if lengths is None and mean_tokens is None:
        note = (None if padding == "fixed" else
                f"no token lengths given: every row counted at max_length {max_length} (the worst case); pass "
                "lengths (--data) or mean_tokens (--mean-tokens)")
        return float(max_length), float(max_length) ** 2, None, note
    if lengths is None:
        real = min(float(mean_tokens), max_length)
        if padding == "fixed":
            return float(max_length), float(max_length) ** 2, real, None
        if padding == "sorted":
            return real, real ** 2, real, "sorted padding from a mean length: attention counted at the mean length"
        raise ValueError(f"padding={padding!r} needs the token length of each row (lengths), not only their mean")
    real = np.minimum(np.asarray(lengths, dtype=np.float64), max_length)
    if real.size == 0:
        raise ValueError("lengths is empty: pass the token count of at least one row")
    if padding == "fixed":
        padded = np.full_like(real, max_length)
    elif padding == "buckets":
        if not buckets or max(buckets) < max_length:
            raise ValueError(f"padding='buckets' needs bucket lengths up to max_length {max_length}, got {buckets}")
        edges = np.sort(np.asarray(buckets, dtype=np.float64))
        padded = edges[np.searchsorted(edges, real)]
    else:
        order = np.sort(real)[::-1] if padding == "sorted" else np.random.default_rng(seed).permutation(real)
        widths = np.maximum.reduceat(order, np.arange(0, order.size, batch_size))
        padded = np.repeat(widths, batch_size)[:order.size]
    return float(padded.mean()), float((padded ** 2).mean()), float(real.mean()), None


def plan_time(config_or_path, target: str = "2xt4", training: bool = False, rows: float = 25_000, lengths=None,
              mean_tokens: float | None = None, max_length: int = 1024, padding: str | None = None, buckets=None,
              batch_size: int = 8, epochs: float = 1.0, eval_rows: float = 0, tta: bool = False,
              quantization: str | None = None, lora_r: int = 16, lora_targets=None,
              gradient_checkpointing: bool = False, placement: str | None = None, utilization=None,
              peak_tflops=None, limit_hours: float = TIME_LIMIT_H, token: str | None = None,
              advise: bool = True) -> TimePlan:
    """Estimate the wall time of training (LoRA) or predicting `rows` rows on a target: an estimate, not a
    measurement.

    FLOPs per row padded to P tokens, with N the linear layers' weights, n the LoRA weights, L layers of
    H x D attention width: forward 2(N + n)P + 4 L H D P^2 (the scores and their product with the values,
    over the full padded square, as eager and masked sdpa compute it). Training: the backward through a frozen
    weight computes only the gradient of its input (another 2NP), not of the weight, so 4NP rather than the 6NP
    of full fine-tuning; LoRA's own weights and the attention products need both gradients (3x forward);
    gradient checkpointing runs the forward once more. Wall time = FLOPs / (peak x utilization) + XLA compiles.

    Args:
        rows: rows trained on per epoch, or rows predicted.
        lengths: real token counts of a sample of rows (their distribution sets the padding); or mean_tokens.
        padding: see `padded_tokens`; None: fixed when training on XLA, longest when training elsewhere,
            sorted when predicting.
        batch_size: rows per optimizer step (training) or per batch (predicting; sets sorted padding).
        eval_rows: rows evaluated over the whole training run (see `evaluated_rows`).
        tta: predict every row twice (A/B swap).
        placement: on several GPUs, "replicate" (each GPU takes a share of the rows, the default) or "split"
            (one model across them: one GPU works at a time).
        utilization: a share of peak, or (low, high); None: `UTILIZATION` for the backend and quantization.
        peak_tflops: per device, a number or a GPU name; needed for gpu:NN and cpu targets.
    """
    devices, _, backend = parse_target(target)
    name = target.lower().strip()
    if peak_tflops is None:
        if name not in PEAK_TFLOPS:
            raise ValueError(f"the time plan needs the peak of target {target!r}: pass peak_tflops "
                             f"(--peak-tflops), a number or a GPU name ({', '.join(GPU_PEAK_TFLOPS)})")
        peak_tflops = PEAK_TFLOPS[name]
    per_device = peak_tflops_of(peak_tflops)
    padding = padding or ("sorted" if not training else "fixed" if backend == "xla" else "longest")
    if rows <= 0 or epochs <= 0 or batch_size < 1 or max_length < 1:
        raise ValueError(f"rows={rows}, epochs={epochs}, batch_size={batch_size} and max_length={max_length} "
                         "must be positive")
    info = architecture(config_or_path, token)
    if lora_targets is None:
        lora_targets = default_lora_targets(info["model_type"])
    settings = dict(target=target, training=training, rows=rows, max_length=max_length, padding=padding,
                    buckets=tuple(buckets) if buckets else None, batch_size=batch_size, epochs=epochs,
                    eval_rows=eval_rows, tta=tta, quantization=quantization, lora_r=lora_r,
                    lora_targets=tuple(lora_targets), gradient_checkpointing=gradient_checkpointing,
                    placement=placement, utilization=utilization, peak_tflops=per_device, limit_hours=limit_hours)

    mean_p, mean_p2, real, note = padded_tokens(max_length, padding, lengths, mean_tokens, batch_size, buckets)
    matmul = info["quantizable_params"] + 3 * info["hidden"]
    lora = lora_r * sum(i + o for t, (i, o) in info["linears"].items() if t in lora_targets) * info["layers"]
    attention = 4 * info["layers"] * info["heads"] * info["head_dim"] * mean_p2  # per row, forward
    forward = 2 * (matmul + lora) * mean_p + attention
    if training:
        again = 1 if gradient_checkpointing else 0
        per_row = 2 * matmul * mean_p * (2 + again) + 2 * lora * mean_p * (3 + again) + attention * (3 + again)
        done = rows * epochs
        flops, eval_flops = done * per_row, eval_rows * forward
        attn_flops = done * attention * (3 + again) + eval_rows * attention
    else:
        per_row = forward
        done = rows * (2 if tta else 1)
        flops, eval_flops = done * per_row, 0.0
        attn_flops = done * attention

    # FSDP and one model copy per GPU share the rows; a model split across GPUs runs one GPU at a time
    parallel = 1 if placement == "split" else devices
    total_peak = per_device * parallel * 1e12
    if utilization is None:
        utilization = UTILIZATION[f"cuda-{quantization}" if backend == "cuda" and quantization else backend]
    low, high = (utilization, utilization) if isinstance(utilization, (int, float)) else utilization
    graphs = 0
    if backend == "xla":
        shapes = len(buckets) if padding == "buckets" else 1
        # training: forward+backward compiles twice (AdamW's state appears at step 2), evaluation once per shape
        graphs = shapes * (2 + (1 if eval_rows else 0)) if training else shapes
    compile_h = (graphs * COMPILE_MIN[0] / 60, graphs * COMPILE_MIN[1] / 60)
    work = flops + eval_flops
    hours = (compile_h[0] + work / (total_peak * high) / 3600, compile_h[1] + work / (total_peak * low) / 3600)
    step = None
    if training:
        step = (batch_size * per_row / (total_peak * high), batch_size * per_row / (total_peak * low))
    verdict = "fits" if hours[1] <= limit_hours else "may not fit" if hours[0] <= limit_hours else "does not fit"
    plan = TimePlan(settings=settings, params=info["params"], matmul_params=matmul, lora_params=lora, rows=done,
                    tokens=done * mean_p, real_tokens=None if real is None else done * real, flops=flops,
                    eval_flops=eval_flops, attention_share=attn_flops / work, peak_tflops=total_peak / 1e12,
                    utilization=(low, high), compile_hours=compile_h, hours=hours, seconds_per_step=step,
                    verdict=verdict, limit_hours=limit_hours, notes=[note] if note else [])
    if not plan.fits and advise:
        plan.fix, plan.advice = _cheapest_time_fix(config_or_path, plan, lengths, mean_tokens, token)
    return plan


def _cheapest_time_fix(config_or_path, plan: TimePlan, lengths, mean_tokens, token) -> tuple:
    """Apply changes from cheapest to costliest (in accuracy) until the high estimate fits; describe them."""
    s = plan.settings
    known = lengths is not None or mean_tokens is not None
    steps = []
    if s["training"]:
        # evaluation worth at most a tenth of the training compute
        cap = 0.1 * plan.flops / max(plan.eval_flops / max(s["eval_rows"], 1), 1)
        if s["eval_rows"] > cap:
            steps.append(({"eval_rows": int(cap)}, f"evaluate fewer rows during training ({s['eval_rows']:,.0f} -> "
                                                   f"{int(cap):,} in all: a fixed subset, or evaluate less often)"))
        steps += [({"epochs": round(s["epochs"] * f, 2), "eval_rows": None},
                   f"epochs {s['epochs']:g} -> {s['epochs'] * f:.2g} (or max_train_rows)") for f in (0.75, 0.5, 0.25)]
    else:
        if s["padding"] == "fixed" and known:
            steps.append(({"padding": "sorted"}, "sort rows by length and pad each batch to its longest row"))
        if s["tta"]:
            steps.append(({"tta": False}, "no A/B-swap TTA (halves the time)"))
    steps += [({"max_length": s["max_length"] // 2 ** i}, f"max_length {s['max_length']} -> {s['max_length'] // 2 ** i}"
               + (" at inference" if not s["training"] else "") + " (truncates more text)")
              for i in (1, 2) if s["max_length"] // 2 ** i >= 256]
    change, words = {}, {}
    for step, text in steps:
        kind = next(iter(step))
        if step.get("eval_rows", 0) is None:  # fewer epochs evaluate proportionally less
            step = {**step, "eval_rows": change.get("eval_rows", s["eval_rows"]) * step["epochs"] / s["epochs"]}
        change = {**change, **step}
        words[kind] = text  # a shorter max_length or fewer epochs replaces the previous try of its kind
        trial = {k: v for k, v in {**s, **change}.items() if k not in ("target", "peak_tflops")}
        trial["buckets"] = list(trial["buckets"]) if trial["buckets"] else None
        fixed = plan_time(config_or_path, s["target"], lengths=lengths, mean_tokens=mean_tokens,
                          peak_tflops=s["peak_tflops"], token=token, advise=False, **trial)
        if fixed.fits:
            return change, " + ".join(words.values()) + f": about {fixed.hours[0]:.1f}-{fixed.hours[1]:.1f} h"
    return None, None


def format_time_plan(plan: TimePlan) -> str:
    """A short printable estimate: what runs, tokens and FLOPs, the assumptions, hours and the verdict."""
    s = plan.settings
    if s["training"]:
        what = (f"training {s['rows']:,.0f} rows x {s['epochs']:.3g} epoch(s)"
                + (f" + evaluating {s['eval_rows']:,.0f} rows" if s["eval_rows"] else ""))
    else:
        what = f"predicting {s['rows']:,.0f} rows" + (" x2 (A/B-swap TTA)" if s["tta"] else "")
    precision = s["quantization"] or "16-bit"
    lines = [f"time estimate (FLOPs / assumed utilization, not a measurement): {what} on {s['target']}, "
             f"{precision}, max_length {s['max_length']}, {s['padding']} padding"]
    padding = (f" for {plan.real_tokens / 1e6:,.1f}M real ({plan.tokens / plan.real_tokens:.2f}x padding)"
               if plan.real_tokens else "")
    share = f"; evaluation {plan.eval_flops / plan.flops:.0%} of training compute" if plan.eval_flops else ""
    lines.append(f"  {plan.tokens / 1e6:,.1f}M tokens processed{padding}; {plan.flops + plan.eval_flops:.2g} FLOPs "
                 f"({_count(plan.matmul_params)} matmul params, attention {plan.attention_share:.0%}){share}")
    parallel = plan.peak_tflops / s["peak_tflops"]
    compile_ = (f"; {plan.compile_hours[0] * 60:.0f}-{plan.compile_hours[1] * 60:.0f} min of XLA compiles"
                if plan.compile_hours[1] else "")
    lines.append(f"  peak {plan.peak_tflops:,.0f} TFLOP/s ({parallel:g} x {s['peak_tflops']:g}), assumed "
                 f"utilization {plan.utilization[0] * 100:.0f}-{plan.utilization[1]:.0%}{compile_}")
    step = (f"{plan.seconds_per_step[0]:.1f}-{plan.seconds_per_step[1]:.1f} s per step of {s['batch_size']} rows; "
            if plan.seconds_per_step else "")
    verdict = {"fits": "FITS", "may not fit": "MAY NOT FIT", "does not fit": "DOES NOT FIT"}[plan.verdict]
    lines.append(f"  {step}about {plan.hours[0]:.1f}-{plan.hours[1]:.1f} h: {verdict} Kaggle's "
                 f"{plan.limit_hours:g} h session limit")
    lines += [f"  note: {note}" for note in plan.notes]
    if not plan.fits:
        lines.append(f"  WARNING: this run may be stopped at {plan.limit_hours:g} h; cheapest change: "
                     f"{plan.advice or 'none found: a faster device or fewer rows'}")
    return "\n".join(lines)


def evaluated_rows(total_steps: int, eval_every: int | None, valid_rows: int, subset_rows: int | None = None) -> int:
    """Rows evaluated over a run: the subset (or the whole split) every `eval_every` steps, the whole split at
    the end (as `train.fit` evaluates at step % eval_every == 0 and at the last step)."""
    periodic = total_steps // eval_every if eval_every else 0
    if eval_every and total_steps % eval_every == 0:
        periodic -= 1  # the last periodic evaluation is the final one
    return periodic * min(subset_rows or valid_rows, valid_rows) + valid_rows


def eval_share(train_rows: int, valid_rows: int, eval_every: int | None, subset_rows: int | None = None,
               epochs: float = 1.0, batch_size: int = 16, train_tokens: float = 1024, eval_tokens: float | None = None,
               gradient_checkpointing: bool = False) -> float:
    """Evaluation compute / training compute of a run, from its numbers alone.

    Counts the linear layers only (2 FLOPs per weight per token forward; training 4, or 6 with gradient
    checkpointing, see `plan_time`); attention adds a few percent to both sides at 1024-2048 tokens.

    Args:
        batch_size: rows per optimizer step (batch_size x grad_accum).
        train_tokens, eval_tokens: mean padded tokens per row in training and in evaluation (default: the same).
    """
    steps = int(train_rows * epochs) // batch_size
    rows = evaluated_rows(steps, eval_every, valid_rows, subset_rows)
    per_token = 4 + (2 if gradient_checkpointing else 0)
    return rows * 2 * (eval_tokens or train_tokens) / (train_rows * epochs * per_token * train_tokens)


def time_plan_from_config(config, target: str, training: bool, rows: int, lengths=None,
                          mean_tokens: float | None = None, padding: str | None = None, buckets=None,
                          quantization: str | None = None, placement=None, peak_tflops=None,
                          token: str | None = None) -> TimePlan:
    """The time plan of a run's `Config`: `rows` of train.csv (split by valid_frac, evaluated as `fit` does)
    or of test.csv (batches of predict_batch_tokens, TTA as configured)."""
    if training:
        valid = round(rows * config.valid_frac)
        train_rows = (rows - valid) * (2 if config.swap_augment else 1)
        step_rows = config.batch_size * config.grad_accum
        steps = config.max_steps or max(1, int(config.epochs * (train_rows // config.batch_size)) // config.grad_accum)
        epochs = steps * step_rows / train_rows
        return plan_time(config.model, target, True, train_rows, lengths, mean_tokens, config.max_length,
                         padding, buckets, batch_size=step_rows, epochs=epochs,
                         eval_rows=evaluated_rows(steps, config.eval_every, valid, config.eval_rows) if valid else 0,
                         quantization=quantization or config.quantization, lora_r=config.lora_r,
                         lora_targets=config.lora_targets, gradient_checkpointing=config.gradient_checkpointing,
                         placement=placement, peak_tflops=peak_tflops, token=token)
    return plan_time(config.model, target, False, rows, lengths, mean_tokens, config.max_length, padding, buckets,
                     batch_size=rows_per_batch(config.predict_batch_tokens, config.max_length), tta=config.tta,
                     quantization=quantization or config.quantization, lora_r=config.lora_r,
                     lora_targets=config.lora_targets, placement=placement, peak_tflops=peak_tflops, token=token)
