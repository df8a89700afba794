"""Loading the classifier, LoRA, and adapters that save and load exactly (tiny models, built in-process)."""

import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lmsys_utils.config import EncodingSettings
from lmsys_utils.data import ID2LABEL
from lmsys_utils.model import (AdapterError, add_lora, load_adapter, load_classifier, load_for_inference,
                               load_tokenizer, save_adapter)
from lmsys_utils.synthetic import build_tiny_model

ENCODING = EncodingSettings(max_length=160, prompt_share=0.5)

SECRET = "hf_neverWriteThisTokenAnywhere42"


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return load_tokenizer(tiny_model_dir)


@pytest.fixture(scope="module")
def batch(tokenizer):
    texts = ["Which answer is better? A says yes.", "B: no, because of the reasons above.", "tie"]
    # transformers 4.x tokenizers also return token_type_ids, which Llama's forward rejects
    return dict(tokenizer(texts, padding=True, return_token_type_ids=False, return_tensors="pt"))


def trained_lora(tiny_model_dir, tokenizer, batch, steps=3):
    """A LoRA model whose adapter and score head moved away from their init (lora_B starts at zero)."""
    torch.manual_seed(0)
    model = add_lora(load_classifier(tiny_model_dir, tokenizer), r=4, alpha=8, dropout=0.0)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    labels = torch.tensor([0, 1, 2])
    for _ in range(steps):
        loss = torch.nn.functional.cross_entropy(model(**batch).logits, labels)
        loss.backward()
        opt.step()
        opt.zero_grad()
    return model.eval()


def checkpointed_layers(model):
    """Decoder layers that recompute their activations in the backward pass."""
    try:
        from transformers.modeling_layers import GradientCheckpointingLayer
    except ImportError:  # transformers < 4.52 flags the stack that holds the layers, not each layer
        return [layer for m in model.modules() if getattr(m, "gradient_checkpointing", False)
                for layer in getattr(m, "layers", [])]
    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer) and m.gradient_checkpointing]


def test_load_classifier(tiny_model_dir, tokenizer, batch):
    model = load_classifier(tiny_model_dir, tokenizer)
    assert model.config.num_labels == 3 and model.config.id2label == ID2LABEL
    assert model.config.pad_token_id == tokenizer.pad_token_id is not None and tokenizer.padding_side == "right"
    assert model.dtype == torch.float32  # cpu default
    assert model(**batch).logits.shape == (3, 3)
    xla = load_classifier(tiny_model_dir, tokenizer, kind="xla")  # not moved: only the settings
    assert xla.dtype == torch.bfloat16 and xla.config._attn_implementation == "eager"
    assert load_classifier(tiny_model_dir, tokenizer, dtype="fp16").dtype == torch.float16
    with pytest.raises(ValueError, match="dtype='half'"):
        load_classifier(tiny_model_dir, tokenizer, dtype="half")
    with pytest.raises(ValueError, match="quantization='3bit'"):
        load_classifier(tiny_model_dir, tokenizer, quantization="3bit")
    with pytest.raises(ValueError, match="does not run on TPU"):
        load_classifier(tiny_model_dir, tokenizer, kind="xla", quantization="8bit")


def test_no_kv_cache_is_built(tiny_model_dir, tokenizer, batch, monkeypatch):
    """A classifier reads each row once: no forward (training, evaluation, prediction) builds a KV cache."""
    import transformers.models.llama.modeling_llama as llama

    built = []

    class CountingCache(llama.DynamicCache):
        def __init__(self, *args, **kwargs):
            built.append(1)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(llama, "DynamicCache", CountingCache)
    model = load_classifier(tiny_model_dir, tokenizer)
    assert model.config.use_cache is False
    for module in (model, add_lora(model, r=4)):
        for mode in (module.train, module.eval):
            mode()
            with torch.no_grad():
                out = module(**batch)
            assert out.past_key_values is None
    assert not built
    # the counter does see a cache when one is asked for, so the check above can fail
    with torch.no_grad():
        assert model(**batch, use_cache=True).past_key_values is not None
    assert built


