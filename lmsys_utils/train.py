"""train(): the entry point that sets a run up; fit(): the loop, with step-level progress, evaluation and
checkpoints that resume."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from peft.utils import load_peft_weights, set_peft_model_state_dict
from tqdm import tqdm
from transformers import get_scheduler

from .batching import choose_buckets, num_train_batches, sorted_batches, train_batches
from .config import Config, EncodingSettings
from .auth import is_local, preflight
from .data import (LABEL_COLUMNS, distill_targets, load_arena, load_teacher, make_folds, split_train_valid, swap_ab,
                   targets)
from .device import CompileWatch, Runtime, get_rng_state, memory_target, resolve, set_rng_state, to_cpu
from .memory import check_fits, format_plan, plan_from_config
from .metrics import accuracy, log_loss
from .files import RUN_FILES, RunLock, atomic_write, check_output_dir, clean_stale_tmp
from .model import (adapter_keys, adapter_state_dict, add_lora, check_max_length, load_classifier, load_tokenizer,
                    save_adapter)
from .text import encode_rows

CHECKPOINT_PREFIX = "step-"


@dataclasses.dataclass
class TrainState:
    """What fit() advances and a checkpoint saves, built by `setup`."""

    model: Any
    """The PeftModel: its trainable weights are what a checkpoint and the adapter hold."""
    net: Any
    """The module forward passes call (the model, or its FSDPv2 wrapper under SPMD)."""
    tokenizer: Any
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: Any
    """Loss scaling for fp16 on CUDA (None elsewhere)."""
    batches: Iterator[dict]
    """Training micro-batches from the current data position on."""
    valid: tuple | None
    """(encoded rows, targets) of the validation split, or None."""
    runtime: Runtime
    encoding: EncodingSettings
    """Saved with every checkpoint's adapter."""
    total_steps: int
    step: int = 0
    """Optimizer steps done."""
    history: dict = dataclasses.field(default_factory=dict)
    notices: list = dataclasses.field(default_factory=list)
    """Lines fit() prints before the bar (resume, compile)."""
    valid_probs: Any = None
    """The latest whole-split evaluation's probabilities per validation row (out-of-fold predictions of a fold)."""
    buckets: tuple | None = None
    """Padded lengths of training and evaluation batches (XLA; None: each batch padded to its longest row)."""
    eval_subset: np.ndarray | None = None
    """Validation rows evaluated during training (None: all); the whole split is evaluated at the end."""


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM stopped training; the message says where, and how to continue."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


# settings a resumed run must share with the checkpoint: they define the schedule, the data order or the model
RESUME_FIELDS = ("train_path", "valid_frac", "max_train_rows", "extra_paths", "folds", "fold", "teacher",
                 "distill_alpha", "distill_temperature", "max_length", "prompt_share", "keep_tail", "model",
                 "quantization", "lora_r", "lora_alpha", "lora_dropout", "lora_targets", "epochs", "max_steps",
                 "batch_size", "grad_accum", "lr", "weight_decay", "warmup_steps", "schedule", "swap_augment",
                 "seed")


