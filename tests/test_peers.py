"""Identifying a local client's process by pid and start time."""

from __future__ import annotations

import subprocess
import sys

from vitserve.ipc.peers import own_identity, process_start, still_running


def test_this_process_is_identified_and_running():
    pid, start = own_identity()
    assert start > 0
    assert still_running(pid, start)
    assert not still_running(pid, start + 1)  # same pid, another process (a reused pid)


def test_an_exited_process_is_not_running():
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    start = process_start(child.pid)
    assert start is not None and still_running(child.pid, start)
    child.kill()
    child.wait()
    assert not still_running(child.pid, start)


RENAMED = """
import ctypes, sys, time
ctypes.CDLL(None).prctl(15, b"odd) (name", 0, 0, 0)  # PR_SET_NAME: the command name in /proc/<pid>/stat
print("renamed", flush=True)
time.sleep(30)
"""


def test_a_command_name_with_spaces_and_parentheses_is_parsed():
    """The start time is found after the last ")" of the command name (field 2)."""
    child = subprocess.Popen([sys.executable, "-c", RENAMED], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "renamed"
        with open(f"/proc/{child.pid}/stat") as stat:
            assert "(odd) (name)" in stat.read()
        start = process_start(child.pid)
        assert start is not None and start > 0 and still_running(child.pid, start)
    finally:
        child.kill()
        child.wait()


def test_no_such_process():
    assert process_start(2**22 + 12345) is None
