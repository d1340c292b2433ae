"""The deployment under infra/ is parseable, clean under checkov and least-privilege.

No Bicep compiler can run here, so the templates are checked two ways: checkov (offline, in
its own virtualenv `.venv-checkov`, which `make test` creates) must parse every file and
report no failed check; and the templates, parsed with checkov's own Bicep parser (pycep),
must keep the security properties the deployment promises. Each property check is a function
over a directory, so the same checks run on a deliberately broken copy and must fail there.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from pycep import BicepParser

from rebalancer.azure_operations import (
    EVENT_GRID_FUNCTION_NAME,
    HANDLED_EVENT_TYPES,
    HANDLED_OPERATION_NAMES,
    LINKED_ACCESS_ROLE_ACTIONS,
    REQUIRED_ROLE_ACTIONS,
    SCALE_SET_ROLE_ACTIONS,
    SUBSCRIPTION_READ_ROLE_ACTIONS,
)
from rebalancer.settings import Mode, OptIn, SettingsError, load_settings
from rebalancer.store import parse_connection

REPO = Path(__file__).resolve().parents[1]
INFRA = REPO / "infra"
CHECKOV = Path(os.environ.get("REBALANCER_CHECKOV", REPO / ".venv-checkov" / "bin" / "checkov"))
CHECKOV_TIMEOUT_SECONDS = 240

TEMPLATES = {
    "main": "main.bicep",
    "app": "modules/app.bicep",
    "role_assignment": "modules/role-assignment.bicep",
    "subscription_role_assignment": "modules/subscription-role-assignment.bicep",
    "monitoring": "modules/monitoring.bicep",
    "event_subscription": "event-subscription.bicep",
}

# The only built-in roles the deployment may assign (ids are the same in every tenant).
ALLOWED_BUILTIN_ROLES = {
    "b7e6dc6d-f1e8-4753-8033-0f276bb0955b": "Storage Blob Data Owner",
    "ba92f5b4-2d11-453d-a403-e96b0029c9fe": "Storage Blob Data Contributor",
    "974c5e8b-45b9-4653-ba55-5f855dd0fb88": "Storage Queue Data Contributor",
    "0a9a7e1f-b9d0-4cc4-a60d-0319b160aaa3": "Storage Table Data Contributor",
    "3913510d-42f4-4e42-8a64-420c390055eb": "Monitoring Metrics Publisher",
    "d5a91429-5739-47e2-a06b-3470a27159e7": "EventGrid Data Sender",
}
PRIVILEGED_ROLES = {
    "8e3af657-a8ff-443c-a75c-2fe8c4bcb635": "Owner",
    "b24988ac-6180-42a0-ab88-20f7382dd24c": "Contributor",
    "18d7d88d-d35e-4fb5-a5c3-7773c20a72d9": "User Access Administrator",
}
_GUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", re.I)

# Every setting the app reads, with the default the deployment gives it.
SETTING_DEFAULTS = {
    "REBALANCER_MODE": ("mode", "audit"),
    "REBALANCER_DEFAULT_OPT_IN": ("defaultOptIn", "audit"),
    "REBALANCER_MAX_SURGE": ("maxSurge", 1),
    "REBALANCER_COOLDOWN_MINUTES": ("cooldownMinutes", 60),
    "REBALANCER_HEALTH_TIMEOUT_MINUTES": ("healthTimeoutMinutes", 90),
    "REBALANCER_MIN_MOVE_INTERVAL_MINUTES": ("minMoveIntervalMinutes", 0),
    "REBALANCER_MAX_CONCURRENT_OPERATIONS": ("maxConcurrentOperations", 5),
    "REBALANCER_TIMER_SCHEDULE": ("timerSchedule", "0 */5 * * * *"),
    "REBALANCER_AUDIT_INTERVAL_MINUTES": ("auditIntervalMinutes", 60),
    "REBALANCER_HISTORY_RETENTION_DAYS": ("historyRetentionDays", 30),
    "REBALANCER_ARM_BUDGET_SHARE": ("armBudgetShare", "0.2"),
}
REQUIRED_SETTINGS = {
    *SETTING_DEFAULTS,
    "REBALANCER_SUBSCRIPTION_ID",
    "REBALANCER_RESOURCE_GROUPS",
    "REBALANCER_APP_PRINCIPAL_ID",
    "REBALANCER_STATE_TABLE_PREFIX",
    "REBALANCER_NOTIFY_TOPIC_ENDPOINT",
    "REBALANCER_ARM_ENDPOINT",
    "REBALANCER_FOLLOW_UP_QUEUE",
    "REBALANCER_FOLLOW_UP_SECONDS",
    "REBALANCER_SDK_LOG_LEVEL",
    "AZURE_CLIENT_ID",
    "AzureWebJobsStorage__blobServiceUri",
    "AzureWebJobsStorage__queueServiceUri",
    "AzureWebJobsStorage__tableServiceUri",
    "AzureWebJobsStorage__credential",
    "AzureWebJobsStorage__clientId",
    "APPLICATIONINSIGHTS_CONNECTION_STRING",
    "APPLICATIONINSIGHTS_AUTHENTICATION_STRING",
}
MAX_EVENT_FILTER_VALUES = 25  # Event Grid's limit over all advanced filters of a subscription


# --- reading the templates ------------------------------------------------------------------


@dataclass(frozen=True)
class Infra:
    """The parsed templates of one infra/ directory, and what could not be parsed."""

    root: Path
    parsed: dict[str, dict[str, Any]]
    texts: dict[str, str]
    parse_errors: dict[str, str]

    def resource(self, template: str, name: str) -> dict[str, Any]:
        """The body of a resource, looking through `if (...)` conditions."""
        config = self.parsed[template]["resources"][name]["config"]
        if "condition" in config and "config" in config:
            return config["config"]
        return config

    def resources_of_type(self, template: str, type_: str) -> Iterator[tuple[str, dict]]:
        for name, resource in self.parsed[template]["resources"].items():
            if resource["type"].lower() == type_.lower():
                yield name, self.resource(template, name)

    def param_default(self, template: str, name: str) -> Any:
        return self.parsed[template]["parameters"][name].get("default")

    def variable(self, template: str, name: str) -> Any:
        return self.parsed[template]["variables"][name]["value"]


def read_infra(root: Path) -> Infra:
    parser = BicepParser()
    parsed: dict[str, dict[str, Any]] = {}
    texts: dict[str, str] = {}
    errors: dict[str, str] = {}
    for key, relative in TEMPLATES.items():
        text = (root / relative).read_text(encoding="utf-8")
        texts[key] = text
        try:
            parsed[key] = parser.parse(text=text)
        except Exception as error:  # lark raises many kinds; each one means "not parsed"
            errors[key] = f"{relative}: {type(error).__name__}: {str(error).splitlines()[0]}"
    return Infra(root, parsed, texts, errors)


def app_settings(infra: Infra) -> dict[str, Any]:
    site = infra.resource("app", "functionApp")
    return {item["name"]: item["value"] for item in site["properties"]["siteConfig"]["appSettings"]}


def dotted(value: Any) -> str:
    """`storage.properties.primaryEndpoints.blob` back from pycep's property accessors."""
    if isinstance(value, dict) and value.get("operator", {}).get("type") == "property_accessor":
        operands = value["operator"]["operands"]
        return f"{dotted(operands['operand_1'])}.{dotted(operands['operand_2'])}"
    return value if isinstance(value, str) else json.dumps(value)


