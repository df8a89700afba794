"""Kaggle metadata (read back by the `kaggle` package's own push/create code) and the offline bundle: a fresh
virtual environment installs from it with no index; against an image freeze it resolves offline for that image."""

import json
import os
import re
import socket
import subprocess
import sys
import types
import zipfile
from pathlib import Path

import pytest

from lmsys_utils import kaggle
from lmsys_utils.cli import main

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(__file__).parent / "data"
TPU_FREEZE = DATA / "kaggle_tpu_2025_freeze.txt"
GPU_FREEZE = DATA / "kaggle_gpu_2024_freeze.txt"


def _pypi_reachable() -> bool:
    try:
        socket.create_connection(("pypi.org", 443), timeout=3).close()
        return True
    except OSError:
        return False


# the new environments must see only what was installed into them: with a checkout on PYTHONPATH, pip would
# even find lmsys-utils "already satisfied" there and install nothing
CLEAN_ENV = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}

needs_pypi = pytest.mark.skipif(not _pypi_reachable(),
                                reason="building the wheel fetches setuptools and downloads wheels from PyPI")


@pytest.fixture
def kaggle_api(monkeypatch, tmp_path):
    """The `kaggle` package's KaggleApi with its server client replaced: push/create run all their own metadata
    reading and validation, and hand us the request they would send."""
    monkeypatch.setenv("KAGGLE_CONFIG_DIR", str(tmp_path / "no-credentials"))
    extended = pytest.importorskip("kaggle.api.kaggle_api_extended",
                                   reason="the kaggle package is not installed (pip install kaggle six)")
    requests = pytest.importorskip("requests")
    sent = {}
    client = types.SimpleNamespace(
        kernels=types.SimpleNamespace(kernels_api_client=types.SimpleNamespace(
            save_kernel=lambda request: sent.setdefault("kernel", request))),
        datasets=types.SimpleNamespace(dataset_api_client=types.SimpleNamespace(
            create_dataset=lambda request: sent.setdefault("dataset", request) and types.SimpleNamespace(error=""))))

    class Client:
        def __enter__(self):
            return client

        def __exit__(self, *exc):
            return False

    def not_found(ref):  # "does this dataset already exist?" asks the server; answer: no
        raise requests.HTTPError(f"404 {ref}")

    api = extended.KaggleApi()
    api.config_values = {"username": "someone"}
    api.build_kaggle_client = Client
    api.dataset_status = not_found
    api.upload_files = lambda *args, **kwargs: None
    api.sent = sent
    return api


def test_kaggle_meta_writes_what_kaggles_own_push_and_create_accept(tmp_path, kaggle_api, capsys):
    out = tmp_path / "kaggle"
    assert main(["kaggle-meta", "--user", "someone", "--out", str(out)]) == 0
    requests = {}
    for nb in kaggle.NOTEBOOKS:
        kaggle_api.sent.clear()
        kaggle_api.kernels_push(str(out / nb.slug))
        requests[nb.slug] = kaggle_api.sent["kernel"]
    assert "does not resolve to the specified id" not in capsys.readouterr().out  # title and slug agree

    eda, train, infer = (requests[nb.slug] for nb in kaggle.NOTEBOOKS)
    assert [r.slug for r in (eda, train, infer)] == ["someone/lmsys-01-eda", "someone/lmsys-02-train-tpu",
                                                     "someone/lmsys-03-inference"]
    assert all(r.kernel_type == "notebook" and r.language == "python" and r.is_private for r in (eda, train, infer))
    assert all(r.competition_data_sources == ["lmsys-chatbot-arena"] for r in (eda, train, infer))
    assert (train.enable_tpu, train.enable_gpu, train.enable_internet, train.machine_shape) == (True, False, True,
                                                                                                "TpuV5E8")
    assert (infer.enable_tpu, infer.enable_gpu, infer.enable_internet, infer.machine_shape) == (False, True, False,
                                                                                                "NvidiaTeslaT4")
    assert not eda.enable_gpu and not eda.enable_tpu

    # the sources agree across notebooks and datasets: one bundle everywhere, the adapter only where it is read
    kaggle_api.sent.clear()
    kaggle_api.dataset_create_new(str(out / "bundle"))
    bundle = kaggle_api.sent["dataset"]
    kaggle_api.sent.clear()
    kaggle_api.dataset_create_new(str(out / "adapter"))
    adapter = kaggle_api.sent["dataset"]
    bundle_id, adapter_id = f"{bundle.owner_slug}/{bundle.slug}", f"{adapter.owner_slug}/{adapter.slug}"
    assert (bundle_id, adapter_id) == ("someone/lmsys-utils-wheels", "someone/lmsys-llama3-lora")
    assert train.dataset_data_sources == eda.dataset_data_sources == [bundle_id]
    assert infer.dataset_data_sources == [bundle_id, adapter_id]
    assert infer.model_data_sources == eda.model_data_sources == ["metaresearch/llama-3/transformers/8b-chat-hf/1"]
    assert train.model_data_sources == []

    # the notebook text pushed is the project's notebook with its inputs pointed at those sources
    cells = json.loads(infer.text)["cells"]
    injected = next(c for c in cells if "injected-parameters" in c["metadata"].get("tags", []))
    assert cells[cells.index(injected) - 1]["metadata"]["tags"] == ["parameters"]
    assert 'BUNDLE = "/kaggle/input/lmsys-utils-wheels"' in injected["source"]
    assert 'ADAPTER = "/kaggle/input/lmsys-llama3-lora"' in injected["source"]
    assert 'MODEL = "/kaggle/input/llama-3/transformers/8b-chat-hf/1"' in injected["source"]
    train_source = "".join(c["source"] for c in json.loads(train.text)["cells"])
    assert f'CONFIG["output_dir"] = "{kaggle.TRAIN_OUTPUT}"' in train_source
    assert 'CONFIG["train_path"] = "/kaggle/input/lmsys-chatbot-arena/train.csv"' in train_source
    original = json.loads((ROOT / "notebooks" / "03_inference.ipynb").read_text())["cells"]
    assert len(cells) == len(original) + 1


