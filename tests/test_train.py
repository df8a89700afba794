"""fit_rows() on CPU (eager): learning, progress output, resume, atomic checkpoints, the train() entry point."""

import dataclasses
import io
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from lmsys_utils.config import Config
from lmsys_utils.data import LABEL_COLUMNS, load_arena, split_train_valid, to_competition_csv
from lmsys_utils.device import resolve
from lmsys_utils.metrics import log_loss
from lmsys_utils.synthetic import make_demo_data

ROOT = Path(__file__).resolve().parents[1]


def small_config(tmp_path, **changes) -> Config:
    base = Config(train_path="unused", output_dir=str(tmp_path / "run"), max_length=64, batch_size=4, grad_accum=1, lr=1e-2,
                  warmup_steps=2, max_steps=12, log_every=4, eval_every=None, save_every=None, lora_r=4,
                  lora_alpha=8, lora_dropout=0.0, seed=0)
    return dataclasses.replace(base, **changes)


def tiny_lora(model_dir, tokenizer, dropout=0.0, seed=0):
    from lmsys_utils.model import add_lora, load_classifier

    model = load_classifier(model_dir, tokenizer, dtype="fp32", kind="cpu")
    torch.manual_seed(seed)
    return add_lora(model, r=4, alpha=8, dropout=dropout)


def fit_rows(model, tokenizer, train_df, valid_df, config, progress_file=None, kind="cpu"):
    """setup() + fit_rows() on rows already in memory, as train() runs them after loading a CSV."""
    from lmsys_utils.train import fit, setup

    return fit(setup(model, tokenizer, train_df, valid_df, config, resolve(kind)), config, progress_file)


def load_arena_rows(path):
    return load_arena(path)[0]


def demo_rows(n, seed=0):
    df = make_demo_data(n, seed=seed)
    df["label"] = df[list(LABEL_COLUMNS)].to_numpy().argmax(axis=1)
    return df


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from lmsys_utils.model import load_tokenizer

    return load_tokenizer(tiny_model_dir)


def test_loss_falls_on_data_the_model_can_memorize(tiny_model_dir, tokenizer, tmp_path):

    rows = demo_rows(8)
    config = small_config(tmp_path, max_steps=30, log_every=5, batch_size=8, schedule="constant")
    history = fit_rows(tiny_lora(tiny_model_dir, tokenizer), tokenizer, rows, None, config,
                  progress_file=io.StringIO())
    assert len(history["loss"]) == 30 and history["step"] == list(range(1, 31))
    first, last = np.mean(history["loss"][:3]), np.mean(history["loss"][-3:])
    assert last < 0.5 * first, (first, last)
    saved = json.loads((tmp_path / "run" / "history.json").read_text())
    assert saved["loss"] == history["loss"]


def test_progress_shows_every_step_and_the_compile_notice_first(tiny_model_dir, tokenizer, tmp_path):

    out = io.StringIO()
    config = small_config(tmp_path, max_steps=10, log_every=4)
    history = fit_rows(tiny_lora(tiny_model_dir, tokenizer), tokenizer, demo_rows(48), None, config, progress_file=out)
    text = out.getvalue()
    shown = [(int(m[1]), int(m[2]), m[3].strip()) for piece in re.split(r"[\r\n]", text)
             if (m := re.match(r"train (\d+)/(\d+) \|[^|]*\|(.*)$", piece))]
    assert {total for _, total, _ in shown} == {10}
    assert [n for n, _, _ in shown if n > 0] == list(range(1, 11)) + [10]  # one update per step, then close
    assert text.index("being compiled") < text.index("train 1/10")
    assert "on a TPU" in text.split("train 0/10")[0]
    # the loss shown changes only at log points (steps 4, 8 and the last)
    by_step = {n: rest for n, _, rest in shown}
    assert by_step[3] == "" and by_step[4].startswith("loss ") and by_step[5] == by_step[4]
    assert by_step[8] != by_step[4] and by_step[9] == by_step[8] and by_step[10] != by_step[8]
    assert history["compile_s"] > 0 and history["step_s"] > 0