def get_ci(mapping: dict[str, Any], key: str) -> Any:
    """ARM property names are case-insensitive (`DisableLocalAuth` == `disableLocalAuth`)."""
    for name, value in mapping.items():
        if name.lower() == key.lower():
            return value
    return None


# --- Bicep source: what the parser does not tell ---------------------------------------------


def bicep_code(text: str) -> str:
    """The Bicep source with comments and the literal text of strings blanked out (lengths and
    line breaks kept); the expressions inside `${...}` interpolations stay."""
    out: list[str] = []
    i, n = 0, len(text)
    braces: list[str] = []  # "{" of an object or "${" of an interpolation, innermost last
    in_string = False
    while i < n:
        char, pair = text[i], text[i : i + 2]
        if in_string:
            if pair == "${":
                braces.append("${")
                in_string = False
                out.append("  ")
                i += 2
                continue
            if pair == "\\'" or pair == "\\\\":
                out.append("  ")
                i += 2
                continue
            if char == "'":
                in_string = False
            out.append("\n" if char == "\n" else " ")
            i += 1
            continue
        if pair == "//":
            end = text.find("\n", i)
            end = n if end < 0 else end
            out.append(" " * (end - i))
            i = end
            continue
        if pair == "/*":
            end = text.find("*/", i + 2)
            end = n if end < 0 else end + 2
            out.append("".join("\n" if c == "\n" else " " for c in text[i:end]))
            i = end
            continue
        if char == "'":
            in_string = True
            out.append(" ")
        elif char == "{":
            braces.append("{")
            out.append(char)
        elif char == "}" and braces and braces[-1] == "${":
            braces.pop()
            in_string = True
            out.append(" ")
        else:
            if char == "}" and braces:
                braces.pop()
            out.append(char)
        i += 1
    return "".join(out)


_DECLARED = re.compile(
    r"^\s*(?:param|var|resource|module|type|func)\s+(\w+)"  # top-level declarations
    r"|\bfor\s+(\w+)\s+in\b|\bfor\s*\(\s*(\w+)\s*,\s*(\w+)\s*\)\s*in\b"  # loop variables
    r"|\b(\w+)\s*=>|\(\s*(\w+)\s*,\s*(\w+)\s*\)\s*=>",  # lambda variables
    re.M,
)
_CALLED = re.compile(r"(?<![\w.])(@?)(\w+)\s*\(")


def check_no_shadowed_functions(infra: Infra) -> list[str]:
    """A symbol named like a function hides it in the whole file: a parameter `description`
    makes every `@description(...)` BCP265 ("The name "description" is not a function").
    Bicep's own compiler would say so; here nothing compiles Bicep, so this check does."""
    problems = []
    for key, text in infra.texts.items():
        code = bicep_code(text)
        declared = {name for match in _DECLARED.finditer(code) for name in match.groups() if name}
        for match in _CALLED.finditer(code):
            at, name = match.groups()
            if name in declared:
                line = code.count("\n", 0, match.start()) + 1
                kind = "decorator" if at else "function"
                problems.append(
                    f"{TEMPLATES[key]}:{line}: the symbol {name!r} hides the {kind} {at}{name}(); "
                    f"rename the symbol or write sys.{name}(...)"
                )
    return problems


# --- property checks: each returns the problems it finds, [] when the property holds ---------


def check_parsed(infra: Infra) -> list[str]:
    problems = [f"cannot parse {error}" for error in infra.parse_errors.values()]
    # pycep silently drops sibling resources nested in a parent; declare children with
    # `parent:` instead, so that checkov and these checks see every resource.
    for key, tree in infra.parsed.items():
        declared = len(re.findall(r"^\s*resource\s+\w+\s+'", infra.texts[key], re.M))
        if declared != len(tree["resources"]):
            problems.append(
                f"{TEMPLATES[key]}: {declared} resources declared, {len(tree['resources'])} parsed"
            )
    return problems


def check_roles(infra: Infra) -> list[str]:
    problems = []
    roles = dict(infra.resources_of_type("main", "Microsoft.Authorization/roleDefinitions"))
    expected = {
        "scaleSetRole": SCALE_SET_ROLE_ACTIONS,
        "subscriptionReadRole": SUBSCRIPTION_READ_ROLE_ACTIONS,
        "linkedAccessRole": LINKED_ACCESS_ROLE_ACTIONS,
    }
    if set(roles) != set(expected):
        problems.append(f"custom roles are {sorted(roles)}, expected {sorted(expected)}")
    every_action: list[str] = []
    for name, body in roles.items():
        for permission in body["properties"]["permissions"]:
            actions = permission.get("actions", [])
            every_action += actions
            for other in ("notActions", "dataActions", "notDataActions"):
                if permission.get(other):
                    problems.append(f"role {name} has {other}: {permission[other]}")
            if name in expected and sorted(actions) != sorted(expected[name]):
                missing = sorted(set(expected[name]) - set(actions))
                extra = sorted(set(actions) - set(expected[name]))
                problems.append(
                    f"role {name}: missing {missing}; needed by no adapter call "
                    f"(rebalancer.azure_operations.ADAPTER_CALLS): {extra}"
                )
    problems += [f"wildcard action {action}" for action in every_action if "*" in action]
    if sorted(every_action) != sorted(REQUIRED_ROLE_ACTIONS):
        problems.append("the roles' actions together differ from REQUIRED_ROLE_ACTIONS")
    return problems


def _unwrapped(config: dict[str, Any]) -> dict[str, Any]:
    """The body of a resource or module, looking through `for` loops and `if` conditions."""
    while isinstance(config, dict) and ("loop_type" in config or "condition" in config):
        if "config" not in config:
            break
        config = config["config"]
    return config


def expression_terms(value: Any) -> set[str]:
    """Every symbol and property path an expression mentions (`identity.id`, `principalId`)."""
    if isinstance(value, str):
        inner = re.findall(r"\$\{([^}]*)\}", value)
        return {value, *(w for part in inner for w in re.findall(r"[\w.]+", part))}
    if isinstance(value, dict):
        if value.get("operator", {}).get("type") == "property_accessor":
            return {dotted(value)} | expression_terms(value["operator"]["operands"])
        return set().union(*(expression_terms(v) for v in value.values()), set())
    if isinstance(value, list):
        return set().union(*(expression_terms(v) for v in value), set())
    return set()