def test_lora_defaults_per_architecture(tiny_model_dir, tokenizer, capsys):
    model = add_lora(load_classifier(tiny_model_dir, tokenizer))
    assert "trainable params" in capsys.readouterr().out
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
        assert any(f"{proj}.lora_A" in n for n in trainable)
    assert not any("mlp" in n for n in trainable)
    assert "base_model.model.score.modules_to_save.default.weight" in trainable
    assert model.peft_config["default"].r == 16 and model.peft_config["default"].lora_alpha == 32

    from transformers import BertConfig, BertForSequenceClassification

    bert = BertForSequenceClassification(BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1,
                                                    num_attention_heads=2, intermediate_size=64, num_labels=3))
    bert = add_lora(bert, r=2, targets=None)
    assert set(bert.peft_config["default"].target_modules) == {"query", "key", "value", "dense"}
    assert any("classifier.modules_to_save" in n for n, p in bert.named_parameters() if p.requires_grad)
    custom = add_lora(load_classifier(tiny_model_dir, tokenizer), targets=("v_proj",))
    assert set(custom.peft_config["default"].target_modules) == {"v_proj"}


def test_round_trip_is_exact(tiny_model_dir, tokenizer, batch, tmp_path, capsys, caplog):
    caplog.set_level(logging.DEBUG)
    model = trained_lora(tiny_model_dir, tokenizer, batch)
    with torch.no_grad():
        before = model(**batch).logits
    out = save_adapter(model, tokenizer, tmp_path / "adapter", encoding=ENCODING)
    assert {"adapter_config.json", "adapter_model.safetensors", "encoding.json",
            "tokenizer.json"} <= {p.name for p in out.iterdir()}

    loaded, loaded_tokenizer, encoding = load_for_inference(tiny_model_dir, out, token=SECRET)
    assert encoding == ENCODING
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    with torch.no_grad():
        after = loaded(**batch).logits
    assert torch.equal(before, after)
    assert loaded_tokenizer.pad_token_id == tokenizer.pad_token_id
    with torch.no_grad():  # the adapter matters: the bare base predicts something else
        assert not torch.allclose(load_classifier(tiny_model_dir, tokenizer)(**batch).logits, after)

    # the token went in as an argument; it must appear in nothing the run wrote or showed
    captured = capsys.readouterr()
    assert SECRET not in captured.out + captured.err + caplog.text
    for path in out.rglob("*"):
        assert not path.is_file() or SECRET.encode() not in path.read_bytes(), path


def test_strict_loading(tiny_model_dir, tokenizer, batch, tmp_path):
    from safetensors.torch import load_file, save_file

    out = save_adapter(trained_lora(tiny_model_dir, tokenizer, batch, steps=1), tokenizer, tmp_path / "a",
                       encoding=ENCODING)
    # copies: older safetensors map the file, and it is rewritten below (a bus error on reading the old map)
    weights = {k: v.clone() for k, v in load_file(out / "adapter_model.safetensors").items()}
    head = "base_model.model.score.weight"
    assert head in weights

    save_file({k: v for k, v in weights.items() if k != head}, out / "adapter_model.safetensors")
    # peft >= 0.13 fails looking the head up, older peft reports it missing: either way AdapterError names it
    with pytest.raises(AdapterError, match=r"missing \[?'base_model\.model\.score\."):
        load_adapter(load_classifier(tiny_model_dir, tokenizer), out)

    lora_b = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"
    save_file({k: v for k, v in weights.items() if k != lora_b}, out / "adapter_model.safetensors")
    with pytest.raises(AdapterError, match=r"missing \['base_model.model.model.layers.1.self_attn.v_proj.lora_B"):
        load_adapter(load_classifier(tiny_model_dir, tokenizer), out)

    save_file({**weights, "base_model.model.model.layers.0.mlp.up_proj.lora_A.weight": torch.zeros(4, 64)},
              out / "adapter_model.safetensors")
    with pytest.raises(AdapterError, match=r"unexpected \['base_model.model.model.layers.0.mlp.up_proj"):
        load_adapter(load_classifier(tiny_model_dir, tokenizer), out)

    save_file(weights, out / "adapter_model.safetensors")
    other = build_tiny_model(tmp_path / "wider", texts=["a b c"] * 20, vocab_size=300, hidden_size=32)
    with pytest.raises(AdapterError, match="does not fit this llama model"):
        load_adapter(load_classifier(other, load_tokenizer(other)), out)
    with pytest.raises(AdapterError, match="no adapter_config.json"):
        load_adapter(load_classifier(tiny_model_dir, tokenizer), tmp_path)


