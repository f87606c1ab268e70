"""Errors as one line: ``error: <message>`` on stderr and exit status 1.

The messages of our errors name the file, key or sample; forty lines of traceback above them hide
that line. ``HYDRA_FULL_ERROR=1`` still gives the full traceback. Hydra's own config errors (an
unknown key, a missing group option) take the same path: Hydra is told to raise them (its
``HYDRA_FULL_ERROR``), and we print them. The user's choice is kept in ``SEIT_ERRORS`` so that the
processes a run starts (DDP ranks, submitit jobs) report the same way. Light imports only: run.py
imports this before any config is read.
"""

from __future__ import annotations

import os
import re
import sys
from contextlib import contextmanager
from typing import Callable, Iterator

from omegaconf.errors import OmegaConfBaseException

MODE_VAR = "SEIT_ERRORS"
# Errors whose message is the whole story; anything else also gets its type and a pointer to the traceback.
EXPECTED = (ValueError, OSError, LookupError, OmegaConfBaseException)
# torch re-raises a DataLoader worker's exception with the worker's whole traceback as its message.
# Config keys renamed (old -> new): an override of the old name is answered with the new one, not
# with Hydra's advice to append it (+key=...), which would add a key that nothing reads.
RENAMED_KEYS = {"tokenizer.embed_dim": "tokenizer.codebook_dim",
                "tokenizer.model.embed_dim": "tokenizer.model.codebook_dim"}
_WORKER = re.compile(r"Caught (\w+) (in DataLoader worker process \d+)\.\n"
                     r"Original Traceback \(most recent call last\):\n")


class TaskError(SystemExit):
    """A task's exception, carried past Hydra's job runner (which would print a line of its own)."""

    def __init__(self, error: Exception):
        super().__init__(1)
        self.error = error


@contextmanager
def task_errors() -> Iterator[None]:
    """Around the task in a single run; a multirun keeps Hydra's line naming the failed job's overrides."""
    try:
        yield
    except Exception as e:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        if os.environ.get(MODE_VAR) == "full" or HydraConfig.get().mode == RunMode.MULTIRUN:
            raise
        raise TaskError(e) from e


def run_cli(main: Callable[[], object]) -> None:
    """Call the Hydra ``main`` and turn what it raises into one line (unless the full traceback is asked for)."""
    full = os.environ.setdefault(MODE_VAR, "full" if os.environ.get("HYDRA_FULL_ERROR") == "1" else "short") == "full"
    os.environ["HYDRA_FULL_ERROR"] = "1"  # Hydra re-raises instead of printing its own trimmed traceback
    try:
        main()
    except TaskError as e:
        _fail(one_line(e.error), 1)
    except SystemExit as e:
        if not _is_sigterm(e):
            raise
        _fail(getattr(e, "report", "stopped by SIGTERM"), 128 + 15)
    except Exception as e:
        if full:
            raise
        _fail(one_line(e), 1)


def one_line(exc: BaseException) -> str:
    """The message of ``exc`` on one line; a Hydra error adds the error it was raised from (its reason)."""
    parts = [_text(exc)]
    while _is_hydra(exc) and exc.__cause__ is not None:
        exc = exc.__cause__
        if (text := _text(exc)) not in parts[-1]:
            parts.append(text)
    text = ": ".join(parts)
    for old, new in RENAMED_KEYS.items():
        if text.startswith(f"Could not override '{old}'."):
            value = re.search(rf"use \+{re.escape(old)}=(.*?): Key ", text)
            return (f"{old} is now {new} (the codebook's width D; embed_dim is only the ViT's, model.embed_dim): "
                    f"pass {new}={value.group(1) if value else 'D'}")
    return text


def _text(exc: BaseException) -> str:
    keyerror = isinstance(exc, KeyError) and len(exc.args) == 1 and isinstance(exc.args[0], str)
    raw = exc.args[0] if keyerror else str(exc)  # str(KeyError) is the repr of its argument
    if worker := _worker_error(raw):
        return _worker_text(exc, *worker)
    if keyerror:
        text = raw
    else:
        lines = [line.strip() for line in raw.splitlines() if line.strip()]
        if isinstance(exc, OmegaConfBaseException):
            key = getattr(exc, "full_key", None)
            lines = lines[:1] + ([f"(key {key})"] if key and lines and key not in lines[0] else [])
        text = " ".join(lines).split(" Config search path:")[0]  # Hydra's list of where it looked
    if isinstance(exc, EXPECTED) or _is_hydra(exc):
        return text
    return f"{type(exc).__name__}: {text} (HYDRA_FULL_ERROR=1 shows the traceback)"


def _worker_error(text: str) -> tuple[str, str, str] | None:
    """(type name, where, message) of the original exception in torch's re-raised worker message, else None.

    The message is the text after the traceback's final ``module.Type:``, its continuation lines
    included. torch's traceback text ends with a newline; whatever follows the last one was added
    by the exception's own constructor when torch rebuilt it (ShardReadError appends its advice),
    so it is dropped: the original message holds it already.
    """
    match = _WORKER.match(text)
    if match is None:
        return None
    name, where = match.groups()
    lines = text[match.end():].rpartition("\n")[0].splitlines()
    head = re.compile(rf"(?:[\w.]+\.)?{re.escape(name)}(?::|$)")
    start = next((i for i in reversed(range(len(lines))) if head.match(lines[i])), None)
    if start is None:
        return None
    first = lines[start].partition(":")[2]
    message = " ".join(line.strip() for line in [first, *lines[start + 1:]] if line.strip())
    return name, where, message


def _worker_text(exc: BaseException, name: str, where: str, message: str) -> str:
    if isinstance(exc, EXPECTED):
        return f"{message} ({where})"
    return f"{name}: {message} ({where}; HYDRA_FULL_ERROR=1 shows the traceback)"


def _is_hydra(exc: BaseException) -> bool:
    return type(exc).__module__.startswith("hydra.")


def _is_sigterm(exc: SystemExit) -> bool:
    exceptions = sys.modules.get("pytorch_lightning.utilities.exceptions")  # loaded by any training run
    return exceptions is not None and isinstance(exc, exceptions.SIGTERMException)


def _fail(message: str, status: int) -> None:
    sys.stdout.flush()
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(status)
