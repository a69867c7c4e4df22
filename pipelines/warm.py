"""A warm `adpipe`: one process with torch, timm, Dagster and adpipe imported, forking a child per
command, so the stages of `dvc repro` (one `adpipe` process each) do not each spend seconds on
imports before doing their work.

    adpipe warm -- dvc repro          # what `make run` does

`adpipe warm` starts the server on a unix socket in a private temporary folder, runs the command
with ADPIPE_SERVER set to it, then stops the server. An `adpipe` started with ADPIPE_SERVER set sends
its arguments, working directory, environment and standard streams to the server, which forks a
child that runs the command as the process would have (the same code, in a fresh process sharing
only the imports) and sends back its exit status. When the client goes away (Ctrl-C, a killed
`dvc`), the child is killed. Without a reachable server, `adpipe` runs the command itself.

Settings read when a library is imported (e.g. HF_HUB_OFFLINE) come from the environment that
started `adpipe warm`, the same shell that runs the command.
"""
from __future__ import annotations

import ctypes
import importlib
import json
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import traceback
from pathlib import Path

ENV = "ADPIPE_SERVER"  # the socket of a warm server; set by `adpipe warm` for its command
PRELOAD = ("pipelines.definitions", "pipelines.instance", "ad_models.report", "ad_models.predict")
PR_SET_PDEATHSIG = 1  # prctl(2): a signal for this process when its parent dies
STREAMS = (0, 1, 2)  # stdin, stdout, stderr: the child writes where the client would have


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionError("connection closed")
        data += chunk
    return data


def forward(argv: list[str]) -> int | None:
    """Run `adpipe <argv>` on the warm server when ADPIPE_SERVER names one; its exit status, or
    None when there is no server to ask (the caller runs the command itself)."""
    path = os.environ.get(ENV)
    if not path:
        return None
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(path)
    except OSError:
        sock.close()
        return None
    with sock:
        request = json.dumps({"argv": argv, "cwd": os.getcwd(), "env": dict(os.environ)}).encode()
        socket.send_fds(sock, [struct.pack("!I", len(request))], list(STREAMS))
        sock.sendall(request)
        try:
            return struct.unpack("!i", _recv_exact(sock, 4))[0]
        except ConnectionError:
            print(f"adpipe: the warm server at {path} went away before `adpipe {' '.join(argv)}` finished",
                  file=sys.stderr)
            return 1


def _run_request(request: dict, fds: list[int]) -> None:
    """In the forked child: become the client's `adpipe` process, run the command, exit."""
    os.setsid()  # its own process group, so the handler can stop it and anything it started
    ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)  # and it ends if its handler is killed
    for target, fd in zip(STREAMS, fds):
        os.dup2(fd, target)
    for fd in fds:
        os.close(fd)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    os.environ.pop(ENV, None)  # this process runs the command; it must not forward it again
    sys.argv = ["adpipe", *request["argv"]]
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    code = 1
    try:
        from pipelines.cli import main
        code = main(request["argv"]) or 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:  # noqa: BLE001 - reported like an uncaught exception in a process
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
    os._exit(code)


def _handle(conn: socket.socket) -> int:
    """One client: fork the command's process, wait for it (or for the client to go away), reply."""
    header, fds, _, _ = socket.recv_fds(conn, 4, len(STREAMS))
    request = json.loads(_recv_exact(conn, struct.unpack("!I", header)[0]))
    child = os.fork()
    if child == 0:
        conn.close()
        _run_request(request, fds)
    for fd in fds:
        os.close(fd)
    pidfd = os.pidfd_open(child)
    while True:
        ready, _, _ = select.select([conn, pidfd], [], [])
        if pidfd in ready:
            break
        if not conn.recv(1, socket.MSG_PEEK):  # the client is gone: so must its command be
            os.killpg(child, signal.SIGTERM)
            break
    _, status = os.waitpid(child, 0)
    code = os.waitstatus_to_exitcode(status)
    try:
        conn.sendall(struct.pack("!i", code))
    except OSError:
        pass
    return 0


def serve(path: str | os.PathLike, ready_fd: int | None = None) -> None:
    """Import everything a command needs, then fork a handler per connection until SIGTERM."""
    # `warm` stops the server with SIGTERM: a disposition inherited as ignored (a supervisor, a test
    # runner's worker) would leave it, and `warm` waiting for it, running forever
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    for module in PRELOAD:
        importlib.import_module(module)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(64)
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # handlers are reaped by the kernel
    if ready_fd is not None:
        os.write(ready_fd, b"1")
        os.close(ready_fd)
    while True:
        conn, _ = listener.accept()
        if os.fork() == 0:
            listener.close()
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            with conn:
                os._exit(_handle(conn))
        conn.close()


def warm(command: list[str]) -> int:
    """Run `command` with a warm server behind every `adpipe` it starts; stop the server after."""
    if not command:
        raise SystemExit("adpipe warm: give the command to run, e.g. `adpipe warm -- dvc repro`")
    with tempfile.TemporaryDirectory(prefix="adpipe-warm-") as folder:
        path = Path(folder) / "server.sock"
        read_end, write_end = os.pipe()
        sys.stdout.flush()
        sys.stderr.flush()
        server = os.fork()
        if server == 0:
            os.close(read_end)
            os.setsid()
            try:
                serve(path, write_end)
            finally:
                os._exit(1)
        os.close(write_end)
        try:
            started = os.read(read_end, 1) == b"1"  # imports done, socket listening
            os.close(read_end)
            env = {**os.environ, ENV: str(path)} if started else dict(os.environ)
            if not started:
                print("adpipe warm: the server did not start; running without it", file=sys.stderr)
            return subprocess.call(command, env=env)
        finally:
            try:
                os.killpg(server, signal.SIGTERM)
            except ProcessLookupError:
                pass
            os.waitpid(server, 0)
