"""The settings of one run (Config) and the encoding settings that travel with an adapter (EncodingSettings).

Defaults are a real Kaggle TPU run of Llama-3-8B; tests shrink them with `dataclasses.replace`.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

QUANTIZATIONS = (None, "8bit", "4bit")
"""bitsandbytes weights: none, 8-bit (LLM.int8) or 4-bit (nf4)."""
DTYPES = ("auto", "bf16", "fp16", "fp32")
DEVICES = ("auto", "xla", "cuda", "cpu")
ENCODING_FILE = "encoding.json"


@dataclasses.dataclass(frozen=True)
class Template:
    """Markers written before each turn; rounds are interleaved prompt, response A, response B.

    Markers end in a newline so that, with byte-level BPE tokenizers, the text after a marker tokenizes
    the same alone as inside the full string.
    """

    prompt: str = "<prompt>\n"
    """Before each prompt turn."""
    response_a: str = "\n\n<response_a>\n"
    """Before each turn of response A."""
    response_b: str = "\n\n<response_b>\n"
    """Before each turn of response B."""
    separator: str = "\n\n"
    """Between rounds (before every prompt marker but the first)."""


@dataclasses.dataclass(frozen=True)
class EncodingSettings:
    """How a row becomes model input. Saved with the adapter and read back by prediction, so a model is
    predicted with the inputs it was trained on unless an override is asked for (and printed)."""

    max_length: int = 1024
    """Tokens per row after budgeted truncation."""
    prompt_share: float = 0.3
    """Most of max_length the prompt may take when a row is too long; A and B share the rest equally."""
    keep_tail: int = 0
    """Tokens kept from the end of a truncated part (0: keep only the head)."""
    template: Template = Template()
    """The markers around each turn."""

    def as_kwargs(self) -> dict:
        """The settings as keyword arguments of `text.encode_rows`."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def save(self, folder) -> Path:
        path = Path(folder) / ENCODING_FILE
        path.write_text(json.dumps(dataclasses.asdict(self), indent=2))
        return path

    @classmethod
    def load(cls, folder) -> "EncodingSettings | None":
        """The settings saved in `folder` (an adapter), or None when it holds none (or `folder` is None)."""
        path = Path(folder or "") / ENCODING_FILE
        if folder is None or not path.is_file():
            return None
        raw = json.loads(path.read_text())
        return cls(**{**raw, "template": Template(**raw.get("template", {}))})


DEFAULT_ENCODING = EncodingSettings()


