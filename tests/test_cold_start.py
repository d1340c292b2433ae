"""What a fresh worker's first timer tick imports (docs/performance.md, figure 4): an audit
that plans no operation does not import the operation state machine; the first operation
does. (The child builds its parts itself: devkit.stack imports the state machine for its
invariant checks.)"""

from __future__ import annotations

from tests.azurite import in_fresh_process

_TICKS = """\
import json, sys
import function_app
from armsim import ArmSim, ScaleSetSpec, Scenario
from devkit.host import Host
from rebalancer.compute import ArmConfig, ComputeAdapter
from rebalancer.clock import VirtualTime
from rebalancer.service import build_runtime
from rebalancer.settings import load_settings
from rebalancer.store import StorageConnection, Store

connection_string, prefix = sys.argv[1:3]
enabled = {"zone-rebalance": "enabled"}
seen = {}
for name, counts in (("balanced", {"1": 2, "2": 2, "3": 2}), ("skewed", {"1": 1, "2": 3, "3": 3})):
    scenario = Scenario(scale_sets=(ScaleSetSpec("web", "rg-web", counts=counts, tags=enabled),))
    with ArmSim.start(scenario) as sim:
        store = Store(StorageConnection("test", connection_string=connection_string),
                      table_prefix=prefix + name, retry_total=0)
        settings = load_settings({
            "REBALANCER_SUBSCRIPTION_ID": sim.subscription_id,
            "REBALANCER_MODE": "enforce",
            "REBALANCER_APP_PRINCIPAL_ID": sim.scenario.app_principal_id,
            "REBALANCER_ARM_ENDPOINT": sim.endpoint,
        })
        config = ArmConfig(sim.subscription_id, endpoint=sim.endpoint, ca_cert=sim.ca_cert_path)
        compute = ComputeAdapter(config, sim.credential, clock=VirtualTime(sim.clock))
        runtime = build_runtime(settings, store=store, compute=compute, clock=compute.clock)
        Host(runtime).timer()
        seen[name] = {
            "operation": "rebalancer.operation" in sys.modules,
            "in_flight": len(store.active_operations()),
        }
        compute.close()
        store.close()
print(json.dumps(seen))
"""


def test_an_audit_that_plans_nothing_does_not_import_the_state_machine(azurite, table_prefix):
    seen = in_fresh_process(_TICKS, azurite, table_prefix)
    assert seen["balanced"] == {"operation": False, "in_flight": 0}
    assert seen["skewed"] == {"operation": True, "in_flight": 1}
