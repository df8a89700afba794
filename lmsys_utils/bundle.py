"""A folder to upload as a Kaggle dataset so a notebook with internet off can `pip install` this project."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

# Packages the Kaggle GPU/TPU images lack or ship too old, in one place. peft is bundled even where the
# image has it: an adapter must be loaded by the peft version that saved it (or newer).
KAGGLE_MISSING = ("bitsandbytes", "peft")
DEFAULT_SLUG = "lmsys-utils-wheels"


def install_line(slug: str = DEFAULT_SLUG, packages=KAGGLE_MISSING) -> str:
    """The exact command the inference notebook runs (internet off) with the bundle attached."""
    names = " ".join(["lmsys-utils", *(_name(p) for p in packages)])
    return f"pip install --no-index --find-links /kaggle/input/{slug} {names}"


def build_bundle(out_dir, packages=KAGGLE_MISSING, kaggle_user: str = "USERNAME", slug: str = DEFAULT_SLUG,
                 title: str = "lmsys-utils wheels", project_root=None) -> Path:
    """Write the project's wheel, wheels of `packages`, `dataset-metadata.json` and `INSTALL.txt` to `out_dir`.

    Args:
        packages: names (pinned to the version in requirements.txt when it pins them) or full
            requirement strings such as "peft==0.21.2"; wheels only, without their dependencies
            (the Kaggle image has torch, transformers and the rest).
        kaggle_user, slug: the dataset id "kaggle_user/slug" to upload as (`kaggle datasets create -p out_dir`).
        project_root: the source checkout to build from (default: the one this module lives in).
    """
    root = Path(project_root) if project_root else Path(__file__).resolve().parents[1]
    if not (root / "pyproject.toml").is_file():
        raise FileNotFoundError(f"no pyproject.toml in {root}: build the bundle from a clone of the project "
                                "(python -m lmsys_utils bundle, run inside the checkout)")
    if not re.fullmatch(r"[a-z0-9][a-z0-9-]{1,48}[a-z0-9]", slug):
        raise ValueError(f"slug {slug!r} is not a Kaggle dataset slug: use 3-50 lowercase letters, digits "
                         "and dashes, e.g. lmsys-utils-wheels")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("*.whl"):  # a rerun must not leave a stale wheel next to the new one
        old.unlink()
    _pip("wheel", "--no-deps", "--wheel-dir", str(out), str(root))
    specs = [_pin(p, root / "requirements.txt") for p in packages]
    if specs:
        _pip("download", "--no-deps", "--only-binary=:all:", "--dest", str(out), *specs)
    metadata = {"title": title, "id": f"{kaggle_user}/{slug}",
                # the wheels keep their own licenses (this project: Apache-2.0)
                "licenses": [{"name": "other"}]}
    (out / "dataset-metadata.json").write_text(json.dumps(metadata, indent=2) + "\n")
    wheels = sorted(p.name for p in out.glob("*.whl"))
    (out / "INSTALL.txt").write_text(
        f"Attach this dataset to the notebook, then run (internet may be off):\n\n"
        f"    {install_line(slug, packages)}\n\nWheels: {', '.join(wheels)}\n"
        f"Upload: kaggle datasets create -p {out}  (edit the id in dataset-metadata.json first)\n")
    return out


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


def _pip(*args: str) -> None:
    done = subprocess.run([sys.executable, "-m", "pip", *args, "--quiet", "--disable-pip-version-check"],
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"pip {args[0]} failed (building the wheel needs PyPI for setuptools; downloads "
                           f"need PyPI):\n{done.stderr.strip()[-2000:]}")
