"""A fork server for the tests: it imports run.py's heavy third-party libraries once, then
forks a child per request that runs a Python script as ``python SCRIPT ARGS`` would.

Why: about 11 s of every ``python run.py`` start on the 2-core CI machine is importing torch,
torchvision, timm, torchmetrics and Lightning, and the tests start Python well over a hundred times
(run.py, its DDP ranks, background runs, the GPU suite's stages, unit tests' ranks), and about 3 s
of each exit is tearing those libraries down.

How a test reaches it: ``FORK_SERVER.python()`` starts the server and writes a tiny executable, ``python``, whose
``client()`` stands in for the interpreter. Given ``[-u] SCRIPT ARGS`` it connects to the server's
Unix socket and sends its argv, working dir, environment and file descriptors 0-2; the server forks a
child that takes them over, imports nothing new but seit, and runs the script as ``__main__``. The
client forwards the signals it gets to that child (SIGTERM, SIGINT, SIGHUP, SIGQUIT, SIGUSR1, SIGUSR2)
and exits with the child's status (killed by signal N: it kills itself with N). If the client dies
(SIGKILL included), the server kills the child's process group, so the child never outlives what a
test started. Inside a child ``sys.executable`` is that stand-in too, so the DDP ranks Lightning
starts and any ``python SCRIPT`` the child spawns are forked as well.

A fresh interpreter (``exec`` of the real one, so nothing changes for the caller) is used for
anything else: Python options other than ``-u``, ``-m`` and ``-c``; an environment whose
import-time variables (``IMPORT_TIME_ENV``, and ``PYTHON*`` ones other than ``FORK_HONOURS``) differ
from the server's; ``SEIT_TEST_FORK=0``; a SLURM job (it runs where slurmd started it, in its cgroup,
under its signals); multiprocessing's helpers and ``PID_IS_ID``; no server to connect to.

A child gets what the libraries fixed at import afresh where that matters (standard streams,
numpy's and torch's global seeds, Lightning's rank). The differences from a fresh interpreter that
remain: its parent is the server, not the client (tests that walk the process tree use the real
interpreter); it leads its own process group and dies with the server; the str hash seed,
``sys.orig_argv``, warnings already shown and the signal mask are the server's; and at exit,
objects still alive are not finalized (open files are flushed; see ``exit_as_python_does``).
"""

from __future__ import annotations

import atexit
import json
import os
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

HERE = Path(__file__).resolve().parent

# Read by OpenMP, MKL and CUDA when torch loads, so a child cannot change them after the fork.
IMPORT_TIME_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "CUDA_VISIBLE_DEVICES", "PYTORCH_CUDA_ALLOC_CONF")
PRELOAD = ("torch", "torchvision", "timm", "torchmetrics", "pytorch_lightning", "hydra", "omegaconf",
           "webdataset", "PIL.Image", "numpy", "scipy.signal", "sklearn")
# The PYTHON* variables a forked child honours (the others act at start-up: a fresh interpreter runs).
FORK_HONOURS = ("PYTHONPATH", "PYTHONUNBUFFERED", "PYTHONDONTWRITEBYTECODE", "PYTHONFAULTHANDLER")
PID_IS_ID = ("submitit.local._local",)  # its Popen pid names the job: a forked child's pid would not
FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2)


# --- the client: the ``python`` stand-in ------------------------------------------------------
def client(address: str, python: str, import_env: dict[str, str | None]) -> None:
    """Run ``sys.argv[1:]`` as ``python`` would: forked by the server at ``address`` where it can be,
    else by exec'ing the real interpreter ``python``."""
    args, env = sys.argv[1:], dict(os.environ)
    what = _parse(args)
    if (what is None or env.get("SEIT_TEST_FORK") == "0" or "SLURM_JOB_ID" in env
            or any(env.get(k) != v for k, v in import_env.items())
            or any(k.startswith("PYTHON") and k not in FORK_HONOURS and k not in import_env for k in env)):
        os.execv(python, [python, *args])
    mode, target, rest, unbuffered = what
    if unbuffered:
        env["PYTHONUNBUFFERED"] = "1"
    child, pending = [], []

    def forward(signum, _frame):
        if not child:
            pending.append(signum)
            return
        try:
            os.kill(child[0], signum)
        except ProcessLookupError:
            pass  # it has ended: its status is on the way

    for signum in FORWARDED:
        signal.signal(signum, forward)
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        conn.connect(address)
    except OSError:
        os.execv(python, [python, *args])
    request = {"mode": mode, "target": target, "argv": rest, "cwd": os.getcwd(), "env": env,
               "executable": os.path.abspath(sys.argv[0])}
    socket.send_fds(conn, [b"F"], [0, 1, 2])
    conn.sendall(json.dumps(request).encode() + b"\n")
    replies = conn.makefile("r")
    child.append(json.loads(replies.readline())["pid"])
    for signum in pending:
        forward(signum, None)
    line = replies.readline()
    if not line:
        print(f"fork_server: the server ended before child {child[0]} did", file=sys.stderr)
        os._exit(1)
    code = json.loads(line)["returncode"]
    if code < 0:  # killed by a signal: so is this process
        if -code not in (signal.SIGKILL, signal.SIGSTOP):
            signal.signal(-code, signal.SIG_DFL)
        os.kill(os.getpid(), -code)
    os._exit(code & 0xFF)


