"""Runs `python -m medtee ARGS` for the tests without paying the heavy imports each time.

A `medtee train` on the tiny model spends most of its seconds importing torch, Lightning, transformers and MLflow,
and the suite runs it about a hundred times. This server imports them once, then forks one child per command: the
child takes the command's working directory, environment (os.environ replaced), argv and stdio (files), puts the
working directory first on sys.path as `python -m` does, and runs medtee's __main__, so each command is still its
own process with medtee's own state fresh. What a fork cannot show, the tests that need it run `python -m medtee`
itself (`conftest.run_medtee(..., fresh=True)`): import-time output and environment, and modules a command might
import from its working directory. MEDTEE_TEST_FORKSERVER=0 turns the server off.

It runs test scripts the same way (`python -c CODE ARGS`, `python FILE ARGS`): a script that patches medtee and
then calls its CLI is still a process of its own, with medtee imported fresh.

Protocol (one request at a time): the client sends a JSON line {argv, cwd, env, stdout, stderr, code?, path?}; the
server answers {"pid": N} when the child starts and {"returncode": RC} when it ends (negative: the signal that ended
it).
"""

from __future__ import annotations

import json
import os
import socket
import sys

#: What the children would import anyway; a module missing here is only imported later, by the child.
PREIMPORT = ("torch", "lightning.pytorch", "transformers", "transformers.models.gemma3.modeling_gemma3", "peft",
             "bitsandbytes", "mlflow", "mlflow.store.tracking.sqlalchemy_store", "alembic", "sqlalchemy",
             "pyarrow.parquet", "hydra", "omegaconf", "safetensors.torch", "cryptography", "optuna")