def test_gradient_checkpointing_keeps_gradients(tiny_model_dir, tokenizer, batch):
    def lora_grads(checkpointing):
        torch.manual_seed(0)
        model = add_lora(load_classifier(tiny_model_dir, tokenizer, gradient_checkpointing=checkpointing), r=4)
        assert len(checkpointed_layers(model)) == (2 if checkpointing else 0)
        model.train()
        model(**batch).logits.sum().backward()
        return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}

    plain, checkpointed = lora_grads(False), lora_grads(True)
    # lora_A gets no gradient while lora_B is still zero (its init); lora_B and the score head must get one
    assert len(plain) == 2 * 4 * 2 + 1
    assert all(g.abs().sum() > 0 for n, g in checkpointed.items() if "lora_A" not in n)
    assert plain.keys() == checkpointed.keys()
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-5, atol=1e-6)


ON_XLA = """
import sys, torch
import torch_xla.core.xla_model as xm
from transformers.modeling_layers import GradientCheckpointingLayer
from lmsys_utils.config import EncodingSettings
from lmsys_utils.model import add_lora, load_classifier, load_for_inference, load_tokenizer, save_adapter

tokenizer = load_tokenizer(sys.argv[1])
batch = dict(tokenizer(["Which answer is better? A says yes.", "tie"], padding=True, return_token_type_ids=False,
                       return_tensors="pt"))
device = xm.xla_device()
grads = []
for kind, dev in (("xla", device), ("cpu", "cpu")):
    torch.manual_seed(0)
    model = add_lora(load_classifier(sys.argv[1], tokenizer, dtype="fp32", kind=kind,
                                     gradient_checkpointing=kind == "xla"), r=4, dropout=0.0)
    # on XLA each decoder layer's forward is wrapped by torch_xla's checkpoint_module (a bound method, so the
    # layer's weights join the optimization barrier)
    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)
              and getattr(m, "_xla_checkpointed_forward_original", None) is not None]
    assert len(layers) == (2 if kind == "xla" else 0), layers
    model.to(dev).train()
    model(**{k: v.to(dev) for k, v in batch.items()}).logits.sum().backward()
    if kind == "xla":
        xm.mark_step()  # one graph for the whole step; else each .cpu() below compiles its own
    grads.append({n: p.grad.cpu() for n, p in model.named_parameters() if p.requires_grad})
assert grads[0].keys() == grads[1].keys() and len(grads[0]) == 17
for name in grads[1]:
    torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-4, atol=1e-5)
print("same gradients")

# saving straight from XLA tensors fails in peft; save_adapter copies the adapter to the CPU first
model = add_lora(load_classifier(sys.argv[1], tokenizer, dtype="fp32", kind="xla"), r=4).to(device).eval()
for p in model.parameters():
    if p.requires_grad:
        p.data.normal_(0, 0.1)
with torch.no_grad():
    on_xla = model(**{k: v.to(device) for k, v in batch.items()}).logits.cpu()
save_adapter(model, tokenizer, sys.argv[2], encoding=EncodingSettings())
reloaded, _, _ = load_for_inference(sys.argv[1], sys.argv[2])
with torch.no_grad():
    torch.testing.assert_close(reloaded(**batch).logits, on_xla, rtol=1e-4, atol=1e-5)
print("saved from XLA")
"""