def _parse(args: list[str]) -> tuple[str, str, list[str], bool] | None:
    """(mode, script/module/code, its argv after it, -u) for ``[-u] SCRIPT|-m MOD|-c CODE ARGS``;
    None for anything else."""
    unbuffered = bool(args) and args[0] == "-u"
    args = args[1:] if unbuffered else args
    if len(args) >= 2 and args[0] in ("-m", "-c"):
        if "multiprocessing" in args[1] or args[1] in PID_IS_ID:
            return None  # descriptors inherited beyond 0-2 (multiprocessing) or the pid itself matter
        return args[0], args[1], args[2:], unbuffered
    if args and not args[0].startswith("-"):
        return "script", args[0], args[1:], unbuffered
    return None


# --- the tests' side: the server process and its stand-in ---------------------------------
# One torch thread per run.py unless the environment says otherwise: the test models are tiny, so a
# second thread buys little, and DDP tests run two processes on two cores (A/B on this 2-core machine:
# test_assembly_run 24-26 s with one thread, 30-36 s with two).
THREADS = {"OMP_NUM_THREADS": "1"}


def env(**overrides: str | None) -> dict[str, str]:
    """The environment run.py gets in the tests; an override of None removes that variable."""
    out = {**THREADS, **os.environ, "WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1", **overrides}
    return {k: v for k, v in out.items() if v is not None}


class ForkServer:
    """``python()``: the interpreter the tests start scripts with, the stand-in that ``client()`` is,
    served by this module run as a script, started on first use, once per pytest worker.
    ``SEIT_TEST_FORK=0``, or a server that did not start, gives ``sys.executable`` itself."""

    def __init__(self):
        self.proc: subprocess.Popen | None = None
        self.shim: str | None = None
        self.lock = threading.Lock()

    def python(self) -> str:
        if os.environ.get("SEIT_TEST_FORK", "1") == "0" or not hasattr(os, "fork"):
            return sys.executable
        with self.lock:
            if self.proc is None or (self.shim and self.proc.poll() is not None):  # once more after a death,
                self.shim = self._start()                                          # never after a failed start
        return self.shim or sys.executable

    def _start(self) -> str | None:
        self.proc = subprocess.Popen([sys.executable, str(HERE / "fork_server.py")], cwd=HERE.parent, env=env(),
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        atexit.register(self.proc.stdin.close)
        ready = json.loads(self.proc.stdout.readline() or "{}")
        if "ready" not in ready:
            self.proc.kill()
            return None
        if len(f"#!{ready['python']} -ES") > 255:  # Linux cuts longer #! lines: use the plain interpreter
            self.proc.stdin.close()
            return None
        shim = Path(ready["address"]).with_name("python")
        shim.write_text(f"#!{ready['python']} -ES\nimport sys\nsys.path.insert(0, {str(HERE)!r})\n"
                        f"from fork_server import client\nclient({ready['address']!r}, {ready['python']!r}, "
                        f"{ready['import_env']!r})\n")
        shim.chmod(0o755)
        return str(shim)


FORK_SERVER = ForkServer()




# --- the server -------------------------------------------------------------------------------
def serve(listener: socket.socket) -> tuple[dict, list[int]] | None:
    """Fork a child per request until stdin closes; in a child, return its request and descriptors."""
    import selectors

    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_r, False)
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    sel = selectors.DefaultSelector()
    sel.register(listener, selectors.EVENT_READ, "accept")
    sel.register(0, selectors.EVENT_READ, "stdin")
    sel.register(wake_r, selectors.EVENT_READ, "reap")
    children: dict[int, socket.socket] = {}
    while True:
        for key, _ in sel.select():
            if key.data == "accept":
                conn, _ = listener.accept()
                received = _receive(conn)
                if received is None:
                    conn.close()
                    continue
                pid = os.fork()
                if pid == 0:
                    _die_with_parent()
                    signal.set_wakeup_fd(-1)
                    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
                    for s in (listener, conn, *children.values()):
                        s.close()
                    for fd in (wake_r, wake_w):
                        os.close(fd)
                    sel.close()
                    return received
                for fd in received[1]:
                    os.close(fd)
                try:
                    os.setpgid(pid, pid)  # as the child does: either may run first
                except OSError:
                    pass
                children[pid] = conn
                try:
                    conn.sendall(json.dumps({"pid": pid}).encode() + b"\n")
                except OSError:  # the client died in the meantime: its child goes too
                    _kill_group(pid)
                    continue
                sel.register(conn, selectors.EVENT_READ, pid)
            elif key.data == "reap":
                try:
                    while os.read(wake_r, 4096):
                        pass
                except BlockingIOError:
                    pass
                _reap(children, sel)
            elif key.data == "stdin":
                if not os.read(0, 4096):
                    for pid in children:
                        _kill_group(pid)
                    return None
            elif key.fileobj in sel.get_map() and not _recv(key.fileobj):  # the client died first:
                sel.unregister(key.fileobj)                                  # its child goes too
                _kill_group(key.data)


