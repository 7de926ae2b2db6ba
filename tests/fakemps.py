"""A fake `nvidia-cuda-mps-control`: an executable that records its commands and whose
"daemon" (a sleeping process, its PID in the pipe directory) can be killed.

`-d` starts the daemon; a command on stdin is answered while the daemon lives, else the
binary exits 1 as the real one does when it finds no daemon; `quit` ends the daemon.
Everything it is told goes to `<log dir>/commands.log`.
"""

from __future__ import annotations

import contextlib
import os
import signal
from pathlib import Path

SCRIPT = r"""#!/bin/sh
log="$CUDA_MPS_LOG_DIRECTORY/commands.log"
pid_file="$CUDA_MPS_PIPE_DIRECTORY/daemon.pid"
threads="$CUDA_MPS_PIPE_DIRECTORY/threads"
alive() { [ -f "$pid_file" ] && kill -0 "$(cat "$pid_file")" 2>/dev/null; }
if [ "$1" = "-d" ]; then
    echo "-d" >> "$log"
    alive && exit 0
    setsid sleep 3600 < /dev/null > /dev/null 2>&1 &
    echo $! > "$pid_file"
    exit 0
fi
read -r command
echo "$command" >> "$log"
if ! alive; then
    echo "Cannot find MPS control daemon process"
    exit 1
fi
case "$command" in
    quit) kill "$(cat "$pid_file")"; rm -f "$pid_file" ;;
    get_default_active_thread_percentage) cat "$threads" 2>/dev/null || echo 100.0 ;;
    set_default_active_thread_percentage*) echo "${command##* }" > "$threads" ;;
esac
exit 0
"""


def install(directory: Path) -> Path:
    """Write the fake binary into `directory`; its path."""
    path = directory / "nvidia-cuda-mps-control"
    path.write_text(SCRIPT)
    path.chmod(0o755)
    return path


def commands(root: Path, resource: str) -> list[str]:
    """What the binary was told for `resource` (under MPS root `root`)."""
    log = root / resource / "log" / "commands.log"
    return log.read_text().splitlines() if log.exists() else []


def kill(root: Path, resource: str) -> None:
    """Kill the resource's daemon, as a crash would."""
    pid_file = root / resource / "pipe" / "daemon.pid"
    with contextlib.suppress(FileNotFoundError, ProcessLookupError, ValueError):
        os.kill(int(pid_file.read_text()), signal.SIGKILL)


def kill_all(root: Path) -> None:
    """Leave no fake daemon behind (test teardown)."""
    for pid_file in root.glob("*/*/pipe/daemon.pid"):
        with contextlib.suppress(FileNotFoundError, ProcessLookupError, ValueError):
            os.kill(int(pid_file.read_text()), signal.SIGKILL)
    for pid_file in root.glob("*/pipe/daemon.pid"):
        with contextlib.suppress(FileNotFoundError, ProcessLookupError, ValueError):
            os.kill(int(pid_file.read_text()), signal.SIGKILL)
