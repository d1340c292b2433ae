"""App settings (environment variables) -> validated, immutable `Settings`.

Validated once at start. A bad value raises `SettingsError` naming the setting, the value and
what is allowed; the functions refuse to act rather than guess.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import timedelta
from enum import StrEnum
from typing import TypeVar

PREFIX = "REBALANCER_"
_UUID = re.compile(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")
_RESOURCE_GROUP = re.compile(r"^[-\w\._\(\)]{1,90}$")

T = TypeVar("T")


class Mode(StrEnum):
    """The global switch. `off`: do nothing; `audit`: report only; `enforce`: move VMs."""

    OFF = "off"
    AUDIT = "audit"
    ENFORCE = "enforce"


class OptIn(StrEnum):
    """A scale set's `zone-rebalance` tag (or the default for untagged sets)."""

    ENABLED = "enabled"
    AUDIT = "audit"
    DISABLED = "disabled"


OPT_IN_TAG = "zone-rebalance"


SETTING_NAMES: tuple[str, ...] = (
    PREFIX + "SUBSCRIPTION_ID",
    PREFIX + "APP_PRINCIPAL_ID",
    PREFIX + "ARM_BUDGET_SHARE",
    PREFIX + "ARM_ENDPOINT",
    PREFIX + "AUDIT_INTERVAL_MINUTES",
    PREFIX + "COOLDOWN_MINUTES",
    PREFIX + "DEFAULT_OPT_IN",
    PREFIX + "FOLLOW_UP_QUEUE",
    PREFIX + "FOLLOW_UP_SECONDS",
    PREFIX + "HEALTH_TIMEOUT_MINUTES",
    PREFIX + "HISTORY_RETENTION_DAYS",
    PREFIX + "MAX_CONCURRENT_OPERATIONS",
    PREFIX + "MAX_SURGE",
    PREFIX + "MIN_MOVE_INTERVAL_MINUTES",
    PREFIX + "MODE",
    PREFIX + "NOTIFY_TOPIC_ENDPOINT",
    PREFIX + "RESOURCE_GROUPS",
    PREFIX + "SDK_LOG_LEVEL",
    PREFIX + "STATE_TABLE_PREFIX",
)
"""Every app setting `load_settings` reads (the deployment sets each of them)."""


class SettingsError(ValueError):
    def __init__(self, name: str, value: str, allowed: str) -> None:
        super().__init__(f"setting {name}={value!r} is invalid: {allowed}")
        self.name = name


@dataclass(frozen=True, slots=True)
class Settings:
    subscription_id: str
    mode: Mode = Mode.AUDIT
    resource_groups: tuple[str, ...] = ()
    default_opt_in: OptIn = OptIn.AUDIT
    max_surge: int = 1
    cooldown: timedelta = timedelta(minutes=60)
    health_timeout: timedelta = timedelta(minutes=90)
    min_move_interval: timedelta = timedelta(0)
    max_concurrent_operations: int = 5
    audit_interval: timedelta = timedelta(minutes=60)
    history_retention: timedelta = timedelta(days=30)
    app_principal_id: str | None = None
    table_prefix: str = "rebalancer"
    notify_topic_endpoint: str | None = None
    arm_endpoint: str = "https://management.azure.com"
    arm_budget_share: float = 0.2
    follow_up_queue: str = "rebalancer-follow-ups"
    """Storage queue of the follow-up messages (the durable timer of in-flight operations)."""
    follow_up_interval: timedelta = timedelta(seconds=10)
    """How often an operation waiting for its new VMs' health reads their instance views."""
    sdk_log_level: str = "WARNING"
    """The level of the Azure SDKs' and urllib3's own log records. Their HTTP logging writes
    each request and each answer at INFO, and the Functions worker sends every record at INFO
    or above to the host: two records per ARM read, a thousand reads an audit."""
    function_timeout: timedelta | None = timedelta(minutes=10)
    """An invocation's time limit (`host.json` `functionTimeout`; None: unbounded). Not an
    app setting: `function_timeout` reads it from the deployed host.json."""

    def in_scope(self, subscription_id: str, resource_group: str) -> bool:
        """Whether a resource in this subscription and resource group is ours to touch."""
        if subscription_id.lower() != self.subscription_id.lower():
            return False
        if not self.resource_groups:
            return True
        return resource_group.lower() in {rg.lower() for rg in self.resource_groups}

    def opt_in(self, tag_value: str | None) -> OptIn:
        """The opt-in of a scale set from its tag value; unknown values fail safe to audit."""
        if tag_value is None or not tag_value.strip():
            return self.default_opt_in
        try:
            return OptIn(tag_value.strip().lower())
        except ValueError:
            return OptIn.AUDIT


