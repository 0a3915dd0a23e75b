"""Rate limits of the public hooks: one bucket per hook, one per client address.

A hook's global bucket alone lets one noisy client spend everybody's budget;
the per-client buckets stop that. The HTTP cycle charges them only after the
cheap checks (content type, size), so junk does not cost a real client its turn,
and the client's bucket before the hook's, so a client over its own limit does
not spend the hook's budget either.
"""

from __future__ import annotations

import time
from collections import OrderedDict

from switchboard.limits import client_key

__all__ = ["ClientBuckets", "TokenBucket", "client_key"]


class TokenBucket:
    """``rate`` requests per second sustained, ``burst`` at once."""

    def __init__(self, rate: float, burst: int) -> None:
        self.rate = rate
        self.capacity = float(burst)
        self.tokens = float(burst)
        self.stamp = time.monotonic()

    def take(self) -> float:
        """0 if allowed, else the seconds until a request would be."""
        now = time.monotonic()
        self.tokens = min(self.capacity, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= 1:
            self.tokens -= 1
            return 0.0
        return (1 - self.tokens) / self.rate


class ClientBuckets:
    """A token bucket per client address, at most ``max_clients`` remembered (least
    recently seen forgotten first), so a spray of addresses cannot grow memory."""

    def __init__(self, rate: float, burst: int, max_clients: int = 10_000) -> None:
        self.rate = rate
        self.burst = burst
        self.max_clients = max_clients
        self._buckets: OrderedDict[str, TokenBucket] = OrderedDict()

    def take(self, host: str | None) -> float:
        """0 if ``host`` may send now, else the seconds until it may."""
        key = client_key(host)
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = TokenBucket(self.rate, self.burst)
            if len(self._buckets) > self.max_clients:
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end(key)
        return bucket.take()