def test_kaggle_meta_names_its_inputs_and_keeps_edited_files(tmp_path):
    with pytest.raises(ValueError, match="Kaggle user name"):
        kaggle.write_kaggle_meta("USERNAME", tmp_path)
    with pytest.raises(ValueError, match="Kaggle Models source"):
        kaggle.write_kaggle_meta("someone", tmp_path, model="meta-llama/Meta-Llama-3-8B-Instruct")
    with pytest.raises(FileNotFoundError, match="clone of the project"):
        kaggle.write_kaggle_meta("someone", tmp_path, notebooks_dir=tmp_path)
    out = tmp_path / "kaggle"
    kaggle.write_kaggle_meta("someone", out)
    kaggle.write_kaggle_meta("someone", out)  # unchanged files: a rerun is fine
    meta = out / "lmsys-02-train-tpu" / "kernel-metadata.json"
    meta.write_text(meta.read_text().replace('"is_private": true', '"is_private": false'))
    assert main(["kaggle-meta", "--user", "someone", "--out", str(out)]) == 1
    assert '"is_private": false' in meta.read_text()
    assert main(["kaggle-meta", "--user", "someone", "--out", str(out), "--force"]) == 0
    assert '"is_private": true' in meta.read_text()


def test_a_notebook_without_the_expected_parameter_is_named(tmp_path):
    for nb in kaggle.NOTEBOOKS:
        notebook = json.loads((ROOT / "notebooks" / nb.file).read_text())
        if nb.slug == "lmsys-03-inference":
            cell = next(c for c in notebook["cells"] if "parameters" in c["metadata"].get("tags", []))
            cell["source"] = [line for line in cell["source"] if not line.startswith("ADAPTER = ")]
        (tmp_path / nb.file).write_text(json.dumps(notebook))
    with pytest.raises(ValueError, match=r"03_inference.ipynb: the parameters cell does not set ADAPTER"):
        kaggle.write_kaggle_meta("someone", tmp_path / "out", notebooks_dir=tmp_path)


def test_install_line_names_the_dataset_and_packages():
    assert kaggle.install_line("my-wheels", ["peft==0.21.2", "bitsandbytes"]) == (
        "pip install --no-index --find-links /kaggle/input/my-wheels lmsys-utils peft bitsandbytes")
    assert kaggle.install_line("my-wheels", ["peft==0.13.2"], exact=True) == (
        "pip install --no-index --find-links /kaggle/input/my-wheels lmsys-utils peft==0.13.2")


