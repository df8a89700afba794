"""Kaggle from the command line: kernel and dataset metadata for the three notebooks, and the offline wheel bundle
(optionally resolved against a `pip freeze` of the Kaggle image it will be installed on)."""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from packaging.requirements import Requirement
from packaging.tags import sys_tags
from packaging.utils import canonicalize_name
from packaging.version import InvalidVersion, Version

COMPETITION = "lmsys-chatbot-arena"
# Packages the Kaggle GPU/TPU images lack or ship too old, in one place. peft is bundled even where the
# image has it: an adapter must be loaded by the peft version that saved it (or newer).
KAGGLE_MISSING = ("bitsandbytes", "peft")
DEFAULT_SLUG = "lmsys-utils-wheels"
ADAPTER_SLUG = "lmsys-llama3-lora"
# Meta's Llama-3 8B Instruct on Kaggle Models (owner/model/framework/variation/version); attached as
# /kaggle/input/llama-3/transformers/8b-chat-hf/1, the path the notebooks default to
KAGGLE_MODEL = "metaresearch/llama-3/transformers/8b-chat-hf/1"
TRAIN_OUTPUT = "/kaggle/working/run"  # the training notebook's OUTPUT_DIR; adapter/ lies inside it
DEFAULT_PLATFORM = "manylinux_2_35_x86_64"  # Kaggle's images are Ubuntu 22.04 (glibc 2.35) on x86-64


@dataclass(frozen=True)
class Notebook:
    """One notebook as a Kaggle kernel."""

    file: str
    """File name under notebooks/."""
    slug: str
    """Kernel slug; Kaggle derives it from the title, so the two must agree."""
    title: str
    """Kernel title (5+ characters)."""
    accelerator: str
    """"tpu", "gpu" or "none"."""
    machine_shape: str
    """Kaggle's accelerator name for `kaggle kernels push` ("" for none)."""
    internet: bool
    """Internet on: training downloads from the hub; a submission must run with it off."""
    params: tuple[str, ...] = field(default=())
    """Parameters-cell names the copy sets to the attached sources' mount paths; "CONFIG.field=KEY" sets a key
    of the notebook's CONFIG dict to mount path KEY."""


NOTEBOOKS = (
    Notebook("01_eda.ipynb", "lmsys-01-eda", "LMSYS 01 EDA", "none", "", True, ("TRAIN_CSV", "TOKENIZER")),
    Notebook("02_train_tpu.ipynb", "lmsys-02-train-tpu", "LMSYS 02 Train TPU", "tpu", "TpuV5E8", True,
             ("BUNDLE", "CONFIG.train_path=TRAIN_CSV", "CONFIG.output_dir=OUTPUT_DIR")),
    Notebook("03_inference.ipynb", "lmsys-03-inference", "LMSYS 03 Inference", "gpu", "NvidiaTeslaT4", False,
             ("BUNDLE", "TEST_CSV", "MODEL", "ADAPTER")),
)


def slugify(title: str) -> str:
    """The slug Kaggle makes of a title: lowercase words joined by dashes."""
    return "-".join(re.findall(r"[a-z0-9]+", title.lower()))


def dataset_metadata(user: str, slug: str, title: str) -> dict:
    """`dataset-metadata.json` for `kaggle datasets create -p DIR`."""
    _check_user(user)
    _check_dataset_slug(slug)
    if not 6 <= len(title) <= 50:
        raise ValueError(f"dataset title {title!r} must be 6-50 characters (Kaggle's rule)")
    # the files keep their own licenses (this project: Apache-2.0)
    return {"title": title, "id": f"{user}/{slug}", "licenses": [{"name": "other"}]}