def check_role_assignments_name_their_principal(infra: Infra) -> list[str]:
    """A role assignment's name must change with its principal: Resource Manager refuses to
    point an existing assignment at another principal (RoleAssignmentUpdateNotPermitted).
    Subscription-scope assignments outlive `azd down`, and the next `azd up` makes a new
    identity, so their names must come from the principal id itself. An assignment in the
    app's resource group may use the id of the identity's resource instead (a name must be
    known when the deployment starts): the resource group, the identity and the assignment
    are deleted together."""
    problems = []
    for key, tree in infra.parsed.items():
        for name, resource in tree["resources"].items():
            if resource["type"].lower() != "microsoft.authorization/roleassignments":
                continue
            body = _unwrapped(resource["config"])
            principal = dotted(body["properties"]["principalId"])
            terms = expression_terms(body["name"])
            root = principal.split(".")[0]
            owner = tree["resources"].get(root)
            in_resource_group = (
                tree.get("globals", {}).get("scope", {}).get("value", "resourceGroup")
                == "resourceGroup"
            )
            same_group_identity = (
                in_resource_group
                and owner is not None
                and not owner.get("existing")
                and f"{root}.id" in terms
            )
            if principal not in terms and not same_group_identity:
                problems.append(
                    f"{TEMPLATES[key]}: role assignment {name} is named without its principal "
                    f"({principal}): after `azd down` a new identity gets "
                    "RoleAssignmentUpdateNotPermitted; name it guid(scope, principal id, role), "
                    "through a module that takes principalId"
                )
    return problems


def check_linked_subscriptions(infra: Infra) -> list[str]:
    """Scale sets using images, identities or networks of other subscriptions: the linked-access
    role must be assignable there, and assigned, on each subscription listed."""
    problems = []
    wanted = json.dumps(infra.variable("main", "linkedSubscriptions"))
    if not all(part in wanted for part in ('"type": "filter"', '"empty"', "subscriptionId")):
        problems.append("linkedSubscriptions keeps empty ids or this subscription's own id")
    role = infra.resource("main", "linkedAccessRole")["properties"]
    if "linkedSubscriptionScopes" not in expression_terms(role["assignableScopes"]):
        problems.append("the linked-access role is not assignable in the linked subscriptions")
    module = infra.parsed["main"]["modules"]["linkedAccessRoleOnSubscriptions"]
    loop = module["config"]["loop_type"]["detail"]
    body = _unwrapped(module["config"])
    scope = body["scope"]["function"]
    if loop["array_name"] != "linkedSubscriptions" or (scope["type"], scope["parameters"]) != (
        "subscription",
        {"subscription_id": loop["item_name"]},
    ):
        problems.append("the linked-access role is not assigned on each linked subscription")
    # A role definition id names a subscription: the one of the assignment's scope.
    expected = (
        f"/subscriptions/${{{loop['item_name']}}}/providers/Microsoft.Authorization/"
        "roleDefinitions/${linkedAccessRole.name}"
    )
    if body["params"]["roleDefinitionId"] != expected:
        problems.append(
            "the linked subscriptions get another role than linked access, or name it "
            "from another subscription"
        )
    return problems


def check_builtin_roles(infra: Infra) -> list[str]:
    problems = []
    for key, text in infra.texts.items():
        for guid in {match.lower() for match in _GUID.findall(text)}:
            if guid in PRIVILEGED_ROLES:
                problems.append(f"{TEMPLATES[key]} assigns {PRIVILEGED_ROLES[guid]}")
            elif guid not in ALLOWED_BUILTIN_ROLES:
                problems.append(f"{TEMPLATES[key]} names an unexpected role or id {guid}")
    return problems


def check_storage(infra: Infra) -> list[str]:
    props = infra.resource("app", "storage")["properties"]
    expected = {
        "allowSharedKeyAccess": False,
        "allowBlobPublicAccess": False,
        "minimumTlsVersion": "TLS1_2",
        "supportsHttpsTrafficOnly": True,
        "defaultToOAuthAuthentication": True,
    }
    return [
        f"storage {name} is {props.get(name)!r}, expected {value!r}"
        for name, value in expected.items()
        if props.get(name) != value
    ]


def check_identity_based_settings(infra: Infra) -> list[str]:
    settings = app_settings(infra)
    problems = []
    if settings.get("AzureWebJobsStorage__credential") != "managedidentity":
        problems.append("AzureWebJobsStorage__credential is not 'managedidentity'")
    for service in ("blob", "queue", "table"):
        name = f"AzureWebJobsStorage__{service}ServiceUri"
        if dotted(settings.get(name)) != f"storage.properties.primaryEndpoints.{service}":
            problems.append(f"{name} is not the {service} endpoint")
    client_id = "identity.properties.clientId"
    for name in ("AzureWebJobsStorage__clientId", "AZURE_CLIENT_ID"):
        if dotted(settings.get(name)) != client_id:
            problems.append(f"{name} is not the user-assigned identity's client id")
    if "AzureWebJobsStorage" in settings:
        problems.append("AzureWebJobsStorage (a connection string) is set")
    if "Authorization=AAD" not in str(settings.get("APPLICATIONINSIGHTS_AUTHENTICATION_STRING")):
        problems.append("Application Insights ingestion is not identity-based")
    for key, text in infra.texts.items():
        for secret in ("listKeys", "AccountKey", "InstrumentationKey="):
            if secret in text:
                problems.append(f"{TEMPLATES[key]} uses {secret}")
    return problems


def check_app_insights(infra: Infra) -> list[str]:
    props = infra.resource("app", "appInsights")["properties"]
    if get_ci(props, "disableLocalAuth") is not True:
        return ["Application Insights local auth is not disabled"]
    return []


def check_flex_consumption(infra: Infra) -> list[str]:
    problems = []
    sku = infra.resource("app", "plan")["sku"]
    if (sku.get("name"), sku.get("tier")) != ("FC1", "FlexConsumption"):
        problems.append(f"plan sku is {sku}, expected FC1 FlexConsumption")
    site = infra.resource("app", "functionApp")
    config = site["properties"]["functionAppConfig"]
    if config["runtime"] != {"name": "python", "version": "3.11"}:
        problems.append(f"runtime is {config['runtime']}, expected python 3.11")
    if site["identity"]["type"] != "UserAssigned":
        problems.append("the function app has no user-assigned identity")
    if config["deployment"]["storage"]["authentication"]["type"] != "UserAssignedIdentity":
        problems.append("the deployment container is not read with the identity")
    if site["properties"].get("httpsOnly") is not True:
        problems.append("the function app accepts plain HTTP")
    return problems