def test_packages_are_pinned_from_requirements(tmp_path):
    req = tmp_path / "requirements.txt"
    req.write_text("# comment\npeft==0.21.2\nBits_And_Bytes==1.0  # why\n")
    assert kaggle._pin("peft", req) == "peft==0.21.2"
    assert kaggle._pin("bits-and-bytes", req) == "bits-and-bytes==1.0"
    assert kaggle._pin("peft>=0.10", req) == "peft>=0.10"  # an explicit requirement is kept as given
    assert kaggle._pin("tqdm", req) == "tqdm"


def test_bad_slug_and_missing_checkout_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="Kaggle dataset slug"):
        kaggle.build_bundle(tmp_path / "b", packages=(), slug="Bad Slug")
    with pytest.raises(ValueError, match="Kaggle dataset slug"):
        kaggle.build_bundle(tmp_path / "b", packages=(), slug="abc")  # Kaggle's client wants 6+ characters
    with pytest.raises(FileNotFoundError, match="clone of the project"):
        kaggle.build_bundle(tmp_path / "b", packages=(), project_root=tmp_path)


def test_image_freeze_files_are_read_with_their_python_and_platform(tmp_path):
    image = kaggle.read_freeze(GPU_FREEZE)
    assert (image["python"], image["platform"]) == ("3.10.14", "manylinux_2_35_x86_64")
    assert image["packages"]["torch"] == "2.4.1" and image["packages"]["peft"] == "0.12.0"
    assert image["packages"]["jinja2"] == "3.1.4"  # names are normalized as pip does
    tpu = kaggle.read_freeze(TPU_FREEZE)
    assert tpu["python"] == "3.12.11" and tpu["packages"]["torch-xla"] == "2.8.0"
    assert "peft" not in tpu["packages"] and "bitsandbytes" not in tpu["packages"]

    bad = tmp_path / "freeze.txt"
    bad.write_text("numpy==1.26.4\ntorch @ file:///tmp/torch-2.4.0-cp310-cp310-linux_x86_64.whl\n")
    with pytest.raises(ValueError, match=r"freeze.txt, line 2: .*pip list --format=freeze"):
        kaggle.read_freeze(bad)
    bad.write_text("numpy==1.26.4\n")
    with pytest.raises(ValueError, match="pass --python-version"):
        kaggle.build_bundle(tmp_path / "b", packages=(), image_freeze=bad)
    assert not (tmp_path / "b").exists()  # nothing written before the inputs are known to be good


def test_requirements_the_images_python_needs_are_checked_with_its_markers():
    report = [{"metadata": {"name": "tool", "version": "1.0",
                            "requires_dist": ['tomli>=1.1; python_version < "3.11"', 'extra-only; extra == "x"']},
               "download_info": {"url": "file:///b/tool-1.0-py3-none-any.whl"}}]
    kaggle._check_requirements(report, kaggle._Target("3.12", "3.12.11", "manylinux_2_35_x86_64", None), "x")
    py310 = kaggle._Target("3.10", "3.10.14", "manylinux_2_35_x86_64", None)
    with pytest.raises(RuntimeError, match=r"tool needs tomli>=1.1; python_version < \"3.11\" on Python 3.10"):
        kaggle._check_requirements(report, py310, "the offline dry run")
    report.append({"metadata": {"name": "tomli", "version": "2.0.1"}, "download_info": {"url": "file:///b/t"}})
    kaggle._check_requirements(report, py310, "the offline dry run")


def test_pip_install_stops_with_pips_own_error():
    with pytest.raises(RuntimeError, match=r"(?s)pip install --no-index no-such-package-xyz failed.*No matching distribution"):
        kaggle.pip_install("--no-index", "no-such-package-xyz")


def test_image_freeze_prints_a_file_bundle_can_read(tmp_path, capsys):
    text = kaggle.image_freeze()
    assert capsys.readouterr().out == text
    path = tmp_path / "freeze.txt"
    path.write_text(text)
    image = kaggle.read_freeze(path)
    assert image["python"] == ".".join(map(str, sys.version_info[:3]))
    assert image["packages"]["pytest"] == pytest.__version__


def _python(version: str):
    """An interpreter of `version` on this machine (pyenv's or on PATH), for pip to evaluate markers with."""
    found = kaggle._find_python(version)
    for candidate in sorted(Path.home().glob(f".pyenv/versions/{version}.*/bin/python")) if not found else []:
        if kaggle._python_version(str(candidate)) == version:
            found = str(candidate)
    return found