def kernel_metadata(user: str, notebook: Notebook, bundle_slug: str = DEFAULT_SLUG,
                    adapter_slug: str = ADAPTER_SLUG, model: str = KAGGLE_MODEL) -> dict:
    """`kernel-metadata.json` for `kaggle kernels push -p DIR`; `code_file` is the notebook copied next to it."""
    _check_user(user)
    datasets = [f"{user}/{bundle_slug}"] + ([f"{user}/{adapter_slug}"] if notebook.accelerator == "gpu" else [])
    return {
        "id": f"{user}/{notebook.slug}",
        "title": notebook.title,
        "code_file": notebook.file,
        "language": "python",
        "kernel_type": "notebook",
        "is_private": True,
        "enable_gpu": notebook.accelerator == "gpu",
        "enable_tpu": notebook.accelerator == "tpu",
        "enable_internet": notebook.internet,
        "machine_shape": notebook.machine_shape,
        "dataset_sources": datasets,
        "competition_sources": [COMPETITION],
        "kernel_sources": [],
        # training reads the hub id (internet on); EDA's tokenizer and inference's base model come from Kaggle Models
        "model_sources": [] if notebook.accelerator == "tpu" else [model],
    }


def mount_paths(bundle_slug: str = DEFAULT_SLUG, adapter_slug: str = ADAPTER_SLUG,
                model: str = KAGGLE_MODEL) -> dict[str, str]:
    """Where Kaggle mounts each attached source, by notebook parameter name."""
    _, *model_path = model.split("/")  # /kaggle/input/<model>/<framework>/<variation>/<version>, no owner
    return {
        "TRAIN_CSV": f"/kaggle/input/{COMPETITION}/train.csv",
        "TEST_CSV": f"/kaggle/input/{COMPETITION}/test.csv",
        "BUNDLE": f"/kaggle/input/{bundle_slug}",
        "TOKENIZER": "/kaggle/input/" + "/".join(model_path),
        "MODEL": "/kaggle/input/" + "/".join(model_path),
        "OUTPUT_DIR": TRAIN_OUTPUT,
        # the adapter dataset holds the files of the training run's adapter/ folder at its top
        "ADAPTER": f"/kaggle/input/{adapter_slug}",
    }


def write_kaggle_meta(user: str, out_dir, notebooks_dir=None, bundle_slug: str = DEFAULT_SLUG,
                      adapter_slug: str = ADAPTER_SLUG, model: str = KAGGLE_MODEL, force: bool = False) -> dict:
    """Write one folder per notebook (kernel-metadata.json + the notebook) and the bundle and adapter dataset folders.

    Each notebook copy gets an `injected-parameters` cell right after its parameters cell that points its inputs at
    the sources the metadata attaches, so ids, slugs and paths agree. Returns {folder name: folder path}.

    Args:
        notebooks_dir: the project's notebooks/ (default: the checkout this module lives in).
        model: the Kaggle Models source "owner/model/framework/variation/version" of the base model.
        force: replace files that differ from what this writes (default: refuse, naming the file).
    """
    _check_user(user)
    if model.count("/") != 4 or not model.rsplit("/", 1)[1].isdigit():
        raise ValueError(f"--model {model!r} is not a Kaggle Models source: use owner/model/framework/variation/"
                         f"version, e.g. {KAGGLE_MODEL}")
    src = Path(notebooks_dir) if notebooks_dir else Path(__file__).resolve().parents[1] / "notebooks"
    missing = [nb.file for nb in NOTEBOOKS if not (src / nb.file).is_file()]
    if missing:
        raise FileNotFoundError(f"{src} lacks {', '.join(missing)}: run kaggle-meta in a clone of the project "
                                "(the notebooks are not part of the wheel) or pass --notebooks DIR")
    out = Path(out_dir)
    paths = mount_paths(bundle_slug, adapter_slug, model)
    written = {}
    for nb in NOTEBOOKS:
        meta = kernel_metadata(user, nb, bundle_slug, adapter_slug, model)
        notebook = _with_parameters(json.loads((src / nb.file).read_text()),
                                    {p.split("=")[0]: paths[p.split("=")[-1]] for p in nb.params}, src / nb.file)
        folder = out / nb.slug
        _write(folder / "kernel-metadata.json", json.dumps(meta, indent=2) + "\n", force)
        _write(folder / nb.file, json.dumps(notebook, indent=1, ensure_ascii=False) + "\n", force)
        written[nb.slug] = folder
    for name, slug, title in (("bundle", bundle_slug, "lmsys-utils wheels"),
                              ("adapter", adapter_slug, "LMSYS LoRA adapter")):
        meta = dataset_metadata(user, slug, title)
        _write(out / name / "dataset-metadata.json", json.dumps(meta, indent=2) + "\n", force)
        written[name] = out / name
    return written