def test_validation_log_loss_falls_on_demo_data(tiny_model_dir, tokenizer, tmp_path):
    from lmsys_utils.train import evaluate
    from lmsys_utils.text import encode_rows

    train_df, valid_df = split_train_valid(demo_rows(240), 0.25, seed=0)
    model = tiny_lora(tiny_model_dir, tokenizer)
    seqs = encode_rows(tokenizer, valid_df, 64)
    targets = valid_df[list(LABEL_COLUMNS)].to_numpy(np.float32)
    before = evaluate(model, seqs, targets, 16, tokenizer.pad_token_id, None, resolve("cpu"))["log_loss"]
    config = small_config(tmp_path, max_steps=40, batch_size=8, lr=5e-3, eval_every=20, log_every=10)
    history = fit_rows(model, tokenizer, train_df, valid_df, config, progress_file=io.StringIO())
    after = history["eval"][-1]["log_loss"]
    assert [e["step"] for e in history["eval"]] == [20, 40]
    assert after < before - 0.02, (before, after)


@pytest.mark.slow
def test_resume_continues_with_the_same_losses(tiny_model_dir, tokenizer, tmp_path):

    train_df, valid_df = split_train_valid(demo_rows(120), 0.2, seed=0)
    # dropout on and swap augmentation on: the resumed run must restore RNG states and the data position
    config = small_config(tmp_path, max_steps=12, save_every=4, eval_every=6, lr=3e-3, lora_dropout=0.1,
                          swap_augment=True, schedule="cosine", log_every=3)
    full = fit_rows(tiny_lora(tiny_model_dir, tokenizer, dropout=0.1), tokenizer, train_df, valid_df,
               dataclasses.replace(config, output_dir=str(tmp_path / "full")),
               progress_file=io.StringIO())

    class StopAt(io.StringIO):  # like Ctrl-C right after step 7 is shown
        stopped = False

        def write(self, s):
            super().write(s)
            if "train 7/12" in s and not self.stopped:
                self.stopped = True
                raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fit_rows(tiny_lora(tiny_model_dir, tokenizer, dropout=0.1), tokenizer, train_df, valid_df, config, progress_file=StopAt())
    out = io.StringIO()
    resumed = fit_rows(tiny_lora(tiny_model_dir, tokenizer, dropout=0.1, seed=123), tokenizer, train_df, valid_df,
                  dataclasses.replace(config, resume=True), progress_file=out)
    assert "continuing from step 6" in out.getvalue()  # step 6: best eval so far, newest checkpoint
    assert resumed["step"] == full["step"]
    np.testing.assert_allclose(resumed["loss"], full["loss"], rtol=0, atol=1e-6)
    np.testing.assert_allclose(resumed["lr"], full["lr"], rtol=0, atol=1e-12)
    assert [e["log_loss"] for e in resumed["eval"]] == pytest.approx([e["log_loss"] for e in full["eval"]], abs=1e-6)


def test_checkpoints_keep_last_and_best(tiny_model_dir, tokenizer, tmp_path):
    from lmsys_utils.model import load_adapter, load_classifier
    from lmsys_utils.train import latest_checkpoint

    train_df, valid_df = split_train_valid(demo_rows(80), 0.2, seed=0)
    config = small_config(tmp_path, max_steps=8, save_every=2, eval_every=2, log_every=2, lr=5e-2)
    history = fit_rows(tiny_lora(tiny_model_dir, tokenizer), tokenizer, train_df, valid_df, config, progress_file=io.StringIO())
    ckpts = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    best = f"step-{history['best_step']:07d}"
    assert set(ckpts) == {"step-0000008", best}
    assert latest_checkpoint(tmp_path / "run" / "checkpoints").name == "step-0000008"
    assert history["best_log_loss"] == min(e["log_loss"] for e in history["eval"])
    # a checkpoint's adapter loads strictly for inference
    load_adapter(load_classifier(tiny_model_dir, tokenizer, dtype="fp32"), tmp_path / "run" / "checkpoints" / best / "adapter")