def _get(env: Mapping[str, str], name: str) -> str | None:
    value = env.get(name)
    if value is None or not value.strip():
        return None
    return value.strip()


def _parse(
    env: Mapping[str, str], name: str, default: T, convert: Callable[[str], T], allowed: str
) -> T:
    raw = _get(env, name)
    if raw is None:
        return default
    try:
        return convert(raw)
    except (ValueError, TypeError):
        raise SettingsError(name, raw, allowed) from None


def _int_in(low: int, high: int) -> Callable[[str], int]:
    def convert(raw: str) -> int:
        value = int(raw)
        if not low <= value <= high:
            raise ValueError(raw)
        return value

    return convert


def _minutes(low: int, high: int) -> Callable[[str], timedelta]:
    as_int = _int_in(low, high)
    return lambda raw: timedelta(minutes=as_int(raw))


def _share(raw: str) -> float:
    value = float(raw)
    if not 0 < value <= 1:
        raise ValueError(raw)
    return value


def _https_url(raw: str) -> str:
    if not raw.startswith("https://"):
        raise ValueError(raw)
    return raw.rstrip("/")


def _resource_groups(raw: str) -> tuple[str, ...]:
    groups = tuple(part.strip() for part in raw.split(",") if part.strip())
    if not all(_RESOURCE_GROUP.match(group) for group in groups):
        raise ValueError(raw)
    return groups


def _uuid(raw: str) -> str:
    if not _UUID.match(raw):
        raise ValueError(raw)
    return raw.lower()


LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


def _log_level(raw: str) -> str:
    if raw.strip().upper() not in LOG_LEVELS:
        raise ValueError(raw)
    return raw.strip().upper()


def _queue_name(raw: str) -> str:
    if not re.match(r"^[a-z0-9](?:[a-z0-9]|-(?=[a-z0-9])){2,62}$", raw):
        raise ValueError(raw)
    return raw


def _table_prefix(raw: str) -> str:
    if not re.match(r"^[A-Za-z][A-Za-z0-9]{0,39}$", raw):
        raise ValueError(raw)
    return raw


