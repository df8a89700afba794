"""fit(): the training loop with step-level progress, evaluation and checkpoints that resume; train(): the entry point."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from .data import LABEL_COLUMNS

CHECKPOINT_PREFIX = "step-"


def fit(model, tokenizer, train_df, valid_df, config, device_kind: str | None = None, progress_file=None) -> dict:
    """Fine-tune `model` (a PeftModel: only its trainable weights change) on `train_df`; return the history.

    Shows a bar over all optimizer steps of the run; evaluates `valid_df` every `config.eval_every` steps and
    at the end; checkpoints to `config.output_dir/checkpoints` and, with `config.resume`, continues from the
    last one. The history is also written to `config.output_dir/history.json`.

    Args:
        progress_file: where the bar and notices go (default: stderr).
    """
    import pandas as pd
    import torch.nn.functional as F
    from tqdm import tqdm
    from transformers import get_scheduler

    from . import device as dev
    from .batching import num_train_batches
    from .data import swap_ab
    from .text import encode_rows

    kind = device_kind or dev.detect()
    main = dev.is_main_process()
    out = Path(config.output_dir)
    stream = progress_file or sys.stderr
    torch.manual_seed(config.seed)

    if config.swap_augment:
        train_df = pd.concat([train_df, swap_ab(train_df)], ignore_index=True)
    train_seqs = encode_rows(tokenizer, train_df, config.max_length, config.prompt_share, config.keep_tail)
    train_targets = _targets(train_df)
    has_valid = valid_df is not None and len(valid_df) > 0
    if has_valid:
        valid_seqs = encode_rows(tokenizer, valid_df, config.max_length, config.prompt_share, config.keep_tail)
        valid_targets = _targets(valid_df)
    # XLA compiles one graph per shape: pad every batch to max_length there; elsewhere pad to the longest row
    length = config.max_length if kind == "xla" else None
    pad_id = tokenizer.pad_token_id
    shards = dev.num_data_shards(kind)
    if config.batch_size % shards:
        raise ValueError(f"batch_size={config.batch_size} must be a multiple of the {shards} devices the batch is "
                         "split over; change Config.batch_size")
    per_epoch = num_train_batches(len(train_seqs), config.batch_size)
    if per_epoch == 0:
        raise ValueError(f"{len(train_seqs)} training rows make no full batch of batch_size={config.batch_size}; "
                         "use more rows or a smaller batch_size")
    total_steps = config.max_steps or max(1, int(config.epochs * per_epoch) // config.grad_accum)

    # the frozen weights' dtype sets mixed precision (bf16 on TPU, fp16 autocast + loss scaling on GPU) ...
    amp_dtype = _half_dtype(model)
    # ... while trainable weights are fp32: AdamW's small updates vanish when added to bf16/fp16 weights
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    net = dev.prepare_model(model, kind)  # on XLA the parameters are new objects: build the optimizer after
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters; add LoRA first (lmsys_utils.model.add_lora)")
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    scheduler = get_scheduler(
        "constant_with_warmup" if config.schedule == "constant" else config.schedule, optimizer,
        num_warmup_steps=min(config.warmup_steps, total_steps), num_training_steps=total_steps)
    scaler = torch.amp.GradScaler("cuda") if kind == "cuda" and amp_dtype == torch.float16 else None

    history = {"device": kind, "total_steps": total_steps, "step": [], "loss": [], "lr": [], "eval": [],
               "compile_s": None, "step_s": None, "best_step": None, "best_log_loss": None,
               "xla_log": [], "recompile_warning": None}
    start, notices = 0, []
    ckpt_dir = out / "checkpoints"
    if config.resume:
        state = load_checkpoint(ckpt_dir, model, optimizer, scheduler, kind)
        if state is None:
            notices.append(f"resume: no checkpoint in {ckpt_dir}; starting from step 0")
        else:
            start, history = state["step"], state["history"]
            notices.append(f"resume: continuing from step {start} of {total_steps} ({latest_checkpoint(ckpt_dir)})")

    batches = _micro_batches(train_seqs, train_targets, config.batch_size, pad_id, length, config.seed,
                             per_epoch, start * config.grad_accum)
    device = dev.get_device(kind)
    log_every = config.log_every
    # per-step losses stay on the device in a buffer with one slot per step of a log interval; a step writes
    # its slot with a multiply by a one-hot row (the same graph every step, unlike indexing with the step)
    slots = [row.to(device) for row in torch.eye(log_every)]
    loss_buffer = torch.zeros(log_every, device=device)
    lrs = {}
    warmup = 2 if kind == "xla" else 1  # on XLA step 2 compiles once more: AdamW's state exists from then on
    eval_compiles, expected_compiles, warned = None, None, False
    t_run = run_from = None
    last_logged = start

    notices.append(f"Step {start + 1} is being compiled/warmed up before the bar moves: on a TPU the first steps "
                   "are traced and compiled by XLA, which takes minutes for an 8B model; later steps reuse the graph.")
    if main:
        print("\n".join(notices), file=stream, flush=True)
    bar = tqdm(total=total_steps, initial=start, file=stream, disable=not main, mininterval=0, miniters=1,
               bar_format="train {n_fmt}/{total_fmt} |{bar:20}| {desc}", dynamic_ncols=False)
    say = (lambda text: bar.write(text, file=stream)) if main else (lambda text: None)
    net.train()
    t0 = time.perf_counter()
    for step in range(start + 1, total_steps + 1):
        step_loss = 0
        for _ in range(config.grad_accum):
            batch = dev.to_device(next(batches), kind)
            with dev.autocast(kind, amp_dtype):
                logits = net(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            # labels are target probabilities (B x 3): hard labels are one-hot, soft ones come from a teacher
            loss = F.cross_entropy(logits.float(), batch["labels"]) / config.grad_accum
            (scaler.scale(loss) if scaler else loss).backward()
            step_loss = step_loss + loss.detach()
        if scaler:
            scaler.unscale_(optimizer)
        if config.grad_clip:
            torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
        if scaler:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        lrs[step] = scheduler.get_last_lr()[0]
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        slot = slots[(step - 1) % log_every]
        loss_buffer = loss_buffer + slot * (step_loss - loss_buffer)
        dev.sync(kind)  # the one sync per step: XLA cuts the graph here and runs it asynchronously

        if step == start + min(warmup, total_steps - start):
            dev.wait(kind)  # once, so the compile time is measured whole
            history["compile_s"] = time.perf_counter() - t0
            t_run, run_from = time.perf_counter(), step
            say(f"compiled and ran the first {step - start} step(s) in {history['compile_s']:.1f} s "
                "(excluded from step time and ETA)")
            if kind == "xla":
                expected_compiles = dev.compile_count()

        if step % log_every == 0 or step == total_steps:
            # the host reads the device only here, once per log interval: all this interval's losses in one transfer
            values = loss_buffer.cpu().tolist()
            for s in range(last_logged + 1, step + 1):
                history["step"].append(s)
                history["loss"].append(values[(s - 1) % log_every])
                history["lr"].append(lrs.pop(s))
            postfix = f"loss {np.mean(history['loss'][-(step - last_logged):]):.4f} lr {history['lr'][-1]:.2e}"
            if run_from is not None and step > run_from:
                history["step_s"] = (time.perf_counter() - t_run) / (step - run_from)
                eta = history["step_s"] * (total_steps - step)
                postfix += f" {history['step_s']:.3f} s/step ETA {_clock(eta)}"
            bar.set_description_str(postfix, refresh=False)  # shown after the bar
            last_logged = step
            if kind == "xla":
                history["xla_log"].append({"step": step, "compiles": dev.compile_count(),
                                           "transfers": dev.transfer_count()})
            if expected_compiles is not None and not warned and dev.compile_count() > expected_compiles:
                warned = True
                history["recompile_warning"] = _recompile_message(dev.compile_count() - expected_compiles, step)
                warnings.warn(history["recompile_warning"], stacklevel=2)
        bar.update(1)

        new_best = False
        if has_valid and ((config.eval_every and step % config.eval_every == 0) or step == total_steps):
            before = dev.compile_count() if kind == "xla" else 0
            metrics = evaluate(net, valid_seqs, valid_targets, config.batch_size, pad_id, length, kind, amp_dtype)
            if expected_compiles is not None and eval_compiles is None:
                eval_compiles = dev.compile_count() - before  # the eval graph compiles once, at the first eval
                expected_compiles += eval_compiles
            history["eval"].append({"step": step, **metrics})
            say(f"step {step}: valid log loss {metrics['log_loss']:.4f}, accuracy {metrics['accuracy']:.3f}")
            new_best = history["best_log_loss"] is None or metrics["log_loss"] < history["best_log_loss"]
            if new_best:
                history["best_step"], history["best_log_loss"] = step, metrics["log_loss"]
        # with periodic saving on, a new best is checkpointed too, so the best checkpoint exists between save points
        if config.save_every and (step % config.save_every == 0 or new_best) or step == total_steps:
            save_checkpoint(ckpt_dir, model, tokenizer, optimizer, scheduler, step, history, kind,
                            data_position=step * config.grad_accum, keep_step=history["best_step"])
    bar.close()
    if main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "history.json").write_text(json.dumps(history, indent=1))
    return history


def evaluate(model, seqs, targets, batch_size: int, pad_id: int, length: int | None, kind: str,
             amp_dtype=None) -> dict:
    """Validation log loss and accuracy; with a fixed `length` every batch has one shape (one XLA graph)."""
    from . import device as dev
    from .batching import pad_batch
    from .metrics import accuracy, log_loss

    model.eval()
    probs = []
    with torch.no_grad():
        for i in range(0, len(seqs), batch_size):
            chunk = list(seqs[i:i + batch_size])
            if length is not None:
                chunk += [chunk[0]] * (batch_size - len(chunk))  # a full last batch keeps the graph's shape
            batch = dev.to_device(pad_batch(chunk, pad_id, length), kind)
            with dev.autocast(kind, amp_dtype):
                logits = model(**batch).logits
            probs.append(torch.softmax(logits.float(), dim=-1))
            dev.sync(kind)
    # one host transfer for the whole validation set
    probs = torch.cat(probs).cpu().numpy()[:len(seqs)]
    model.train()
    return {"log_loss": log_loss(targets, probs), "accuracy": accuracy(targets, probs)}


def save_checkpoint(ckpt_dir, model, tokenizer, optimizer, scheduler, step: int, history: dict, kind: str,
                    data_position: int, keep_step: int | None = None) -> Path | None:
    """Write `ckpt_dir/step-NNNNNNN` atomically (a temp dir renamed when complete) and prune older checkpoints.

    Keeps this checkpoint and the one of `keep_step` (the best so far). Holds the adapter (loadable for
    inference), trainable weights, optimizer, scheduler, step, data position, RNG states and history.
    """
    from . import device as dev
    from .model import adapter_state_dict, save_adapter

    # gather on every process (reading a sharded tensor is collective on a multi-host slice); only main writes
    adapter = adapter_state_dict(model)
    state = {
        "step": step, "data_position": data_position, "history": history, "rng": dev.get_rng_state(kind),
        "trainable": {n: p.detach().cpu() for n, p in model.named_parameters() if p.requires_grad},
        "optimizer": _to_cpu(optimizer.state_dict()), "scheduler": scheduler.state_dict(),
    }
    if not dev.is_main_process():
        return None
    ckpt_dir = Path(ckpt_dir)
    final = ckpt_dir / f"{CHECKPOINT_PREFIX}{step:07d}"
    tmp = ckpt_dir / f".tmp-{final.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    torch.save(state, tmp / "trainer_state.pt")
    save_adapter(model, tokenizer, tmp / "adapter", state_dict=adapter)
    shutil.rmtree(final, ignore_errors=True)
    # the rename is the commit point: a process killed before it leaves only a .tmp dir that loading ignores
    os.rename(tmp, final)
    keep = {final.name, f"{CHECKPOINT_PREFIX}{keep_step:07d}" if keep_step is not None else None}
    for old in ckpt_dir.iterdir():
        if old.name not in keep:
            shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(ckpt_dir) -> Path | None:
    """The newest complete checkpoint directory (temp dirs of interrupted writes are ignored)."""
    ckpt_dir = Path(ckpt_dir)
    found = sorted(ckpt_dir.glob(f"{CHECKPOINT_PREFIX}*")) if ckpt_dir.is_dir() else []
    return found[-1] if found else None


def load_checkpoint(ckpt_dir, model, optimizer, scheduler, kind: str) -> dict | None:
    """Restore the newest checkpoint into model/optimizer/scheduler and the RNGs; return its state (None: none)."""
    from . import device as dev

    path = latest_checkpoint(ckpt_dir)
    if path is None:
        return None
    state = torch.load(path / "trainer_state.pt", map_location="cpu", weights_only=False)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    if set(state["trainable"]) != trainable:
        raise ValueError(f"checkpoint {path} was written for a different model or LoRA setup "
                         f"({len(state['trainable'])} trainable tensors saved, {len(trainable)} in the model); "
                         "use the same model and lora_* settings, or set resume=False")
    model.load_state_dict(state["trainable"], strict=False)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    dev.set_rng_state(state["rng"], kind)
    return state


def train(config, token=None) -> dict:
    """The entry point: load data, split, tokenizer, model, LoRA, fit, then save the adapter and history."""
    from . import device as dev
    from .data import load_arena, split_train_valid
    from .memory import check_fits, format_plan, plan_from_config
    from .model import adapter_state_dict, add_lora, load_classifier, load_tokenizer, save_adapter

    kind = dev.detect() if config.device == "auto" else config.device
    dev.get_device(kind)  # on XLA, SPMD must be on before any XLA tensor exists
    main = dev.is_main_process()
    df, summary = load_arena(config.train_path)
    if main:
        print(summary)
    if config.max_train_rows:
        df = df.sample(frac=1.0, random_state=config.seed).head(config.max_train_rows).reset_index(drop=True)
    if config.valid_frac > 0:
        train_df, valid_df = split_train_valid(df, config.valid_frac, config.seed)
    else:
        train_df, valid_df = df, None
    tokenizer = load_tokenizer(config.model, token=token)
    # know before loading: refuse a setup the memory plan says cannot fit, unless forced
    plan = check_fits(plan_from_config(dataclasses.replace(config, device=kind), config.memory_target, training=True,
                                       token=token), force=config.force)
    if main:
        print(format_plan(plan))
    model = load_classifier(config.model, tokenizer, token=token, dtype=config.dtype, device_kind=kind,
                            quantization=config.quantization, gradient_checkpointing=config.gradient_checkpointing)
    torch.manual_seed(config.seed)
    model = add_lora(model, r=config.lora_r, alpha=config.lora_alpha, dropout=config.lora_dropout,
                     targets=config.lora_targets)
    history = fit(model, tokenizer, train_df, valid_df, config, device_kind=kind)
    adapter = adapter_state_dict(model)  # on every process: collective on a multi-host slice
    if main:
        save_adapter(model, tokenizer, Path(config.output_dir) / "adapter", settings=dataclasses.asdict(config),
                     state_dict=adapter)
        config.save(Path(config.output_dir) / "config.json")
    return history


def _micro_batches(seqs, targets, batch_size, pad_id, length, seed, per_epoch, start):
    """Batches across epochs from data position `start` (micro-batches already consumed by earlier steps)."""
    from .batching import train_batches

    epoch, skip = divmod(start, per_epoch)
    while True:
        yield from train_batches(seqs, targets, batch_size, pad_id, length, seed, epoch, start=skip)
        epoch, skip = epoch + 1, 0


def _targets(df) -> np.ndarray:
    missing = [c for c in LABEL_COLUMNS if c not in df.columns]
    if missing:
        raise ValueError(f"training/validation rows need the label columns {', '.join(LABEL_COLUMNS)}; "
                         f"missing {', '.join(missing)} (is this a test file?)")
    return df[list(LABEL_COLUMNS)].to_numpy(np.float32)


def _half_dtype(model):
    frozen = {p.dtype for p in model.parameters() if not p.requires_grad}
    return next((d for d in (torch.bfloat16, torch.float16) if d in frozen), None)


def _to_cpu(obj):
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def _recompile_message(n: int, step: int) -> str:
    return (f"XLA compiled {n} new graph(s) after warm-up (noticed at step {step}); each costs a compile "
            "(minutes on a TPU). Likely cause: a batch whose shape changed (pad every batch to max_length and "
            "drop the last partial batch), a host read of a device tensor inside the step (.item(), float(), "
            "print), or a Python value that changes each step traced into the graph.")