def train(config: Config, token=None, progress_file=None) -> dict:
    """The entry point: check the output folder and inputs, load and split the rows, check the memory plan, load
    the model with LoRA, fit, save the adapter (with its encoding settings) and `history.json` to
    `config.output_dir` (`config.json` is written first, so a resumed run can be checked against it).

    Ctrl-C or SIGTERM ends it with TrainingInterrupted, naming the last checkpoint to resume from.
    """
    out = check_output_dir(config.output_dir, config.resume, config.overwrite)
    with RunLock(out):
        if config.resume:
            _check_resume(config, out / "config.json")
        elif config.overwrite:  # the old run's files go, so nothing of it is mistaken for this run's later
            for path in (out / name for name in RUN_FILES):
                shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
        clean_stale_tmp(out / "checkpoints")
        if is_local(config.model):
            preflight(config.model)  # a missing or incomplete model folder: one clear message, before anything loads
        # on XLA, SPMD must be on before any XLA tensor exists, and the compile cache before the first compile
        runtime = resolve(config.device, config.dtype, compile_cache_dir(config))
        train_df, valid_df = load_training_rows(config, runtime.main)
        check_max_length(config.model, config.max_length, token=token)
        tokenizer = load_tokenizer(config.model, token=token)
        # know before loading: refuse a setup the memory plan says cannot fit, unless forced
        target = memory_target(runtime.kind) if config.memory_target == "auto" else config.memory_target
        plan = check_fits(plan_from_config(config, target, training=True, token=token), force=config.force)
        if runtime.main:
            print(format_plan(plan))
            config.save(out / "config.json")
        model = load_classifier(config.model, tokenizer, token=token, dtype=runtime.dtype, kind=runtime.kind,
                                quantization=config.quantization,
                                gradient_checkpointing=config.gradient_checkpointing)
        torch.manual_seed(config.seed)
        model = add_lora(model, r=config.lora_r, alpha=config.lora_alpha, dropout=config.lora_dropout,
                         targets=config.lora_targets)
        state = setup(model, tokenizer, train_df, valid_df, config, runtime)
        with _interrupts_as_exceptions():
            try:
                history = fit(state, config, progress_file=progress_file)
            except KeyboardInterrupt as e:
                raise _interrupted(state, out / "checkpoints", e) from None
        adapter = adapter_state_dict(model)  # on every process: collective on a multi-host slice
        if runtime.main:
            save_adapter(model, tokenizer, out / "adapter", encoding=config.encoding, state_dict=adapter)
            if config.fold is not None and state.valid_probs is not None:
                write_predictions(valid_df["id"], state.valid_probs, out / "oof.csv")
    return history


def load_training_rows(config: Config, verbose: bool = True) -> tuple[pd.DataFrame, pd.DataFrame | None]:
    """The training and validation rows of a run: the labeled train CSV, split by fold or by valid_frac, plus
    the extra battles (training only), with the teacher's probabilities mixed into the targets."""
    df, summary = load_arena(config.train_path, labels=True)
    if verbose:
        print(summary)
    if config.max_train_rows:
        df = df.sample(frac=1.0, random_state=config.seed).head(config.max_train_rows).reset_index(drop=True)
    if config.folds:
        held_out = (make_folds(df, k=config.folds, seed=config.seed) == config.fold).to_numpy()
        train_df, valid_df = df[~held_out].reset_index(drop=True), df[held_out].reset_index(drop=True)
    elif config.valid_frac > 0:
        train_df, valid_df = split_train_valid(df, config.valid_frac, config.seed)
    else:
        train_df, valid_df = df, None
    for path in config.extra_paths:
        extra, extra_summary = load_arena(path, labels=True)
        if verbose:
            print(f"extra rows from {path}: {len(extra)} (training only)")
        train_df = pd.concat([train_df, extra], ignore_index=True)
    if config.teacher:
        teacher = load_teacher(config.teacher, train_df["id"], fallback=config.teacher_fallback)
        mixed = distill_targets(targets(train_df), teacher, config.distill_alpha, config.distill_temperature)
        train_df = train_df.copy()
        train_df[list(LABEL_COLUMNS)] = mixed  # soft targets: fit's loss is cross-entropy against them
    return train_df, valid_df


def write_predictions(ids, probs, path) -> Path:
    """id + the three probabilities, in the submission's format (out-of-fold predictions, a blend's input)."""
    frame = pd.DataFrame(np.asarray(probs, dtype=np.float64), columns=list(LABEL_COLUMNS))
    frame.insert(0, "id", list(ids))
    with atomic_write(path) as f:
        frame.to_csv(f, index=False)
    return Path(path)


def _check_resume(config: Config, saved_path: Path) -> None:
    """Refuse a resume whose schedule-, data- or model-defining settings differ from the run's, naming them."""
    if not saved_path.is_file():
        return
    saved = json.loads(saved_path.read_text())
    current = json.loads(json.dumps(dataclasses.asdict(config)))  # tuples as lists, as saved
    changed = [f"{k}: {saved[k]!r} -> {current[k]!r}" for k in RESUME_FIELDS if k in saved and saved[k] != current[k]]
    if changed:
        raise ValueError(f"resume=true, but these settings differ from the run in {saved_path.parent}: "
                         f"{'; '.join(changed)}. Resume with the run's settings, or start a new run "
                         "(another output_dir, or overwrite=true)")