@pytest.mark.slow
@needs_pypi
@pytest.mark.parametrize("freeze, packages, python, older", [
    # the 2024 image's huggingface_hub, matplotlib and tqdm are older than lmsys-utils' minimums: upgraded
    (GPU_FREEZE, ["peft", "bitsandbytes"], "3.10", {"huggingface-hub", "matplotlib", "tqdm"}),
    (TPU_FREEZE, ["peft"], "3.12", {"tqdm"}),
])
def test_bundle_for_an_image_holds_only_what_it_lacks_and_resolves_offline(tmp_path, freeze, packages, python, older):
    out = tmp_path / "bundle"
    target = _python(python)
    args = ["bundle", "--out", str(out), "--kaggle-user", "someone", "--image-freeze", str(freeze)]
    args += [a for p in packages for a in ("--package", p)] + (["--target-python", target] if target else [])
    assert main(args) == 0
    wheels = sorted(p.name for p in out.glob("*.whl"))
    install = (out / "INSTALL.txt").read_text()
    print(install)  # the dry-run result, for the report
    image = {kaggle.canonicalize_name(n) for n in kaggle.read_freeze(freeze)["packages"]}
    versions = kaggle.read_freeze(freeze)["packages"]
    bundled = {re.split(r"-\d", w, maxsplit=1)[0].replace("_", "-").lower() for w in wheels}
    assert {"lmsys-utils", *packages, *older} <= bundled
    # anything else bundled is a new dependency the image lacks; nothing the image has in a fitting version
    assert not {b for b in bundled - {"lmsys-utils", *packages, *older} if b in image}
    assert not bundled & {"torch", "transformers", "numpy", "torch-xla"}
    assert f"Offline dry run: Python {python} manylinux_2_35_x86_64: OK" in install
    assert f"torch=={versions['torch']}" in install and f"transformers=={versions['transformers']}" in install
    line = re.search(r"pip install --no-index [^\n]*", install).group(0)
    assert all(re.search(rf" {p}==\d", line) for p in packages)  # pinned: an image's older peft gets upgraded
    if python == "3.10":  # upgraded only to lmsys-utils' tested minimums: transformers 4.44 needs huggingface_hub < 1
        assert "huggingface_hub==0.25.0" in line and "matplotlib==3.8.1" in line and "tqdm==4.68.1" in line

    # the dry run can fail: without the peft wheel the same line does not resolve offline
    next(out.glob("peft-*.whl")).unlink()
    target_record = kaggle._Target.of(kaggle.read_freeze(freeze), None, None, target, freeze)
    with pytest.raises(RuntimeError, match="peft"):
        kaggle.check_offline(out, line.split("find-links ")[1].split()[1:], kaggle.read_freeze(freeze),
                             target_record)


@pytest.mark.slow
@needs_pypi
def test_fresh_venv_installs_from_the_bundle_with_no_index(tmp_path):
    out = tmp_path / "bundle"
    assert main(["bundle", "--out", str(out), "--kaggle-user", "someone", "--package", "tqdm"]) == 0
    wheels = sorted(p.name for p in out.glob("*.whl"))
    assert wheels[0].startswith("lmsys_utils-0.1.0-py3-none-any") and wheels[1].startswith("tqdm-4.70.1-")
    with zipfile.ZipFile(out / wheels[0]) as whl:
        assert "lmsys_utils/plots.py" in whl.namelist() and "lmsys_utils/kaggle.py" in whl.namelist()
        assert not any(n.startswith(("tests/", "notebooks/")) for n in whl.namelist())
    meta = json.loads((out / "dataset-metadata.json").read_text())
    assert meta["id"] == "someone/lmsys-utils-wheels" and meta["title"] and meta["licenses"]
    assert "pip install --no-index --find-links /kaggle/input/lmsys-utils-wheels lmsys-utils tqdm" in (
        out / "INSTALL.txt").read_text()

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, env=CLEAN_ENV)
    new_python = venv / "bin" / "python"
    # this environment's pip installs into the new one; no index, so only the bundle can provide it
    subprocess.run([sys.executable, "-m", "pip", "--python", str(new_python), "install", "--quiet", "--no-index",
                    "--no-deps", "--find-links", str(out), "lmsys-utils", "tqdm"], check=True, env=CLEAN_ENV)
    done = subprocess.run([str(new_python), "-c", "import lmsys_utils, tqdm; print(lmsys_utils.__version__, "
                           "lmsys_utils.__file__, tqdm.__version__)"], capture_output=True, text=True,
                          cwd=tmp_path, check=True, env=CLEAN_ENV)
    version, path, tqdm_version = done.stdout.split()
    assert version == "0.1.0" and path.startswith(str(venv)) and tqdm_version == "4.70.1"


