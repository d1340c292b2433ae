# azd postdeploy hook (Windows): same as postdeploy.sh. Creates or updates the Event Grid
# subscription once the Event Grid function exists; Event Grid refuses a subscription to a
# function that is not deployed yet. Safe to re-run with `azd hooks run postdeploy`.
# -IfDeployed (the postprovision hook, postprovision.ps1): look for the function once and skip
# when it is not deployed yet, instead of waiting.
param([switch]$IfDeployed)
$ErrorActionPreference = 'Stop'
# `az` exit codes are checked below; a non-zero one (function not listed yet) is no error here.
$PSNativeCommandUseErrorActionPreference = $false
$hook = if ($IfDeployed) { 'postprovision' } else { 'postdeploy' }

foreach ($name in 'AZURE_SUBSCRIPTION_ID', 'AZURE_RESOURCE_GROUP', 'AZURE_FUNCTION_APP_NAME',
    'AZURE_STORAGE_ACCOUNT_NAME', 'REBALANCER_SYSTEM_TOPIC_NAME', 'REBALANCER_DEAD_LETTER_CONTAINER') {
    if (-not [Environment]::GetEnvironmentVariable($name)) {
        throw "${hook}: $name is not set in the azd environment: run 'azd provision' first."
    }
}
if (-not (Get-Command az -ErrorAction SilentlyContinue)) {
    throw "${hook}: the Azure CLI (az) creates the Event Grid subscription: install it, run 'az login', then 'azd hooks run $hook'."
}

$template = Join-Path $PSScriptRoot '..' 'event-subscription.bicep'
$match = Select-String -Path $template -Pattern "^param functionName string = '(.*)'$"
if (-not $match) { throw "${hook}: no default functionName in $template." }
$functionName = $match.Matches[0].Groups[1].Value

$attempts = if ($env:REBALANCER_HOOK_ATTEMPTS) { [int]$env:REBALANCER_HOOK_ATTEMPTS } else { 30 }
$delay = if ($env:REBALANCER_HOOK_DELAY_SECONDS) { [int]$env:REBALANCER_HOOK_DELAY_SECONDS } else { 10 }
for ($attempt = 1; ; $attempt++) {
    az functionapp function show --subscription $env:AZURE_SUBSCRIPTION_ID `
        --resource-group $env:AZURE_RESOURCE_GROUP --name $env:AZURE_FUNCTION_APP_NAME `
        --function-name $functionName --output none 2>$null
    if ($LASTEXITCODE -eq 0) { break }
    if ($IfDeployed) {
        Write-Host "${hook}: function '$functionName' is not deployed in $($env:AZURE_FUNCTION_APP_NAME) yet; the postdeploy hook creates the Event Grid subscription after 'azd deploy'."
        exit 0
    }
    if ($attempt -ge $attempts) {
        throw "${hook}: function '$functionName' is not listed in $($env:AZURE_FUNCTION_APP_NAME); check the deployment in the portal (Deployment Center), then run 'azd hooks run postdeploy'."
    }
    Start-Sleep -Seconds $delay
}

Write-Host "${hook}: subscribing $($env:AZURE_FUNCTION_APP_NAME)/$functionName to resource events of subscription $($env:AZURE_SUBSCRIPTION_ID)"
az deployment group create --subscription $env:AZURE_SUBSCRIPTION_ID `
    --resource-group $env:AZURE_RESOURCE_GROUP `
    --name vmss-zone-rebalancer-events `
    --template-file $template `
    --parameters `
    "systemTopicName=$($env:REBALANCER_SYSTEM_TOPIC_NAME)" `
    "functionAppName=$($env:AZURE_FUNCTION_APP_NAME)" `
    "functionName=$functionName" `
    "storageAccountName=$($env:AZURE_STORAGE_ACCOUNT_NAME)" `
    "deadLetterContainerName=$($env:REBALANCER_DEAD_LETTER_CONTAINER)" `
    "subjectPrefixes=$($env:REBALANCER_SUBJECT_PREFIXES)" `
    --output none
if ($LASTEXITCODE -ne 0) { throw "${hook}: creating the Event Grid subscription failed (see above)." }
Write-Host "${hook}: Event Grid subscription 'vmss-zone-rebalancer' is in place."
