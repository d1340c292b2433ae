"""Adapter: follow-up messages on a Storage queue, through azure-storage-queue.

A message sent with a visibility delay is a durable timer: Azure Storage keeps it, invisible,
until its time, and the Functions host's queue trigger (`on_follow_up` in function_app.py)
hands it to `service.handle_follow_up` then. It survives a crash of the app like the
operation's row does; a message whose handling fails becomes visible again and is retried by
the host. Nothing is sent while no operation is in flight and no audit pass is left half
done (`Continuation`), so an idle app is invoked only by its timer and by events.

Messages are Base64 text, as the Functions host's queue trigger reads them by default.
"""

from __future__ import annotations

import contextlib
import logging
import math
import threading
from collections.abc import Mapping
from datetime import datetime
from typing import TYPE_CHECKING, Any

from rebalancer.followup import FollowUp

if TYPE_CHECKING:
    from rebalancer.store import StorageConnection
    from rebalancer.sweep import Continuation

log = logging.getLogger("rebalancer")

MAX_DELAY_SECONDS = 7 * 24 * 3600
"""Azure Storage accepts a visibility timeout of at most seven days."""


class FollowUpQueueError(RuntimeError):
    """A follow-up could not be sent; the timer tick still advances the operation."""


def queue_service_uri(connection: StorageConnection, env: Mapping[str, str]) -> str | None:
    """The queue endpoint of an identity-based connection: `<name>__queueServiceUri`, else
    the table endpoint's account with `.queue.` (the public cloud's naming)."""
    from rebalancer.store.connection import _sub_setting

    uri = _sub_setting(env, connection.setting, "queueServiceUri")
    if uri:
        return uri.rstrip("/")
    table = connection.table_service_uri
    if table and ".table." in table:
        return table.replace(".table.", ".queue.", 1).rstrip("/")
    return None


class FollowUpQueue:
    """Sends follow-ups with their delay. Creates the queue on first use if it is missing."""

    def __init__(
        self,
        queue_name: str,
        *,
        connection_string: str | None = None,
        account_url: str | None = None,
        credential: Any = None,
    ) -> None:
        if (connection_string is None) == (account_url is None):
            raise ValueError("give the follow-up queue a connection string or an account URL")
        self.queue_name = queue_name
        self._connection_string = connection_string
        self._account_url = account_url
        self._credential = credential
        self._client: Any = None
        self._lock = threading.Lock()

    @classmethod
    def from_connection(
        cls,
        queue_name: str,
        connection: StorageConnection,
        env: Mapping[str, str],
        credential: Any = None,
    ) -> FollowUpQueue:
        if connection.connection_string is not None:
            return cls(queue_name, connection_string=connection.connection_string)
        uri = queue_service_uri(connection, env)
        if uri is None:
            raise ValueError(
                f"no queue endpoint for the follow-ups: set {connection.setting}__queueServiceUri "
                "to https://<account>.queue.core.windows.net"
            )
        return cls(queue_name, account_url=uri, credential=credential)

    def _queue(self) -> Any:
        with self._lock:
            if self._client is None:
                from azure.storage.queue import QueueClient, TextBase64EncodePolicy

                from rebalancer.transport import Urllib3Transport

                # the app's one HTTP stack: its proxies, its TLS context, no requests import
                options = {
                    "message_encode_policy": TextBase64EncodePolicy(),
                    "transport": Urllib3Transport(),
                }
                if self._connection_string is not None:
                    self._client = QueueClient.from_connection_string(
                        self._connection_string, self.queue_name, **options
                    )
                else:
                    self._client = QueueClient(
                        self._account_url, self.queue_name, credential=self._credential, **options
                    )
            return self._client

    def delay_seconds(self, follow_up: FollowUp | Continuation, now: datetime) -> int:
        """Whole seconds to keep the message invisible (rounded up: never early)."""
        seconds = (follow_up.due - now).total_seconds()
        return max(0, min(MAX_DELAY_SECONDS, math.ceil(seconds)))

    def schedule(self, follow_up: FollowUp | Continuation, now: datetime) -> None:
        """Send the message, visible at `follow_up.due`. Raises FollowUpQueueError."""
        from azure.core.exceptions import AzureError, ResourceNotFoundError

        queue = self._queue()
        delay = self.delay_seconds(follow_up, now)
        try:
            try:
                queue.send_message(follow_up.to_json(), visibility_timeout=delay)
            except ResourceNotFoundError:
                self._create()
                queue.send_message(follow_up.to_json(), visibility_timeout=delay)
        except AzureError as error:
            raise FollowUpQueueError(
                f"{follow_up.label} not sent to queue {self.queue_name}: {error}"
            ) from error

    def _create(self) -> None:
        from azure.core.exceptions import ResourceExistsError

        with contextlib.suppress(ResourceExistsError):  # created meanwhile by another instance
            self._queue().create_queue()

    def close(self) -> None:
        with self._lock:
            if self._client is not None:
                self._client.close()
                self._client = None
