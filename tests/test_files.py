import errno
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from lmsys_utils.files import (
    SUBMISSION_HEADER, OutputError, RunLock, RunLockedError, atomic_write, check_output_dir, check_output_file,
    clean_stale_tmp,
)

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def mount_tmpfs(tmp_path):
    """Mount a real tmpfs (read-only, or tiny to fill it) so EROFS and ENOSPC come from the kernel, not a mock."""
    mounted = []

    def mount(options):
        target = tmp_path / f"mnt{len(mounted)}"
        target.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(target)], capture_output=True)
        if done.returncode:
            pytest.skip(f"cannot mount a tmpfs here ({done.stderr.decode().strip()}): needs root where mount works")
        mounted.append(target)
        return target

    yield mount
    for target in mounted:
        subprocess.run(["umount", str(target)], check=True)


def _as_nobody(fn):
    """Run fn() in a forked child with uid/gid 65534, so permission checks apply (root bypasses chmod);
    return what it raised as (type name, message), or None."""
    if os.geteuid() != 0:
        pytest.skip("needs root to switch to an unprivileged user")
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        os.close(read)
        try:
            os.setgid(65534)
            os.setuid(65534)
            fn()
            result = "none"
        except BaseException as e:  # noqa: BLE001 - reported to the parent
            result = f"{type(e).__name__}\n{e}"
        os.write(write, result.encode())
        os._exit(0)
    os.close(write)
    with os.fdopen(read) as f:
        result = f.read()
    os.waitpid(pid, 0)
    return None if result == "none" else tuple(result.split("\n", 1))


# --- check_output_file ---

def test_a_directory_is_refused_as_an_output_file(tmp_path):
    with pytest.raises(OutputError, match=r"is a directory; give a file path such as .*submission.csv"):
        check_output_file(tmp_path)


def test_an_input_is_refused_as_the_output(tmp_path):
    data = tmp_path / "test.csv"
    data.write_text("id,prompt,response_a,response_b\n")
    for out in (data, tmp_path / "." / "test.csv"):
        with pytest.raises(OutputError, match=r"is also an input"):
            check_output_file(out, inputs=[data])
    link = tmp_path / "link.csv"
    link.symlink_to(data)
    with pytest.raises(OutputError, match=r"is also an input"):
        check_output_file(link, inputs=[data])


def test_an_existing_file_that_is_not_a_submission_is_refused(tmp_path):
    notes = tmp_path / "notes.csv"
    notes.write_text("id,prompt,response_a,response_b\n1,x,y,z\n")
    with pytest.raises(OutputError, match=r"exists and is not a submission \(its first line is 'id,prompt"):
        check_output_file(notes)
    sub = tmp_path / "submission.csv"
    sub.write_text(SUBMISSION_HEADER + "\r\n1,0.2,0.3,0.5\r\n")
    assert check_output_file(sub) == sub  # an earlier submission may be replaced
    (tmp_path / "empty.csv").touch()
    check_output_file(tmp_path / "empty.csv")
    with pytest.raises(OutputError, match="exists and is not to be replaced"):
        check_output_file(sub, kind=None)


def test_a_file_in_the_way_of_the_folder_is_refused(tmp_path):
    (tmp_path / "runs").write_text("x")
    with pytest.raises(OutputError, match=r"runs is a file, so the folder .*runs/a cannot be created"):
        check_output_file(tmp_path / "runs" / "a" / "submission.csv")


def test_a_read_only_location_is_refused_before_any_work(mount_tmpfs):
    ro = mount_tmpfs("ro,size=1m")
    with pytest.raises(OutputError, match=r"cannot write to .*mnt0 \(Read-only file system\)"):
        check_output_file(ro / "submission.csv")
    with pytest.raises(OutputError, match=r"cannot write to .*mnt0/run \(Read-only file system\)"):
        check_output_dir(ro / "run")


def test_a_folder_without_write_permission_is_refused():
    folder = Path(tempfile.mkdtemp(dir="/tmp"))
    try:
        folder.chmod(0o755)  # root's; others may enter but not write
        raised = _as_nobody(lambda: check_output_file(folder / "submission.csv"))
        assert raised is not None and raised[0] == "OutputError", raised
        assert f"cannot write to {folder} (Permission denied)" in raised[1]
    finally:
        folder.rmdir()


# --- check_output_dir ---

