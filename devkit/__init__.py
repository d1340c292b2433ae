"""The dev kit: everything that runs the app outside Azure, and is never deployed.

The host driver that decodes trigger payloads and calls the functions (host.py), the Azurite
launcher (azurite.py), the armsim + Azurite stack and the app's parts pointed at it (stack.py),
the virtual-time driver through the functions (driver.py), the invariant catalogue and its
journal judge (invariants.py), and the demo (demo.py, demo_cli.py). Tests, chaos, bench and
`python -m rebalancer demo` import it; `.funcignore` keeps it out of the package.
"""