KILL_WORKER = textwrap.dedent("""
    import sys, time, torch
    from pathlib import Path
    from lmsys_utils.config import Config
    from lmsys_utils.device import resolve
    from lmsys_utils.model import add_lora, load_classifier, load_tokenizer
    from lmsys_utils.synthetic import make_demo_data
    from lmsys_utils import train

    model_dir, ckpt_dir = sys.argv[1], Path(sys.argv[2])
    tokenizer = load_tokenizer(model_dir)
    model = load_classifier(model_dir, tokenizer, dtype="fp32")
    torch.manual_seed(0)
    model = add_lora(model, r=4, alpha=8)
    config = Config(train_path="unused", output_dir=str(ckpt_dir.parent), max_length=64, batch_size=4, lr=1e-3,
                    max_steps=10, warmup_steps=1, schedule="linear")
    state = train.setup(model, tokenizer, make_demo_data(8), None, config, resolve("cpu"))
    params = [p for p in model.parameters() if p.requires_grad]
    state.step, state.history = 1, {"loss": [1.0]}
    train.save_checkpoint(ckpt_dir, state, 1)
    real_save = torch.save

    def save_then_hang(obj, f, *args, **kwargs):  # the process dies in the middle of writing step 2
        real_save(obj, f, *args, **kwargs)
        Path(f).write_bytes(Path(f).read_bytes()[:100])
        print("WRITING", flush=True)
        time.sleep(600)

    train.torch.save = save_then_hang
    with torch.no_grad():
        params[0].add_(1.0)
    state.step, state.history = 2, {"loss": [1.0, 0.5]}
    train.save_checkpoint(ckpt_dir, state, 2)
""")


@pytest.mark.slow
def test_killed_while_writing_a_checkpoint_leaves_the_previous_one(tiny_model_dir, tokenizer, tmp_path):
    from transformers import get_scheduler

    from lmsys_utils.train import latest_checkpoint, load_checkpoint

    ckpt_dir = tmp_path / "checkpoints"
    proc = subprocess.Popen([sys.executable, "-c", KILL_WORKER, str(tiny_model_dir), str(ckpt_dir)],
                            stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        for line in proc.stdout:
            if "WRITING" in line:
                break
        assert proc.poll() is None, "the worker should be hanging inside the checkpoint write"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert (ckpt_dir / ".tmp-step-0000002").is_dir()  # the half-written one is there, but ignored
    assert latest_checkpoint(ckpt_dir).name == "step-0000001"
    model = tiny_lora(tiny_model_dir, tokenizer, seed=5)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    scheduler = get_scheduler("linear", optimizer, num_warmup_steps=1, num_training_steps=10)
    state = load_checkpoint(ckpt_dir, model, optimizer, scheduler, "cpu")
    assert state["step"] == 1 and state["history"] == {"loss": [1.0]}
    reference = tiny_lora(tiny_model_dir, tokenizer, seed=0)  # the worker's LoRA init (seed 0), before the +1.0
    for (name, p), (_, q) in zip(model.named_parameters(), reference.named_parameters()):
        if p.requires_grad:
            torch.testing.assert_close(p, q, msg=name)


def test_user_errors_are_clear(tiny_model_dir, tokenizer, tmp_path):
    from lmsys_utils.model import load_classifier

    model = tiny_lora(tiny_model_dir, tokenizer)
    with pytest.raises(ValueError, match="batch_size"):
        fit_rows(model, tokenizer, demo_rows(3), None, small_config(tmp_path, batch_size=8))
    with pytest.raises(ValueError, match="label columns"):
        fit_rows(model, tokenizer, demo_rows(8).drop(columns=["winner_tie"]), None, small_config(tmp_path))
    bare = load_classifier(tiny_model_dir, tokenizer, dtype="fp32")
    for p in bare.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="add LoRA"):
        fit_rows(bare, tokenizer, demo_rows(8), None, small_config(tmp_path))