def test_a_folder_holding_another_run_is_refused_unless_resume_or_overwrite(tmp_path):
    run = tmp_path / "run"
    check_output_dir(run)  # new: fine, and nothing is created yet
    assert not run.exists()
    run.mkdir()
    (run / "notes.txt").write_text("mine")
    check_output_dir(run)  # a folder with unrelated files holds no run
    (run / "checkpoints").mkdir()
    (run / "history.json").write_text("{}")
    with pytest.raises(OutputError, match=r"holds another run \(checkpoints, history.json\); set resume=true"):
        check_output_dir(run)
    assert check_output_dir(run, resume=True) == run and check_output_dir(run, overwrite=True) == run
    with pytest.raises(OutputError, match="contradict"):
        check_output_dir(run, resume=True, overwrite=True)


def test_a_file_where_the_output_folder_should_be_is_refused(tmp_path):
    (tmp_path / "run").write_text("x")
    with pytest.raises(OutputError, match=r"run is a file, but a folder is needed"):
        check_output_dir(tmp_path / "run")


# --- atomic_write ---

def test_atomic_write_gives_normal_permissions_and_keeps_a_replaced_files_mode(tmp_path):
    old_umask = os.umask(0o022)
    try:
        with atomic_write(tmp_path / "a.csv") as f:
            f.write("x\n")
        assert (tmp_path / "a.csv").stat().st_mode & 0o777 == 0o644
        (tmp_path / "a.csv").chmod(0o600)
        with atomic_write(tmp_path / "a.csv") as f:
            f.write("y\n")
        assert (tmp_path / "a.csv").stat().st_mode & 0o777 == 0o600 and (tmp_path / "a.csv").read_text() == "y\n"
    finally:
        os.umask(old_umask)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.csv"]


def test_atomic_write_leaves_the_old_file_when_the_block_fails(tmp_path):
    path = tmp_path / "a.csv"
    path.write_text("old\n")
    with pytest.raises(RuntimeError):
        with atomic_write(path) as f:
            f.write("half")
            raise RuntimeError("model crashed")
    assert path.read_text() == "old\n" and sorted(p.name for p in tmp_path.iterdir()) == ["a.csv"]


def test_a_full_disk_names_the_file_and_leaves_nothing_partial(mount_tmpfs):
    disk = mount_tmpfs("size=64k")
    path = disk / "submission.csv"
    path.write_text("old\n")
    with pytest.raises(OSError) as e:
        with atomic_write(path) as f:
            f.write("0.333333," * 100_000)  # ~900 kB into 64 kB
    assert e.value.errno == errno.ENOSPC and e.value.filename == str(path)
    assert path.read_text() == "old\n" and sorted(p.name for p in disk.iterdir()) == ["submission.csv"]


def test_writing_onto_a_read_only_mount_names_the_file(mount_tmpfs):
    ro = mount_tmpfs("ro,size=1m")
    with pytest.raises(OSError) as e:
        with atomic_write(ro / "submission.csv") as f:
            f.write("x")
    assert e.value.errno == errno.EROFS and str(ro) in str(e.value.filename)


# --- RunLock ---

def test_a_second_run_into_a_locked_folder_is_refused_naming_the_holder(tmp_path):
    with RunLock(tmp_path / "run"):
        with pytest.raises(RunLockedError, match=rf"in use by another run \(pid {os.getpid()} on "
                                                 rf"{socket.gethostname()} since "):
            with RunLock(tmp_path / "run"):
                pass
    with RunLock(tmp_path / "run"):  # released at the end of the block
        pass
    check_output_dir(tmp_path / "run")  # the lock file is no run


def test_the_lock_of_another_process_is_seen_and_released_when_it_dies(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from lmsys_utils.files import RunLock; "
                               "lock = RunLock(sys.argv[1]).__enter__(); print('locked', flush=True); time.sleep(60)",
         str(tmp_path / "run")],
        stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunLockedError, match=rf"pid {holder.pid} on "):
            with RunLock(tmp_path / "run"):
                pass
    finally:
        holder.kill()
        holder.wait()
    with RunLock(tmp_path / "run"):  # the killed run left no stale lock
        pass


# --- clean_stale_tmp ---

def test_leftovers_of_failed_checkpoint_writes_are_removed_and_counted(tmp_path, capsys):
    ckpt = tmp_path / "checkpoints"
    (ckpt / ".tmp-step-0000200" / "adapter").mkdir(parents=True)
    (ckpt / ".tmp-step-0000300").mkdir()
    (ckpt / "step-0000100").mkdir()
    assert clean_stale_tmp(ckpt) == 2
    assert [p.name for p in ckpt.iterdir()] == ["step-0000100"]
    assert "removed 2 unfinished checkpoint write(s)" in capsys.readouterr().err
    assert clean_stale_tmp(ckpt) == 0 and clean_stale_tmp(tmp_path / "none") == 0
