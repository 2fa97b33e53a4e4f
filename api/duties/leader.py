"""A Redis lease so that one API process at a time runs a fleet-wide duty (the batch manager).

The holder renews the lease on every tick; if it dies, the lease expires and another process takes
over. The duties it guards are written to be safe even if two holders ever overlap (every state
change is a guarded UPDATE), so the lease is about not doing the work twice, not about correctness.
"""

from __future__ import annotations

import secrets

from redis.asyncio import Redis

from shared import keys

_ACQUIRE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
  return 1
end
return 0
"""

_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


class Lease:
    def __init__(self, redis: Redis, name: str, ttl_seconds: float) -> None:
        self._redis = redis
        self.key = keys.lease(name)
        self._token = secrets.token_hex(8)
        self._ttl_ms = int(ttl_seconds * 1000)

    async def hold(self) -> bool:
        """Take or renew the lease; False while another process holds it."""
        return bool(await self._redis.eval(_ACQUIRE, 1, self.key, self._token, str(self._ttl_ms)))  # type: ignore[misc]

    async def release(self) -> None:
        await self._redis.eval(_RELEASE, 1, self.key, self._token)  # type: ignore[misc]