@pytest.mark.slow
def test_train_entry_point_end_to_end_from_the_cli(tiny_model_dir, tmp_path, capsys):
    from lmsys_utils.cli import main
    from lmsys_utils.synthetic import write_demo_data
    from lmsys_utils.model import load_for_inference

    train_path, _ = write_demo_data(tmp_path / "data", n_train=120, n_test=4)
    config = small_config(tmp_path, train_path=str(train_path), model=str(tiny_model_dir), max_steps=5,
                          eval_every=3, valid_frac=0.2, dtype="fp32")
    config.save(tmp_path / "settings.json")
    assert main(["train", "--config", str(tmp_path / "settings.json"), "max_steps=6"]) == 0
    assert "trained 6 steps; valid log loss" in capsys.readouterr().out
    config.max_steps = 6
    out = tmp_path / "run"
    history = json.loads((out / "history.json").read_text())
    assert history["device"] == "cpu" and len(history["loss"]) == 6 and len(history["eval"]) == 2
    assert Config.load(out / "config.json") == config
    model, _, _ = load_for_inference(tiny_model_dir, out / "adapter", dtype="fp32")
    assert not model.training


def test_train_refuses_a_setup_that_cannot_fit_unless_forced(tiny_model_dir, tmp_path, capsys):
    from lmsys_utils.cli import main
    from lmsys_utils.synthetic import write_demo_data

    train_path, _ = write_demo_data(tmp_path / "data", n_train=60, n_test=4)
    config = small_config(tmp_path, train_path=str(train_path), model=str(tiny_model_dir), max_steps=2,
                          valid_frac=0.2, dtype="fp32", memory_target="cpu:0.05")  # 50 MB: far too small
    config.save(tmp_path / "settings.json")
    assert main(["train", "--config", str(tmp_path / "settings.json")]) == 1
    err = capsys.readouterr().err
    assert "DOES NOT FIT" in err and "--force" in err and "Traceback" not in err
    assert not (tmp_path / "run" / "history.json").exists()  # refused before loading the model
    with pytest.warns(UserWarning, match="forced"):
        assert main(["train", "--config", str(tmp_path / "settings.json"), "force=true"]) == 0
    assert (tmp_path / "run" / "history.json").exists()


@pytest.mark.parametrize("quantization", ["8bit", "4bit"])
def test_qlora_training_on_quantized_weights(tiny_model_dir, tmp_path, capsys, quantization, cpu_quantization):
    """Config.quantization loads bitsandbytes weights (runs on the CPU here, as on a GPU) and trains LoRA on top."""
    import logging

    from lmsys_utils.synthetic import write_demo_data
    from lmsys_utils.model import load_for_inference

    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    train_path, _ = write_demo_data(tmp_path / "data", n_train=80, n_test=4)
    config = small_config(tmp_path, train_path=str(train_path), model=str(tiny_model_dir), max_steps=4,
                          valid_frac=0.2, dtype="fp32", device="cpu", memory_target="cpu",
                          quantization=quantization)
    from lmsys_utils.train import train

    history = train(config)
    assert f"params, {quantization}, training" in capsys.readouterr().out  # the plan counted the quantized weights
    assert len(history["loss"]) == 4 and np.isfinite(history["loss"]).all()
    model, _, _ = load_for_inference(tiny_model_dir, tmp_path / "run" / "adapter", quantization=quantization)
    assert any("bnb" in type(m).__module__ for m in model.modules())


# --- folds, extra data, distillation (the winners' toolkit) ---