def _child(request: dict, ready: int) -> None:
    """In the forked child: become the command, run it, exit as it exits. `ready` is closed once stdio is set up."""
    import runpy
    import signal
    import tempfile

    signal.signal(signal.SIGINT, signal.default_int_handler)  # as a new interpreter has them
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    if request.get("new_session"):
        os.setsid()
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    tempfile.tempdir = None  # found again from the command's TMPDIR
    null = os.open(os.devnull, os.O_RDONLY)
    out = os.open(request["stdout"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    err = os.open(request["stderr"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    for fd, target in ((null, 0), (out, 1), (err, 2)):
        os.dup2(fd, target)
        os.close(fd)
    os.close(ready)  # a client reading stderr as a pipe (a FIFO) now has its writer
    if request.get("code") is not None:  # python -c CODE ARGV
        sys.argv = ["-c", *request["argv"]]
        sys.path[0] = ""
        exec(compile(request["code"], "<string>", "exec"), {"__name__": "__main__", "__builtins__": __builtins__})
    elif request.get("path") is not None:  # python PATH ARGV
        sys.argv = [request["path"], *request["argv"]]
        sys.path[0] = os.path.dirname(os.path.abspath(request["path"]))
        runpy.run_path(request["path"], run_name="__main__")
    else:  # python -m medtee ARGV
        sys.argv = ["-m", *request["argv"]]
        sys.path[0] = os.getcwd()
        runpy.run_module("medtee", run_name="__main__", alter_sys=True)  # its sys.exit ends the child


def _run(request: dict, ready: int) -> int:
    """The command's exit status, as the interpreter would give it (a traceback for an exception that escapes)."""
    import traceback

    try:
        _child(request, ready)
    except SystemExit as e:
        if e.code is None or isinstance(e.code, int):
            return e.code or 0
        print(e.code, file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        traceback.print_exc()
        return -2
    except BaseException:  # noqa: BLE001 - printed as the interpreter prints it
        traceback.print_exc()
        return 1
    return 0


def _exit(code: int) -> None:
    """End the child as an interpreter ends, but without tearing down the modules it shares with the server (that
    would write to every page of them, copying them all): exit handlers and weakref finalizers run, stdio is flushed."""
    import atexit
    import signal

    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    if code == -2:  # an uncaught KeyboardInterrupt ends the interpreter by SIGINT
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)
    os._exit(code & 0xFF)


def serve(fd: int) -> None:
    import gc
    import importlib

    for name in PREIMPORT:
        try:
            importlib.import_module(name)
        except Exception:  # noqa: BLE001 - the child imports it (or fails) as medtee would
            pass
    gc.freeze()  # the children's collections then leave the shared modules' pages alone
    conn = socket.socket(fileno=fd)
    lines = conn.makefile("rw", encoding="utf-8", newline="\n")
    for line in lines:
        request = json.loads(line)
        sys.stdout.flush(), sys.stderr.flush()
        ready, set_up = os.pipe()
        pid = os.fork()
        if pid == 0:
            lines.close(), conn.close(), os.close(ready)
            _exit(_run(request, set_up))
        os.close(set_up)
        os.read(ready, 1)  # EOF: the child has its stdio (or died)
        os.close(ready)
        lines.write(json.dumps({"pid": pid}) + "\n")
        lines.flush()
        _, status = os.waitpid(pid, 0)
        lines.write(json.dumps({"returncode": os.waitstatus_to_exitcode(status)}) + "\n")
        lines.flush()


class Client:
    """The test side: starts the server (lazily, once) and runs commands through it."""

    def __init__(self) -> None:
        self._proc = None
        self._lines = None

    def _start(self) -> None:
        import subprocess

        mine, theirs = socket.socketpair()
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self._proc = subprocess.Popen([sys.executable, __file__, str(theirs.fileno())], pass_fds=[theirs.fileno()],
                                      stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                      env=env)
        theirs.close()
        self._sock = mine
        self._lines = mine.makefile("rw", encoding="utf-8", newline="\n")

    def run(self, argv: list[str], *, cwd, env: dict, timeout: float, code: str | None = None,
            path: str | None = None):
        """Like subprocess.run(capture_output=True, text=True, timeout=timeout) of `python -m medtee ARGV` (or of
        `python -c CODE ARGV`, `python PATH ARGV`)."""
        import subprocess

        with Started(self, argv, cwd=cwd, env=env, code=code, path=path) as started:
            started.wait(timeout)
            out, err = started.communicate()
            return subprocess.CompletedProcess(started.args, started.returncode, out, err)

    def start(self, argv: list[str], *, cwd, env: dict, code: str | None = None, path: str | None = None,
              new_session: bool = False) -> Started:
        """Like subprocess.Popen(stdout=PIPE, stderr=PIPE, text=True, start_new_session=new_session) of the same
        commands: its stderr is read as it is written (a FIFO), its stdout once it has ended. One at a time."""
        return Started(self, argv, cwd=cwd, env=env, code=code, path=path, new_session=new_session, stream=True)

    def _request(self, request: dict) -> int:
        if self._proc is None or self._proc.poll() is not None:
            self._start()
        self._lines.write(json.dumps(request) + "\n")
        self._lines.flush()
        return json.loads(self._lines.readline())["pid"]

    def _returncode(self, timeout: float | None) -> int:
        """The running command's exit status; TimeoutError after `timeout` seconds."""
        self._sock.settimeout(timeout)
        try:
            reply = self._lines.readline()
        except socket.timeout:
            raise TimeoutError from None
        finally:
            self._sock.settimeout(None)
        if not reply:
            raise RuntimeError("the medtee fork server ended while running a command")
        return json.loads(reply)["returncode"]

    def close(self) -> None:
        if self._proc is not None:
            self._lines.close(), self._sock.close()
            self._proc.kill()
            self._proc.wait()
            self._proc = None


class Started:
    """A command the server is running for `client`: `pid`, `stderr` (a text stream when started with `stream`),
    `poll`, `wait`, `communicate`, `returncode`, as subprocess.Popen has them."""

    def __init__(self, client: Client, argv: list[str], *, cwd, env: dict, code: str | None, path: str | None,
                 new_session: bool = False, stream: bool = False) -> None:
        import tempfile

        self._client, self.returncode, self.stderr = client, None, None
        self.args = [sys.executable, *(["-c", code] if code is not None else [str(path)] if path is not None
                                       else ["-m", "medtee"]), *argv]
        self._tmp = tempfile.TemporaryDirectory(prefix="medtee-fork-")
        self._out, self._err = os.path.join(self._tmp.name, "stdout"), os.path.join(self._tmp.name, "stderr")
        if stream:  # opened for reading first (without waiting for a writer), so the child's open does not block
            os.mkfifo(self._err, 0o600)
            fd = os.open(self._err, os.O_RDONLY | os.O_NONBLOCK)
            os.set_blocking(fd, True)
            self.stderr = open(fd, encoding="utf-8", errors="replace")
        self.pid = client._request({"argv": list(argv), "cwd": str(cwd), "env": dict(env), "stdout": self._out,
                                    "stderr": self._err, "code": code, "path": None if path is None else str(path),
                                    "new_session": new_session})

    def poll(self) -> int | None:
        if self.returncode is None:
            try:
                os.kill(self.pid, 0)
                return None
            except ProcessLookupError:  # ended and reaped by the server, which is sending its status
                self.wait()
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        import signal
        import subprocess

        if self.returncode is None:
            try:
                self.returncode = self._client._returncode(timeout)
            except TimeoutError:
                os.kill(self.pid, signal.SIGKILL)
                self._client.close()  # the server's reply to this request is no longer read: start afresh
                self.returncode = -signal.SIGKILL
                raise subprocess.TimeoutExpired(self.args, timeout) from None
        return self.returncode

    def communicate(self, timeout: float | None = None) -> tuple[str, str]:
        """(stdout, the rest of stderr) once the command has ended."""
        read = (lambda p: open(p, encoding="utf-8", errors="replace").read() if os.path.exists(p) else "")
        err = self.stderr.read() if self.stderr is not None else ""  # to its end: the child's exit closes it
        self.wait(timeout)
        return read(self._out), err if self.stderr is not None else read(self._err)

    def __enter__(self) -> Started:
        return self

    def __exit__(self, *exc) -> None:
        if self.returncode is None:
            try:
                os.kill(self.pid, 9)
            except ProcessLookupError:
                pass
            self.wait()
        if self.stderr is not None:
            self.stderr.close()
        self._tmp.cleanup()


_CLIENT: Client | None = None


def client() -> Client:
    """This process's one client: every copy of the conftest module (pytest imports it under two names) shares it,
    so one server imports torch per test process."""
    global _CLIENT
    if _CLIENT is None:
        _CLIENT = Client()
    return _CLIENT


def close() -> None:
    if _CLIENT is not None:
        _CLIENT.close()


if __name__ == "__main__":
    serve(int(sys.argv[1]))
