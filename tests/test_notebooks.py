"""The three notebooks: recipes with stripped outputs, and all three run top to bottom in smoke mode."""

import json
import re
from pathlib import Path

import pandas as pd
import pytest

from lmsys_utils.kaggle import install_line

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ["01_eda.ipynb", "02_train_tpu.ipynb", "03_inference.ipynb"]
FAKE_TOKEN = "hf_" + "notebookSmokeTestSecret0123456789"  # built at run time: no token-shaped literal in the repo


def _cells(name):
    return json.loads((ROOT / "notebooks" / name).read_text())["cells"]


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_is_a_recipe_with_stripped_outputs(name):
    cells = _cells(name)
    assert cells[0]["cell_type"] == "markdown" and len("".join(cells[0]["source"])) > 300
    tagged = [c for c in cells if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(tagged) == 1 and tagged[0] is cells[1]
    for cell in cells:
        if cell["cell_type"] != "code":
            continue
        assert cell["outputs"] == [] and cell["execution_count"] is None, "outputs must be stripped"
        source = "".join(cell["source"])
        assert not re.search(r"^\s*(def|class|async def) ", source, re.M), f"no definitions in notebooks:\n{source}"
        # the Kaggle defaults are the parameters; smoke mode may only replace them, after the install
        if re.search(r"^\s*[%!]pip", source, re.M):
            assert "if not SMOKE:" in source


def test_inference_notebook_installs_with_the_bundles_exact_line():
    source = "\n".join("".join(c["source"]) for c in _cells("03_inference.ipynb"))
    args = re.search(r'pip_install\(([^)]*)\)', source).group(1)
    words = [w.strip().strip('"') for w in args.split(",")]
    line = "pip install " + " ".join("/kaggle/input/lmsys-utils-wheels" if w == "BUNDLE" else w for w in words)
    assert line == install_line()
    assert 'BUNDLE = "/kaggle/input/lmsys-utils-wheels"' in source
    assert 'OUT = "/kaggle/working/submission.csv"' in source


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_install_cells_stop_on_a_failed_install_and_keep_the_images_torch(name):
    source = "\n".join("".join(c["source"]) for c in _cells(name))
    assert "%pip" not in source and "!pip" not in source  # a failed %pip only prints, and the notebook runs on
    assert "pip_install(" in source and "if not SMOKE:" in source
    if name != "03_inference.ipynb":  # internet on: the image's torch (and torch_xla) pair is pinned
        assert "image_freeze()" in source and 'keep_pins("torch"' in source
    if name == "02_train_tpu.ipynb":
        assert 'keep_pins("torch", "torch_xla")' in source
        assert "find_token()" in source and "print(TOKEN)" not in source


def test_pip_install_raises_with_pips_own_message(tmp_path):
    from lmsys_utils.kaggle import keep_pins, pip_install

    with pytest.raises(RuntimeError, match="no-such-package-lmsys"):
        pip_install("--no-index", "--find-links", str(tmp_path), "no-such-package-lmsys")
    pins = (tmp_path / "keep.txt")
    keep_pins("torch", "not-installed-at-all", path=pins)
    assert pins.read_text().startswith("torch==") and "not-installed" not in pins.read_text()


@pytest.mark.slow
@pytest.mark.xla
def test_all_three_notebooks_run_in_smoke_mode(tmp_path, monkeypatch):
    papermill = pytest.importorskip("papermill")
    pytest.importorskip("torch_xla", reason="02 trains on the XLA CPU device: needs torch_xla (pip install torch-xla)")
    # a token in the environment must never reach an output
    monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)
    # only this environment's kernel: a user-level "python3" kernelspec could point at another Python
    monkeypatch.setenv("JUPYTER_DATA_DIR", str(tmp_path / "jupyter"))
    monkeypatch.delenv("JUPYTER_PATH", raising=False)
    smoke = tmp_path / "smoke"
    outputs = {}
    for name in NOTEBOOKS:  # in order: 03 predicts with the adapter 02 trained
        out = tmp_path / name
        papermill.execute_notebook(str(ROOT / "notebooks" / name), str(out), kernel_name="python3",
                                   parameters={"SMOKE": True, "SMOKE_DIR": str(smoke)}, cwd=str(ROOT),
                                   progress_bar=False)
        outputs[name] = out.read_text()
        assert FAKE_TOKEN not in outputs[name]

    assert len(list((smoke / "eda").glob("*.png"))) == 8  # 7 data figures + token lengths
    history = json.loads((smoke / "run" / "history.json").read_text())
    assert history["device"] == "xla" and history["step"][-1] == 6  # 02 ran on the XLA CPU device
    assert (smoke / "run" / "adapter" / "adapter_model.safetensors").is_file()
    assert "image/png" in outputs["02_train_tpu.ipynb"]  # the loss/lr figure

    submission = pd.read_csv(smoke / "submission.csv")
    assert list(submission.columns) == ["id", "winner_model_a", "winner_model_b", "winner_tie"]
    test_csv = ROOT.parent / "shared" / "data" / "arena" / "test.csv"
    expected = pd.read_csv(test_csv)["id"] if test_csv.is_file() else pd.read_csv(smoke / "data" / "test.csv")["id"]
    assert sorted(submission["id"]) == sorted(expected)
    assert (submission.iloc[:, 1:].sum(axis=1) - 1).abs().max() < 1e-6
    assert "validation log loss" in outputs["03_inference.ipynb"]
