"""A fork server for the integration tests: it imports run.py's heavy third-party libraries once, then
forks a child per request that runs ``run.py`` as ``python run.py ARGS`` would.

Why: about 11 s of every ``python run.py`` start on the 2-core CI machine is importing torch,
torchvision, timm, torchmetrics and Lightning, and the integration tests start run.py more than a
hundred times. A forked child skips those imports and nothing else: it gets the request's argv, cwd
and environment, its own stdout/stderr files, imports seit and run.py afresh, and exits through the
interpreter's normal shutdown (threads joined, atexit handlers run), with run.py's exit status.

Protocol (one JSON object per line): the client writes ``{"argv", "cwd", "env", "stdout", "stderr"}``;
the server answers ``{"pid": N}`` when the child starts and ``{"returncode": N}`` when it ends
(negative: killed by that signal). Environment variables read when the libraries load (the
``IMPORT_TIME_ENV`` below) must match the server's; the client starts a plain subprocess otherwise.
"""

from __future__ import annotations

import json
import os
import sys

# Read by OpenMP, MKL and CUDA when torch loads, so a child cannot change them after the fork.
IMPORT_TIME_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "CUDA_VISIBLE_DEVICES", "PYTORCH_CUDA_ALLOC_CONF")
PRELOAD = ("torch", "torchvision", "timm", "torchmetrics", "pytorch_lightning", "hydra", "omegaconf",
           "webdataset", "PIL.Image", "numpy", "scipy.signal", "sklearn")


def serve(requests, replies) -> dict | None:
    """Answer requests until stdin closes; in a forked child, return its request instead."""
    for line in requests:
        request = json.loads(line)
        replies.flush()
        pid = os.fork()
        if pid == 0:
            return request
        replies.write(json.dumps({"pid": pid}) + "\n")
        replies.flush()
        _, status = os.waitpid(pid, 0)
        replies.write(json.dumps({"returncode": os.waitstatus_to_exitcode(status)}) + "\n")
        replies.flush()
    return None


def become(request: dict) -> None:
    """In the child: the request's process state, as ``python run.py ARGS`` would start with."""
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    for fd, path in ((1, request["stdout"]), (2, request["stderr"])):
        out = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(out, fd)
        os.close(out)
    os.close(devnull)
    sys.stdin = open(0, closefd=False)
    os.chdir(request["cwd"])
    ours = _pythonpath(os.environ)
    os.environ.clear()
    os.environ.update(request["env"])
    script = os.path.join(request["cwd"], request["argv"][0])
    sys.argv = [script, *request["argv"][1:]]
    # sys.path as Python builds it at start-up: the script's dir, then PYTHONPATH, then the rest
    sys.path[:1 + len(ours)] = [os.path.dirname(script), *_pythonpath(request["env"])]


def _pythonpath(env) -> list[str]:
    return [os.path.abspath(p) for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]


def main() -> None:
    import importlib
    import runpy

    for name in PRELOAD:
        importlib.import_module(name)
    replies = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # the server's own output never mixes with the protocol
    requests = sys.stdin
    print(json.dumps({"ready": os.getpid()}), file=replies, flush=True)
    request = serve(requests, replies)
    if request is None:
        return
    replies.close()
    requests.close()
    become(request)
    runpy.run_path(sys.argv[0], run_name="__main__")  # an uncaught error exits 1 with its traceback, as python does


if __name__ == "__main__":
    main()
