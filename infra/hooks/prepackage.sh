#!/bin/sh
# azd prepackage hook: byte-compile the app's own modules into the package.
#
# Flex Consumption runs the app from its package, mounted read-only, so Python cannot keep
# what it compiles: without .pyc in the package, every cold start compiles function_app.py
# and rebalancer/ again (about 0.1 s of CPU, docs/performance.md figure 4). checked-hash .pyc
# are used whatever times the files carry in the package, and only while their source is
# unchanged. The dependencies are compiled by pip when the package is built.
#
# The .pyc must match the app's Python (infra/modules/app.bicep, runtime version); with
# another python3 this hook compiles nothing and says so: the app works as before.
set -eu

cd "$(dirname "$0")/../.."
want=3.11
have=$(python3 -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null || echo none)
if [ "$have" != "$want" ]; then
  echo "prepackage: python3 is $have, the app runs on Python $want: not byte-compiling" \
    "(each cold start compiles the app's modules); install Python $want as python3 to ship them compiled" >&2
  exit 0
fi
python3 -m compileall -q --invalidation-mode checked-hash function_app.py rebalancer
