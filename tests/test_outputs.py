"""Outputs and interruption (issue 13): nothing lost, nothing left behind, every refusal one line.

Tables of output cases run the CLI in this process (refused outputs, faults while writing, states a
killed run leaves); the kill test runs `merge`, `quantize` and `convert` as their own processes and
SIGKILLs or SIGTERMs them at seeded random points. Those processes are forked from a multiprocessing
forkserver that imported adaptkit and torch once, so a run costs a fraction of a second, not the
three seconds of a fresh interpreter.
"""
from __future__ import annotations

import errno
import hashlib
import multiprocessing
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from contextlib import ExitStack
from pathlib import Path

import pytest

from adaptkit.errors import AdaptkitError
from adaptkit.io.outputs import Terminated, atomic_output, beside, recover_output
from adaptkit.io.writer import copy_side_files
from hostile import assert_one_line_error, leftovers, run_cli

MERGE = ["--quiet", "merge", "--method", "average", "-m", "{t}/model", "-m", "{t}/model"]
QUANTIZE = ["--quiet", "quantize", "{t}/model", "--method", "int8"]
CONVERT = ["--quiet", "convert", "{t}/lora", "--to", "peft"]
EXTRACT = ["--quiet", "extract", "--model", "{t}/model", "--base", "{t}/model", "--rank", "2"]


def tree(folder: Path) -> dict[str, str]:
    """Every path under `folder` -> its bytes' sha256 ("dir" for folders, "link" for links)."""
    found = {}
    for path in sorted(Path(folder).rglob("*")):
        rel = str(path.relative_to(folder))
        if path.is_symlink():
            found[rel] = "link"
        elif path.is_dir():
            found[rel] = "dir"
        else:
            found[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return found


def locks(folder: Path) -> list[str]:
    return sorted(p.name for p in Path(folder).iterdir() if p.name.endswith(".adaptkit.lock"))


def fill(args: list[str], t: Path) -> list[str]:
    return [a.format(t=t) for a in args]


@pytest.fixture
def work(tmp_path, llama_dir, peft_lora_dir) -> Path:
    """A folder holding the inputs (`model`, `lora`) of the runs, copied so no test can touch the originals."""
    shutil.copytree(llama_dir, tmp_path / "model")
    shutil.copytree(peft_lora_dir, tmp_path / "lora")
    return tmp_path


# -- builders of the states a case starts from -------------------------------------------------------
def nothing(t: Path, stack: ExitStack) -> None:
    pass


def a_file(t: Path, stack: ExitStack) -> None:
    (t / "file").write_text("not a folder")


def a_link_into_the_model(t: Path, stack: ExitStack) -> None:
    (t / "link").symlink_to(t / "model")


def an_old_output(t: Path, stack: ExitStack) -> None:
    shutil.copytree(t / "model", t / "out")


def set_aside_only(t: Path, stack: ExitStack) -> None:
    """A run killed between setting the old output aside and renaming the new one in."""
    shutil.copytree(t / "model", beside(t / "out", "old"))


HOLD = ("import fcntl, os, sys; fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT); "
        "fcntl.flock(fd, fcntl.LOCK_EX); print('locked', flush=True); sys.stdin.read()")


def another_run_writing(t: Path, stack: ExitStack) -> None:
    """Another process holds the output's lock for as long as the case runs."""
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(beside(t / "out", "lock"))], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    stack.callback(holder.wait)
    stack.callback(holder.stdin.close)
    assert holder.stdout.readline() == "locked\n"