def _with_parameters(notebook: dict, values: dict, path: Path) -> dict:
    cells = notebook["cells"]
    where = [i for i, c in enumerate(cells) if "parameters" in c.get("metadata", {}).get("tags", [])]
    if len(where) != 1:
        raise ValueError(f"{path}: expected one cell tagged 'parameters', found {len(where)}")
    source = "".join(cells[where[0]]["source"])
    def is_set(name):  # NAME = ... at the top level, or a key of a dict set as `CONFIG = dict(key=...)`
        top, _, key = name.partition(".")
        return bool(re.search(rf"^{top} = ", source, re.M)) and (not key or bool(re.search(rf"^\s+{key}=", source, re.M)))

    unknown = [name for name in values if not is_set(name)]
    if unknown:
        raise ValueError(f"{path}: the parameters cell does not set {', '.join(unknown)}; update "
                         "lmsys_utils.kaggle.NOTEBOOKS to the notebook's parameter names")
    lines = ["# Injected by `python -m lmsys_utils kaggle-meta`: the mount paths of the attached sources"]
    lines += [f"{name} = {json.dumps(value)}" if "." not in name else
              f'{name.split(".")[0]}["{name.split(".")[1]}"] = {json.dumps(value)}' for name, value in values.items()]
    injected = {"cell_type": "code", "execution_count": None, "id": "injected-parameters",
                "metadata": {"tags": ["injected-parameters"]}, "outputs": [], "source": "\n".join(lines) + "\n"}
    for cell in cells:
        if cell["cell_type"] == "code":
            cell["outputs"], cell["execution_count"] = [], None
    cells.insert(where[0] + 1, injected)
    return notebook


def _write(path: Path, text: str, force: bool) -> None:
    if path.is_file() and path.read_text() != text and not force:
        raise FileExistsError(f"{path} exists and differs from what would be written: keep your edits by "
                              "moving it, or pass --force to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def _check_user(user: str) -> None:
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_-]*", user or "") or user == "USERNAME":
        raise ValueError(f"Kaggle user name {user!r} is not valid: pass yours (letters, digits, - or _), "
                         "as in https://www.kaggle.com/NAME")


def _check_dataset_slug(slug: str) -> None:
    if not re.fullmatch(r"[a-z0-9][a-z0-9-]{4,48}[a-z0-9]", slug):
        raise ValueError(f"slug {slug!r} is not a Kaggle dataset slug: use 6-50 lowercase letters, digits "
                         "and dashes, e.g. lmsys-utils-wheels")


# --- the offline bundle --------------------------------------------------------------------------------------


@dataclass
class Bundle:
    """What `build_bundle` wrote and proved."""

    path: Path
    """The folder to upload as a Kaggle dataset."""
    install_line: str
    """The pip line the notebook runs with the dataset attached and internet off."""
    wheels: list[str]
    """File names of the wheels in the folder."""
    dataset_id: str
    """The Kaggle dataset id in its dataset-metadata.json."""
    offline_check: str = ""
    """The offline dry run's result against the image (empty without an image freeze)."""


def install_line(slug: str = DEFAULT_SLUG, packages=KAGGLE_MISSING, exact: bool = False) -> str:
    """The exact command the inference notebook runs (internet off) with the bundle attached.

    Args:
        exact: keep the packages' versions ("peft==0.21.2"): pip upgrades a package the image already has
            only when the line asks for the bundled version.
    """
    names = " ".join(["lmsys-utils", *(p if exact else _name(p) for p in packages)])
    return f"pip install --no-index --find-links /kaggle/input/{slug} {names}"