@pytest.mark.slow
@needs_pypi
def test_the_wheel_installs_in_a_fresh_venv_without_extras_and_every_command_runs(tmp_path):
    from lmsys_utils.cli import build_parser

    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--wheel-dir", str(tmp_path),
                    str(ROOT)], check=True, env=CLEAN_ENV)
    wheel = next(tmp_path.glob("lmsys_utils-*.whl"))
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, env=CLEAN_ENV)
    python = str(venv / "bin" / "python")
    # torch 2.13.0: a CPU wheel on this project's machines (fast); pip would otherwise take the newest, with CUDA
    subprocess.run([python, "-m", "pip", "install", "--quiet", str(wheel), "torch==2.13.0"], check=True,
                   env=CLEAN_ENV)

    def run(*args):
        return subprocess.run([python, *args], capture_output=True, text=True, cwd=tmp_path, env=CLEAN_ENV)

    imported = run("-c", "import importlib.util, lmsys_utils.train, lmsys_utils.predict, lmsys_utils.kaggle; "
                         "print(lmsys_utils.__file__, importlib.util.find_spec('torch_xla'))")
    assert imported.returncode == 0, imported.stderr
    path, xla = imported.stdout.split()
    assert path.startswith(str(venv)) and xla == "None"  # the package, not this checkout; no torch_xla needed
    demo = run("-c", "from lmsys_utils.demo import write_demo_data; print(write_demo_data('data')[0])")
    assert demo.returncode == 0, demo.stderr
    checked = run("-m", "lmsys_utils", "check-data", demo.stdout.strip())
    assert checked.returncode == 0 and "800" in checked.stdout, checked.stdout + checked.stderr
    commands = build_parser()._subparsers._group_actions[0].choices
    assert {"check-data", "bundle", "kaggle-meta", "train", "predict"} <= set(commands)
    for command in commands:
        helped = run("-m", "lmsys_utils", command, "--help")
        assert helped.returncode == 0 and helped.stdout.startswith("usage: python -m lmsys_utils " + command), (
            command, helped.stderr)


def test_the_bundle_keeps_the_dataset_id_kaggle_meta_wrote(tmp_path):
    kaggle.write_kaggle_meta("someone", tmp_path / "kaggle")
    path = tmp_path / "kaggle" / "bundle" / "dataset-metadata.json"
    written = path.read_text()
    meta = {"title": "lmsys-utils wheels", "id": "USERNAME/lmsys-utils-wheels", "licenses": [{"name": "other"}]}
    assert kaggle._keep_dataset_id(path, meta, default_user=True)["id"] == "someone/lmsys-utils-wheels"
    with pytest.raises(ValueError, match="names the dataset someone/lmsys-utils-wheels, not other/lmsys-utils-wheels"):
        kaggle._keep_dataset_id(path, {**meta, "id": "other/lmsys-utils-wheels"}, default_user=False)
    assert path.read_text() == written


def test_too_old_lists_what_the_image_must_upgrade_and_refuses_an_old_torch(tmp_path):
    wheel = tmp_path / "lmsys_utils-0.1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:  # only the metadata matters here
        z.writestr("lmsys_utils-0.1.0.dist-info/METADATA", "Name: lmsys-utils\nRequires-Dist: torch>=2.4.1\n"
                   "Requires-Dist: huggingface_hub>=0.25.0\nRequires-Dist: tqdm>=4.68.1\n"
                   'Requires-Dist: pytest>=8; extra == "dev"\n')
    image = {"packages": {"torch": "2.4.1", "huggingface-hub": "0.24.6", "tqdm": "4.68.1", "pytest": "7.0"}}
    assert kaggle.too_old(wheel, image) == ["huggingface_hub==0.25.0"]  # the tested minimum, nothing newer
    image["packages"]["torch"] = "2.1.2"
    with pytest.raises(ValueError, match="torch 2.1.2 is older than lmsys-utils needs"):
        kaggle.too_old(wheel, image)