REFUSED = [  # (id, builder, command, expected fragment): one line, exit 1, nothing created or lost
    ("merge-output-inside-input", nothing, MERGE + ["-o", "{t}/model/merged"], "inside the input {t}/model"),
    ("quantize-output-inside-input", nothing, QUANTIZE + ["-o", "{t}/model/q"], "inside the input {t}/model"),
    ("convert-output-inside-input", nothing, CONVERT + ["-o", "{t}/lora/peft"], "inside the input {t}/lora"),
    ("merge-output-inside-input-through-link", a_link_into_the_model, MERGE + ["-o", "{t}/link/merged"],
     "inside the input {t}/model"),
    ("merge-output-is-input-force", nothing, MERGE + ["-o", "{t}/model", "--force"], "this is the input {t}/model"),
    ("convert-output-is-input-force", nothing, CONVERT + ["-o", "{t}/lora", "--force"], "this is the input {t}/lora"),
    ("extract-output-is-input-force", nothing, EXTRACT + ["-o", "{t}/model", "--force"], "this is the input {t}/model"),
    ("merge-force-on-parent-of-inputs", nothing, MERGE + ["-o", "{t}", "--force"], "holds the input {t}/model"),
    ("quantize-force-on-parent-of-input", nothing, QUANTIZE + ["-o", "{t}", "--force"], "holds the input {t}/model"),
    ("convert-force-on-parent-of-input", nothing, CONVERT + ["-o", "{t}", "--force"], "holds the input {t}/lora"),
    ("merge-parent-is-a-file", a_file, MERGE + ["-o", "{t}/file/out"], "{t}/file is a file, not a folder"),
    ("quantize-grandparent-is-a-file", a_file, QUANTIZE + ["-o", "{t}/file/sub/q"], "{t}/file is a file, not a folder"),
    ("convert-parent-is-a-file", a_file, CONVERT + ["-o", "{t}/file/p"], "{t}/file is a file, not a folder"),
    ("merge-second-concurrent-writer", another_run_writing, MERGE + ["-o", "{t}/out", "--force"],
     "{t}/out: another adaptkit run is writing this output"),
    ("quantize-second-concurrent-writer", another_run_writing, QUANTIZE + ["-o", "{t}/out"],
     "{t}/out: another adaptkit run is writing this output"),
    ("convert-second-concurrent-writer", another_run_writing, CONVERT + ["-o", "{t}/out"],
     "{t}/out: another adaptkit run is writing this output"),
    ("merge-output-exists", an_old_output, MERGE + ["-o", "{t}/out"], "output already exists"),
]


@pytest.mark.parametrize("build, command, fragment", [r[1:] for r in REFUSED], ids=[r[0] for r in REFUSED])
def test_refused_outputs(work, build, command, fragment):
    with ExitStack() as stack:
        build(work, stack)
        before = tree(work)
        result = run_cli(*fill(command, work))
        assert_one_line_error(result, fragment.format(t=work))
        assert tree(work) == before  # nothing written, deleted or left behind


# -- faults while writing --------------------------------------------------------------------------
def disk_full(monkeypatch) -> None:
    def pwrite(fd, data, offset):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # as the kernel says it: no file name

    monkeypatch.setattr(os, "pwrite", pwrite)


