"""Will it fit? Exact parameter counts from a config (meta device) and a per-device peak-memory plan with a
verdict and the cheapest change that makes a setup fit; `check_fits` lets train/predict refuse early."""

from __future__ import annotations

import dataclasses
import functools
import re
from pathlib import Path

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


class DoesNotFitError(RuntimeError):
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
    from transformers import AutoConfig, PretrainedConfig

    if isinstance(config_or_path, PretrainedConfig):
        return config_or_path
    path = Path(str(config_or_path)).expanduser()
    if path.exists():
        if path.is_dir() and not (path / "config.json").is_file():
            raise FileNotFoundError(f"no config.json in {path}: point at the model folder that holds it")
        return AutoConfig.from_pretrained(str(path))
    from .auth import resolve_token

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
    import json

    import torch
    from transformers import AutoConfig, AutoModelForSequenceClassification

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
    )
    return tuple(info.items())


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
    import os

    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GB


def plan_memory(config_or_path, target: str = "t4", dtype: str = "auto", quantization: str | None = None,
                training: bool = False, batch_size: int = 8, max_length: int = 1024, lora_r: int = 16,
                lora_targets=None, lora_dropout: float = 0.05, gradient_checkpointing: bool = False,
                placement: str | None = None, attention: str | None = None, token: str | None = None,
                advise: bool = True) -> MemoryPlan:
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
        attention: "eager" (materialises B x heads x L x L scores) or "sdpa"; None: eager on TPU, else sdpa.
    """
    devices, capacity, backend = parse_target(target)
    if dtype == "auto":
        dtype = {"xla": "bf16", "cuda": "fp16", "cpu": "fp32"}[backend]
    if dtype not in DTYPE_BYTES:
        raise ValueError(f"dtype {dtype!r} is not one of auto, fp32, bf16, fp16")
    if quantization not in (None, "8bit", "4bit"):
        raise ValueError(f"quantization {quantization!r} is not one of None, '8bit', '4bit'")
    if quantization and backend == "xla":
        raise ValueError("bitsandbytes 8-bit/4-bit loading does not run on TPU; use quantization=None there")
    if placement not in (None, "single", "fsdp", "replicate", "split") or (
            placement in ("replicate", "split") and (devices < 2 or backend != "cuda")):
        raise ValueError(f"placement {placement!r} does not suit target {target!r}: use None (the plan picks), "
                         "or 'replicate' / 'split' on several GPUs")
    info = architecture(config_or_path, token)
    if lora_targets is None:  # the same default as model.add_lora
        from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as peft_defaults

        from .model import LORA_TARGETS

        lora_targets = LORA_TARGETS.get(info["model_type"]) or peft_defaults.get(info["model_type"], ())
    settings = dict(target=target, dtype=dtype, quantization=quantization, training=training,
                    batch_size=batch_size, max_length=max_length, lora_r=lora_r,
                    lora_targets=tuple(lora_targets), lora_dropout=lora_dropout,
                    gradient_checkpointing=gradient_checkpointing, placement=placement,
                    attention=attention or ("eager" if backend == "xla" else "sdpa"))
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
    mask = (b if eager else 1) * length  # one B x 1 x L x L mask shared by all layers
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
    """The plan for a run's `Config` (train: its batch; predict: rows of max_length in predict_batch_tokens).

    `target` "auto" is the machine this runs on (`device.memory_target` of `config.device`).
    """
    if target == "auto":
        from .device import detect, memory_target

        target = memory_target(detect() if config.device == "auto" else config.device)
    batch = config.batch_size if training else max(1, config.predict_batch_tokens // config.max_length)
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
        f"{s['attention']} attention{', gradient checkpointing' if s['gradient_checkpointing'] else ''}",
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
    import warnings

    warnings.warn(message + "\n(forced: trying anyway)", stacklevel=2)
    return plan


def measure_run(model_dir, training: bool, quantization=None, batch_size=4, max_length=256, attention="sdpa",
                device_kind="cpu") -> int:
    """Measured peak bytes of one setup: the model's own bytes plus the peak that two LoRA + AdamW training
    steps (or one prediction batch) add on top, per `measure_peak`. Loads through `model.load_classifier`."""
    import torch

    from .model import add_lora, load_classifier, load_tokenizer

    tokenizer = load_tokenizer(model_dir)
    model = load_classifier(model_dir, tokenizer, dtype="fp32", device_kind=device_kind, quantization=quantization)
    model.config._attn_implementation = attention
    model = add_lora(model).train() if training else model.eval()
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(5, len(tokenizer), (batch_size, max_length), generator=gen).to(device)
    mask = torch.ones_like(ids)
    targets = torch.softmax(torch.randn(batch_size, 3, generator=gen), -1).to(device)
    with torch.no_grad():  # touch every weight before the baseline is read
        model(input_ids=ids[:1, :8], attention_mask=mask[:1, :8])

    def work():
        if not training:
            with torch.no_grad():
                return model(input_ids=ids, attention_mask=mask).logits
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        for _ in range(2):  # the second step has AdamW's states, gradients and activations all alive
            logits = model(input_ids=ids, attention_mask=mask).logits
            loss = -(targets * torch.log_softmax(logits.float(), -1)).sum(-1).mean()
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return loss

    _, added = measure_peak(work, device_kind)
    own = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    return own + added


def measure_peak(fn, device_kind: str = "cpu"):
    """Run fn() and return (its result, the peak bytes it added to what was in use before).

    CUDA: torch's allocator peak. CPU (Linux): the process's peak resident memory (VmHWM, reset through
    /proc/self/clear_refs) minus the resident memory before; glibc's mmap threshold is pinned so that big
    tensors are mapped fresh and returned on free instead of reusing memory already resident.
    """
    import gc

    import torch

    gc.collect()
    if device_kind == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        result = fn()
        torch.cuda.synchronize()
        return result, torch.cuda.max_memory_allocated() - before
    _pin_malloc()
    before = _status_kb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current resident size
    result = fn()
    return result, (_status_kb("VmHWM") - before) * 1024


def _status_kb(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{key} not in /proc/self/status: peak memory can only be measured on Linux")


@functools.lru_cache(maxsize=1)
def _pin_malloc() -> None:
    import ctypes

    libc = ctypes.CDLL("libc.so.6")
    libc.mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD: fixed, so glibc stops raising it after each free
    libc.mallopt(-1, 128 * 1024)  # M_TRIM_THRESHOLD: give freed heap tops back to the system