class _Terminated(KeyboardInterrupt):
    """SIGTERM (Kaggle stopping a session, `kill`), raised in the main thread like Ctrl-C."""


@contextlib.contextmanager
def _interrupts_as_exceptions():
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_term(signum, frame):
        raise _Terminated()

    previous = signal.signal(signal.SIGTERM, on_term)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _interrupted(state: "TrainState", ckpt_dir: Path, error: KeyboardInterrupt) -> TrainingInterrupted:
    last = latest_checkpoint(ckpt_dir)
    where = (f"the last checkpoint is step {int(last.name[len(CHECKPOINT_PREFIX):])}; continue with resume=true"
             if last else "no checkpoint was written yet (save_every sets how often)")
    return TrainingInterrupted(f"interrupted at step {state.step + 1} of {state.total_steps}; {where}",
                               143 if isinstance(error, _Terminated) else 130)


def setup(model, tokenizer, train_df: pd.DataFrame, valid_df: pd.DataFrame | None, config: Config,
          runtime: Runtime) -> TrainState:
    """Encode the rows, place the model, build optimizer, schedule and batches, and resume when asked."""
    if config.swap_augment:
        train_df = pd.concat([train_df, swap_ab(train_df)], ignore_index=True)
    encoding = config.encoding.as_kwargs()
    train_seqs, train_targets = encode_rows(tokenizer, train_df, **encoding), targets(train_df)
    valid = None
    if valid_df is not None and len(valid_df):
        valid = encode_rows(tokenizer, valid_df, **encoding), targets(valid_df)
    if config.batch_size % runtime.shards:
        raise ValueError(f"batch_size={config.batch_size} must be a multiple of the {runtime.shards} devices the "
                         "batch is split over; change Config.batch_size")
    # XLA compiles one graph per shape: batches are padded to a few lengths that fit the training rows
    lengths = [len(s) for s in train_seqs]
    buckets = None
    if runtime.padding == "buckets":
        buckets = choose_buckets(lengths, config.max_length, config.length_buckets)
    per_epoch = num_train_batches(len(train_seqs), config.batch_size, lengths, buckets, config.grad_accum)
    if per_epoch == 0:
        raise ValueError(f"{len(train_seqs)} training rows make no full batch of batch_size={config.batch_size}; "
                         "use more rows or a smaller batch_size")
    total_steps = config.max_steps or max(1, int(config.epochs * per_epoch) // config.grad_accum)

    # trainable weights are fp32 (AdamW's small updates vanish when added to bf16/fp16 weights); the frozen
    # weights keep the runtime's dtype, and autocast computes in it
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    net = runtime.prepare_model(model)  # on XLA the parameters are new objects: build the optimizer after
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters; add LoRA first (lmsys_utils.model.add_lora)")
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    scheduler = get_scheduler(
        "constant_with_warmup" if config.schedule == "constant" else config.schedule, optimizer,
        num_warmup_steps=min(config.warmup_steps, total_steps), num_training_steps=total_steps)
    scaler = torch.amp.GradScaler("cuda") if runtime.amp_dtype == torch.float16 and runtime.kind == "cuda" else None

    state = TrainState(model, net, tokenizer, optimizer, scheduler, scaler, iter(()), valid, runtime, config.encoding,
                       total_steps, history=_new_history(runtime, total_steps))
    ckpt_dir = Path(config.output_dir) / "checkpoints"
    if config.resume:
        saved = load_checkpoint(ckpt_dir, model, optimizer, scheduler, runtime.kind)
        if saved is None:
            state.notices.append(f"resume: no checkpoint in {ckpt_dir}; starting from step 0")
        else:
            state.step, state.history = saved["step"], saved["history"]
            state.notices.append(f"resume: continuing from step {state.step} of {total_steps} "
                                 f"({latest_checkpoint(ckpt_dir)})")
    state.buckets = buckets
    state.history["buckets"] = list(buckets) if buckets else None
    if valid is not None and config.eval_rows and config.eval_rows < len(valid[0]):
        # a fixed subset (same rows every time, so evaluations compare); drawn apart from the split's own seed use
        picked = np.random.default_rng([config.seed, 1]).choice(len(valid[0]), config.eval_rows, replace=False)
        state.eval_subset = np.sort(picked)
    state.batches = _micro_batches(train_seqs, train_targets, config.batch_size, tokenizer.pad_token_id, buckets,
                                   config.seed, per_epoch, state.step * config.grad_accum, config.grad_accum)
    return state


def fit(state: TrainState, config: Config, progress_file=None) -> dict:
    """Run the optimizer steps left in `state`; return (and write to output_dir/history.json) the history.

    One bar over all steps of the run, with a notice while the first steps compile; the loss is read from the
    device once per `log_every` steps; evaluation every `eval_every` steps and at the end; checkpoints to
    output_dir/checkpoints every `save_every` steps, at every new best and at the end.
    """
    runtime, history, total = state.runtime, state.history, state.total_steps
    stream = progress_file or sys.stderr
    log_every, start = config.log_every, state.step
    # per-step losses stay on the device in a buffer with one slot per step of a log interval; a step writes
    # its slot with a multiply by a one-hot row (the same graph every step, unlike indexing with the step)
    slots = [row.to(runtime.device) for row in torch.eye(log_every)]
    loss_buffer = torch.zeros(log_every, device=runtime.device)
    lrs, watch = {}, CompileWatch(runtime, state.buckets)
    warmup = min(2 if runtime.kind == "xla" else 1, total - start)  # on XLA step 2 compiles once more (AdamW state)
    t_run, last_logged = None, start
    notices = state.notices + [f"Step {start + 1} is being compiled/warmed up before the bar moves: on a TPU the "
                               "first steps are traced and compiled by XLA, which takes minutes for an 8B model; "
                               "later steps reuse the graph."]
    if runtime.main:
        print("\n".join(notices), file=stream, flush=True)
    bar = tqdm(total=total, initial=start, file=stream, disable=not runtime.main, mininterval=0, miniters=1,
               bar_format="train {n_fmt}/{total_fmt} |{bar:20}| {desc}", dynamic_ncols=False)
    say = (lambda text: bar.write(text, file=stream)) if runtime.main else (lambda text: None)
    state.net.train()
    t0 = time.perf_counter()
    for step in range(start + 1, total + 1):
        loss = train_step(state, config, watch)
        lrs[step] = state.scheduler.get_last_lr()[0]
        state.scheduler.step()
        loss_buffer = loss_buffer + slots[(step - 1) % log_every] * (loss - loss_buffer)
        with watch.syncing():
            runtime.sync()  # the one sync per step: XLA cuts the graph here and runs it asynchronously
        state.step = step

        if step == start + warmup:
            runtime.wait()  # once, so the compile time is measured whole
            history["compile_s"], t_run = time.perf_counter() - t0, time.perf_counter()
            watch.warmed_up()
            say(f"compiled and ran the first {warmup} step(s) in {history['compile_s']:.1f} s "
                "(excluded from step time and ETA)")
        if step % log_every == 0 or step == total:
            # the host reads the device only here, once per log interval: all this interval's losses in one transfer
            values = loss_buffer.cpu().tolist()
            logged, last_logged = range(last_logged + 1, step + 1), step
            for s in logged:
                history["step"].append(s)
                history["loss"].append(values[(s - 1) % log_every])
                history["lr"].append(lrs.pop(s))
            postfix = f"loss {np.mean(history['loss'][-len(logged):]):.4f} lr {history['lr'][-1]:.2e}"
            if step > start + warmup:
                history["step_s"] = (time.perf_counter() - t_run) / (step - start - warmup)
                postfix += f" {history['step_s']:.3f} s/step ETA {_clock(history['step_s'] * (total - step))}"
            bar.set_description_str(postfix, refresh=False)  # shown after the bar
            if watch.on:
                history["xla_log"].append(watch.counters(step))
            history["recompile_warning"] = history["recompile_warning"] or watch.check(step)
        bar.update(1)

        new_best = False
        if state.valid and ((config.eval_every and step % config.eval_every == 0) or step == total):
            seqs, targets_ = _eval_split(state, whole=step == total)
            with watch.evaluation(len(seqs)):
                metrics = evaluate(state.net, seqs, targets_, config.batch_size, state.tokenizer.pad_token_id,
                                   state.buckets, runtime)
            probs, whole = metrics.pop("probs"), len(seqs) == len(state.valid[0])
            if whole:
                state.valid_probs = probs
            new_best = _record_eval(history, step, metrics, len(seqs), whole=whole)
            say(f"step {step}: valid log loss {metrics['log_loss']:.4f}, accuracy {metrics['accuracy']:.3f} "
                f"({len(seqs)} rows)")
        # with periodic saving on, a new best is checkpointed too, so the best checkpoint exists between save points
        if config.save_every and (step % config.save_every == 0 or new_best) or step == total:
            save_checkpoint(Path(config.output_dir) / "checkpoints", state, data_position=step * config.grad_accum)
    bar.close()
    if runtime.main:
        Path(config.output_dir).mkdir(parents=True, exist_ok=True)
        (Path(config.output_dir) / "history.json").write_text(json.dumps(history, indent=1))
    return history


def train_step(state: TrainState, config: Config, watch: CompileWatch | None = None) -> torch.Tensor:
    """One optimizer step over `grad_accum` micro-batches; returns the step's mean loss, on the device.

    `watch` is told of each batch sent, so a new bucket's compiles count as expected (XLA).
    """
    runtime, scaler = state.runtime, state.scaler
    step_loss = 0
    for _ in range(config.grad_accum):
        batch = runtime.to_device(next(state.batches))
        if watch is not None:
            watch.saw(batch)
        with runtime.autocast():
            logits = state.net(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        # labels are target probabilities (B x 3): hard labels are one-hot, soft ones come from a teacher
        loss = F.cross_entropy(logits.float(), batch["labels"]) / config.grad_accum
        (scaler.scale(loss) if scaler else loss).backward()
        step_loss = step_loss + loss.detach()
    if scaler:
        scaler.unscale_(state.optimizer)
    if config.grad_clip:
        torch.nn.utils.clip_grad_norm_([p for g in state.optimizer.param_groups for p in g["params"]],
                                       config.grad_clip)
    if scaler:
        scaler.step(state.optimizer)
        scaler.update()
    else:
        state.optimizer.step()
    state.optimizer.zero_grad(set_to_none=True)
    return step_loss


def evaluate(model, seqs, targets, batch_size: int, pad_id: int, buckets, runtime: Runtime) -> dict:
    """Validation log loss and accuracy over length-sorted batches of about batch_size x the longest length
    tokens; with `buckets` (XLA) each batch is padded to a bucket length and filled to its bucket's row count,
    so each bucket compiles one graph."""
    model.eval()
    max_tokens = batch_size * (max(buckets) if buckets else max(map(len, seqs)))
    parts = []
    with torch.no_grad():
        for idx, batch in sorted_batches(seqs, pad_id, max_tokens, buckets=buckets, shards=runtime.shards):
            with runtime.autocast():
                logits = model(**runtime.to_device(batch)).logits
            parts.append((idx, torch.softmax(logits.float(), dim=-1)))
            runtime.sync()
    # one host transfer for the whole validation set
    probs = np.zeros((len(seqs), 3))
    for (idx, _), p in zip(parts, to_cpu([p for _, p in parts], runtime.kind)):
        probs[idx] = p[:len(idx)].numpy()
    model.train()
    return {"log_loss": log_loss(targets, probs), "accuracy": accuracy(targets, probs), "probs": probs}


def _eval_split(state: TrainState, whole: bool) -> tuple:
    """(encoded rows, targets) to evaluate: the fixed subset during training, the whole split when `whole`."""
    seqs, targets_ = state.valid
    if whole or state.eval_subset is None:
        return seqs, targets_
    return [seqs[i] for i in state.eval_subset], targets_[state.eval_subset]


def _record_eval(history: dict, step: int, metrics: dict, rows: int, whole: bool) -> bool:
    """Add an evaluation to the history; True when it is a new best. Only evaluations of the same rows as the
    best so far compare (the subset ones during training; the whole split at the end stands alone then)."""
    history["eval"].append({"step": step, **metrics, "rows": rows, "whole_split": whole})
    best = next((e for e in history["eval"] if e["step"] == history["best_step"]), None)
    if best is not None and (best.get("rows", rows) != rows or metrics["log_loss"] >= best["log_loss"]):
        return False
    history["best_step"], history["best_log_loss"] = step, metrics["log_loss"]
    return True


def save_checkpoint(ckpt_dir, state: TrainState, data_position: int) -> Path | None:
    """Write `ckpt_dir/step-NNNNNNN` atomically (a temp dir renamed when complete) and prune older checkpoints.

    Keeps this checkpoint and the best one so far. Holds the adapter (loadable for inference), optimizer,
    scheduler, step, data position, RNG states and history.
    """
    # gather on every process (reading a sharded tensor is collective on a multi-host slice); only main writes.
    # The adapter and the optimizer state come over in one device-to-host transfer on XLA.
    weights = state.model.state_dict()
    adapter, optimizer = to_cpu(({k: weights[k] for k in adapter_keys(state.model)}, state.optimizer.state_dict()),
                                state.runtime.kind)
    trainer_state = {
        "step": state.step, "data_position": data_position, "history": state.history,
        "rng": get_rng_state(state.runtime.kind), "trainable": sorted(adapter),  # names only: the values are the adapter's
        "optimizer": optimizer, "scheduler": state.scheduler.state_dict(),
    }
    if not state.runtime.main:
        return None
    ckpt_dir = Path(ckpt_dir)
    final = ckpt_dir / f"{CHECKPOINT_PREFIX}{state.step:07d}"
    tmp = ckpt_dir / f".tmp-{final.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    torch.save(trainer_state, tmp / "trainer_state.pt")
    save_adapter(state.model, state.tokenizer, tmp / "adapter", encoding=state.encoding, state_dict=adapter)
    shutil.rmtree(final, ignore_errors=True)
    # the rename is the commit point: a process killed before it leaves only a .tmp dir that loading ignores
    os.rename(tmp, final)
    best = state.history.get("best_step")
    keep = {final.name, f"{CHECKPOINT_PREFIX}{best:07d}" if best is not None else None}
    for old in ckpt_dir.glob(f"{CHECKPOINT_PREFIX}*"):
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
    path = latest_checkpoint(ckpt_dir)
    if path is None:
        return None
    state = torch.load(path / "trainer_state.pt", map_location="cpu", weights_only=False)
    trainable = set(adapter_keys(model))
    if set(state["trainable"]) != trainable:
        raise ValueError(f"checkpoint {path} was written for a different model or LoRA setup "
                         f"({len(state['trainable'])} adapter tensors saved, {len(trainable)} in the model); "
                         "use the same model and lora_* settings, or start a new run in another output_dir")
    set_peft_model_state_dict(model, load_peft_weights(str(path / "adapter"), device="cpu"))
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    set_rng_state(state["rng"], kind)
    return state


def _new_history(runtime: Runtime, total_steps: int) -> dict:
    return {"device": runtime.kind, "total_steps": total_steps, "step": [], "loss": [], "lr": [], "eval": [],
            "compile_s": None, "step_s": None, "best_step": None, "best_log_loss": None, "xla_log": [],
            "recompile_warning": None}


def _micro_batches(seqs, targets, batch_size, pad_id, buckets, seed, per_epoch, start, group=1):
    """Batches across epochs from data position `start` (micro-batches already consumed by earlier steps);
    with `buckets`, each optimizer step's `group` micro-batches share a bucket."""
    epoch, skip = divmod(start, per_epoch)
    while True:
        yield from train_batches(seqs, targets, batch_size, pad_id, None, seed, epoch, start=skip, buckets=buckets,
                                 group=group)
        epoch, skip = epoch + 1, 0


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def compile_cache_dir(config: Config) -> Path | None:
    """Where XLA keeps compiled graphs for later sessions: Config.compile_cache, under output_dir unless
    absolute; None when off (only XLA uses it)."""
    if not config.compile_cache:
        return None
    return Path(config.output_dir) / config.compile_cache  # an absolute compile_cache replaces output_dir
