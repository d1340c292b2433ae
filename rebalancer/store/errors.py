"""What a Table Storage call can fail with, by what the caller does next."""

from __future__ import annotations


class StoreError(RuntimeError):
    """Table Storage refused a request in a way retrying will not fix."""


class StoreUnavailable(StoreError):
    """Table Storage is unreachable or failing transiently (connection, timeout, 5xx).

    Safe to retry later: an Event Grid handler lets it propagate so Event Grid redelivers.
    """


class ConcurrencyError(StoreError):
    """Someone else changed the row since it was read (stale ETag): re-read and decide again."""


class LockLost(ConcurrencyError):
    """The scale set's lock is no longer ours (lease expired and taken over, or released)."""


class EntityTooLarge(StoreError, ValueError):
    """A row would exceed Table Storage's limits (64 KiB per property, 1 MiB per entity)."""


class StoreConfigError(StoreError, ValueError):
    """The storage connection settings are missing or malformed."""