def _recv(conn: socket.socket) -> bytes:
    try:
        return conn.recv(4096)
    except OSError:
        return b""


def _receive(conn: socket.socket) -> tuple[dict, list[int]] | None:
    """The request and descriptors a client sends right after it connects (None if it does not: a
    client that stalls cannot stall the server for more than a few seconds)."""
    conn.settimeout(5)
    try:
        _, fds, _, _ = socket.recv_fds(conn, 1, 3)
        data = b""
        while not data.endswith(b"\n"):
            more = conn.recv(1 << 16)
            if not more:
                raise ConnectionError("the client left mid-request")
            data += more
    except OSError:
        return None
    conn.settimeout(None)
    return json.loads(data), fds


def _reap(children: dict[int, socket.socket], sel) -> None:
    while children:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        conn = children.pop(pid, None)
        if conn is None:
            continue
        try:
            conn.sendall(json.dumps({"returncode": os.waitstatus_to_exitcode(status)}).encode() + b"\n")
        except OSError:
            pass  # the client is gone
        if conn in sel.get_map():
            sel.unregister(conn)
        conn.close()


def _die_with_parent() -> None:
    """Linux: SIGKILL this process when the server dies, however it dies."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except OSError:
        pass


def become(request: dict, fds: list[int]) -> None:
    """In the child: the request's process state, as a fresh interpreter would start with."""
    os.setpgid(0, 0)
    for target, fd in enumerate(fds):
        os.dup2(fd, target)
        os.close(fd)
    os.chdir(request["cwd"])
    ours = _pythonpath(os.environ)
    os.environ.clear()
    os.environ.update(request["env"])
    sys.stdout = sys.__stdout__ = _stdio(1, sys.stdout, bool(os.environ.get("PYTHONUNBUFFERED")))
    sys.stderr = sys.__stderr__ = _stdio(2, sys.stderr, bool(os.environ.get("PYTHONUNBUFFERED")))
    _fresh_process_state()
    mode, target = request["mode"], request["target"]
    first = os.path.dirname(os.path.abspath(target)) if mode == "script" else "" if mode == "-c" else os.getcwd()
    sys.argv = [{"script": target, "-c": "-c", "-m": target}[mode], *request["argv"]]
    # sys.path as Python builds it at start-up: the script's dir (or cwd), then PYTHONPATH, then the rest
    sys.path[:1 + len(ours)] = [first, *_pythonpath(request["env"])]


def _stdio(fd: int, old, unbuffered: bool):
    """A standard stream as Python builds it at start-up: block-buffered to a pipe or file (stderr
    and a terminal: line-buffered), or unbuffered under -u / PYTHONUNBUFFERED."""
    import io

    raw = io.FileIO(fd, "w", closefd=False)
    return io.TextIOWrapper(raw if unbuffered else io.BufferedWriter(raw), encoding=old.encoding, errors=old.errors,
                            line_buffering=fd == 2 or raw.isatty(), write_through=unbuffered)


def _fresh_process_state() -> None:
    """What the preloaded libraries fixed at import that a fresh process would not share with its
    siblings: the global RNG seeds of numpy and torch (Python's ``random`` reseeds itself after a
    fork), and Lightning's rank, read from RANK / LOCAL_RANK / SLURM_PROCID at import. (The str hash
    seed stays the server's: it cannot change in a running interpreter.)"""
    import numpy as np
    import torch
    from lightning_fabric.utilities import rank_zero

    np.random.seed()
    torch.seed()
    rank_zero.rank_zero_only.rank = rank_zero._get_rank() or 0  # as lightning_fabric sets it at import


def _pythonpath(env) -> list[str]:
    return [os.path.abspath(p) for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]


