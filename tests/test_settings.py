from datetime import timedelta

import pytest

from rebalancer.settings import Mode, OptIn, SettingsError, load_settings

SUB = "5e8a1b2c-3d4e-4f50-8a61-7b8c9d0e1f2a"


def test_defaults_are_safe():
    settings = load_settings({"REBALANCER_SUBSCRIPTION_ID": SUB})
    assert settings.mode is Mode.AUDIT
    assert settings.default_opt_in is OptIn.AUDIT
    assert settings.max_surge == 1
    assert settings.cooldown == timedelta(minutes=60)
    assert settings.health_timeout == timedelta(minutes=90)
    assert settings.resource_groups == ()


def test_every_setting_is_read():
    settings = load_settings(
        {
            "REBALANCER_SUBSCRIPTION_ID": SUB.upper(),
            "REBALANCER_MODE": "enforce",
            "REBALANCER_RESOURCE_GROUPS": "rg-web, rg-api ,",
            "REBALANCER_DEFAULT_OPT_IN": "enabled",
            "REBALANCER_MAX_SURGE": "3",
            "REBALANCER_COOLDOWN_MINUTES": "15",
            "REBALANCER_HEALTH_TIMEOUT_MINUTES": "30",
            "REBALANCER_MIN_MOVE_INTERVAL_MINUTES": "10",
            "REBALANCER_MAX_CONCURRENT_OPERATIONS": "2",
            "REBALANCER_AUDIT_INTERVAL_MINUTES": "120",
            "REBALANCER_APP_PRINCIPAL_ID": "9D2C1B0A-1111-4222-8333-444455556666",
            "REBALANCER_STATE_TABLE_PREFIX": "zr1",
            "REBALANCER_NOTIFY_TOPIC_ENDPOINT": "https://t.westeurope-1.eventgrid.azure.net/api/events",
            "REBALANCER_ARM_ENDPOINT": "https://management.usgovcloudapi.net/",
            "REBALANCER_ARM_BUDGET_SHARE": "0.5",
        }
    )
    assert settings.subscription_id == SUB
    assert settings.mode is Mode.ENFORCE
    assert settings.resource_groups == ("rg-web", "rg-api")
    assert settings.default_opt_in is OptIn.ENABLED
    assert settings.max_surge == 3
    assert settings.cooldown == timedelta(minutes=15)
    assert settings.health_timeout == timedelta(minutes=30)
    assert settings.min_move_interval == timedelta(minutes=10)
    assert settings.max_concurrent_operations == 2
    assert settings.audit_interval == timedelta(hours=2)
    assert settings.app_principal_id == "9d2c1b0a-1111-4222-8333-444455556666"
    assert settings.table_prefix == "zr1"
    assert settings.arm_endpoint == "https://management.usgovcloudapi.net"
    assert settings.arm_budget_share == 0.5


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("REBALANCER_MODE", "yes"),
        ("REBALANCER_MAX_SURGE", "0"),
        ("REBALANCER_MAX_SURGE", "two"),
        ("REBALANCER_COOLDOWN_MINUTES", "-1"),
        ("REBALANCER_HEALTH_TIMEOUT_MINUTES", "1"),
        ("REBALANCER_RESOURCE_GROUPS", "rg/one"),
        ("REBALANCER_APP_PRINCIPAL_ID", "not-a-guid"),
        ("REBALANCER_NOTIFY_TOPIC_ENDPOINT", "http://insecure"),
        ("REBALANCER_ARM_BUDGET_SHARE", "1.5"),
        ("REBALANCER_STATE_TABLE_PREFIX", "9bad"),
        ("REBALANCER_SUBSCRIPTION_ID", "my-subscription"),
    ],
)
def test_bad_values_name_the_setting_and_the_allowed_values(name, value):
    env = {"REBALANCER_SUBSCRIPTION_ID": SUB, name: value}
    with pytest.raises(SettingsError) as caught:
        load_settings(env)
    assert caught.value.name == name
    assert name in str(caught.value)
    assert repr(value) in str(caught.value)


def test_subscription_is_required():
    with pytest.raises(SettingsError, match="REBALANCER_SUBSCRIPTION_ID"):
        load_settings({})


def test_scope_is_case_insensitive():
    settings = load_settings(
        {"REBALANCER_SUBSCRIPTION_ID": SUB, "REBALANCER_RESOURCE_GROUPS": "RG-Web"}
    )
    assert settings.in_scope(SUB.upper(), "rg-web")
    assert not settings.in_scope(SUB, "rg-other")
    assert not settings.in_scope("00000000-0000-0000-0000-000000000000", "rg-web")


def test_opt_in_tag_values():
    settings = load_settings({"REBALANCER_SUBSCRIPTION_ID": SUB})
    assert settings.opt_in(None) is OptIn.AUDIT
    assert settings.opt_in(" Enabled ") is OptIn.ENABLED
    assert settings.opt_in("disabled") is OptIn.DISABLED
    assert settings.opt_in("maybe") is OptIn.AUDIT


class _Recording(dict):
    def __init__(self, values):
        super().__init__(values)
        self.read = set()

    def get(self, key, default=None):
        self.read.add(key)
        return super().get(key, default)


def test_setting_names_list_exactly_what_is_read():
    from rebalancer.settings import SETTING_NAMES

    env = _Recording({"REBALANCER_SUBSCRIPTION_ID": SUB})
    load_settings(env)
    assert env.read == set(SETTING_NAMES)


def test_sdk_log_level():
    assert load_settings({"REBALANCER_SUBSCRIPTION_ID": SUB}).sdk_log_level == "WARNING"
    settings = load_settings(
        {"REBALANCER_SUBSCRIPTION_ID": SUB, "REBALANCER_SDK_LOG_LEVEL": " info"}
    )
    assert settings.sdk_log_level == "INFO"
    with pytest.raises(SettingsError, match=r"REBALANCER_SDK_LOG_LEVEL='verbose'.*DEBUG, INFO"):
        load_settings({"REBALANCER_SUBSCRIPTION_ID": SUB, "REBALANCER_SDK_LOG_LEVEL": "verbose"})


def test_history_retention():
    settings = load_settings(
        {"REBALANCER_SUBSCRIPTION_ID": SUB, "REBALANCER_HISTORY_RETENTION_DAYS": "7"}
    )
    assert settings.history_retention == timedelta(days=7)
    with pytest.raises(SettingsError, match="REBALANCER_HISTORY_RETENTION_DAYS"):
        load_settings({"REBALANCER_SUBSCRIPTION_ID": SUB, "REBALANCER_HISTORY_RETENTION_DAYS": "0"})


def test_the_invocation_limit_comes_from_host_json():
    from pathlib import Path

    from rebalancer import service
    from rebalancer.settings import function_timeout

    shipped = (Path(__file__).resolve().parent.parent / "host.json").read_text()
    assert function_timeout(shipped) == timedelta(minutes=10)
    assert service._host_function_timeout() == timedelta(minutes=10)
    assert function_timeout('{"functionTimeout": "1.02:03:04"}') == timedelta(
        days=1, hours=2, minutes=3, seconds=4
    )
    assert function_timeout('{"functionTimeout": "-1"}') is None
    assert function_timeout('{"version": "2.0"}') == timedelta(minutes=30)  # Flex default


@pytest.mark.parametrize("value", ["10 minutes", "00:61:00", "00:00:00", "600"])
def test_a_bad_function_timeout_names_host_json_and_the_value(value):
    from rebalancer.settings import function_timeout

    with pytest.raises(ValueError, match=r"host\.json.*functionTimeout"):
        function_timeout(f'{{"functionTimeout": "{value}"}}')