def build_bundle(out_dir, packages=KAGGLE_MISSING, kaggle_user: str = "USERNAME", slug: str = DEFAULT_SLUG,
                 title: str = "lmsys-utils wheels", project_root=None, image_freeze=None,
                 python_version: str | None = None, platform: str | None = None,
                 target_python: str | None = None) -> Bundle:
    """Write the project's wheel, wheels of `packages`, `dataset-metadata.json` and `INSTALL.txt` to `out_dir`.

    Without `image_freeze`: `packages` only, without their dependencies, for this machine's Python.
    With it: every wheel that lmsys-utils and `packages` need and the image lacks, at versions that fit what
    the image has, for the image's Python and platform; then an offline dry run proves that the install line
    resolves from the bundle plus the image alone.

    Args:
        packages: names (pinned to the version in requirements.txt when it pins them and no image freeze is
            given) or full requirement strings such as "peft==0.21.2"; with an image freeze these are bundled
            even where the image has them (newest version compatible with the rest of the image).
        kaggle_user, slug: the dataset id "kaggle_user/slug" to upload as (`kaggle datasets create -p out_dir`).
        project_root: the source checkout to build from (default: the one this module lives in).
        image_freeze: a `pip list --format=freeze` of the target image, e.g. as `image_freeze()` prints it.
        python_version, platform: the image's, e.g. "3.12" and "manylinux_2_35_x86_64" (default: the
            `# python:` / `# platform:` lines of the freeze file).
        target_python: an interpreter of the image's Python version to run pip with, so that environment
            markers are evaluated for it (default: python3.X on PATH if there is one).
    """
    root = Path(project_root) if project_root else Path(__file__).resolve().parents[1]
    if not (root / "pyproject.toml").is_file():
        raise FileNotFoundError(f"no pyproject.toml in {root}: build the bundle from a clone of the project "
                                "(python -m lmsys_utils bundle, run inside the checkout)")
    _check_dataset_slug(slug)
    # the files keep their own licenses (this project: Apache-2.0)
    metadata = {"title": title, "id": f"{kaggle_user}/{slug}", "licenses": [{"name": "other"}]}
    image = read_freeze(image_freeze) if image_freeze else None
    target = _Target.of(image, python_version, platform, target_python, image_freeze) if image else None
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("*.whl"):  # a rerun must not leave a stale wheel next to the new one
        old.unlink()
    _pip("wheel", "--no-deps", "--wheel-dir", str(out), str(root))
    check = ""
    if image is None:
        specs = [_pin(p, root / "requirements.txt") for p in packages]
        if specs:
            _pip("download", "--no-deps", "--only-binary=:all:", "--dest", str(out), *specs)
        line = install_line(slug, packages)
    else:
        own = next(out.glob("lmsys_utils-*.whl"))
        # the image's packages older than lmsys-utils needs (huggingface_hub 0.24 under >=0.25, say) are bundled too
        named = {canonicalize_name(_name(p)) for p in packages}
        packages = [*packages, *(spec for spec in too_old(own, image) if canonicalize_name(_name(spec)) not in named)]
        pinned = _download_missing(out, own, list(packages), image, target)
        line = install_line(slug, pinned, exact=True)
        check = check_offline(out, ["lmsys-utils", *pinned], image, target)
    metadata = _keep_dataset_id(out / "dataset-metadata.json", metadata, kaggle_user == "USERNAME")
    wheels = sorted(p.name for p in out.glob("*.whl"))
    (out / "INSTALL.txt").write_text(
        f"Attach this dataset to the notebook, then run (internet may be off):\n\n    {line}\n\n"
        f"Wheels: {', '.join(wheels)}\n" + (f"Offline dry run: {check}\n" if check else "") +
        f"Upload: kaggle datasets create -p {out}  (edit the id in dataset-metadata.json first)\n")
    return Bundle(out, line, wheels, metadata["id"], check)