def check_hardening(infra: Infra) -> list[str]:
    """What a first deployment trips over, and the zone-redundant plan."""
    problems = []
    site = infra.resource("app", "functionApp")
    if "deploymentContainer" not in site.get("dependsOn", []):
        problems.append("the function app does not depend on its deployment container")
    plan = infra.resource("app", "plan")["properties"]
    if plan.get("zoneRedundant") != "zoneRedundant":
        problems.append("the plan's zoneRedundant is not the zoneRedundant parameter")
    if infra.param_default("main", "zoneRedundant") is not False:
        problems.append("zoneRedundant (two always-ready instances per function) is on by default")
    scale = site["properties"]["functionAppConfig"]["scaleAndConcurrency"]
    ready = scale.get("alwaysReady", {}).get("operator", {}).get("operands", {})
    if (ready.get("condition"), ready.get("true_value")) != ("zoneRedundant", "alwaysReady"):
        problems.append("alwaysReady is not set when the plan is zone-redundant")
    counts = infra.variable("app", "alwaysReady")["config"]
    if counts.get("instanceCount", 0) < 2:
        problems.append("a zone-redundant plan needs two always-ready instances per function")
    sku = infra.resource("app", "storage")["sku"]["name"].get("operator", {}).get("operands", {})
    if (sku.get("condition"), sku.get("true_value")) != ("zoneRedundant", "Standard_ZRS"):
        problems.append("the storage account is not ZRS when the plan is zone-redundant")
    for name in ("managedResourceGroups", "linkedResourceGroups"):
        value = infra.variable("main", name)
        function = value.get("function", {}) if isinstance(value, dict) else {}
        keep = function.get("parameters", {}).get("expression", {}).get("operator", {})
        empty = keep.get("operands", {}).get("bool_value", {}).get("function", {})
        if function.get("type") != "filter" or (keep.get("type"), empty.get("type")) != (
            "not",
            "empty",
        ):
            problems.append(f"{name} keeps empty names: filter them out (name => !empty(name))")
    return problems


def check_settings(infra: Infra) -> list[str]:
    settings = app_settings(infra)
    problems = [f"app setting {name} missing" for name in sorted(REQUIRED_SETTINGS - set(settings))]
    for setting, (param, default) in SETTING_DEFAULTS.items():
        if infra.param_default("main", param) != default:
            problems.append(f"{param} (-> {setting}) does not default to {default!r}")
    return problems


def check_event_subscription(infra: Infra) -> list[str]:
    problems = []
    template = "event_subscription"
    operation_filter = infra.variable(template, "operationNameFilter")
    if (operation_filter["operatorType"], operation_filter["key"]) != (
        "StringIn",
        "data.operationName",
    ):
        problems.append(
            f"operation filter is {operation_filter['operatorType']} on {operation_filter['key']}"
        )
    values = operation_filter["values"]
    if sorted(values) != sorted(HANDLED_OPERATION_NAMES):
        missing = sorted(set(HANDLED_OPERATION_NAMES) - set(values))
        extra = sorted(set(values) - set(HANDLED_OPERATION_NAMES))
        problems.append(f"operationName filter: missing {missing}, not handled {extra}")
    body = infra.resource(template, "eventSubscription")["properties"]
    event_filter = body["filter"]
    if sorted(event_filter["includedEventTypes"]) != sorted(HANDLED_EVENT_TYPES):
        problems.append(f"event types are {event_filter['includedEventTypes']}")
    concat = event_filter["advancedFilters"]["function"]["parameters"]
    if concat.get("arg_1") != ["operationNameFilter"]:
        problems.append("advancedFilters does not apply operationNameFilter")
    if len(values) + infra.variable(template, "maxPrefixes") > MAX_EVENT_FILTER_VALUES:
        problems.append("the filters can exceed Event Grid's 25 values")
    if body["destination"]["endpointType"] != "AzureFunction":
        problems.append("the destination is not the Azure Function")
    if infra.param_default(template, "functionName") != EVENT_GRID_FUNCTION_NAME:
        problems.append(f"functionName does not default to {EVENT_GRID_FUNCTION_NAME}")
    if not body.get("retryPolicy"):
        problems.append("no retry policy")
    dead_letter = body.get("deadLetterWithResourceIdentity") or {}
    if dead_letter.get("identity", {}).get("type") != "SystemAssigned":
        problems.append("dead-lettering does not use the system topic's identity")
    return problems


def check_notification_topic(infra: Infra) -> list[str]:
    problems = []
    props = infra.resource("app", "notificationTopic")["properties"]
    if props.get("disableLocalAuth") is not True:
        problems.append("the notification topic allows local (key) auth")
    if props.get("inputSchema") != "CloudEventSchemaV1_0":
        problems.append("the notification topic does not take the CloudEvents the app publishes")
    sender = infra.resource("app", "identityNotificationSender")["properties"]["roleDefinitionId"]
    if sender["function"]["parameters"]["resource_name_1"] != "eventGridDataSender":
        problems.append("the app cannot send to the notification topic")
    return problems


def check_monitoring(infra: Infra) -> list[str]:
    """The alert rules watch the app's Application Insights, notify only the given action
    group and are off without one; every query file the module loads exists."""
    problems = []
    rules = dict(infra.resources_of_type("monitoring", "Microsoft.Insights/scheduledQueryRules"))
    if len(rules) != 3:
        problems.append(f"alert rules are {sorted(rules)}, expected three")
    for name, body in rules.items():
        props = body["properties"]
        if props.get("enabled") != "alertsEnabled" or props.get("actions") != "actions":
            problems.append(f"alert {name} is not off without an action group")
        if [dotted(scope) for scope in props.get("scopes", [])] != ["appInsights.id"]:
            problems.append(f"alert {name} does not watch the app's Application Insights")
    actions = infra.variable("monitoring", "actions")["operator"]["operands"]
    if actions["condition"] != "alertsEnabled" or actions["false_value"] != {}:
        problems.append("the alert rules notify something without an action group")
    enabled = infra.variable("monitoring", "alertsEnabled")["operator"]
    test = enabled["operands"]["bool_value"]["function"]
    if (enabled["type"], test["type"], test["parameters"]) != (
        "not",
        "empty",
        {"item_to_test": "actionGroupId"},
    ):
        problems.append("alertsEnabled is not !empty(actionGroupId)")
    modules = infra.parsed["main"].get("modules", {})
    if modules.get("monitoring", {}).get("detail", {}).get("path") != "modules/monitoring.bicep":
        problems.append("main.bicep does not deploy modules/monitoring.bicep")
    module_dir = infra.root / "modules"
    for path in re.findall(r"loadTextContent\('([^']+)'\)", infra.texts["monitoring"]):
        if not (module_dir / path).is_file():
            problems.append(f"modules/monitoring.bicep loads {path}, which does not exist")
    return problems


