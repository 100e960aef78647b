"""Which failed process the launcher's one line names."""

from __future__ import annotations

from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

from lathe.distributed import _failure


def _failed(rank: int, exitcode: int, at: float) -> ProcessFailure:
    f = ProcessFailure(local_rank=rank, pid=1000 + rank, exitcode=exitcode, error_file="")
    f.timestamp = at
    return f


def test_a_killed_process_is_named_over_the_peer_it_took_down_in_the_same_second():
    # rank 1 killed; rank 0's collective failed at once: torch's whole-second times tie
    e = ChildFailedError("lathe", {0: _failed(0, 1, 100), 1: _failed(1, -9, 100)})
    err = _failure(e)
    assert str(err).startswith("LaunchError: rank 1 (pid 1001) was killed by SIGKILL"), str(err)
    assert err.code == 1


def test_a_process_the_launcher_killed_after_the_first_failure_is_not_named():
    # rank 1 hung (SIGSTOP): rank 0 gave up at 100 and exited; the launcher SIGKILLed rank 1 later
    e = ChildFailedError("lathe", {0: _failed(0, 1, 100), 1: _failed(1, -9, 131)})
    assert str(_failure(e)).startswith("LaunchError: rank 0 (pid 1000) exited with code 1")


def test_otherwise_the_earliest_failure_and_its_exit_code():
    e = ChildFailedError("lathe", {0: _failed(0, 1, 101), 1: _failed(1, 2, 100)})
    err = _failure(e)
    assert str(err).startswith("LaunchError: rank 1 (pid 1001) exited with code 2"), str(err)
    assert err.code == 2  # a user's mistake in that process stays exit 2


def test_a_killed_process_is_named_over_the_one_the_launcher_terminated_in_the_same_second():
    # rank 1 killed by SIGKILL; the launcher sent rank 0 its SIGTERM within the same second (seen in CI)
    e = ChildFailedError("lathe", {0: _failed(0, -15, 100), 1: _failed(1, -9, 100)})
    assert str(_failure(e)).startswith("LaunchError: rank 1 (pid 1001) was killed by SIGKILL")