def disk_full_on_side_files(monkeypatch) -> None:
    def copyfile(src, dst, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(shutil, "copyfile", copyfile)


def read_only_folder(monkeypatch) -> None:
    """The output's folder cannot be written (chmod does not stop root, who runs these tests)."""
    os_open = os.open

    def failing(path, flags, *args, **kwargs):
        if str(path).endswith(".adaptkit.lock") and flags & os.O_CREAT:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return os_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", failing)


def final_rename_fails(monkeypatch) -> None:
    rename = Path.rename

    def failing(self, target):
        if self.name.endswith(".adaptkit.tmp"):
            raise OSError(errno.EBUSY, os.strerror(errno.EBUSY), str(self), str(target))
        return rename(self, target)

    monkeypatch.setattr(Path, "rename", failing)


FAULTS = [  # (id, fault, command, expected fragment): one line, the old output intact, nothing left behind
    ("merge-disk-full", disk_full, MERGE, "{t}/out: cannot write model.safetensors: No space left on device"),
    ("quantize-disk-full", disk_full, QUANTIZE, "{t}/out: cannot write model.safetensors: No space left on device"),
    ("convert-disk-full", disk_full, CONVERT, "{t}/out: cannot write adapter_model.safetensors: No space left"),
    ("merge-disk-full-on-side-files", disk_full_on_side_files, MERGE,
     "{t}/out: cannot write the output: No space left on device"),
    ("merge-read-only-folder", read_only_folder, MERGE, "{t}/out: cannot create the output: Read-only file system"),
    ("quantize-read-only-folder", read_only_folder, QUANTIZE, "{t}/out: cannot create the output: Read-only file"),
    ("merge-final-rename-fails", final_rename_fails, MERGE,
     "{t}/out: cannot move the finished output into place: Device or resource busy"),
    ("quantize-final-rename-fails", final_rename_fails, QUANTIZE, "cannot move the finished output into place"),
    ("convert-final-rename-fails", final_rename_fails, CONVERT, "cannot move the finished output into place"),
]


@pytest.mark.parametrize("fault, command, fragment", [r[1:] for r in FAULTS], ids=[r[0] for r in FAULTS])
def test_faults_while_writing(work, monkeypatch, fault, command, fragment):
    an_old_output(work, ExitStack())
    old = tree(work / "out")
    with monkeypatch.context() as patch:
        fault(patch)
        result = run_cli(*fill(command, work), "-o", work / "out", "--force")
    assert_one_line_error(result, fragment.format(t=work))
    assert tree(work / "out") == old
    assert leftovers(work) == [] and locks(work) == []


# -- what a killed run left, and the next command ------------------------------------------------------
def stale_temporary_folder(t: Path, stack: ExitStack) -> None:
    """A run SIGKILLed while writing: its temporary folder and its (no longer held) lock file."""
    tmp = beside(t / "out", "tmp")
    tmp.mkdir()
    (tmp / "model.safetensors").write_bytes(b"\0" * 4096)
    beside(t / "out", "lock").touch()


def old_and_new(t: Path, stack: ExitStack) -> None:
    """A run killed after renaming its output in, before deleting the old one it had set aside."""
    shutil.copytree(t / "model", t / "out")
    shutil.copytree(t / "lora", beside(t / "out", "old"))


INSPECT = ["--quiet", "inspect", "{t}/out"]
RECOVERY = [  # (id, builder, command, expected fragment or None for success, what `out` holds afterwards)
    ("stale-temp-folder-merge", stale_temporary_folder, MERGE + ["-o", "{t}/out"], None, "new"),
    ("stale-temp-folder-quantize", stale_temporary_folder, QUANTIZE + ["-o", "{t}/out"], None, "new"),
    ("stale-temp-folder-convert", stale_temporary_folder, CONVERT + ["-o", "{t}/out"], None, "new"),
    ("set-aside-restored-by-inspect", set_aside_only, INSPECT, None, "old"),
    ("set-aside-restored-by-next-run", set_aside_only, MERGE + ["-o", "{t}/out"], "output already exists", "old"),
    ("set-aside-replaced-by-next-run-force", set_aside_only, QUANTIZE + ["-o", "{t}/out", "--force"], None, "new"),
    ("old-removed-by-inspect", old_and_new, INSPECT, None, "model"),
    ("old-removed-by-next-run-force", old_and_new, CONVERT + ["-o", "{t}/out", "--force"], None, "new"),
]


@pytest.mark.parametrize("build, command, fragment, holds", [r[1:] for r in RECOVERY], ids=[r[0] for r in RECOVERY])
def test_recovery_after_a_killed_run(work, build, command, fragment, holds):
    build(work, ExitStack())
    expected = {"old": tree(beside(work / "out", "old")) if holds == "old" else None, "model": tree(work / "model")}
    result = run_cli(*fill(command, work))
    if fragment is None:
        assert result.exit_code == 0, result.output + result.stderr
    else:
        assert_one_line_error(result, fragment)
    if holds == "new":
        assert any(name.endswith(".safetensors") for name in tree(work / "out"))
    else:
        assert tree(work / "out") == expected[holds]
    assert leftovers(work) == [] and locks(work) == []


def test_recover_output_leaves_a_folder_another_run_is_writing(work):
    set_aside_only(work, ExitStack())
    with ExitStack() as stack:
        another_run_writing(work, stack)
        recover_output(work / "out")
        assert not (work / "out").exists() and leftovers(work) == [".out.adaptkit.old"]
    recover_output(work / "out")
    assert tree(work / "out") == tree(work / "model") and leftovers(work) == []


def test_training_output_is_checked_against_its_inputs(work):
    from adaptkit.train import checkpoint
    from adaptkit.errors import AdaptkitError

    data = work / "data.jsonl"
    data.write_text('{"text": "x"}\n')
    with pytest.raises(AdaptkitError, match="this is the input"), ExitStack() as hold:
        checkpoint.lock_output(work / "model", hold, inputs=[work / "model", data, None])
    with pytest.raises(AdaptkitError, match="holds the input"), ExitStack() as hold:
        checkpoint.lock_output(work, hold, inputs=["org/name", data])
    assert not checkpoint.work_folder(work / "model").exists() and leftovers(work) == []


# -- signals ---------------------------------------------------------------------------------------
def test_sigterm_cleans_up_like_ctrl_c_and_restores_the_handler(tmp_path):
    if signal.getsignal(signal.SIGTERM) != signal.SIG_DFL:
        pytest.skip("this test process handles SIGTERM itself")
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(Terminated):
        with atomic_output(out, force=True) as tmp:
            (tmp / "new.txt").write_text("new")
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the handler raises before this returns
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    assert tree(out) == {"old.txt": hashlib.sha256(b"old").hexdigest()}
    assert leftovers(tmp_path) == [] and locks(tmp_path) == []


def test_an_applications_own_sigterm_handler_is_kept(tmp_path):
    seen = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: seen.append(signum))
    try:
        with atomic_output(tmp_path / "out") as tmp:
            os.kill(os.getpid(), signal.SIGTERM)
            (tmp / "a.txt").write_text("a")
        assert seen == [signal.SIGTERM] and (tmp_path / "out" / "a.txt").is_file()
        assert signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_copy_side_files_skips_sub_folders(tmp_path):
    source, dest = tmp_path / "model", tmp_path / "dest"
    (source / "checkpoints" / "step-1").mkdir(parents=True)
    (source / "checkpoints" / "step-1" / "state.json").write_text("{}")
    (source / "config.json").write_text("{}")
    os.mkfifo(source / "pipe")
    dest.mkdir()
    assert copy_side_files(source, dest) == ["config.json"]
    assert sorted(p.name for p in dest.iterdir()) == ["config.json"]


