"""Mechanisms whose process misbehaves on purpose (``imports: [tests.faulty_processes]``): they exit, kill
themselves, crash, start subprocesses or raise enormous messages, to check how the runner records each."""

import ctypes
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import attentions
from tests.faulty_mechanisms import _Base


@attentions.register("test_sys_exit")
class SysExit(_Base):
    """Calls sys.exit(0) in forward (a plug-in that thinks it is a script)."""

    def forward(self, x):
        sys.exit(0)


@attentions.register("test_vanishes")
class Vanishes(_Base):
    """Says something on stderr, then ends its process with os._exit(0): no result, no exception."""

    def forward(self, x):
        print("about to vanish without a result", file=sys.stderr, flush=True)
        os._exit(0)


@attentions.register("test_self_kill")
class SelfKill(_Base):
    """Sends SIGKILL to its own process (what the OOM killer, or a user, would do)."""

    def forward(self, x):
        os.kill(os.getpid(), signal.SIGKILL)


@attentions.register("test_segfault")
class Segfault(_Base):
    """Reads address 0."""

    def forward(self, x):
        ctypes.string_at(0)


@attentions.register("test_huge_message")
class HugeMessage(_Base):
    """Raises an exception whose message is 5 MB on one line."""

    def forward(self, x):
        raise RuntimeError("x" * 5_000_000)


@attentions.register("test_spawns_sleeper")
class SpawnsSleeper(_Base):
    """Starts a ``sleep`` subprocess, writes 'WORKER_PID SLEEPER_PID' to $ATTNBENCH_TEST_PID_FILE, then sleeps."""

    def forward(self, x):
        sleeper = subprocess.Popen(["sleep", "300"])
        Path(os.environ["ATTNBENCH_TEST_PID_FILE"]).write_text(f"{os.getpid()} {sleeper.pid}")
        time.sleep(300)
        return self.proj(x)


@attentions.register("test_leaves_child")
class LeavesChild(_Base):
    """Starts a ``sleep`` subprocess in every forward and returns, leaving it running; writes the pids to
    $ATTNBENCH_TEST_PID_FILE."""

    def forward(self, x):
        sleeper = subprocess.Popen(["sleep", "300"])
        with open(os.environ["ATTNBENCH_TEST_PID_FILE"], "a") as pids:
            pids.write(f"{sleeper.pid} ")
        return self.proj(x)
