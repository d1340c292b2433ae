#!/bin/sh
# azd postdeploy hook: create or update the Event Grid subscription from the subscription's
# system topic to the rebalancer's Event Grid function.
#
# Why here and not in main.bicep: when an event subscription targets a function, Event Grid
# checks that the function exists. On the first `azd up` the function app is empty until
# `azd deploy` has uploaded the code, so the subscription can only be created after it.
# Safe to re-run (`azd hooks run postdeploy`): the deployment is idempotent.
#
# With --if-deployed (the postprovision hook, postprovision.sh) it looks for the function once
# and skips when it is not deployed yet, instead of waiting: so `azd provision` applies a
# changed subject filter, and on the first `azd up` the postdeploy run creates the
# subscription once the code is there.
set -eu

hook=postdeploy
if_deployed=false
case "${1:-}" in
  "") ;;
  --if-deployed) hook=postprovision if_deployed=true ;;
  *)
    echo "postdeploy: unknown argument '$1'; the only option is --if-deployed" >&2
    exit 2
    ;;
esac

fail() {
  echo "$hook: $*" >&2
  exit 1
}

for name in AZURE_SUBSCRIPTION_ID AZURE_RESOURCE_GROUP AZURE_FUNCTION_APP_NAME \
  AZURE_STORAGE_ACCOUNT_NAME REBALANCER_SYSTEM_TOPIC_NAME REBALANCER_DEAD_LETTER_CONTAINER; do
  [ -n "$(printenv "$name" || true)" ] ||
    fail "$name is not set in the azd environment: run 'azd provision' first."
done

command -v az >/dev/null 2>&1 ||
  fail "the Azure CLI (az) creates the Event Grid subscription: install it, run 'az login', then 'azd hooks run $hook'."

here=$(cd "$(dirname "$0")" && pwd)
template="$here/../event-subscription.bicep"
function_name=$(sed -n "s/^param functionName string = '\(.*\)'$/\1/p" "$template")
[ -n "$function_name" ] || fail "no default functionName in $template."

# Flex Consumption lists the functions shortly after the package lands: wait for ours.
attempts=${REBALANCER_HOOK_ATTEMPTS:-30}
delay=${REBALANCER_HOOK_DELAY_SECONDS:-10}
attempt=1
until az functionapp function show --subscription "$AZURE_SUBSCRIPTION_ID" \
  --resource-group "$AZURE_RESOURCE_GROUP" --name "$AZURE_FUNCTION_APP_NAME" \
  --function-name "$function_name" --output none 2>/dev/null; do
  if [ "$if_deployed" = true ]; then
    echo "$hook: function '$function_name' is not deployed in $AZURE_FUNCTION_APP_NAME yet; the postdeploy hook creates the Event Grid subscription after 'azd deploy'."
    exit 0
  fi
  [ "$attempt" -lt "$attempts" ] ||
    fail "function '$function_name' is not listed in $AZURE_FUNCTION_APP_NAME; check the deployment in the portal (Deployment Center), then run 'azd hooks run postdeploy'."
  attempt=$((attempt + 1))
  sleep "$delay"
done

echo "$hook: subscribing $AZURE_FUNCTION_APP_NAME/$function_name to resource events of subscription $AZURE_SUBSCRIPTION_ID"
az deployment group create --subscription "$AZURE_SUBSCRIPTION_ID" \
  --resource-group "$AZURE_RESOURCE_GROUP" \
  --name vmss-zone-rebalancer-events \
  --template-file "$template" \
  --parameters \
  systemTopicName="$REBALANCER_SYSTEM_TOPIC_NAME" \
  functionAppName="$AZURE_FUNCTION_APP_NAME" \
  functionName="$function_name" \
  storageAccountName="$AZURE_STORAGE_ACCOUNT_NAME" \
  deadLetterContainerName="$REBALANCER_DEAD_LETTER_CONTAINER" \
  subjectPrefixes="${REBALANCER_SUBJECT_PREFIXES:-}" \
  --output none
echo "$hook: Event Grid subscription 'vmss-zone-rebalancer' is in place."
