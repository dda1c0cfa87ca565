"""Waiting for a condition: the one poll loop (the demo's steps, tests' ``wait_until``)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any


def poll_until(pred: Callable[[], Any], timeout: float, on_timeout: Callable[[], BaseException],
               every: float = 0.02) -> Any:
    """Call ``pred`` every ``every`` s until it returns something true, and return that.

    Parameters
    ----------
    pred : callable
        The condition; its first true result is returned.
    timeout : float
        Seconds to wait.
    on_timeout : callable
        Makes the exception raised when ``timeout`` passes (it may describe what was seen).
    every : float
        Seconds between two calls.

    Returns
    -------
    Any
        The first true value of ``pred()``.
    """
    end = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() > end:
            raise on_timeout()
        time.sleep(every)
