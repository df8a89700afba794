"""The device layer on CPU: detection, dtypes, RNG states, gradient checkpointing, no torch_xla at import."""

import subprocess
import sys

import pytest
import torch

from lmsys_utils import device as dev


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


def test_dtypes_devices_and_main_process(monkeypatch):
    assert dev.default_dtype("xla") == torch.bfloat16
    assert dev.default_dtype("cuda") == torch.float16
    assert dev.default_dtype("cpu") == torch.float32
    assert dev.get_device("cpu") == torch.device("cpu") and dev.num_data_shards("cpu") == 1
    dev.sync("cpu")
    with dev.autocast("cpu", None):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32
    with dev.autocast("cpu", torch.bfloat16):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16
    monkeypatch.setattr(dev, "detect", lambda: "cpu")
    monkeypatch.setenv("RANK", "1")
    assert not dev.is_main_process()
    monkeypatch.setenv("RANK", "0")
    assert dev.is_main_process()


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


def test_importing_the_package_does_not_import_torch_xla():
    code = "import sys, lmsys_utils.device, lmsys_utils.train; print('torch_xla' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
