"""Load the tokenizer and 3-way sequence classifier, add LoRA, save/load adapters; the tiny test model."""

from __future__ import annotations

import json
from pathlib import Path

from .data import CLASS_NAMES

ID2LABEL = dict(enumerate(CLASS_NAMES))
LABEL2ID = {v: k for k, v in ID2LABEL.items()}
SETTINGS_FILE = "run_settings.json"
QUANTIZATIONS = (None, "8bit", "4bit")
DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
# LoRA targets per architecture: all attention projections (ANCHORS.md: o_proj on top of q/k/v helped Gemma-2)
LORA_TARGETS = {
    **dict.fromkeys(("llama", "mistral", "mixtral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3"),
                    ("q_proj", "k_proj", "v_proj", "o_proj")),
    **dict.fromkeys(("bert", "roberta", "xlm-roberta", "electra"), ("query", "key", "value", "dense")),
    "deberta-v2": ("query_proj", "key_proj", "value_proj", "dense"),
}


class AdapterError(ValueError):
    """An adapter folder that does not fit the base model; the message names the keys and the fix."""


def load_tokenizer(name_or_path, token: str | None = None):
    """The tokenizer of a hub id or local folder, with a pad token (Llama-3 has none) and right padding."""
    from transformers import AutoTokenizer

    from .text import ensure_pad_token

    return ensure_pad_token(AutoTokenizer.from_pretrained(str(name_or_path), token=_token_for(name_or_path, token)))


def load_classifier(name_or_path, tokenizer, token: str | None = None, dtype=None, device_kind: str = "cpu",
                    quantization: str | None = None, gradient_checkpointing: bool = False, device_map=None):
    """A 3-way `AutoModelForSequenceClassification` (new `score` head on a causal LM) ready for LoRA.

    Args:
        dtype: a torch dtype, "bf16"/"fp16"/"fp32", or None/"auto" for the device's default (bf16 on XLA,
            fp16 on CUDA, fp32 on CPU).
        device_kind: "xla", "cuda" or "cpu"; XLA gets eager attention (sdpa syncs with the host every step).
        quantization: None, "8bit" or "4bit" (nf4) via bitsandbytes; needs CUDA or CPU.
        device_map: passed to from_pretrained (default: none, or the one device for a quantized model).
    """
    import torch
    from transformers import AutoModelForSequenceClassification

    if quantization not in QUANTIZATIONS:
        raise ValueError(f"quantization={quantization!r}: use None, '8bit' or '4bit'")
    if quantization and device_kind == "xla":
        raise ValueError("bitsandbytes quantization does not run on TPU/XLA: use quantization=None there "
                         "(bf16 weights, sharded over the devices)")
    dtype = _torch_dtype(dtype, device_kind)
    kwargs = dict(num_labels=3, id2label=ID2LABEL, label2id=LABEL2ID, pad_token_id=tokenizer.pad_token_id,
                  token=_token_for(name_or_path, token))
    kwargs[_dtype_kwarg()] = dtype
    if device_kind == "xla":
        kwargs["attn_implementation"] = "eager"
    if quantization:
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = (
            BitsAndBytesConfig(load_in_8bit=True) if quantization == "8bit" else
            BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype))
        # bitsandbytes quantizes while placing the weights, so it needs a device map
        device_map = device_map or ({"": torch.cuda.current_device()} if device_kind == "cuda" else "cpu")
    if device_map is not None:
        kwargs["device_map"] = device_map
    model = AutoModelForSequenceClassification.from_pretrained(str(name_or_path), **kwargs)
    # checkpoints whose config names no pad token still need one: the head pools the last non-pad token
    model.config.pad_token_id = tokenizer.pad_token_id
    if gradient_checkpointing:
        from .device import enable_gradient_checkpointing

        enable_gradient_checkpointing(model, device_kind)
    return model


def add_lora(model, r: int = 16, alpha: int = 32, dropout: float = 0.05, targets=None):
    """Wrap the model in a LoRA PeftModel (task SEQ_CLS: the score head is trained and saved too).

    Args:
        targets: module names to adapt; None uses LORA_TARGETS for the architecture, else peft's default.
    """
    from peft import LoraConfig, TaskType, get_peft_model

    if targets is None:
        targets = LORA_TARGETS.get(model.config.model_type)
    config = LoraConfig(task_type=TaskType.SEQ_CLS, r=r, lora_alpha=alpha, lora_dropout=dropout,
                        target_modules=list(targets) if targets is not None else None)
    model = get_peft_model(model, config)
    model.print_trainable_parameters()
    return model