def test_copy_side_files_refuses_a_link_out_of_the_input(tmp_path):
    source, dest = tmp_path / "model", tmp_path / "dest"
    source.mkdir()
    dest.mkdir()
    (tmp_path / "secret").write_text("not for the output")
    (source / "tokenizer.json").symlink_to(tmp_path / "secret")
    with pytest.raises(AdaptkitError, match="tokenizer.json: links to .*secret, outside .*model; refused"):
        copy_side_files(source, dest)
    assert list(dest.iterdir()) == []


# -- kill test -------------------------------------------------------------------------------------
KILLED = {  # command -> (input folder copied as the old output, arguments)
    "merge": ("model", MERGE),
    "quantize": ("model", QUANTIZE),
    "convert": ("lora", CONVERT),
}
#: (signal, when): a random moment of the whole run, or a random moment of up to `when` seconds after
#: the temporary folder appears (the tiny models' writing takes milliseconds)
POINTS = [(signal.SIGKILL, None), (signal.SIGTERM, None), (signal.SIGKILL, 0.01), (signal.SIGTERM, 0.01),
          (signal.SIGKILL, 0.001), (signal.SIGTERM, 0.001)]


def _cli_child(args: list[str], log: str) -> None:
    """A forked run of `adaptkit ARGS`, its output into `log`."""
    import threading

    from tqdm import tqdm

    from adaptkit.cli import cli

    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    tqdm.set_lock(threading.RLock())  # not tqdm's multiprocessing lock, which a killed run would leak

    cli.main(args=args, prog_name="adaptkit")