@pytest.mark.xla
@pytest.mark.slow
def test_gradient_checkpointing_and_saving_on_xla(tiny_model_dir, tmp_path):
    """On XLA (CPU-backed): torch_xla's checkpoint gives the CPU gradients; an adapter saved there reloads exactly.

    In a fresh process: a CPU backward before the XLA runtime starts breaks every later XLA backward
    (autograd's device queues are sized once), and earlier tests in this session run CPU backwards.
    """
    pytest.importorskip("torch_xla")
    env = {**os.environ, "PJRT_DEVICE": "CPU"}
    env.pop("CPU_NUM_DEVICES", None)
    run = subprocess.run([sys.executable, "-c", ON_XLA, str(tiny_model_dir), str(tmp_path / "adapter")], env=env,
                         capture_output=True, text=True, timeout=300, cwd=Path(__file__).parents[1])
    assert run.returncode == 0 and "same gradients" in run.stdout and "saved from XLA" in run.stdout, run.stderr[-3000:]


@pytest.mark.parametrize("quantization, tolerance", [("8bit", 0.02), ("4bit", 0.1)])
def test_quantized_on_cpu(tiny_model_dir, tokenizer, batch, quantization, tolerance, tmp_path, cpu_quantization):
    bnb = cpu_quantization
    reference = trained_lora(tiny_model_dir, tokenizer, batch, steps=1)
    out = save_adapter(reference, tokenizer, tmp_path / "adapter", encoding=ENCODING)
    quantized, _, _ = load_for_inference(tiny_model_dir, out, quantization=quantization)
    assert any(isinstance(m, (bnb.nn.Linear8bitLt, bnb.nn.Linear4bit)) for m in quantized.modules())
    with torch.no_grad():
        torch.testing.assert_close(quantized(**batch).logits.float(), reference(**batch).logits,
                                   atol=tolerance, rtol=0)


def test_adapter_config_keys_this_peft_does_not_know(tiny_model_dir, tokenizer, batch, tmp_path):
    """A newer peft's keys load when off (peft 0.12 reading 0.21's file) and are refused when they change the model."""
    model = trained_lora(tiny_model_dir, tokenizer, batch, steps=1)
    with torch.no_grad():
        before = model(**batch).logits
    out = save_adapter(model, tokenizer, tmp_path / "adapter", encoding=ENCODING)
    path = out / "adapter_config.json"
    saved = json.loads(path.read_text())
    path.write_text(json.dumps({**saved, "use_future_trick": False, "future_config": None, "future_layers": []}))
    with torch.no_grad():
        assert torch.equal(load_adapter(load_classifier(tiny_model_dir, tokenizer), out)(**batch).logits, before)
    path.write_text(json.dumps({**saved, "use_future_trick": True}))
    with pytest.raises(AdapterError, match=r"sets use_future_trick=true, which peft .* does not know"):
        load_adapter(load_classifier(tiny_model_dir, tokenizer), out)


def test_inference_tokenizer_comes_from_the_base_with_the_saved_pad(tiny_model_dir, tokenizer, batch, tmp_path):
    import copy

    eos_padded = copy.deepcopy(tokenizer)
    eos_padded.pad_token = eos_padded.eos_token
    model = trained_lora(tiny_model_dir, tokenizer, batch, steps=1)
    out = save_adapter(model, eos_padded, tmp_path / "adapter", encoding=ENCODING)
    # a tokenizer.json this transformers cannot read (as 4.x meets 5.x's): never opened
    (out / "tokenizer.json").write_text("{not json")
    _, loaded, _ = load_for_inference(tiny_model_dir, out)
    assert loaded.pad_token == "<|eos|>" != tokenizer.pad_token
    config = json.loads((out / "tokenizer_config.json").read_text())
    (out / "tokenizer_config.json").write_text(json.dumps({**config, "pad_token": "<|not-in-vocab|>"}))
    with pytest.raises(AdapterError, match=re.escape("pads with '<|not-in-vocab|>', which the base")):
        load_for_inference(tiny_model_dir, out)
