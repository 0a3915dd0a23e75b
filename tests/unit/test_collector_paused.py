"""switchboard.consumer.collector_paused: the garbage collector off while a poll is
applied, and always left as it was found."""

from __future__ import annotations

import gc
import threading
from collections.abc import Iterator

import pytest

from switchboard.consumer import collector_paused


@pytest.fixture(autouse=True)
def _collector_restored() -> Iterator[None]:
    was = gc.isenabled()
    yield
    if was:
        gc.enable()
    else:
        gc.disable()


def test_off_inside_on_after_even_when_the_poll_fails() -> None:
    gc.enable()
    with collector_paused():
        assert not gc.isenabled()
    assert gc.isenabled()
    with pytest.raises(ValueError, match="bad poll"), collector_paused():
        raise ValueError("bad poll")
    assert gc.isenabled()


def test_a_collector_someone_else_turned_off_stays_off() -> None:
    gc.disable()
    with collector_paused():
        assert not gc.isenabled()
    assert not gc.isenabled()


def test_overlapping_threads_never_leave_it_off() -> None:
    gc.enable()
    first_in, second_in, first_out = threading.Event(), threading.Event(), threading.Event()

    def first() -> None:
        with collector_paused():
            first_in.set()
            assert second_in.wait(5)
        first_out.set()

    def second() -> None:
        assert first_in.wait(5)
        with collector_paused():  # found it off: leaves it to the first
            second_in.set()
            assert first_out.wait(5)
            assert gc.isenabled()  # the first turned it on: on sooner, not later

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert gc.isenabled()