def load_settings(env: Mapping[str, str]) -> Settings:
    """Read and validate every setting. Raises SettingsError on the first bad one."""
    subscription = _get(env, PREFIX + "SUBSCRIPTION_ID")
    if subscription is None:
        raise SettingsError(
            PREFIX + "SUBSCRIPTION_ID", "", "required: the id of the subscription to manage"
        )
    p = PREFIX
    return Settings(
        subscription_id=_parse(env, p + "SUBSCRIPTION_ID", "", _uuid, "a subscription GUID"),
        mode=_parse(env, p + "MODE", Mode.AUDIT, Mode, "one of off, audit, enforce"),
        resource_groups=_parse(
            env,
            p + "RESOURCE_GROUPS",
            (),
            _resource_groups,
            "comma-separated resource group names, or empty for the whole subscription",
        ),
        default_opt_in=_parse(
            env,
            p + "DEFAULT_OPT_IN",
            OptIn.AUDIT,
            OptIn,
            "one of audit, enabled, disabled (what untagged scale sets get)",
        ),
        max_surge=_parse(env, p + "MAX_SURGE", 1, _int_in(1, 100), "an integer from 1 to 100"),
        cooldown=_parse(
            env,
            p + "COOLDOWN_MINUTES",
            timedelta(minutes=60),
            _minutes(0, 10080),
            "whole minutes from 0 to 10080",
        ),
        health_timeout=_parse(
            env,
            p + "HEALTH_TIMEOUT_MINUTES",
            timedelta(minutes=90),
            _minutes(5, 1440),
            "whole minutes from 5 to 1440",
        ),
        min_move_interval=_parse(
            env,
            p + "MIN_MOVE_INTERVAL_MINUTES",
            timedelta(0),
            _minutes(0, 10080),
            "whole minutes from 0 to 10080",
        ),
        max_concurrent_operations=_parse(
            env, p + "MAX_CONCURRENT_OPERATIONS", 5, _int_in(1, 100), "an integer from 1 to 100"
        ),
        audit_interval=_parse(
            env,
            p + "AUDIT_INTERVAL_MINUTES",
            timedelta(minutes=60),
            _minutes(1, 1440),
            "whole minutes from 1 to 1440",
        ),
        history_retention=_parse(
            env,
            p + "HISTORY_RETENTION_DAYS",
            timedelta(days=30),
            lambda raw: timedelta(days=_int_in(1, 3650)(raw)),
            "whole days from 1 to 3650 (how long finished operations are kept)",
        ),
        app_principal_id=_parse(
            env,
            p + "APP_PRINCIPAL_ID",
            None,
            _uuid,
            "the object (principal) id of the app's managed identity, a GUID",
        ),
        table_prefix=_parse(
            env,
            p + "STATE_TABLE_PREFIX",
            "rebalancer",
            _table_prefix,
            "a letter followed by up to 39 letters or digits",
        ),
        notify_topic_endpoint=_parse(
            env, p + "NOTIFY_TOPIC_ENDPOINT", None, _https_url, "an https:// topic endpoint"
        ),
        arm_endpoint=_parse(
            env,
            p + "ARM_ENDPOINT",
            "https://management.azure.com",
            _https_url,
            "the https:// Resource Manager endpoint of your cloud",
        ),
        arm_budget_share=_parse(
            env, p + "ARM_BUDGET_SHARE", 0.2, _share, "a fraction greater than 0, at most 1"
        ),
        follow_up_queue=_parse(
            env,
            p + "FOLLOW_UP_QUEUE",
            "rebalancer-follow-ups",
            _queue_name,
            "a Storage queue name: 3-63 lower-case letters, digits and single hyphens, "
            "starting and ending with a letter or digit",
        ),
        follow_up_interval=_parse(
            env,
            p + "FOLLOW_UP_SECONDS",
            timedelta(seconds=10),
            lambda raw: timedelta(seconds=_int_in(5, 300)(raw)),
            "whole seconds from 5 to 300",
        ),
        sdk_log_level=_parse(
            env,
            p + "SDK_LOG_LEVEL",
            "WARNING",
            _log_level,
            "one of DEBUG, INFO, WARNING, ERROR, CRITICAL (INFO logs every HTTP request)",
        ),
    )


_TIMESPAN = re.compile(r"^(?:(?P<days>\d+)\.)?(?P<h>\d{1,2}):(?P<m>\d{2}):(?P<s>\d{2})$")


def function_timeout(host_json: str, where: str = "host.json") -> timedelta | None:
    """`functionTimeout` of a host.json text: a `[d.]hh:mm:ss` timespan, or None for `-1`
    (no limit). Without the property, the Flex Consumption plan's default (30 minutes).
    ValueError naming the file and the value otherwise."""
    import json

    try:
        document = json.loads(host_json)
    except json.JSONDecodeError as error:
        raise ValueError(f"{where} is not JSON: {error}") from None
    raw = document.get("functionTimeout") if isinstance(document, dict) else None
    if raw is None:
        return timedelta(minutes=30)
    text = str(raw).strip()
    if text == "-1":
        return None
    match = _TIMESPAN.match(text)
    if match is None or int(match["m"]) > 59 or int(match["s"]) > 59:
        raise ValueError(
            f"{where}: functionTimeout {raw!r} is not a timespan like 00:10:00 (or -1 for no "
            "limit); fix host.json"
        )
    limit = timedelta(
        days=int(match["days"] or 0),
        hours=int(match["h"]),
        minutes=int(match["m"]),
        seconds=int(match["s"]),
    )
    if limit <= timedelta(0):
        raise ValueError(f"{where}: functionTimeout {raw!r} must be positive, or -1 for no limit")
    return limit
