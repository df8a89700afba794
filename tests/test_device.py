"""The device layer on CPU: detection, dtypes, RNG states, gradient checkpointing, no torch_xla at import."""

import subprocess
import sys

import pytest
import torch

from lmsys_utils import device as dev
from lmsys_utils.synthetic import ARCHITECTURES, build_tiny_model


@pytest.fixture
def no_tpu(monkeypatch):
    monkeypatch.setattr(dev.glob, "glob", lambda pattern: [])
    for name in ("PJRT_DEVICE", "TPU_ACCELERATOR_TYPE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(dev.torch.cuda, "is_available", lambda: False)
    return monkeypatch


def test_detect_picks_xla_only_for_a_real_accelerator(no_tpu):
    assert dev.detect() == "cpu"
    no_tpu.setenv("PJRT_DEVICE", "CPU")  # what importing torch_xla sets by itself: not a TPU
    assert dev.detect() == "cpu"
    if dev.importlib.util.find_spec("torch_xla") is not None:
        no_tpu.setenv("PJRT_DEVICE", "TPU")
        assert dev.detect() == "xla"
        no_tpu.delenv("PJRT_DEVICE")
        no_tpu.setattr(dev.glob, "glob", lambda pattern: ["/dev/accel0"] if "accel" in pattern else [])
        assert dev.detect() == "xla"
    no_tpu.setattr(dev.glob, "glob", lambda pattern: [])
    no_tpu.setattr(dev.torch.cuda, "is_available", lambda: True)
    assert dev.detect() == "cuda"


def test_runtime_is_resolved_once_with_the_dtype_rule(monkeypatch):
    assert dev.resolve_dtype("auto", "xla") == torch.bfloat16
    assert dev.resolve_dtype("auto", "cuda") == torch.float16
    assert dev.resolve_dtype("auto", "cpu") == torch.float32
    assert dev.resolve_dtype("bf16", "cpu") == torch.bfloat16
    with pytest.raises(ValueError, match="dtype='half'"):
        dev.resolve_dtype("half", "cpu")
    with pytest.raises(ValueError, match="device='tpu'"):
        dev.resolve("tpu")
    runtime = dev.resolve("cpu")
    assert (runtime.kind, runtime.device, runtime.dtype, runtime.shards, runtime.padding) == (
        "cpu", torch.device("cpu"), torch.float32, 1, "dynamic")
    assert runtime.amp_dtype is None and runtime.main
    runtime.sync()
    with runtime.autocast():
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32
    with dev.resolve("cpu", "bf16").autocast():
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16
    with runtime.inference():
        assert torch.is_inference_mode_enabled()
    monkeypatch.setenv("RANK", "1")
    assert not dev.resolve("cpu").main


def test_rng_state_round_trip():
    state = dev.get_rng_state("cpu")
    first = torch.rand(3)
    dev.set_rng_state(state, "cpu")
    torch.testing.assert_close(torch.rand(3), first)


def test_gradient_checkpointing_keeps_gradients(tiny_model_dir):
    from lmsys_utils.batching import pad_batch
    from lmsys_utils.model import add_lora, load_classifier, load_tokenizer

    tokenizer = load_tokenizer(tiny_model_dir)
    batch = pad_batch([[1, 5, 9, 33, 40], [1, 7, 8]], tokenizer.pad_token_id)
    grads = []
    for checkpointing in (False, True):
        model = load_classifier(tiny_model_dir, tokenizer, dtype="fp32")
        if checkpointing:
            dev.enable_gradient_checkpointing(model, "cpu")
            assert any(getattr(m, "gradient_checkpointing", False) for m in model.modules())
        torch.manual_seed(0)
        model = add_lora(model, r=4, alpha=8, dropout=0.0).train()
        model(**batch).logits.sum().backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], msg=name)
    with pytest.raises(ValueError, match="gradient checkpointing"):
        dev.enable_gradient_checkpointing(torch.nn.Linear(2, 2), "cpu")


def test_only_device_imports_torch_xla_and_only_inside_functions():
    """CPU installs never need torch_xla (transformers and peft import it by themselves when it is installed)."""
    import ast
    from pathlib import Path

    package = Path(dev.__file__).parent
    for path in package.glob("*.py"):
        tree = ast.parse(path.read_text())
        top_level = {id(n) for n in tree.body}
        for node in ast.walk(tree):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            if any(n.split(".")[0] == "torch_xla" for n in names):
                assert path.name == "device.py", f"{path.name} imports torch_xla"
                assert id(node) not in top_level, f"device.py imports torch_xla at the top (line {node.lineno})"
    code = "import sys, lmsys_utils.device, lmsys_utils.batching, lmsys_utils.text; print('torch_xla' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_decoder_layer_classes_of_every_architecture(architecture, tmp_path):
    """The per-layer sharding and XLA checkpointing find each supported architecture's repeated block."""
    from lmsys_utils.model import add_lora, load_classifier, load_tokenizer

    model_dir = build_tiny_model(tmp_path, architecture=architecture, num_layers=2)
    model = load_classifier(model_dir, load_tokenizer(model_dir))
    classes = dev.decoder_layer_classes(model)
    assert len(classes) == 1 and classes[0].__name__.endswith("Layer")
    assert sum(isinstance(m, classes) for m in model.modules()) == 2  # each of the 2 layers, nothing else
    assert dev.decoder_layer_classes(add_lora(model, r=2)) == classes  # found through the PeftModel too
    with pytest.raises(ValueError, match="decoder-layer class"):
        dev.decoder_layer_classes(torch.nn.Sequential(torch.nn.Linear(2, 2)))


def test_to_cpu_copies_nested_tensors():
    state = {"a": [torch.ones(2), (torch.zeros(1), 3)], "b": "text"}
    out = dev.to_cpu(state, "cpu")
    assert out["b"] == "text" and out["a"][1][1] == 3 and isinstance(out["a"][1], tuple)
    assert torch.equal(out["a"][0], torch.ones(2)) and out["a"][0].device.type == "cpu"
