"""io.DirectoryLock: one writer per directory, across processes and threads, gone with its holder."""

import os
import signal
import subprocess
import sys
import threading

import pytest

from clipdalle.io import DirectoryLock

HOLD_THEN_FORK = """
import os, sys, time
from clipdalle.io import DirectoryLock
DirectoryLock(sys.argv[1]).acquire()
started, ready = os.pipe()
child = os.fork()  # as a DataLoader starts its workers
if child == 0:
    os.write(ready, b"1")  # the fork handlers have run: a killed parent must not leave the lock to this child
    time.sleep(60)
    os._exit(0)
os.read(started, 1)
print(child, flush=True)
time.sleep(60)
"""


def test_a_killed_holder_leaves_no_lock_behind_even_with_forked_children(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    holder = subprocess.Popen([sys.executable, "-c", HOLD_THEN_FORK, str(tmp_path)], stdout=subprocess.PIPE, env=env)
    child = int(holder.stdout.readline())
    try:
        with pytest.raises(ValueError, match=f"pid {holder.pid}"):
            DirectoryLock(tmp_path).acquire()
        holder.send_signal(signal.SIGKILL)
        holder.wait()
        with DirectoryLock(tmp_path):  # the orphaned child is still running, but holds nothing
            os.kill(child, 0)
    finally:
        os.kill(child, signal.SIGKILL)


def test_the_holding_thread_may_take_it_again_another_thread_may_not(tmp_path):
    with DirectoryLock(tmp_path, "build an index"):
        with DirectoryLock(tmp_path):  # e.g. a sync that calls Index.add
            pass
        errors = []

        def second_writer():
            try:
                DirectoryLock(tmp_path).acquire()
            except ValueError as error:
                errors.append(str(error))

        thread = threading.Thread(target=second_writer)
        thread.start()
        thread.join()
        assert len(errors) == 1 and f"pid {os.getpid()}" in errors[0]
    DirectoryLock(tmp_path).acquire().release()