@dataclasses.dataclass
class Config:
    # --- data ---
    train_path: str = "/kaggle/input/lmsys-chatbot-arena/train.csv"
    """Competition-format training CSV."""
    test_path: str = "/kaggle/input/lmsys-chatbot-arena/test.csv"
    """Competition-format test CSV (no labels) to predict."""
    output_dir: str = "/kaggle/working/run"
    """Where the adapter, checkpoints, history and figures go."""
    valid_frac: float = 0.05
    """Share of rows held out for validation (grouped by prompt, stratified by label)."""
    max_train_rows: int | None = None
    """Use only the first N training rows after shuffling (None: all)."""

    # --- text ---
    max_length: int = DEFAULT_ENCODING.max_length
    """Tokens per row after budgeted truncation (saved with the adapter; prediction uses it by default)."""
    prompt_share: float = DEFAULT_ENCODING.prompt_share
    """Most of max_length the prompt may take when a row is too long; A and B share the rest equally."""
    keep_tail: int = DEFAULT_ENCODING.keep_tail
    """Tokens kept from the end of a truncated part (0: keep only the head)."""

    # --- model ---
    model: str = "meta-llama/Meta-Llama-3-8B-Instruct"
    """Hub id or local directory of the base model (e.g. /kaggle/input/llama-3/transformers/8b-chat-hf/1)."""
    dtype: str = "auto"
    """Weights dtype: auto (bf16 on TPU, fp16 on GPU, fp32 on CPU), bf16, fp16 or fp32."""
    quantization: str | None = None
    """bitsandbytes weights for QLoRA on a GPU: None, "8bit" or "4bit" (nf4). None on TPU."""
    lora_r: int = 16
    """LoRA rank."""
    lora_alpha: int = 32
    """LoRA scaling numerator (scale = alpha / r)."""
    lora_dropout: float = 0.05
    """Dropout on the LoRA input."""
    lora_targets: tuple | None = None
    """Module names LoRA adapts (None: the architecture's default, e.g. q/k/v/o projections)."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass: less memory, about 30% slower."""
    device: str = "auto"
    """Where to train: auto (TPU/XLA if present, else CUDA, else CPU), xla, cuda or cpu (xla on a CPU: tests)."""

    # --- training ---
    epochs: float = 1.0
    """Passes over the training set (fractions allowed)."""
    max_steps: int | None = None
    """Stop after this many optimizer steps (overrides epochs)."""
    batch_size: int = 8
    """Rows per micro-batch across all devices (8 rows x 1024 tokens fit a TPU v3-8 with an 8B model)."""
    grad_accum: int = 2
    """Micro-batches accumulated into one optimizer step (default: 16 rows per step)."""
    lr: float = 5e-5
    """Peak learning rate of AdamW."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    warmup_steps: int = 128
    """Linear warmup steps before the schedule."""
    schedule: str = "cosine"
    """Learning-rate schedule after warmup: cosine, linear or constant."""
    grad_clip: float | None = 1.0
    """Clip the gradient norm to this (None: no clipping)."""
    swap_augment: bool = False
    """Add every training row again with A and B swapped (labels follow)."""
    log_every: int = 10
    """Steps between progress-bar refreshes; the loss is read from the device only then."""
    eval_every: int | None = 200
    """Steps between validation runs (None: only at the end)."""
    save_every: int | None = 200
    """Steps between checkpoints (None: only at the end)."""
    memory_target: str = "auto"
    """Device the memory plan checks before loading: auto (this machine), tpu-v3-8, tpu-v5e-8, t4, 2xt4, gpu:NN, cpu."""
    force: bool = False
    """Train even when the memory plan says the setup does not fit."""
    resume: bool = False
    """Continue from the last checkpoint in output_dir."""
    seed: int = 42
    """Seed for the split, shuffling and LoRA init."""

    # --- prediction ---
    predict_batch_tokens: int = 16384
    """Token budget per inference batch (rows x padded length)."""
    tta: bool = False
    """Average the prediction with the A/B-swapped one (doubles inference time)."""

    def __post_init__(self):
        checks = {
            "max_length": self.max_length >= 16,
            "prompt_share": 0 < self.prompt_share < 1,
            "valid_frac": 0 <= self.valid_frac < 1,
            "batch_size": self.batch_size >= 1,
            "grad_accum": self.grad_accum >= 1,
            "lr": self.lr > 0,
            "epochs": self.epochs > 0,
            "log_every": self.log_every >= 1,
            "lora_r": self.lora_r >= 1,
            "dtype": self.dtype in DTYPES,
            "quantization": self.quantization in QUANTIZATIONS,
            "schedule": self.schedule in ("cosine", "linear", "constant"),
            "device": self.device in DEVICES,
        }
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            values = ", ".join(f"{n}={getattr(self, n)!r}" for n in bad)
            raise ValueError(f"invalid Config field(s): {values}; see the field docs in lmsys_utils/config.py")
        if self.lora_targets is not None:
            self.lora_targets = tuple(self.lora_targets)

    @property
    def encoding(self) -> EncodingSettings:
        """The text settings that are saved with the adapter."""
        return EncodingSettings(self.max_length, self.prompt_share, self.keep_tail)

    def save(self, path) -> None:
        """Write the settings as JSON (the config holds no secrets)."""
        Path(path).write_text(json.dumps(dataclasses.asdict(self), indent=2))

    @classmethod
    def load(cls, path) -> "Config":
        return cls(**json.loads(Path(path).read_text()))
