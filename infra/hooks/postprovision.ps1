# azd postprovision hook (Windows): same as postprovision.sh. Applies the Event Grid
# subscription again after `azd provision`; skips while the function is not deployed yet.
$ErrorActionPreference = 'Stop'
& (Join-Path $PSScriptRoot 'postdeploy.ps1') -IfDeployed
