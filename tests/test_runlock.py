"""One trainer per run.dir (fmtrain/runlock.py): the lock, and what a failed start takes back."""
import os

import pytest

from fmtrain.runlock import LOCK_FILE, RunDirInUse, RunLock


def test_a_failed_start_takes_back_only_what_it_made(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "notes.txt").write_text("mine")
    lock = RunLock(run)
    lock.acquire()
    assert (run / LOCK_FILE).read_text().startswith(f"pid {os.getpid()} ")
    lock.release(failed_start=True)  # the folder existed: it stays, without the lock file this start made
    assert sorted(p.name for p in run.iterdir()) == ["notes.txt"]
    (run / LOCK_FILE).write_text("pid 1 on elsewhere since then\n")  # an earlier run's lock file stays
    lock = RunLock(run)
    lock.acquire()
    lock.release(failed_start=True)
    assert sorted(p.name for p in run.iterdir()) == [LOCK_FILE, "notes.txt"]
    new = tmp_path / "a" / "b"  # folders the lock made go, parents included
    lock = RunLock(new)
    lock.acquire()
    lock.release(failed_start=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]
    lock = RunLock(new)  # a run that started keeps its folder and lock file
    lock.acquire()
    lock.release()
    assert [p.name for p in new.iterdir()] == [LOCK_FILE]
    (new / LOCK_FILE).unlink()
    lock = RunLock(new)  # a run that failed after writing (a full disk at its second checkpoint) too
    lock.acquire()
    (new / "step_00000003").mkdir()
    lock.release(failed_start=True)
    assert sorted(p.name for p in new.iterdir()) == [LOCK_FILE, "step_00000003"]


def test_a_second_trainer_is_refused_until_the_first_lets_go(tmp_path):
    first, second = RunLock(tmp_path), RunLock(tmp_path)
    first.acquire()
    with pytest.raises(RunDirInUse, match=f"in use by another trainer \\(pid {os.getpid()} on "):
        second.acquire()
    first.release(failed_start=True)  # removes the lock file it made, under the lock
    second.acquire()  # a new lock file: the one every later trainer opens
    assert second.made_file and os.fstat(second.fd).st_ino == os.stat(tmp_path / LOCK_FILE).st_ino
    with pytest.raises(RunDirInUse):
        RunLock(tmp_path).acquire()
    second.release()
