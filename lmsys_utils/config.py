"""The settings of one run (Config) and the encoding settings that travel with an adapter (EncodingSettings).

Defaults are a real Kaggle TPU run of Llama-3-8B; tests shrink them with `dataclasses.replace`.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import types
import typing
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


class ConfigError(ValueError):
    """A setting that cannot be used as given; the message names the field and what it accepts."""


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
    extra_paths: tuple = ()
    """Competition-format CSVs of extra battles (`python -m lmsys_utils extra-data`), added to training only."""
    folds: int | None = None
    """K folds grouped by prompt (`data.make_folds`) instead of valid_frac; set `fold` too."""
    fold: int | None = None
    """The held-out fold (0..folds-1): validation, and output_dir/oof.csv with its out-of-fold predictions."""
    teacher: str | None = None
    """CSV of id + three probabilities (a bigger model's out-of-fold predictions) to distill from."""
    distill_alpha: float = 0.5
    """Weight of the teacher's probabilities in the training targets (0: labels only, 1: teacher only)."""
    distill_temperature: float = 1.0
    """Softens (> 1) or sharpens (< 1) the teacher's probabilities before mixing."""
    teacher_fallback: bool = False
    """Training rows the teacher has no row for keep their hard labels (else such rows are refused)."""

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
    eval_every: int | None = 500
    """Steps between validation runs on the eval_rows subset (None: only at the end)."""
    save_every: int | None = 200
    """Steps between checkpoints (None: only at the end)."""
    memory_target: str = "auto"
    """Device the memory plan checks before loading: auto (this machine), tpu-v3-8, tpu-v5e-8, t4, 2xt4, gpu:NN, cpu."""
    force: bool = False
    """Train even when the memory plan says the setup does not fit."""
    resume: bool = False
    """Continue from the last checkpoint in output_dir."""
    overwrite: bool = False
    """Replace an existing run in output_dir (its adapter and checkpoints); without it such a dir is refused."""
    seed: int = 42
    """Seed for the split, shuffling and LoRA init."""
    length_buckets: int = 6
    """Padded lengths that training and evaluation batches use on XLA, chosen from the training rows' token
    lengths (batching.choose_buckets); each compiles its own graph. 1: every batch padded to max_length."""
    eval_rows: int | None = 1000
    """Validation rows evaluated every eval_every steps (a fixed random subset; None: the whole split); the
    whole split is evaluated at the end. With eval_every=500 evaluation costs ~8% of the training compute."""
    compile_cache: str | None = "xla_cache"
    """Folder of XLA's persistent compile cache, relative to output_dir unless absolute, so a resumed session
    reuses the compiled graphs (None or "": off). XLA only."""

    # --- prediction ---
    predict_batch_tokens: int = 16384
    """Token budget per inference batch (rows x padded length)."""
    tta: bool = False
    """Average the prediction with the A/B-swapped one (doubles inference time)."""

    def __post_init__(self):
        hints = typing.get_type_hints(type(self))
        bad = []
        for f in dataclasses.fields(self):
            try:
                setattr(self, f.name, convert_value(f.name, getattr(self, f.name), hints[f.name]))
            except ConfigError as e:
                bad.append(str(e))
        if not bad:
            bad = [f"{name}={getattr(self, name)!r} ({rule})" for name, rule in self._range_errors()]
        if bad:
            raise ConfigError(f"invalid Config field(s): {'; '.join(bad)}; see the field docs in "
                              "lmsys_utils/config.py")

    def _range_errors(self) -> list[tuple[str, str]]:
        """(field, allowed range) for every setting outside its range."""
        def at_least(low, optional=False):
            return lambda v: (optional and v is None) or (v is not None and v >= low)

        rules = {
            "valid_frac": (lambda v: 0 <= v < 1, "must be >= 0 and < 1"),
            "max_train_rows": (at_least(1, optional=True), "must be >= 1, or None for all rows"),
            "folds": (at_least(2, optional=True), "must be >= 2, or None to split by valid_frac"),
            "fold": (lambda v: (v is None) == (self.folds is None) and (v is None or 0 <= v < self.folds),
                     "must be one of 0..folds-1 when folds is set, and None otherwise"),
            "distill_alpha": (lambda v: 0 <= v <= 1, "must be between 0 and 1"),
            "distill_temperature": (lambda v: v > 0, "must be > 0"),
            "max_length": (at_least(16), "must be >= 16"),
            "prompt_share": (lambda v: 0 < v < 1, "must be > 0 and < 1"),
            "keep_tail": (lambda v: 0 <= v < self.max_length, f"must be >= 0 and < max_length ({self.max_length})"),
            "dtype": (lambda v: v in DTYPES, "must be auto, bf16, fp16 or fp32"),
            "quantization": (lambda v: v in QUANTIZATIONS, "must be None, 8bit or 4bit"),
            "lora_r": (at_least(1), "must be >= 1"),
            "lora_alpha": (lambda v: v > 0, "must be > 0"),
            "lora_dropout": (lambda v: 0 <= v < 1, "must be >= 0 and < 1"),
            "device": (lambda v: v in DEVICES, "must be auto, xla, cuda or cpu"),
            "epochs": (lambda v: v > 0, "must be > 0"),
            "max_steps": (at_least(1, optional=True), "must be >= 1, or None to train `epochs` epochs"),
            "batch_size": (at_least(1), "must be >= 1"),
            "grad_accum": (at_least(1), "must be >= 1"),
            "lr": (lambda v: v > 0, "must be > 0"),
            "weight_decay": (at_least(0), "must be >= 0"),
            "warmup_steps": (at_least(0), "must be >= 0"),
            "schedule": (lambda v: v in ("cosine", "linear", "constant"), "must be cosine, linear or constant"),
            "grad_clip": (lambda v: v is None or v > 0, "must be > 0, or None for no clipping"),
            "log_every": (at_least(1), "must be >= 1"),
            "eval_every": (at_least(1, optional=True), "must be >= 1, or None to evaluate only at the end"),
            "save_every": (at_least(1, optional=True), "must be >= 1, or None to save only at the end"),
            "seed": (at_least(0), "must be >= 0"),
            "length_buckets": (at_least(1), "must be >= 1 (1: pad every batch to max_length)"),
            "eval_rows": (at_least(1, optional=True), "must be >= 1, or None for the whole validation split"),
            "predict_batch_tokens": (lambda v: v >= self.max_length,
                                     f"must be >= max_length ({self.max_length}): one row must fit a batch"),
        }
        return [(name, rule) for name, (ok, rule) in rules.items() if not ok(getattr(self, name))]

    @property
    def encoding(self) -> EncodingSettings:
        """The text settings that are saved with the adapter."""
        return EncodingSettings(self.max_length, self.prompt_share, self.keep_tail)

    def save(self, path) -> None:
        """Write the settings as JSON (the config holds no secrets)."""
        Path(path).write_text(json.dumps(dataclasses.asdict(self), indent=2))

    @classmethod
    def load(cls, path) -> "Config":
        """Read a JSON object of settings (as `save` writes); values are converted by the field types."""
        return cls.from_overrides(path, [])

    @classmethod
    def from_overrides(cls, path=None, overrides=()) -> "Config":
        """The defaults, updated by a JSON config file (optional), then by FIELD=VALUE strings (the CLI's).

        Every value is converted by the field's type: bools from true/false/1/0/yes/no, None (or null) for
        optional fields, tuples from a JSON list or a comma list. Unknown fields, values that do not convert
        and a JSON that is not an object are refused with the field named.
        """
        values = {}
        if path is not None:
            text = Path(path).read_text(encoding="utf-8")
            try:
                loaded = json.loads(text)
            except json.JSONDecodeError as e:
                raise ConfigError(f"{path}: not valid JSON ({e}); write it with Config.save") from None
            if not isinstance(loaded, dict):
                raise ConfigError(f"{path}: a Config JSON must be an object {{\"field\": value, ...}}, "
                                  f"got a {type(loaded).__name__}")
            values.update(_known(loaded, source=str(path)))
        for item in overrides:
            name, sep, value = item.partition("=")
            name = name.strip()
            if not sep or not name:
                raise ConfigError(f"{item!r}: use FIELD=VALUE with a Config field, e.g. max_steps=100")
            values.update(_known({name: value}, source="the command line"))
        return cls(**values)


def _known(values: dict, source: str) -> dict:
    """`values` if every key is a Config field; else one error suggesting the nearest field name."""
    names = [f.name for f in dataclasses.fields(Config)]
    for key in values:
        if key not in names:
            close = difflib.get_close_matches(key, names, n=1)
            hint = f"did you mean {close[0]}?" if close else "see the fields in lmsys_utils/config.py"
            raise ConfigError(f"unknown Config field {key!r} in {source}; {hint}")
    return values


_TRUE, _FALSE, _NONE = ("true", "1", "yes"), ("false", "0", "no"), ("none", "null")


def _to_bool(v):
    if isinstance(v, bool):
        return v
    if isinstance(v, str) and v.lower() in _TRUE + _FALSE:
        return v.lower() in _TRUE
    raise ValueError(v)


def _to_int(v):
    if isinstance(v, float) and v.is_integer():
        return int(v)
    if isinstance(v, bool) or not isinstance(v, (int, str)):
        raise ValueError(v)
    return int(v)  # "2.5" raises: a whole number is needed, not a rounded one


def _to_float(v):
    if isinstance(v, bool) or not isinstance(v, (int, float, str)) or not math.isfinite(float(v)):
        raise ValueError(v)
    return float(v)


def _to_tuple(v):
    if isinstance(v, str):
        v = json.loads(v) if v.startswith("[") else [part.strip() for part in v.split(",") if part.strip()]
    if not isinstance(v, (list, tuple)) or not all(isinstance(item, str) for item in v):
        raise ValueError(v)
    return tuple(v)


def _to_str(v):
    if not isinstance(v, str):
        raise ValueError(v)
    return v


_CONVERTERS = {
    bool: (_to_bool, "true or false (also 1/0, yes/no)"),
    int: (_to_int, "a whole number"),
    float: (_to_float, "a finite number"),
    tuple: (_to_tuple, 'a list of names, e.g. q_proj,v_proj or ["q_proj", "v_proj"]'),
    str: (_to_str, "a text"),
}


def convert_value(name: str, value, annotation):
    """`value` (a Python/JSON value, or a string from the command line) as the field's type, or ConfigError.

    Args:
        annotation: the field's resolved type: bool, int, float, str, tuple, or one of them | None.
    """
    args = typing.get_args(annotation) if isinstance(annotation, types.UnionType) else ()
    optional = type(None) in args
    kind = next((a for a in args if a is not type(None)), annotation)
    convert, expected = _CONVERTERS[kind]
    if optional and isinstance(value, str) and value.strip().lower() in _NONE:
        value = None
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{name}=None: expected {expected}")
    try:
        return convert(value.strip() if isinstance(value, str) else value)
    except (ValueError, OverflowError):
        raise ConfigError(f"{name}={value!r}: expected {expected}" + (" or None" if optional else "")) from None
