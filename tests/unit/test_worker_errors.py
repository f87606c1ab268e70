"""An exception from a DataLoader worker reads as the worker's own message on one line (#64)."""

from __future__ import annotations

import pytest
from torch.utils.data import DataLoader, IterableDataset

from seit.data.shard_reader import ShardReadError
from seit.utils.errors import one_line


class Failing(IterableDataset):
    def __init__(self, error: Exception):
        self.error = error

    def __iter__(self):
        raise self.error


class TwoArgs(Exception):
    """torch cannot rebuild it from one message, so it re-raises a RuntimeError."""

    def __init__(self, a, b):
        super().__init__(f"{a} and {b}")


def from_worker(error: Exception) -> BaseException:
    with pytest.raises(BaseException) as caught:
        next(iter(DataLoader(Failing(error), batch_size=None, num_workers=1)))
    assert "Original Traceback" in str(caught.value)  # what torch raises in the main process
    return caught.value


def test_a_shard_error_from_a_worker_is_its_message_once():
    line = one_line(from_worker(ShardReadError("shard /d/shards/train-000001.tar is corrupt")))
    assert line.startswith("shard /d/shards/train-000001.tar is corrupt; scrub the dataset")
    assert line.endswith("(in DataLoader worker process 0)")
    assert line.count("scrub the dataset") == 1 and "Traceback" not in line and "\n" not in line


def test_other_worker_errors_keep_their_type_and_message():
    assert one_line(from_worker(ValueError("bad\nsecond line"))) == "bad second line (in DataLoader worker process 0)"
    assert one_line(from_worker(KeyError("ids"))) == "'ids' (in DataLoader worker process 0)"
    assert one_line(from_worker(ZeroDivisionError("division by zero"))) == (
        "ZeroDivisionError: division by zero (in DataLoader worker process 0; HYDRA_FULL_ERROR=1 shows the traceback)")
    assert one_line(from_worker(TwoArgs("x", "y"))) == (
        "TwoArgs: x and y (in DataLoader worker process 0; HYDRA_FULL_ERROR=1 shows the traceback)")


def test_a_chained_worker_error_reads_as_the_last_one():
    try:
        try:
            raise OSError("disk")
        except OSError as cause:
            raise ShardReadError("shard s.tar is unreadable: disk") from cause
    except ShardReadError as error:
        line = one_line(from_worker(error))
    assert line.startswith("shard s.tar is unreadable: disk; scrub") and "OSError" not in line