def adapter_state_dict(model) -> dict:
    """The adapter's tensors (LoRA + score head) copied to the CPU.

    Saving XLA tensors directly fails, and copying the whole 8B state dict would move 16 GB. On a multi-host
    TPU slice reading a sharded tensor is collective: every process must call this, even those that write nothing.
    """
    adapter = model.active_adapter
    return {k: v.detach().to("cpu") for k, v in model.state_dict().items() if adapter in k.split(".")}


def save_adapter(model, tokenizer, out_dir, settings: dict | None = None, state_dict: dict | None = None) -> Path:
    """Write the peft adapter (LoRA + score head), the tokenizer and `run_settings.json` to `out_dir`.

    Args:
        state_dict: the adapter's CPU tensors from `adapter_state_dict` (default: gathered here; on a multi-host
            slice gather on every process and pass it to the one process that writes).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, state_dict=adapter_state_dict(model) if state_dict is None else state_dict)
    tokenizer.save_pretrained(out_dir)
    settings = {k: v for k, v in (settings or {}).items() if "token" not in k.lower() or not isinstance(v, str)}
    (out_dir / SETTINGS_FILE).write_text(json.dumps(settings, indent=2, default=str))
    return out_dir


def load_adapter(model, adapter_dir):
    """Put a saved adapter on a freshly loaded base model, strictly: every saved key must fit, none be missing."""
    from peft import get_peft_model
    from peft.utils import load_peft_weights, set_peft_model_state_dict

    adapter_dir = Path(adapter_dir)
    if not (adapter_dir / "adapter_config.json").is_file():
        raise AdapterError(f"{adapter_dir} has no adapter_config.json: point at the folder save_adapter wrote "
                           f"(the run's output_dir, or its adapter subfolder)")
    config = _read_adapter_config(adapter_dir)
    config.inference_mode = True
    base = config.base_model_name_or_path
    try:
        peft_model = get_peft_model(model, config)
        result = set_peft_model_state_dict(peft_model, load_peft_weights(str(adapter_dir), device="cpu"))
    except KeyError as e:  # peft's lookup of a modules_to_save tensor (the score head) absent from the file
        raise AdapterError(f"the adapter in {adapter_dir} (trained on {base}) is missing {e}: the file is "
                           f"incomplete; save it again with save_adapter") from None
    except (ValueError, RuntimeError) as e:
        raise AdapterError(f"the adapter in {adapter_dir} (trained on {base}) does not fit this "
                           f"{model.config.model_type} model: {e}") from None
    adapter = peft_model.active_adapter
    # torch lists every base weight as missing; only the adapter's own tensors must all be in the file
    missing = [k for k in result.missing_keys if adapter in k.split(".")]
    if missing or result.unexpected_keys:
        raise AdapterError(f"the adapter in {adapter_dir} (trained on {base}) does not match this model: "
                           f"missing {missing[:5]} ({len(missing)} in all), unexpected "
                           f"{result.unexpected_keys[:5]} ({len(result.unexpected_keys)} in all); load it on "
                           f"the base model and LoRA settings it was trained with")
    # peft < 0.14 leaves the score head (modules_to_save) trainable in inference mode
    peft_model.requires_grad_(False)
    return peft_model.eval()


def load_for_inference(name_or_path, adapter_dir=None, token: str | None = None, dtype=None,
                       device_kind: str = "cpu", quantization: str | None = None, device_map=None):
    """(model, tokenizer) for prediction: the base with the adapter on top (unmerged), in eval mode.

    The tokenizer comes from the base model, as in training (the pad-token choice is deterministic): the copy
    in the adapter folder is in the format of the transformers that trained, which older ones cannot read
    (transformers 5's "TokenizersBackend" under 4.x). Its pad token, read as plain JSON, still wins.
    """
    tokenizer = load_tokenizer(name_or_path, token=token)
    if adapter_dir is not None:
        _use_saved_pad_token(tokenizer, adapter_dir)
    model = load_classifier(name_or_path, tokenizer, token=token, dtype=dtype, device_kind=device_kind,
                            quantization=quantization, device_map=device_map)
    if adapter_dir is not None:
        model = load_adapter(model, adapter_dir)
    return model.eval(), tokenizer


# keys newer peft writes that change nothing when an older peft drops them, whatever their value
_INERT_ADAPTER_KEYS = {
    "peft_version": "metadata",
    "qalora_group_size": "read only when use_qalora is true, and a true use_qalora is refused",
}


def _read_adapter_config(adapter_dir: Path):
    """The adapter's PeftConfig, keeping only the keys the running peft knows.

    peft raises on keys it does not know (peft 0.12 on the `alora_invocation_tokens` 0.21 writes) or drops them
    with a warning. A dropped key is fine at its off value (None, False, empty); any other value would make this
    peft build a different model, so that is refused.
    """
    import dataclasses

    import peft
    from peft import PeftConfig
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    path = adapter_dir / "adapter_config.json"
    saved = json.loads(path.read_text())
    config_class = PEFT_TYPE_TO_CONFIG_MAPPING.get(saved.get("peft_type"))
    if config_class is None:
        raise AdapterError(f"{path}: peft_type {saved.get('peft_type')!r} is unknown to peft {peft.__version__}; "
                           f"save the adapter with save_adapter (LoRA) or upgrade peft")
    known = {f.name for f in dataclasses.fields(config_class)}
    unknown = {k: v for k, v in saved.items() if k not in known}
    changing = {k: v for k, v in unknown.items() if k not in _INERT_ADAPTER_KEYS and v not in (None, False, [], {}, "")}
    if changing:
        found = ", ".join(f"{k}={json.dumps(v)}" for k, v in changing.items())
        raise AdapterError(f"{path} sets {found}, which peft {peft.__version__} does not know: loading without it "
                           f"would build a different model. Install the peft that trained it "
                           f"({saved.get('peft_version', 'see the file')}) or newer for prediction")
    return PeftConfig.from_peft_type(**{k: v for k, v in saved.items() if k in known})


def _use_saved_pad_token(tokenizer, adapter_dir) -> None:
    """Set the pad token training saved (tokenizer_config.json, as plain JSON) when the base's differs."""
    path = Path(adapter_dir) / "tokenizer_config.json"
    if not path.is_file():
        return
    pad = json.loads(path.read_text()).get("pad_token")
    if isinstance(pad, dict):  # AddedToken as transformers 4.x writes it
        pad = pad.get("content")
    if pad is None or pad == tokenizer.pad_token:
        return
    if pad not in tokenizer.get_vocab():
        raise AdapterError(f"{path} pads with {pad!r}, which the base tokenizer {tokenizer.name_or_path!r} does "
                           f"not have: load the adapter on the base model it was trained on")
    tokenizer.pad_token = pad


def _token_for(name_or_path, token):
    """The token for a hub id, after checking access (a clear AccessError before any download); None locally."""
    from huggingface_hub import constants

    from .auth import is_local, preflight, resolve_token

    # local folders need no token; resolving one there could call Kaggle's secret service for nothing
    if is_local(name_or_path):
        return None
    token = resolve_token(token)
    if not constants.HF_HUB_OFFLINE:  # offline, transformers loads from the local cache or says what is missing
        preflight(name_or_path, token=token)
    return token


def _torch_dtype(dtype, device_kind: str):
    import torch

    if dtype is None or dtype == "auto":
        from .device import default_dtype

        return default_dtype(device_kind)
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"dtype={dtype!r}: use 'auto', 'bf16', 'fp16', 'fp32' or a torch dtype")
        return getattr(torch, DTYPES[dtype])
    return dtype


