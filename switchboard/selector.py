"""The selector kafka-python's clients run on (their ``selector`` option).

kafka-python 3 asks its selector for the key of a socket that is not registered
on every wait for a read or a write, and catches the KeyError. The standard
library builds that KeyError's message with ``repr(socket)``, which asks the
kernel for both addresses: two system calls and string formatting per wait. In
the router that was 3% of the process's samples, on the producer's network
thread, holding the GIL (py-spy, 2026-11-29). This selector raises the same
KeyError without building the message; everything else is the platform's
default selector.
"""

from __future__ import annotations

import selectors
from typing import Any


class QuietSelector(selectors.DefaultSelector):
    def get_key(self, fileobj: Any) -> selectors.SelectorKey:  # noqa: ANN401 - a file object
        # _fd_to_key and _fileobj_lookup: the standard selectors' own lookup (what
        # get_key reaches through get_map()), unchanged since Python 3.4.
        if self._map is None:  # type: ignore[attr-defined]
            raise RuntimeError("Selector is closed")
        try:
            key: selectors.SelectorKey = self._fd_to_key[self._fileobj_lookup(fileobj)]  # type: ignore[attr-defined]
        except KeyError:
            raise KeyError(fileobj) from None  # its repr is built only if it is shown
        return key