def test_a_fold_run_writes_out_of_fold_predictions_for_its_held_out_rows(tiny_model_dir, tmp_path):
    from lmsys_utils.data import make_folds
    from lmsys_utils.synthetic import write_demo_data
    from lmsys_utils.train import train

    train_csv, _ = write_demo_data(tmp_path / "data", n_train=90, n_test=4)
    config = small_config(tmp_path, train_path=str(train_csv), model=str(tiny_model_dir), max_steps=3,
                          folds=3, fold=1, dtype="fp32", device="cpu", memory_target="cpu")
    history = train(config, progress_file=io.StringIO())
    df = load_arena_rows(train_csv)
    held_out = df["id"][(make_folds(df, 3, seed=0) == 1).to_numpy()]
    oof = pd.read_csv(tmp_path / "run" / "oof.csv")
    assert sorted(oof["id"]) == sorted(held_out)
    probs = oof[list(LABEL_COLUMNS)].to_numpy()
    np.testing.assert_allclose(probs.sum(axis=1), 1, atol=1e-6)
    # the file holds the final evaluation's predictions: its log loss is the one the history reports
    assert log_loss(df.set_index("id").loc[oof["id"], list(LABEL_COLUMNS)].to_numpy(), probs) == pytest.approx(
        history["eval"][-1]["log_loss"], abs=1e-6)


def test_extra_rows_train_only_and_the_teacher_sets_the_targets(tiny_model_dir, tmp_path):
    from lmsys_utils.synthetic import write_demo_data
    from lmsys_utils.train import load_training_rows, train

    train_csv, _ = write_demo_data(tmp_path / "data", n_train=80, n_test=4)
    extra_csv, _ = write_demo_data(tmp_path / "extra", n_train=40, n_test=4, seed=7)
    extra = load_arena_rows(extra_csv)
    extra["id"] = extra["id"] + 10_000_000
    to_competition_csv(extra, extra_csv)
    df = load_arena_rows(train_csv)
    uniform = pd.DataFrame({"id": pd.concat([df["id"], extra["id"]]), "winner_model_a": 1 / 3,
                            "winner_model_b": 1 / 3, "winner_tie": 1 / 3})
    teacher_csv = tmp_path / "teacher.csv"
    uniform.to_csv(teacher_csv, index=False)
    config = small_config(tmp_path, train_path=str(train_csv), model=str(tiny_model_dir), max_steps=20,
                          valid_frac=0.2, extra_paths=(str(extra_csv),), dtype="fp32", device="cpu",
                          memory_target="cpu", lr=1e-2, schedule="constant", log_every=1)
    train_df, valid_df = load_training_rows(config, verbose=False)
    assert len(train_df) + len(valid_df) == 120 and set(extra["id"]) <= set(train_df["id"])
    assert not set(extra["id"]) & set(valid_df["id"])  # extra battles never reach validation

    hard = train(config, progress_file=io.StringIO())
    taught = train(dataclasses.replace(config, teacher=str(teacher_csv), distill_alpha=1.0, overwrite=True),
                   progress_file=io.StringIO())
    # cross-entropy against a uniform teacher is at least its entropy, log 3, whatever the model predicts;
    # against hard labels the same run falls well below it
    assert min(taught["loss"]) >= np.log(3) - 1e-4
    assert min(hard["loss"]) < np.log(3) - 0.05
    rows, _ = load_training_rows(dataclasses.replace(config, teacher=str(teacher_csv), distill_alpha=0.5),
                                 verbose=False)
    hard_rows, _ = load_training_rows(config, verbose=False)
    np.testing.assert_allclose(rows[list(LABEL_COLUMNS)].to_numpy(),
                               0.5 * hard_rows[list(LABEL_COLUMNS)].to_numpy() + 0.5 / 3, atol=1e-6)
    partial = tmp_path / "partial.csv"
    uniform.iloc[:50].to_csv(partial, index=False)
    with pytest.raises(ValueError, match="teacher"):
        load_training_rows(dataclasses.replace(config, teacher=str(partial)), verbose=False)