@pytest.fixture(scope="module")
def forkserver():
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["adaptkit.cli", "adaptkit.merge", "adaptkit.quant.quantize", "adaptkit.files.convert"])
    return context


def _start(forkserver, args: list[str], log: Path):
    process = forkserver.Process(target=_cli_child, args=(args, str(log)))
    process.start()
    return process


def _finish(process) -> int:
    process.join(60)
    assert process.exitcode is not None, "the run hung"
    return process.exitcode


@pytest.mark.parametrize("command", sorted(KILLED))
def test_kill_at_random_points(work, forkserver, command):
    source, args = KILLED[command]
    args, out, log = fill(args, work), work / "out", work / "run.log"
    assert _finish(_start(forkserver, args + ["-o", str(work / "ref")], log)) == 0, log.read_text()
    new = tree(work / "ref")
    started = time.perf_counter()  # a warm run: how long the random points may range over; same bytes again
    assert _finish(_start(forkserver, args + ["-o", str(work / "ref"), "--force"], log)) == 0, log.read_text()
    took = time.perf_counter() - started
    assert tree(work / "ref") == new
    shutil.copytree(work / source, work / "old")
    old = tree(work / "old")
    rng = random.Random(f"issue-13-{command}")
    for sig, within in POINTS:
        shutil.rmtree(out, ignore_errors=True)
        shutil.copytree(work / "old", out)
        process = _start(forkserver, args + ["-o", str(out), "--force"], log)
        if within is None:
            time.sleep(rng.uniform(0, took))
        else:
            while process.is_alive() and not leftovers(work):  # until the temporary folder appears
                time.sleep(0.0002)
            time.sleep(rng.uniform(0, within))
        if process.is_alive():
            os.kill(process.pid, sig)
        _finish(process)
        what = f"{command}: {signal.Signals(sig).name} at a random point " + ("of the run" if within is None else
                                                                            f"within {within} s of writing")
        assert tree(out) in (old, new), f"{what}: the output is neither the old one nor the new one"
        if sig == signal.SIGTERM:
            assert leftovers(work) == [] and locks(work) == [], f"{what} left {leftovers(work) + locks(work)}"
        code = _finish(_start(forkserver, args + ["-o", str(out), "--force"], log))
        assert code == 0, f"the run after {what}: {log.read_text()[-2000:]}"
        assert tree(out) == new and leftovers(work) == [] and locks(work) == [], what


def test_a_second_training_on_the_same_output_fails_in_one_line(tmp_path):
    """`train` holds its output's lock for the whole run (its run folder would be shared otherwise)."""
    from adaptkit.io.outputs import output_lock
    from text_models import counting, llama_dir, write_jsonl

    base, data = llama_dir(tmp_path / "llama"), write_jsonl(tmp_path / "d.jsonl", counting(4))
    out = tmp_path / "adapter"
    with output_lock(out):  # as a first run in progress holds it
        result = run_cli("train", "--base", base, "--variant", "lora", "--data", data, "-o", out, "--max-steps", "1")
        assert_one_line_error(result, f"{out}: another adaptkit run is writing this output")
    assert not out.exists() and not (tmp_path / ".adapter.training").exists()
    assert run_cli("train", "--base", base, "--variant", "lora", "--data", data, "-o", out, "--max-steps", "1",
                   "--quiet").exit_code == 0
    assert (out / "adapter_config.json").is_file() and leftovers(tmp_path) == []
