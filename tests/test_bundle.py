"""The offline bundle: a fresh virtual environment installs lmsys_utils from it with no package index."""

import json
import socket
import subprocess
import sys
import zipfile

import pytest

from lmsys_utils import bundle
from lmsys_utils.cli import main


def _pypi_reachable() -> bool:
    try:
        socket.create_connection(("pypi.org", 443), timeout=3).close()
        return True
    except OSError:
        return False


needs_pypi = pytest.mark.skipif(not _pypi_reachable(),
                                reason="building the wheel fetches setuptools and downloads wheels from PyPI")


def test_install_line_names_the_dataset_and_packages():
    assert bundle.install_line("my-wheels", ["peft==0.21.2", "bitsandbytes"]) == (
        "pip install --no-index --find-links /kaggle/input/my-wheels lmsys-utils peft bitsandbytes")


def test_packages_are_pinned_from_requirements(tmp_path):
    req = tmp_path / "requirements.txt"
    req.write_text("# comment\npeft==0.21.2\nBits_And_Bytes==1.0  # why\n")
    assert bundle._pin("peft", req) == "peft==0.21.2"
    assert bundle._pin("bits-and-bytes", req) == "bits-and-bytes==1.0"
    assert bundle._pin("peft>=0.10", req) == "peft>=0.10"  # an explicit requirement is kept as given
    assert bundle._pin("tqdm", req) == "tqdm"


def test_bad_slug_and_missing_checkout_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="Kaggle dataset slug"):
        bundle.build_bundle(tmp_path / "b", packages=(), slug="Bad Slug")
    with pytest.raises(FileNotFoundError, match="clone of the project"):
        bundle.build_bundle(tmp_path / "b", packages=(), project_root=tmp_path)


@pytest.mark.slow
@needs_pypi
def test_fresh_venv_installs_from_the_bundle_with_no_index(tmp_path):
    out = tmp_path / "bundle"
    assert main(["bundle", "--out", str(out), "--kaggle-user", "someone", "--package", "tqdm"]) == 0
    wheels = sorted(p.name for p in out.glob("*.whl"))
    assert wheels[0].startswith("lmsys_utils-0.1.0-py3-none-any") and wheels[1].startswith("tqdm-4.70.1-")
    with zipfile.ZipFile(out / wheels[0]) as whl:
        assert "lmsys_utils/plots.py" in whl.namelist()
        assert not any(n.startswith(("tests/", "notebooks/")) for n in whl.namelist())
    meta = json.loads((out / "dataset-metadata.json").read_text())
    assert meta["id"] == "someone/lmsys-utils-wheels" and meta["title"] and meta["licenses"]
    assert "pip install --no-index --find-links /kaggle/input/lmsys-utils-wheels lmsys-utils tqdm" in (
        out / "INSTALL.txt").read_text()

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    new_python = venv / "bin" / "python"
    # this environment's pip installs into the new one; no index, so only the bundle can provide it
    subprocess.run([sys.executable, "-m", "pip", "--python", str(new_python), "install", "--quiet", "--no-index",
                    "--no-deps", "--find-links", str(out), "lmsys-utils", "tqdm"], check=True)
    done = subprocess.run([str(new_python), "-c", "import lmsys_utils, tqdm; print(lmsys_utils.__version__, "
                           "lmsys_utils.__file__, tqdm.__version__)"], capture_output=True, text=True,
                          cwd=tmp_path, check=True)
    version, path, tqdm_version = done.stdout.split()
    assert version == "0.1.0" and path.startswith(str(venv)) and tqdm_version == "4.70.1"