PROPERTY_CHECKS: tuple[Callable[[Infra], list[str]], ...] = (
    check_no_shadowed_functions,
    check_roles,
    check_role_assignments_name_their_principal,
    check_linked_subscriptions,
    check_builtin_roles,
    check_storage,
    check_identity_based_settings,
    check_app_insights,
    check_flex_consumption,
    check_hardening,
    check_settings,
    check_event_subscription,
    check_notification_topic,
    check_monitoring,
)


def infra_problems(root: Path) -> list[str]:
    infra = read_infra(root)
    problems = check_parsed(infra)
    for check in PROPERTY_CHECKS:
        try:
            problems += check(infra)
        except KeyError as error:  # a template that did not parse or lost a resource
            problems.append(f"{check.__name__}: cannot find {error}")
    return problems


# --- checkov -------------------------------------------------------------------------------


def run_checkov(directory: Path) -> subprocess.Popen[str]:
    if not CHECKOV.is_file():
        raise AssertionError(
            f"checkov is not installed at {CHECKOV}: run `make test` (it creates .venv-checkov "
            "from infra/requirements-checkov.txt) or set REBALANCER_CHECKOV to a checkov binary"
        )
    env = {**os.environ, "BC_SKIP_MAPPING": "TRUE"}
    env.pop("BC_API_KEY", None)
    command = [str(CHECKOV), "-d", str(directory), "--framework", "bicep", "-o", "json"]
    return subprocess.Popen(
        [*command, "--skip-download"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def checkov_report(process: subprocess.Popen[str]) -> dict[str, Any]:
    try:
        out, err = process.communicate(timeout=CHECKOV_TIMEOUT_SECONDS)
    except subprocess.TimeoutExpired:
        process.kill()
        process.communicate()
        raise AssertionError(f"checkov ran longer than {CHECKOV_TIMEOUT_SECONDS} s") from None
    try:
        report = json.loads(out)
    except json.JSONDecodeError as error:
        message = f"checkov printed no JSON (exit {process.returncode}): {err[-2000:]}"
        raise AssertionError(message) from error
    if isinstance(report, list):
        report = next(r for r in report if r.get("check_type") == "bicep")
    return report


_SKIP = re.compile(r"checkov:skip=(CKV2?_[A-Z]+_\d+)(?::(.*))?")
_RESOURCE = re.compile(r"^resource\s+(\w+)\s+'")


def checkov_problems(report: dict[str, Any], root: Path) -> list[str]:
    results = report.get("results", {})
    problems = [f"checkov cannot parse {path}" for path in results.get("parsing_errors", [])]
    problems += [
        f"checkov {c['check_id']} ({c['check_name']}) failed on {c['resource']} in {c['file_path']}"
        for c in results.get("failed_checks", [])
    ]
    if report.get("summary", {}).get("resource_count", 0) == 0:
        problems.append("checkov scanned no resource")
    used = {
        (c["check_id"], c["resource"].split(".")[-1]) for c in results.get("skipped_checks", [])
    }
    for path in sorted(root.rglob("*.bicep")):
        lines = path.read_text(encoding="utf-8").splitlines()
        for number, line in enumerate(lines):
            match = _SKIP.search(line)
            if not match:
                continue
            check_id, reason = match.group(1), (match.group(2) or "").strip()
            where = f"{path.relative_to(root)}:{number + 1}"
            if len(reason) < 20:
                problems.append(f"{where}: skip of {check_id} has no real justification")
            resource = next(
                (m.group(1) for m in map(_RESOURCE.match, reversed(lines[:number])) if m), None
            )
            if (check_id, resource) not in used:
                problems.append(f"{where}: skip of {check_id} on {resource} is not used: remove it")
    return problems


# --- fixtures ------------------------------------------------------------------------------


def break_copy(tmp_path: Path) -> Path:
    """A copy of infra/ with one parse error and several security regressions."""
    broken = tmp_path / "infra"
    shutil.copytree(INFRA, broken, ignore=shutil.ignore_patterns("hooks", "*.json", "*.txt"))
    main = broken / "main.bicep"
    main.write_text(main.read_text().replace("targetScope = 'subscription'", "targetScope = {"))
    app = broken / "modules" / "app.bicep"
    text = app.read_text()
    for old, new in (
        ("allowSharedKeyAccess: false", "allowSharedKeyAccess: true"),
        ("minimumTlsVersion: 'TLS1_2'", "minimumTlsVersion: 'TLS1_0'"),
        ("DisableLocalAuth: true", "DisableLocalAuth: false"),
        ("name: 'AzureWebJobsStorage__credential'", "name: 'AzureWebJobsStorage'"),
    ):
        assert old in text, f"the broken copy needs {old!r} in app.bicep"
        text = text.replace(old, new)
    app.write_text(text)
    events = broken / "event-subscription.bicep"
    text = events.read_text()
    dropped = "    'Microsoft.Compute/virtualMachines/delete'\n"
    assert dropped in text
    events.write_text(text.replace(dropped, "", 1))
    return broken


@pytest.fixture(scope="module")
def checkov_reports(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """checkov over infra/ and over a broken copy, run side by side, once per module."""
    broken = break_copy(tmp_path_factory.mktemp("broken"))
    processes = {"infra": run_checkov(INFRA), "broken": run_checkov(broken)}
    try:
        reports = {name: checkov_report(process) for name, process in processes.items()}
    finally:
        for process in processes.values():
            if process.poll() is None:
                process.kill()
                process.communicate()
    return {**reports, "broken_root": broken}


@pytest.fixture(scope="module")
def infra() -> Infra:
    return read_infra(INFRA)


# --- tests: the real templates --------------------------------------------------------------


def test_checkov_parses_every_template_and_finds_nothing(checkov_reports):
    report = checkov_reports["infra"]
    assert checkov_problems(report, INFRA) == []
    assert report["summary"]["resource_count"] >= 20


def test_every_template_parses_with_checkovs_parser(infra):
    assert check_parsed(infra) == []


@pytest.mark.parametrize("check", PROPERTY_CHECKS, ids=lambda check: check.__name__)
def test_template_property(infra, check):
    assert check(infra) == []


def deployed_settings(infra: Infra, **overrides: object) -> dict[str, str]:
    """The REBALANCER_* settings the deployment gives the app with its parameter defaults."""
    env = {
        setting: str(infra.param_default("main", param))
        for setting, (param, _) in SETTING_DEFAULTS.items()
    }
    env |= {
        "REBALANCER_SUBSCRIPTION_ID": "00000000-0000-0000-0000-000000000001",
        "REBALANCER_APP_PRINCIPAL_ID": "00000000-0000-0000-0000-000000000002",
        "REBALANCER_RESOURCE_GROUPS": "",
        "REBALANCER_NOTIFY_TOPIC_ENDPOINT": "",
        "REBALANCER_STATE_TABLE_PREFIX": app_settings(infra)["REBALANCER_STATE_TABLE_PREFIX"],
    }
    for param, value in overrides.items():
        setting = next(s for s, (p, _) in SETTING_DEFAULTS.items() if p == param)
        env[setting] = str(value)
    return env


def test_the_app_accepts_the_deployed_defaults(infra):
    settings = load_settings(deployed_settings(infra))
    assert settings.mode is Mode.AUDIT
    assert settings.default_opt_in is OptIn.AUDIT
    assert settings.resource_groups == ()


def test_the_app_accepts_every_value_the_parameters_allow(infra):
    """A deployment must not be able to set what the app then refuses at start."""
    for param, _ in SETTING_DEFAULTS.values():
        declared = infra.parsed["main"]["parameters"][param]
        decorators = {d["type"]: d["argument"] for d in declared["decorators"]}
        if declared["type"] == "int":
            assert "max_value" in decorators and "min_value" in decorators, param
            values = [decorators["min_value"], decorators["max_value"]]
        else:
            values = decorators.get("allowed", [])
        for value in values:
            load_settings(deployed_settings(infra, **{param: value}))
    with pytest.raises(SettingsError):
        load_settings(deployed_settings(infra, maxSurge=0))


def test_the_store_reads_the_deployed_storage_connection(infra):
    """The deployed AzureWebJobsStorage__* settings, with what ARM fills in at deploy time."""
    runtime_values = {
        "storage.properties.primaryEndpoints.blob": "https://zrstabc.blob.core.windows.net/",
        "storage.properties.primaryEndpoints.queue": "https://zrstabc.queue.core.windows.net/",
        "storage.properties.primaryEndpoints.table": "https://zrstabc.table.core.windows.net/",
        "identity.properties.clientId": "00000000-0000-0000-0000-0000000000c1",
    }
    env = {
        name: runtime_values.get(dotted(value), dotted(value))
        for name, value in app_settings(infra).items()
        if name.startswith("AzureWebJobsStorage")
    }
    connection = parse_connection(env)
    assert connection.identity_based and connection.managed_identity
    assert connection.table_service_uri == "https://zrstabc.table.core.windows.net"
    assert connection.client_id == "00000000-0000-0000-0000-0000000000c1"


def test_the_deployment_targets_and_configures_the_apps_functions(infra):
    """The event subscription's target exists in function_app.py, and every %SETTING% a
    trigger binds to is an app setting the deployment writes."""
    from devkit.host import indexed_functions

    functions = indexed_functions()
    target = infra.param_default("event_subscription", "functionName")
    assert target in functions, sorted(functions)
    assert functions[target].get_trigger().get_binding_name() == "eventGridTrigger"
    settings = app_settings(infra)
    bound = {
        name
        for f in functions.values()
        for field in ("schedule", "queue_name")
        for name in re.findall(r"%(\w+)%", str(getattr(f.get_trigger(), field, "")))
    }
    assert {"REBALANCER_TIMER_SCHEDULE", "REBALANCER_FOLLOW_UP_QUEUE"} <= bound, bound
    assert bound <= set(settings), bound - set(settings)
    # Always-ready instances (zone-redundant plan) go by function: one group per function.
    assert sorted(infra.variable("app", "functionNames")) == sorted(functions)


def test_docs_list_exactly_the_role_actions():
    text = (REPO / "docs" / "deploy.md").read_text(encoding="utf-8")
    section = text.split("### Role actions", 1)[1].split("\n#", 1)[0]
    documented = re.findall(r"^\| `([^`]+)` \|", section, re.M)
    assert documented == list(REQUIRED_ROLE_ACTIONS)


def test_operation_names_are_unique_and_scoped_to_compute():
    assert len(set(HANDLED_OPERATION_NAMES)) == len(HANDLED_OPERATION_NAMES)
    assert all(name.startswith("Microsoft.Compute/") for name in HANDLED_OPERATION_NAMES)
    assert len(set(REQUIRED_ROLE_ACTIONS)) == len(REQUIRED_ROLE_ACTIONS)


# --- tests: the checks catch a broken template ---------------------------------------------


def test_checkov_fails_on_a_broken_copy(checkov_reports):
    problems = checkov_problems(checkov_reports["broken"], checkov_reports["broken_root"])
    assert any("cannot parse" in p and p.endswith("main.bicep") for p in problems), problems
    assert any("CKV_AZURE_44" in p for p in problems), problems  # TLS 1.0 on storage


def test_property_checks_fail_on_a_broken_copy(tmp_path):
    problems = infra_problems(break_copy(tmp_path))
    expected = (
        "cannot parse main.bicep",
        "storage allowSharedKeyAccess is True",
        "storage minimumTlsVersion is 'TLS1_0'",
        "Application Insights local auth is not disabled",
        "AzureWebJobsStorage (a connection string) is set",
        "operationName filter: missing ['Microsoft.Compute/virtualMachines/delete']",
    )
    for text in expected:
        assert any(text in problem for problem in problems), (text, problems)


def test_a_wildcard_or_owner_role_is_caught(tmp_path):
    broken = tmp_path / "infra"
    shutil.copytree(INFRA, broken)
    main = broken / "main.bicep"
    text = main.read_text().replace(
        "'Microsoft.Compute/skus/read'",
        "'Microsoft.Compute/*'\n          'Microsoft.Compute/skus/read'",
    )
    main.write_text(text + "\n// 8e3af657-a8ff-443c-a75c-2fe8c4bcb635\n")
    problems = infra_problems(broken)
    assert "wildcard action Microsoft.Compute/*" in problems
    assert "main.bicep assigns Owner" in problems


ASSIGNMENT_TYPE = "Microsoft.Authorization/roleAssignments@2022-04-01"


def test_a_role_assignment_named_without_its_principal_is_caught(tmp_path):
    broken = tmp_path / "infra"
    shutil.copytree(INFRA, broken)
    module = broken / "modules" / "subscription-role-assignment.bicep"
    text = module.read_text()
    old = "guid(subscription().id, principalId, roleDefinitionId)"
    assert old in text
    module.write_text(text.replace(old, "guid(subscription().id, roleDefinitionId)"))
    main = broken / "main.bicep"
    main.write_text(
        main.read_text() + f"\nresource readsOnSubscription '{ASSIGNMENT_TYPE}' = {{\n"
        "  name: guid(subscription().id, environmentName, subscriptionReadRole.id)\n"
        "  properties: {\n"
        "    roleDefinitionId: subscriptionReadRole.id\n"
        "    principalId: app.outputs.identityPrincipalId\n"
        "  }\n"
        "}\n"
    )
    problems = check_role_assignments_name_their_principal(read_infra(broken))
    assert len(problems) == 2, problems
    assert any("main.bicep: role assignment readsOnSubscription" in p for p in problems)
    assert any(
        "subscription-role-assignment.bicep: role assignment assignment" in p for p in problems
    )


def test_a_symbol_that_hides_a_decorator_or_function_is_caught(tmp_path):
    broken = tmp_path / "infra"
    shutil.copytree(INFRA, broken)
    module = broken / "modules" / "role-assignment.bicep"
    text = module.read_text().replace("assignmentDescription", "description")
    module.write_text(text + "\nvar guid = 'not a function any more'\n")
    problems = check_no_shadowed_functions(read_infra(broken))
    assert any(
        "role-assignment.bicep:4: the symbol 'description' hides the decorator" in p
        for p in problems
    ), problems
    assert any("the symbol 'guid' hides the function guid()" in p for p in problems), problems


def test_bicep_code_keeps_interpolations_and_drops_comments_and_literal_text():
    text = "var a = 'x(${description(1)}) \\' // y(' // z(\nvar b = 1 /* w( */ + v(2)\n"
    code = bicep_code(text)
    assert len(code) == len(text) and code.count("\n") == 2
    assert [m.group(2) for m in _CALLED.finditer(code)] == ["description", "v"]


def test_alerts_on_without_an_action_group_or_a_lost_query_are_caught(tmp_path):
    broken = tmp_path / "infra"
    shutil.copytree(INFRA, broken)
    module = broken / "modules" / "monitoring.bicep"
    text = module.read_text()
    assert "    enabled: alertsEnabled\n" in text and "monitoring/zones.kql" in text
    text = text.replace("    enabled: alertsEnabled\n", "    enabled: true\n", 1)
    module.write_text(text.replace("monitoring/zones.kql", "monitoring/zone.kql"))
    problems = infra_problems(broken)
    assert "alert operationFailedAlert is not off without an action group" in problems
    assert any("loads monitoring/zone.kql, which does not exist" in p for p in problems)


# --- tests: azd wiring ----------------------------------------------------------------------


# A subset of the azd azure.yaml schema (schemas/v1.0/azure.yaml.json in Azure/azure-dev).
AZD_TOP_LEVEL_KEYS = {
    "name", "resourceGroup", "metadata", "infra", "services", "pipeline", "hooks",
    "requiredVersions", "state", "platform", "workflows", "cloud", "resources",
}  # fmt: skip
AZD_SERVICE_KEYS = {
    "apiVersion", "resourceGroup", "resourceName", "project", "image", "host", "language",
    "module", "dist", "docker", "k8s", "config", "hooks", "env", "uses", "remoteBuild",
}  # fmt: skip
AZD_HOSTS = {
    "appservice",
    "containerapp",
    "function",
    "staticwebapp",
    "aks",
    "springapp",
    "ai.endpoint",
}
AZD_HOOK_NAMES = {
    f"{when}{what}"
    for when in ("pre", "post")
    for what in ("provision", "deploy", "up", "down", "restore", "package", "build")
}
AZD_HOOK_KEYS = {"run", "shell", "interactive", "continueOnError", "secrets", "posix", "windows"}


def test_azure_yaml_has_the_azd_shape():
    config = yaml.safe_load((REPO / "azure.yaml").read_text(encoding="utf-8"))
    assert set(config) <= AZD_TOP_LEVEL_KEYS, set(config) - AZD_TOP_LEVEL_KEYS
    assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", config["name"])
    for service in config["services"].values():
        assert set(service) <= AZD_SERVICE_KEYS, set(service) - AZD_SERVICE_KEYS
        assert service["host"] in AZD_HOSTS
    for hook_name, hook in config["hooks"].items():
        assert hook_name in AZD_HOOK_NAMES
        assert set(hook) <= AZD_HOOK_KEYS
        for platform in ("posix", "windows"):
            assert set(hook.get(platform, {})) <= AZD_HOOK_KEYS - {"posix", "windows"}
    assert config["name"]
    assert config["infra"] == {"provider": "bicep", "path": "infra", "module": "main"}
    assert (REPO / config["infra"]["path"] / f"{config['infra']['module']}.bicep").is_file()
    (name, service), *others = config["services"].items()
    assert others == []
    assert service["host"] == "function"
    assert service["language"] == "python"
    project = REPO / service["project"]
    assert (project / "host.json").is_file() and (project / "requirements.txt").is_file()
    # azd finds the app by this tag.
    assert f"'azd-service-name': '{name}'" in (INFRA / "modules" / "app.bicep").read_text()
    for hook in config["hooks"].values():
        for platform in ("posix", "windows"):
            assert (REPO / hook[platform]["run"]).is_file()
            assert hook[platform]["shell"] in {"sh", "pwsh"}


def test_provision_applies_the_event_subscription_too():
    """The guide changes settings with `azd provision`, which runs no postdeploy hook: a
    postprovision hook applies the subject filter of a changed REBALANCER_RESOURCE_GROUPS."""
    hooks = yaml.safe_load((REPO / "azure.yaml").read_text(encoding="utf-8"))["hooks"]
    assert {"postprovision", "postdeploy"} <= set(hooks)
    for name in ("postprovision", "postdeploy"):
        for platform, shell, suffix in (("posix", "sh", ".sh"), ("windows", "pwsh", ".ps1")):
            entry = hooks[name][platform]
            assert (entry["shell"], entry["run"]) == (shell, f"./infra/hooks/{name}{suffix}")
            assert entry["continueOnError"] is False


def test_parameters_file_matches_the_template(infra):
    parameters = json.loads((INFRA / "main.parameters.json").read_text(encoding="utf-8"))
    declared = infra.parsed["main"]["parameters"]
    given = parameters["parameters"]
    assert set(given) <= set(declared), set(given) - set(declared)
    required = {name for name, p in declared.items() if "default" not in p}
    assert required <= set(given), required - set(given)
    for name, entry in given.items():
        match = re.fullmatch(r"\$\{(\w+)(?:=(.*))?\}", entry["value"])
        assert match, f"{name}: {entry['value']} is not an azd ${{VAR}} or ${{VAR=default}}"
        if match.group(2) is not None and "default" in declared[name]:
            assert match.group(2) == str(declared[name]["default"]).lower() or match.group(
                2
            ) == str(declared[name]["default"]), (name, match.group(2))


def test_every_azd_environment_value_is_documented():
    parameters = (INFRA / "main.parameters.json").read_text(encoding="utf-8")
    docs = (REPO / "docs" / "deploy.md").read_text(encoding="utf-8")
    names = set(re.findall(r"\$\{(\w+)", parameters)) - {"AZURE_ENV_NAME", "AZURE_LOCATION"}
    assert names, "main.parameters.json reads no azd environment value"
    assert {name for name in names if f"`{name}`" not in docs} == set()


def test_hook_passes_declared_parameters_and_reads_template_outputs(infra):
    hook = (INFRA / "hooks" / "postdeploy.sh").read_text(encoding="utf-8")
    passed = set(re.findall(r"^\s+(\w+)=\"\$", hook, re.M))
    assert passed == set(infra.parsed["event_subscription"]["parameters"])
    used = set(re.findall(r"\$\{?([A-Z][A-Z0-9_]+)", hook))
    from_azd = {"AZURE_SUBSCRIPTION_ID"}
    tuning = {"REBALANCER_HOOK_ATTEMPTS", "REBALANCER_HOOK_DELAY_SECONDS"}
    assert used - from_azd - tuning <= set(infra.parsed["main"]["outputs"])


HOOK_ENV = {
    "AZURE_SUBSCRIPTION_ID": "00000000-0000-0000-0000-000000000001",
    "AZURE_RESOURCE_GROUP": "rg-test",
    "AZURE_FUNCTION_APP_NAME": "zr-func-abc",
    "AZURE_STORAGE_ACCOUNT_NAME": "zrstabc",
    "REBALANCER_SYSTEM_TOPIC_NAME": "zr-evgt-abc",
    "REBALANCER_DEAD_LETTER_CONTAINER": "eventgrid-deadletter",
    "REBALANCER_SUBJECT_PREFIXES": "",
    "REBALANCER_HOOK_DELAY_SECONDS": "0",
    "REBALANCER_HOOK_ATTEMPTS": "3",
}


def run_hook(
    tmp_path: Path,
    env: dict[str, str],
    function_appears_after: int,
    *args: str,
    script="postdeploy",
):
    """Run a hook with a stand-in `az` that records its arguments (wiring only)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "az.log"
    az = bin_dir / "az"
    az.write_text(
        "#!/bin/sh\n"
        f'echo "$*" >> "{log}"\n'
        'if [ "$1 $2 $3" = "functionapp function show" ]; then\n'
        f'  n=$(grep -c "^functionapp function show" "{log}")\n'
        f'  [ "$n" -gt {function_appears_after} ]\n'
        "  exit $?\n"
        "fi\n"
        "exit 0\n"
    )
    az.chmod(0o755)
    process = subprocess.run(
        ["sh", str(INFRA / "hooks" / f"{script}.sh"), *args],
        env={"PATH": f"{bin_dir}:/usr/bin:/bin", **env},
        capture_output=True,
        text=True,
        timeout=30,
    )
    calls = log.read_text().splitlines() if log.exists() else []
    return process, calls


def test_hook_waits_for_the_function_then_deploys_the_subscription(tmp_path):
    process, calls = run_hook(tmp_path, HOOK_ENV, function_appears_after=1)
    assert process.returncode == 0, process.stderr
    assert [call.split()[:3] for call in calls] == [
        ["functionapp", "function", "show"],
        ["functionapp", "function", "show"],
        ["deployment", "group", "create"],
    ]
    deploy = calls[-1]
    assert f"--function-name {EVENT_GRID_FUNCTION_NAME}" in calls[0]
    assert "--template-file " in deploy and deploy.split("--template-file ")[1].split()[0].endswith(
        "event-subscription.bicep"
    )
    assert f"functionName={EVENT_GRID_FUNCTION_NAME}" in deploy
    assert "systemTopicName=zr-evgt-abc" in deploy and "--resource-group rg-test" in deploy


def test_hook_gives_up_with_advice_when_the_function_never_appears(tmp_path):
    process, calls = run_hook(tmp_path, HOOK_ENV, function_appears_after=99)
    assert process.returncode == 1
    assert "azd hooks run postdeploy" in process.stderr
    assert not any(call.startswith("deployment") for call in calls)


def test_hook_names_a_missing_environment_value(tmp_path):
    env = {k: v for k, v in HOOK_ENV.items() if k != "REBALANCER_SYSTEM_TOPIC_NAME"}
    process, calls = run_hook(tmp_path, env, function_appears_after=0)
    assert process.returncode == 1
    assert "REBALANCER_SYSTEM_TOPIC_NAME is not set" in process.stderr
    assert calls == []


def test_postprovision_skips_cleanly_before_the_first_deploy(tmp_path):
    process, calls = run_hook(tmp_path, HOOK_ENV, 99, script="postprovision")
    assert process.returncode == 0, process.stderr
    assert [call.split()[:3] for call in calls] == [["functionapp", "function", "show"]]
    assert "postprovision: function 'on_resource_event' is not deployed" in process.stdout


def test_postprovision_applies_a_changed_subject_filter(tmp_path):
    prefixes = "/subscriptions/1/resourceGroups/rg-a/,/subscriptions/1/resourceGroups/rg-b/"
    env = {**HOOK_ENV, "REBALANCER_SUBJECT_PREFIXES": prefixes}
    process, calls = run_hook(tmp_path, env, 0, script="postprovision")
    assert process.returncode == 0, process.stderr
    assert [call.split()[:3] for call in calls][-1] == ["deployment", "group", "create"]
    assert f"subjectPrefixes={prefixes}" in calls[-1]
    assert process.stdout.startswith("postprovision: subscribing")


def test_hook_refuses_an_unknown_argument(tmp_path):
    process, calls = run_hook(tmp_path, HOOK_ENV, 0, "--if-deploy")
    assert process.returncode == 2 and "--if-deploy" in process.stderr
    assert calls == []


def test_the_powershell_hooks_pass_and_read_what_the_shell_hooks_do(infra):
    """pwsh is not installed here: the Windows hooks are compared with the tested ones."""
    hooks = INFRA / "hooks"
    sh, ps1 = (hooks / "postdeploy.sh").read_text(), (hooks / "postdeploy.ps1").read_text()
    passed = set(re.findall(r'^\s+"(\w+)=\$', ps1, re.M))
    assert passed == set(infra.parsed["event_subscription"]["parameters"])
    read_sh = set(re.findall(r"\$\{?([A-Z][A-Z0-9_]+)", sh))
    read_ps1 = set(re.findall(r"\$env:([A-Z][A-Z0-9_]+)", ps1)) | set(
        re.findall(r"'([A-Z][A-Z0-9_]+)'", ps1)
    )
    assert read_ps1 == read_sh
    assert "param([switch]$IfDeployed)" in ps1 and "exit 0" in ps1
    assert "postdeploy.ps1') -IfDeployed" in (hooks / "postprovision.ps1").read_text()
    assert 'postdeploy.sh" --if-deployed' in (hooks / "postprovision.sh").read_text()


def test_every_setting_the_app_reads_is_deployed():
    from rebalancer.settings import SETTING_NAMES

    assert set(SETTING_NAMES) <= REQUIRED_SETTINGS, set(SETTING_NAMES) - REQUIRED_SETTINGS