# a bundle cannot replace these: torch_xla X.Y loads only with torch X.Y, and both come with the image's drivers
IMAGE_PAIR = ("torch", "torch-xla", "torch_xla")


def too_old(own_wheel: Path, image: dict) -> list[str]:
    """Requirements that upgrade the image's packages older than lmsys-utils needs (its wheel's metadata), each
    pinned to the declared minimum: the version `make test-min` tests beside the image-era libraries. A newer one
    could break the image's other packages, whose own requirements the offline resolution cannot see (transformers
    4.44 needs huggingface_hub < 1.0). Refuses an image whose torch (or torch_xla) is too old."""
    with zipfile.ZipFile(own_wheel) as wheel:
        meta = next(n for n in wheel.namelist() if n.endswith(".dist-info/METADATA"))
        lines = wheel.read(meta).decode().splitlines()
    requirements = [Requirement(line.split(":", 1)[1]) for line in lines if line.startswith("Requires-Dist:")]
    found = []
    for req in requirements:
        have = image["packages"].get(canonicalize_name(req.name))
        if have is None or (req.marker and "extra" in str(req.marker)) or req.specifier.contains(have, True):
            continue
        if canonicalize_name(req.name) in IMAGE_PAIR:
            raise ValueError(f"the image's {req.name} {have} is older than lmsys-utils needs ({req.specifier}), and "
                             "a bundle cannot replace the image's torch/torch_xla pair: use a newer image")
        floor = next((spec.version for spec in req.specifier if spec.operator in (">=", "~=", "==")), None)
        found.append(f"{req.name}=={floor}" if floor else req.name)
    return found


def _keep_dataset_id(path: Path, metadata: dict, default_user: bool) -> dict:
    """Write the bundle's dataset-metadata.json, keeping one kaggle-meta (or the user) wrote when no user is given."""
    if path.is_file():
        existing = json.loads(path.read_text())
        if existing.get("id") != metadata["id"]:
            if default_user:
                return existing
            raise ValueError(f"{path} names the dataset {existing.get('id')}, not {metadata['id']}: pass the same "
                             "--kaggle-user and --slug as kaggle-meta, or remove the file")
    path.write_text(json.dumps(metadata, indent=2) + "\n")
    return metadata


