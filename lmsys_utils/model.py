"""Load the tokenizer and 3-way sequence classifier, add LoRA, save and load adapters with their encoding."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import peft
import torch
import transformers
from huggingface_hub import constants
from peft import LoraConfig, PeftConfig, TaskType, get_peft_model
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING
from peft.utils import load_peft_weights, set_peft_model_state_dict
from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer, BitsAndBytesConfig

from .auth import is_local, preflight, resolve_token
from .config import EncodingSettings
from .data import ID2LABEL, LABEL2ID
from .device import check_quantization, enable_gradient_checkpointing, resolve_dtype
from .text import ensure_pad_token

# LoRA targets per architecture: all attention projections (ANCHORS.md: o_proj on top of q/k/v helped Gemma-2)
LORA_TARGETS = {
    **dict.fromkeys(("llama", "mistral", "mixtral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3"),
                    ("q_proj", "k_proj", "v_proj", "o_proj")),
    **dict.fromkeys(("bert", "roberta", "xlm-roberta", "electra"), ("query", "key", "value", "dense")),
    "deberta-v2": ("query_proj", "key_proj", "value_proj", "dense"),
}
HEAD_NAMES = ("score", "classifier")
"""Top-level modules of the classification head (decoder LMs: score; encoders: classifier)."""


class AdapterError(ValueError):
    """An adapter folder that does not fit the base model; the message names the keys and the fix."""


def load_tokenizer(name_or_path, token: str | None = None):
    """The tokenizer of a hub id or local folder, with a pad token (Llama-3 has none) and right padding."""
    return ensure_pad_token(AutoTokenizer.from_pretrained(str(name_or_path), token=_token_for(name_or_path, token)))


def check_max_length(name_or_path, max_length: int, token: str | None = None) -> None:
    """Refuse a max_length beyond the model's position limit (positions past it were never trained, or crash)."""
    config = AutoConfig.from_pretrained(str(name_or_path), token=_token_for(name_or_path, token))
    limit = getattr(config, "max_position_embeddings", None)
    if limit is not None and max_length > limit:
        raise ValueError(f"max_length={max_length} is beyond the {limit} positions of {name_or_path} "
                         f"({config.model_type}); use max_length <= {limit}")


def load_classifier(name_or_path, tokenizer, token: str | None = None, dtype="auto", kind: str = "cpu",
                    quantization: str | None = None, gradient_checkpointing: bool = False, device_map=None,
                    require_head: bool = False):
    """A 3-way `AutoModelForSequenceClassification` (new `score` head on a causal LM) ready for LoRA.

    Args:
        dtype: a torch dtype, "bf16"/"fp16"/"fp32", or "auto" for the device's default (device.DEFAULT_DTYPES).
        kind: "xla", "cuda" or "cpu" (a Runtime's kind); XLA gets eager attention (sdpa syncs with the host
            every step).
        quantization: None, "8bit" or "4bit" (nf4) via bitsandbytes; needs CUDA or CPU.
        device_map: passed to from_pretrained (default: none, or the one device for a quantized model).
        require_head: refuse a checkpoint without a trained classification head (predicting with a randomly
            initialised head gives random probabilities that pass every submission check).
    """
    check_quantization(quantization, kind)
    dtype = resolve_dtype(dtype, kind)
    token = _token_for(name_or_path, token)  # access checked once, for the config and the weights
    config = AutoConfig.from_pretrained(str(name_or_path), token=token)
    kwargs = dict(num_labels=3, id2label=ID2LABEL, label2id=LABEL2ID, pad_token_id=tokenizer.pad_token_id,
                  token=token, output_loading_info=True)
    kwargs[_dtype_kwarg()] = dtype
    # eager on XLA (sdpa reads a tensor on the host every step), and where attention logits are softcapped
    # (Gemma-2): sdpa cannot softcap, and transformers 4.4x picks it anyway
    if kind == "xla" or getattr(config, "attn_logit_softcapping", None):
        kwargs["attn_implementation"] = "eager"
    if quantization:
        kwargs["quantization_config"] = (
            BitsAndBytesConfig(load_in_8bit=True) if quantization == "8bit" else
            BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype))
        # bitsandbytes quantizes while placing the weights, so it needs a device map
        device_map = device_map or ({"": torch.cuda.current_device()} if kind == "cuda" else "cpu")
    if device_map is not None:
        kwargs["device_map"] = device_map
    model, info = AutoModelForSequenceClassification.from_pretrained(str(name_or_path), **kwargs)
    new_head = [k for k in info.get("missing_keys", ()) if k.split(".")[0] in HEAD_NAMES]
    if require_head and new_head:
        raise AdapterError(f"{name_or_path} has no trained classification head ({', '.join(sorted(new_head))} "
                           "would be random): pass the LoRA adapter that training wrote (--adapter RUN/adapter), "
                           "or a merged classifier")
    # checkpoints whose config names no pad token still need one: the head pools the last non-pad token
    model.config.pad_token_id = tokenizer.pad_token_id
    # a classifier reads each row once: a KV cache would only take memory (~2 GB for 8 x 2048 tokens of an 8B model)
    model.config.use_cache = False
    if gradient_checkpointing:
        enable_gradient_checkpointing(model, kind)
    return model


