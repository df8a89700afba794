"""Cross-version check (CI): an adapter saved by the tested set predicts the same in the minimum environment.

Three steps in one folder, each run by the environment named (`make compat-check` runs them in order):
  min env:    python tests/compat_check.py base DIR      a tiny base model as a checkpoint both read, test rows
  tested env: python tests/compat_check.py adapter DIR   a LoRA adapter saved there, its predictions
  min env:    python tests/compat_check.py compare DIR   the same adapter loaded and predicted there, compared
The base is written by the older stack because real bases (hub and Kaggle checkpoints) predate both.
"""

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd

# fp32 on the CPU in both: differences come from kernels of two torch versions only (measured ~1e-7)
TOLERANCE = 1e-5
LABELS = ["winner_model_a", "winner_model_b", "winner_tie"]


def versions() -> dict:
    import peft
    import tokenizers
    import torch
    import transformers

    return {m.__name__: m.__version__ for m in (torch, transformers, peft, tokenizers)}


def build_base(folder: Path) -> None:
    from lmsys_utils.synthetic import build_tiny_model, write_demo_data

    build_tiny_model(folder / "base")
    write_demo_data(folder / "data", n_train=4, n_test=64, seed=7)


def predict_csv(folder: Path, out: Path, adapter=True) -> pd.DataFrame:
    from lmsys_utils.predict import predict

    return predict(folder / "data" / "test.csv", str(folder / "base"), adapter=folder / "adapter" if adapter else None,
                   out=out, tta=True, max_length=256, device="cpu", progress=False)


def save_trained_adapter(folder: Path) -> None:
    import torch

    from lmsys_utils.config import EncodingSettings
    from lmsys_utils.model import add_lora, load_for_inference, save_adapter

    model, tokenizer, _ = load_for_inference(folder / "base")
    model = add_lora(model, r=4, alpha=8)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or "modules_to_save" in name:
                p.normal_(0, 0.5)  # as after training: lora_B starts at zero, the head is new
    save_adapter(model, tokenizer, folder / "adapter", encoding=EncodingSettings(max_length=256))
    with_adapter = predict_csv(folder, folder / "tested.csv")
    base_only = predict_csv(folder, folder / "base_only.csv", adapter=False)
    gap = np.abs(with_adapter[LABELS].to_numpy() - base_only[LABELS].to_numpy()).max()
    if gap < 0.01:
        sys.exit(f"the adapter barely changes the predictions ({gap:.2g}): the comparison would prove nothing")
    (folder / "tested_versions.json").write_text(json.dumps(versions()))


def compare(folder: Path) -> None:
    tested = pd.read_csv(folder / "tested.csv")
    here = predict_csv(folder, folder / "min.csv")
    diff = np.abs(tested[LABELS].to_numpy() - here[LABELS].to_numpy()).max()
    saved_by = json.loads((folder / "tested_versions.json").read_text())
    print(f"adapter saved with {saved_by}, predicted with {versions()}: {len(here)} rows (A/B-swap TTA), "
          f"max |probability difference| {diff:.2e} (tolerance {TOLERANCE:g})")
    if list(tested["id"]) != list(here["id"]) or not diff <= TOLERANCE:
        sys.exit("FAILED: the predictions differ across the two environments")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("step", choices=["base", "adapter", "compare"])
    parser.add_argument("folder", type=Path)
    args = parser.parse_args()
    {"base": build_base, "adapter": save_trained_adapter, "compare": compare}[args.step](args.folder)


if __name__ == "__main__":
    main()