def run_request(request: dict) -> None:
    """Run the request's script, module or code as ``__main__`` (``__file__`` absolute, no
    ``__spec__``, as Python 3.9+ sets them for a script); an uncaught error exits 1 with its
    traceback, as python does."""
    import builtins
    import runpy
    import types

    mode, target = request["mode"], request["target"]
    if mode == "-m":
        runpy.run_module(target, run_name="__main__", alter_sys=True)
        return
    main = types.ModuleType("__main__")
    main.__builtins__ = builtins
    if mode == "script":
        path = os.path.abspath(target)
        try:
            with open(path, "rb") as f:
                source = f.read()
        except OSError as e:
            print(f"{sys.executable}: can't open file {path!r}: [Errno {e.errno}] {e.strerror}", file=sys.stderr)
            raise SystemExit(2)
        main.__file__, main.__cached__ = path, None
    else:
        source, path = target, "<string>"
        main.__annotations__ = {}
    sys.modules["__main__"] = main
    exec(compile(source, path, "exec"), main.__dict__)


def main() -> None:
    import gc
    import glob
    import importlib
    import shutil
    import tempfile

    for name in PRELOAD:
        importlib.import_module(name)
    # The preloaded objects never become garbage: out of the collector's sight, a child's collections
    # skip them (and leave their pages shared), and its exit takes 0.7 s instead of 3.2 s here.
    gc.collect()
    gc.freeze()
    address = os.path.join(tempfile.mkdtemp(prefix="seit-fork-"), "socket")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(address)
    listener.listen(64)
    import_env = {k: os.environ.get(k) for k in IMPORT_TIME_ENV}
    import_env.update((k, v) for k, v in os.environ.items() if k.startswith("PYTHON") and k not in FORK_HONOURS)
    if not glob.glob("/dev/nvidia[0-9]*"):  # no GPU to show or hide (submitit_local hides them all)
        import_env = {k: v for k, v in import_env.items() if not k.startswith(("CUDA_", "PYTORCH_CUDA_"))}
    print(json.dumps({"ready": os.getpid(), "address": address, "python": sys.executable, "import_env": import_env}),
          flush=True)
    os.dup2(2, 1)  # the server's own output never mixes with the protocol
    received = serve(listener)
    if received is None:
        shutil.rmtree(os.path.dirname(address), ignore_errors=True)  # the socket and the stand-in
        return
    request, fds = received
    become(request, fds)
    sys.executable = request["executable"]  # what the child starts as python is forked too
    exit_as_python_does(run_request, request)


def _open_writers() -> list:
    """The child's file objects still open for writing: the teardown would flush them as it
    closes them (the frozen server objects are not among them)."""
    import gc
    import io

    kinds = (io.BufferedWriter, io.TextIOWrapper, io.BufferedRandom)
    # type(), not isinstance(): a dead weakref.proxy raises on isinstance
    return [o for o in gc.get_objects() if issubclass(type(o), kinds) and not o.closed and o.writable()]


def _print_uncaught(e: BaseException) -> None:
    """``sys.excepthook`` on ``e`` without the frames of this file and runpy, as python prints it."""
    tb = e.__traceback__
    while tb is not None and (tb.tb_frame.f_code.co_filename == __file__ or "runpy" in tb.tb_frame.f_code.co_filename):
        tb = tb.tb_next
    sys.excepthook(type(e), e.with_traceback(tb), tb)


def exit_as_python_does(fn, *args) -> None:
    """Call ``fn(*args)`` as a script's ``__main__``, then end the process as the interpreter would:
    the status of an uncaught SystemExit (an error: its traceback, 1; Ctrl-C: killed by SIGINT), then
    non-daemon threads joined, atexit handlers run, the standard streams and every file still open
    for writing flushed. It skips the module teardown after that (about a second per process with
    torch loaded): objects alive at exit are not finalized, so a ``__del__`` that does more than
    close a file does not run, which Python does not promise at exit either."""
    import atexit
    import threading

    code, kill = 0, None
    try:
        fn(*args)
    except SystemExit as e:
        if e.code is None or isinstance(e.code, int):
            code = e.code or 0
        else:
            print(e.code, file=sys.stderr)
            code = 1
    except KeyboardInterrupt as e:
        _print_uncaught(e)
        kill = signal.SIGINT
    except BaseException as e:
        _print_uncaught(e)
        code = 1
    threading._shutdown()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr, *_open_writers()):
        try:
            stream.flush()
        except Exception:  # as the teardown would: ignored
            pass
    if kill is not None:
        signal.signal(kill, signal.SIG_DFL)
        os.kill(os.getpid(), kill)
    os._exit(code & 0xFF)


if __name__ == "__main__":
    main()
