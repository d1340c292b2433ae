#!/bin/sh
# azd postprovision hook: apply the Event Grid subscription again after `azd provision`, so
# that settings changed with `azd env set` + `azd provision` (REBALANCER_RESOURCE_GROUPS, which
# narrows the events) reach it too. Skips while the function is not deployed (the first
# `azd up`): the postdeploy hook creates the subscription then. See postdeploy.sh.
set -eu
exec sh "$(dirname "$0")/postdeploy.sh" --if-deployed