def _dtype_kwarg() -> str:
    import transformers

    # transformers renamed torch_dtype= to dtype= in 4.56; Kaggle images may carry an older one
    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    return "dtype" if (major, minor) >= (4, 56) else "torch_dtype"


def build_tiny_model(out_dir, texts=None, vocab_size: int = 1000, hidden_size: int = 64,
                     num_layers: int = 2, seed: int = 0) -> Path:
    """Write a tiny Llama-architecture classifier and a byte-level BPE tokenizer to `out_dir`.

    It loads through the same `from_pretrained` path as a real model, so tests, smoke runs and the demo
    exercise the real code. `texts` trains the tokenizer (default: the demo data's text).
    """
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForSequenceClassification, PreTrainedTokenizerFast

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if texts is None:
        from .demo import make_demo_data

        df = make_demo_data(400, seed=seed)
        texts = [t or "" for col in ("prompt", "response_a", "response_b") for turns in df[col] for t in turns]
    specials = ["<|pad|>", "<|bos|>", "<|eos|>", "<|unk|>"]
    bpe = Tokenizer(models.BPE(unk_token="<|unk|>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(texts, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, pad_token="<|pad|>", bos_token="<|bos|>",
                                        eos_token="<|eos|>", unk_token="<|unk|>")
    tokenizer.save_pretrained(out_dir)

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=4096, num_labels=3, id2label=ID2LABEL, label2id=LABEL2ID,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=False,
    )
    LlamaForSequenceClassification(config).save_pretrained(out_dir)
    return out_dir