def read_freeze(path) -> dict:
    """Read a `pip list --format=freeze` file: {"packages": {name: version}, "python": str|None, "platform": ...}.

    `# python: 3.12.11` and `# platform: manylinux_2_35_x86_64` lines (as `image_freeze()` writes them) give
    the image's interpreter; other comments and blank lines are skipped.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image freeze {path} not found: in a notebook on the target image run "
                                "`from lmsys_utils.kaggle import image_freeze; image_freeze()` and save what it prints")
    packages, header = {}, {}
    for number, raw in enumerate(path.read_text().splitlines(), start=1):
        line = raw.strip()
        meta = re.fullmatch(r"#\s*(python|platform):\s*(\S+)", line)
        if meta:
            header[meta.group(1)] = meta.group(2)
            continue
        if not line or line.startswith("#"):
            continue
        match = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)", line)
        if not match:
            raise ValueError(f"{path}, line {number}: {line!r} is not NAME==VERSION; write the freeze with "
                             "`pip list --format=freeze` (plain `pip freeze` writes 'NAME @ file://...' for "
                             "packages installed from local files)")
        try:
            Version(match.group(2))
        except InvalidVersion:
            raise ValueError(f"{path}, line {number}: version {match.group(2)!r} of {match.group(1)} is not a "
                             "PEP 440 version pip can compare; remove the line if lmsys-utils does not need "
                             "that package") from None
        packages[canonicalize_name(match.group(1))] = match.group(2)
    if not packages:
        raise ValueError(f"{path} lists no packages: it must hold the image's `pip list --format=freeze`")
    return {"packages": packages, "python": header.get("python"), "platform": header.get("platform")}


def image_freeze() -> str:
    """Print (and return) this environment's packages, Python version and platform for `bundle --image-freeze`.

    Run it in a notebook on the Kaggle image the bundle is for; copy the output to a file.
    """
    done = subprocess.run([sys.executable, "-m", "pip", "list", "--format=freeze", "--disable-pip-version-check"],
                          capture_output=True, text=True, check=True)
    platform = next(iter(sys_tags())).platform
    text = (f"# python: {sys.version.split()[0]}\n# platform: {platform}\n" + done.stdout)
    print(text, end="")
    return text


def keep_pins(*names: str, path="/tmp/keep-image.txt") -> str:
    """Write pip constraints that pin the image's installed versions of `names` (e.g. its torch/torch_xla pair,
    which a newer torch would break); return the file's path for `pip install -c`."""
    pins = []
    for name in names:
        try:
            pins.append(f"{name}=={importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            continue
    Path(path).write_text("".join(pin + "\n" for pin in pins))
    return str(path)


def pip_install(*args: str) -> None:
    """Run `pip install ARGS` in this interpreter; stop with pip's own error text when it fails.

    For notebook install cells: a failed install ends the cell (and a "run all") here, not at a later import.
    """
    done = subprocess.run([sys.executable, "-m", "pip", "install", "--disable-pip-version-check", *args],
                          capture_output=True, text=True)
    print(done.stdout[-3000:], end="")
    if done.returncode != 0:
        raise RuntimeError(f"pip install {' '.join(args)} failed (exit {done.returncode}):\n"
                           f"{done.stderr.strip()[-4000:]}")


@dataclass(frozen=True)
class _Target:
    python: str  # "3.12"
    full_python: str  # "3.12.11" (or "3.12.0" when only X.Y is known)
    platform: str  # "manylinux_2_35_x86_64"
    interpreter: str | None  # a python3.X to run pip with, so markers are evaluated for it

    @staticmethod
    def of(image, python_version, platform, target_python, freeze_path) -> "_Target":
        full = python_version or image["python"]
        if not full or not re.fullmatch(r"3\.\d+(\.\d+)?", full):
            raise ValueError(f"the image's Python version is unknown ({freeze_path} has no '# python: 3.X' line): "
                             "pass --python-version, e.g. 3.12 for today's TPU image or 3.10 for the 2024 GPU image")
        short = ".".join(full.split(".")[:2])
        platform = platform or image["platform"] or DEFAULT_PLATFORM
        if not re.fullmatch(r"manylinux_2_\d+_(x86_64|aarch64)", platform):
            raise ValueError(f"platform {platform!r}: give a glibc platform tag such as {DEFAULT_PLATFORM}")
        interpreter = target_python or _find_python(short)
        if target_python and _python_version(target_python) != short:
            raise ValueError(f"--target-python {target_python} is not Python {short}")
        return _Target(short, full if full.count(".") == 2 else full + ".0", platform, interpreter)

    def pip_options(self) -> list[str]:
        glibc, arch = re.fullmatch(r"manylinux_2_(\d+)_(\w+)", self.platform).groups()
        # pip does not widen a given manylinux tag to the older glibc versions it implies: list them
        tags = [f"manylinux_2_{minor}_{arch}" for minor in range(int(glibc), 4, -1)]
        tags += [f"manylinux{legacy}_{arch}" for legacy in ("2014", "2010", "1")]
        options = ["--only-binary=:all:", "--python-version", self.python, "--implementation", "cp"]
        for tag in tags:
            options += ["--platform", tag]
        return options

    def environment(self) -> dict:
        arch = "aarch64" if self.platform.endswith("aarch64") else "x86_64"
        return {"python_version": self.python, "python_full_version": self.full_python, "os_name": "posix",
                "sys_platform": "linux", "platform_system": "Linux", "platform_machine": arch,
                "platform_python_implementation": "CPython", "implementation_name": "cpython",
                "implementation_version": self.full_python, "platform_release": "", "platform_version": ""}


def _download_missing(out: Path, own_wheel: Path, packages: list, image: dict, target: _Target) -> list[str]:
    """Resolve lmsys-utils + packages against the image; download what the image lacks. Returns pinned packages."""
    upgrade = {canonicalize_name(_name(p)) for p in packages}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        stubs = _image_stubs(image["packages"], tmp / "image", skip=upgrade)
        constraints = tmp / "image-constraints.txt"
        constraints.write_text("".join(f"{name}=={version}\n" for name, version in stubs.items()))
        # the image's packages resolve only to their stand-ins (a version PyPI cannot have): pip never
        # re-resolves their dependencies from PyPI (a CUDA torch's nvidia-* wheels on a TPU image, say)
        report = _resolve(target, [str(own_wheel), *packages], tmp / "report.json", "--find-links",
                          str(tmp / "image"), "--constraint", str(constraints))
        _check_requirements(report, target, "the bundle's resolution")
        missing = [(i["metadata"]["name"], i["metadata"]["version"]) for i in report
                   if not _from(i, tmp / "image") and canonicalize_name(i["metadata"]["name"]) != "lmsys-utils"]
    if missing:
        _pip("download", "--no-deps", *target.pip_options(), "--dest", str(out),
             *(f"{n}=={v}" for n, v in missing), interpreter=target.interpreter)
    versions = {canonicalize_name(n): v for n, v in missing}
    return [f"{_name(p)}=={versions[canonicalize_name(_name(p))]}" for p in packages]


def check_offline(bundle_dir, requirements: list[str], image: dict, target: _Target) -> str:
    """Dry-run installing `requirements` with no index and no pip configuration for the image's Python and
    platform, the image's packages standing in as installed; raise unless every package resolves from the
    bundle or the image. Returns a one-line summary."""
    bundle_dir = Path(bundle_dir).resolve()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        _image_stubs(image["packages"], tmp / "image")
        report = _resolve(target, requirements, tmp / "report.json", "--no-index", "--find-links", str(bundle_dir),
                          "--find-links", str(tmp / "image"), isolated=True)
        _check_requirements(report, target, "the offline dry run")
        from_bundle, from_image = [], []
        for item in report:
            name, version = item["metadata"]["name"], item["metadata"]["version"]
            if _from(item, tmp / "image"):
                from_image.append(f"{name}=={image['packages'][canonicalize_name(name)]}")
            elif _from(item, bundle_dir):
                from_bundle.append(f"{name}=={version}")
            else:
                raise RuntimeError(f"offline dry run resolved {name}=={version} from "
                                   f"{item['download_info']['url']}, neither the bundle nor the image")
    return (f"Python {target.python} {target.platform}: OK, {len(report)} packages, {len(from_bundle)} from the "
            f"bundle ({', '.join(sorted(from_bundle))}), {len(from_image)} already in the image "
            f"({', '.join(sorted(from_image))})")


def _resolve(target: _Target, requirements: list[str], report_path: Path, *options: str,
             isolated: bool = False) -> list[dict]:
    _pip("install", "--dry-run", "--ignore-installed", "--report", str(report_path), *target.pip_options(),
         "--target", str(report_path.parent / "target"), *options, *requirements, interpreter=target.interpreter,
         isolated=isolated)
    return json.loads(report_path.read_text())["install"]


def _from(item: dict, folder: Path) -> bool:
    """Whether pip's report took this package from a file in `folder`."""
    url = item["download_info"]["url"]
    return url.startswith("file:") and Path(url.removeprefix("file://")).resolve().parent == folder.resolve()


def _check_requirements(report: list[dict], target: _Target, what: str) -> None:
    """Every requirement of every resolved package that applies on the image is met by the resolution.

    pip evaluates environment markers for the Python it runs on, not the --python-version it is given;
    this catches a dependency the image's Python needs that pip skipped (e.g. `tomli; python_version < "3.11"`).
    """
    resolved = {canonicalize_name(i["metadata"]["name"]): Version(i["metadata"]["version"]) for i in report}
    env = target.environment()
    gaps = []
    for item in report:
        extras = item.get("requested_extras") or [""]
        for text in item["metadata"].get("requires_dist") or []:
            req = Requirement(text)
            if req.marker and not any(req.marker.evaluate({**env, "extra": e}) for e in extras):
                continue
            have = resolved.get(canonicalize_name(req.name))
            if have is None or not req.specifier.contains(have, prereleases=True):
                gaps.append(f"{item['metadata']['name']} needs {text} on Python {target.python} "
                            f"(resolved: {have or 'nothing'})")
    if gaps:
        raise RuntimeError(f"{what} misses what the image's Python needs: " + "; ".join(gaps) +
                           f". Run the bundle with a Python {target.python} (python{target.python} on PATH or "
                           "--target-python), so that pip evaluates the markers for it")


def _image_stubs(packages: dict, folder: Path, skip=frozenset()) -> dict:
    """Write an empty wheel per image package (no dependencies: the image is taken as consistent).

    Returns {name: stub version}: the image's version with a local label no index can serve."""
    folder.mkdir(parents=True)
    stubs = {}
    for name, version in packages.items():
        if name in skip or name == "lmsys-utils":
            continue
        stub = version if "+" in version else f"{version}+kaggleimage"
        dist = f"{name.replace('-', '_')}-{stub}"
        with zipfile.ZipFile(folder / f"{dist}-py3-none-any.whl", "w") as whl:
            whl.writestr(f"{dist}.dist-info/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: {stub}\n")
            whl.writestr(f"{dist}.dist-info/WHEEL", "Wheel-Version: 1.0\nGenerator: lmsys-utils\n"
                                                   "Root-Is-Purelib: true\nTag: py3-none-any\n")
            whl.writestr(f"{dist}.dist-info/RECORD", "")
        stubs[name] = stub
    return stubs


def _find_python(version: str) -> str | None:
    path = shutil.which(f"python{version}")
    return path if path and _python_version(path) == version else None


def _python_version(path: str) -> str | None:
    try:
        done = subprocess.run([path, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
                              capture_output=True, text=True, timeout=30)
    except OSError:
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def _name(spec: str) -> str:
    return re.split(r"[<>=!~\[; ]", spec, maxsplit=1)[0]


def _pin(spec: str, requirements: Path) -> str:
    if spec != _name(spec) or not requirements.is_file():
        return spec
    key = spec.lower().replace("_", "-")
    for line in requirements.read_text().splitlines():
        name, _, version = line.split("#")[0].strip().partition("==")
        if name.lower().replace("_", "-") == key and version:
            return f"{spec}=={version.strip()}"
    return spec


def _pip(*args: str, interpreter: str | None = None, isolated: bool = False) -> None:
    """Run pip; `interpreter`: run it inside that Python (markers evaluated for it); `isolated`: without any
    pip configuration (files or PIP_* variables), so no index or find-links of this machine can serve."""
    where = ["--python", interpreter] if interpreter else []
    env = None
    if isolated:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")} | {"PIP_CONFIG_FILE": os.devnull}
    done = subprocess.run([sys.executable, "-m", "pip", *where, *args, "--disable-pip-version-check"],
                          capture_output=True, text=True, env=env)
    if done.returncode != 0:
        # pip explains a conflict on stdout ("The conflict is caused by: ...") and states the error on stderr
        lines = [line for line in (done.stdout + done.stderr).splitlines()
                 if line.strip() and not line.startswith(("WARNING: Location", "Collecting", "  Using cached",
                                                            "  Downloading", "Looking in", "Processing"))]
        raise RuntimeError(f"pip {args[0]} failed (it needs PyPI, and a bundle for an image needs versions that "
                           "fit the image):\n" + "\n".join(lines)[-3000:])
