"""Launching distributed test runs under a real ``mlx.launch`` (ring backend, loopback) and watching their ranks
through /proc (tests/test_distributed*.py)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
WORKER = Path(__file__).parent / "distributed_worker.py"
LAUNCHER = Path(sys.executable).parent / "mlx.launch"


def ring_port(n: int) -> int:
    """A first port with ``n`` free ports from it (the ring backend listens on PORT .. PORT+n-1), so two launched
    runs on one machine (parallel suites) do not meet on mlx.launch's default 32323."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            base = s.getsockname()[1]
        if base + n >= 65535:
            continue
        try:
            for p in range(base, base + n):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", p))
            return base
        except OSError:
            continue
    raise RuntimeError("no run of free ports for the ring backend")


def launch_cmd(n: int, *command) -> list[str]:
    """``mlx.launch -n N --backend ring`` of ``command`` (run by this Python); ``--`` keeps the command's own flags
    (``--host``, ``--port``) from being taken as the launcher's (its ``--hosts`` would take ``--host``)."""
    return [str(LAUNCHER), "-n", str(n), "--backend", "ring", "--starting-port", str(ring_port(n)), "--python",
            sys.executable, "--", *map(str, command)]


def launch_env(**extra) -> dict:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]), **extra}


def launch(n: int, out: Path, *args, timeout: float = 600, wait: bool = True, env: dict | None = None):
    """The test worker (tests/distributed_worker.py) on ``n`` ranks. ``wait``: run to the end and check that every
    rank exited 0 (mlx.launch itself exits 0 whatever its ranks did; it reports a failed rank as "Node with rank
    R exited with code C" / "was killed"); else the Popen, its output in ``out``/launch.log."""
    cmd = launch_cmd(n, WORKER, "--out", out, *args)
    env = launch_env(**(env or {}))
    if not wait:
        out.mkdir(parents=True, exist_ok=True)
        with open(out / "launch.log", "w") as log:
            return subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0 and "Node with rank" not in r.stderr + r.stdout, \
        f"mlx.launch failed ({r.returncode}):\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}"
    return r


def rank_pids(marker: str) -> dict[int, int]:
    """{rank: pid} of the live processes mlx.launch started whose command line holds ``marker`` (/proc)."""
    found = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or not running(int(d.name)):
            continue
        try:
            cmdline = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            if marker not in cmdline:
                continue
            env = dict(kv.split("=", 1) for kv in (d / "environ").read_bytes().decode(errors="replace").split("\0")
                       if "=" in kv)
        except OSError:  # ended meanwhile
            continue
        if "MLX_RANK" in env:
            found[int(env["MLX_RANK"])] = int(d.name)
    return found


def running(pid: int) -> bool:
    """Whether ``pid`` is a process that has not ended (a zombie whose parent has not reaped it has ended)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] not in "ZX"


def wait_gone(pids, timeout: float) -> list[int]:
    """Waits until none of ``pids`` runs (or ``timeout``); returns those still running."""
    deadline = time.monotonic() + timeout
    while True:
        left = [p for p in pids if running(p)]
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.2)


def kill_all(pids) -> None:
    """Cleanup after a failed test: SIGKILL the given processes (by id) that still run."""
    import signal

    for p in pids:
        if running(p):
            try:
                os.kill(p, signal.SIGCONT)
                os.kill(p, signal.SIGKILL)
            except OSError:
                pass