def add_lora(model, r: int = 16, alpha: int = 32, dropout: float = 0.05, targets=None):
    """Wrap the model in a LoRA PeftModel (task SEQ_CLS: the score head is trained and saved too).

    Args:
        targets: module names to adapt; None uses LORA_TARGETS for the architecture, else peft's default.
    """
    if targets is None:
        targets = LORA_TARGETS.get(model.config.model_type)
    config = LoraConfig(task_type=TaskType.SEQ_CLS, r=r, lora_alpha=alpha, lora_dropout=dropout,
                        target_modules=list(targets) if targets is not None else None)
    model = get_peft_model(model, config)
    model.print_trainable_parameters()
    return model


def adapter_keys(model) -> list[str]:
    """Names of the adapter's tensors (LoRA + score head) in the model's state dict."""
    return [k for k in model.state_dict() if model.active_adapter in k.split(".")]


def adapter_state_dict(model) -> dict:
    """The adapter's tensors (LoRA + score head) copied to the CPU.

    Saving XLA tensors directly fails, and copying the whole 8B state dict would move 16 GB. On a multi-host
    TPU slice reading a sharded tensor is collective: every process must call this, even those that write nothing.
    """
    state = model.state_dict()
    return {k: state[k].detach().to("cpu") for k in adapter_keys(model)}


def save_adapter(model, tokenizer, out_dir, encoding: EncodingSettings, state_dict: dict | None = None) -> Path:
    """Write the peft adapter (LoRA + score head), the tokenizer and the encoding settings to `out_dir`.

    Args:
        state_dict: the adapter's CPU tensors from `adapter_state_dict` (default: gathered here; on a multi-host
            slice gather on every process and pass it to the one process that writes).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, state_dict=adapter_state_dict(model) if state_dict is None else state_dict)
    tokenizer.save_pretrained(out_dir)
    encoding.save(out_dir)  # prediction reads it back, so the model sees the inputs it was trained on
    return out_dir


def load_adapter(model, adapter_dir):
    """Put a saved adapter on a freshly loaded base model, strictly: every saved key must fit, none be missing."""
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


def load_for_inference(name_or_path, adapter_dir=None, token: str | None = None, dtype="auto", kind: str = "cpu",
                       quantization: str | None = None, device_map=None):
    """(model, tokenizer, encoding) for prediction: the base with the adapter on top (unmerged), in eval mode,
    and the encoding settings saved with the adapter (None without one).

    The tokenizer comes from the base model, as in training (the pad-token choice is deterministic): the copy
    in the adapter folder is in the format of the transformers that trained, which older ones cannot read
    (transformers 5's "TokenizersBackend" under 4.x). Its pad token, read as plain JSON, still wins.
    """
    tokenizer = load_tokenizer(name_or_path, token=token)
    if adapter_dir is not None:
        _use_saved_pad_token(tokenizer, adapter_dir)
    model = load_classifier(name_or_path, tokenizer, token=token, dtype=dtype, kind=kind,
                            quantization=quantization, device_map=device_map, require_head=adapter_dir is None)
    encoding = None
    if adapter_dir is not None:
        model = load_adapter(model, adapter_dir)
        encoding = EncodingSettings.load(adapter_dir)
    return model.eval(), tokenizer, encoding


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
    # local folders need no token; resolving one there could call Kaggle's secret service for nothing
    if is_local(name_or_path):
        return None
    token = resolve_token(token)
    if not constants.HF_HUB_OFFLINE:  # offline, transformers loads from the local cache or says what is missing
        preflight(name_or_path, token=token)
    return token


def _dtype_kwarg() -> str:
    # transformers renamed torch_dtype= to dtype= in 4.56; Kaggle images may carry an older one
    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    return "dtype" if (major, minor) >= (4, 56) else "torch_dtype"
