"""Train the tiny model with fit() on XLA in a process of its own and print the history as JSON.

SPMD must be switched on before any XLA tensor exists, so the SPMD test runs this with CPU_NUM_DEVICES=4.
Usage: PJRT_DEVICE=CPU CPU_NUM_DEVICES=4 python tests/spmd_worker.py MODEL_DIR OUT_DIR
"""

import dataclasses
import io
import json
import sys

import torch

from lmsys_utils import device as dev
from lmsys_utils.config import Config
from lmsys_utils.data import LABEL_COLUMNS, split_train_valid
from lmsys_utils.demo import make_demo_data
from lmsys_utils.model import add_lora, load_classifier, load_tokenizer
from lmsys_utils.train import fit


def spmd_run_config(out_dir) -> Config:
    return Config(train_path="unused", output_dir=str(out_dir), max_length=64, batch_size=8, lr=5e-3,
                  warmup_steps=2, max_steps=6, log_every=3, eval_every=None, save_every=None, lora_r=4,
                  lora_alpha=8, lora_dropout=0.0, seed=0, dtype="fp32")


def spmd_run_data():
    df = make_demo_data(96, seed=1)
    df["label"] = df[list(LABEL_COLUMNS)].to_numpy().argmax(axis=1)
    return split_train_valid(df, 0.25, seed=0)


def run(model_dir, out_dir, kind: str) -> dict:
    dev.get_device(kind)  # SPMD on before the first XLA tensor
    tokenizer = load_tokenizer(model_dir)
    model = load_classifier(model_dir, tokenizer, dtype="fp32", device_kind=kind)
    torch.manual_seed(0)
    model = add_lora(model, r=4, alpha=8, dropout=0.0)
    train_df, valid_df = spmd_run_data()
    history = fit(model, tokenizer, train_df, valid_df, spmd_run_config(out_dir), device_kind=kind,
                  progress_file=io.StringIO())
    if kind == "xla":
        import torch_xla

        lora = next(p for n, p in model.named_parameters() if "lora_A" in n)
        history["lora_sharding"] = torch_xla._XLAC._get_xla_sharding_spec(lora)
        history["devices"] = dev.num_data_shards(kind)
    return history


if __name__ == "__main__":
    print(json.dumps(run(sys.argv[1], sys.argv[2], "xla")))
