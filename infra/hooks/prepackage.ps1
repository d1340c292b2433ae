# azd prepackage hook (Windows): same as prepackage.sh. Byte-compiles function_app.py and
# rebalancer/ into the package (checked-hash .pyc), so that a cold start of the read-only
# package does not compile them again; compiles nothing when python is not the app's version.
$ErrorActionPreference = 'Stop'
Set-Location (Join-Path $PSScriptRoot '..' '..')
$want = '3.11'
$have = 'none'
if (Get-Command python -ErrorAction SilentlyContinue) {
    $have = (& python -c 'import sys; print("%d.%d" % sys.version_info[:2])')
}
if ($have -ne $want) {
    Write-Warning ("prepackage: python is $have, the app runs on Python ${want}: not byte-compiling " +
        "(each cold start compiles the app's modules); install Python $want to ship them compiled")
    exit 0
}
& python -m compileall -q --invalidation-mode checked-hash function_app.py rebalancer
if ($LASTEXITCODE -ne 0) { throw "prepackage: compileall failed ($LASTEXITCODE)" }
