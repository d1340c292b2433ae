"""The client-side throttling budget: pure token buckets on an explicit clock."""

from __future__ import annotations

import pytest

from rebalancer.budget import (
    ARM_READS,
    VMSS_HIGH_COST_GET,
    VMSS_HIGH_COST_GET_SUB,
    Budget,
    CallKind,
    Policy,
    Scope,
    parse_remaining_header,
    policy_window_seconds,
)


def test_share_of_the_subscription_bucket_then_the_refill_rate() -> None:
    budget = Budget(share=0.2, policies={CallKind.VM_LIST: (Policy("p", 900, 300),)})
    waits = [budget.reserve(CallKind.VM_LIST, 0.0).wait for _ in range(181)]
    # 20% of a 900 burst is free; the next call waits for 20% of 300/min = 1 token per second.
    assert waits[:180] == [0.0] * 180
    assert waits[180] == pytest.approx(1.0)
    assert budget.reserve(CallKind.VM_LIST, 0.0).wait == pytest.approx(2.0)


def test_concurrent_callers_queue_one_slot_each() -> None:
    budget = Budget(share=1.0, policies={CallKind.OTHER_READ: (Policy("p", 1, 60),)})
    waits = [budget.reserve(CallKind.OTHER_READ, 10.0).wait for _ in range(4)]
    assert waits == pytest.approx([0.0, 1.0, 2.0, 3.0])
    # Time passing pays back the debt.
    assert budget.reserve(CallKind.OTHER_READ, 14.0).wait == pytest.approx(0.0)


def test_per_resource_policies_are_separate_buckets() -> None:
    budget = Budget(share=0.2, policies={CallKind.SCALE_SET_VM_LIST: (VMSS_HIGH_COST_GET,)})
    a = [budget.reserve(CallKind.SCALE_SET_VM_LIST, 0.0, resource="/a").wait for _ in range(7)]
    b = budget.reserve(CallKind.SCALE_SET_VM_LIST, 0.0, resource="/A").wait
    c = budget.reserve(CallKind.SCALE_SET_VM_LIST, 0.0, resource="/c").wait
    assert a[:6] == [0.0] * 6 and a[6] > 0  # 20% of 30
    assert b > a[6]  # same resource, case-insensitively
    assert c == 0.0


def test_reservation_longer_than_affordable_books_nothing() -> None:
    budget = Budget(share=1.0, policies={CallKind.OTHER_READ: (Policy("p", 1, 6),)})
    assert budget.reserve(CallKind.OTHER_READ, 0.0).granted
    refused = budget.reserve(CallKind.OTHER_READ, 0.0, max_wait=5.0)
    assert not refused.granted and refused.wait == pytest.approx(10.0)
    # The refused call did not take the slot: the next one waits just as long.
    assert budget.reserve(CallKind.OTHER_READ, 0.0).wait == pytest.approx(10.0)


def test_hold_after_retry_after_delays_only_that_kind() -> None:
    budget = Budget()
    budget.hold(CallKind.SCALE_SET_VM_LIST, until=100.0)
    assert budget.reserve(CallKind.SCALE_SET_VM_LIST, 40.0).wait == pytest.approx(60.0)
    assert budget.reserve(CallKind.SCALE_SET_GET, 40.0).wait == 0.0
    assert budget.reserve(CallKind.SCALE_SET_VM_LIST, 101.0).wait == 0.0


def test_remaining_header_parsing_and_windows() -> None:
    header = "Microsoft.Compute/GetVMScaleSet3Min;197,Microsoft.Compute/GetVMScaleSet30Min;1297, x"
    assert parse_remaining_header(header) == {
        "Microsoft.Compute/GetVMScaleSet3Min": 197,
        "Microsoft.Compute/GetVMScaleSet30Min": 1297,
    }
    assert parse_remaining_header(None) == {}
    assert policy_window_seconds("Microsoft.Compute/HighCostGet30Min") == 1800
    assert policy_window_seconds("Microsoft.Compute/VMScaleSetBatchedVMRequests5Min") == 300
    assert policy_window_seconds("arm/reads") is None


def test_low_remaining_header_slows_down_before_azure_says_no() -> None:
    budget = Budget(share=0.2)
    name = "Microsoft.Compute/HighCostGet3Min"
    assert budget.observe(CallKind.VM_LIST, {name: 900}, now=0.0) is None
    # 100 left of 900: less than the app's share (180). Hold until it has refilled to 180.
    until = budget.observe(CallKind.VM_LIST, {name: 100}, now=10.0)
    assert until == pytest.approx(10.0 + (180 - 100) / (900 / 180))
    assert budget.reserve(CallKind.VM_LIST, 10.0).wait == pytest.approx(until - 10.0)
    # Plenty left again: no new hold.
    assert budget.observe(CallKind.VM_LIST, {name: 880}, now=20.0) is None


def test_what_other_tools_use_above_the_share_never_holds_the_app() -> None:
    """Others keep the bucket 70% used, for good: the app still gets its share."""
    budget = Budget(share=0.2)
    name = "Microsoft.Compute/HighCostGetVMScaleSetSubscriptionMaximum"
    assert budget.observe(CallKind.SCALE_SET_VM_LIST, {name: 1080}, now=0.0) is None
    for now in range(0, 3600, 60):
        assert budget.observe(CallKind.SCALE_SET_VM_LIST, {name: 324}, now=float(now)) is None
        assert budget.reserve(CallKind.SCALE_SET_VM_LIST, float(now), resource="/s").wait == 0


def test_with_the_whole_budget_only_retry_after_holds() -> None:
    """Share 1.0 (the demo's private armsim): nothing is left for others to protect."""
    budget = Budget(share=1.0)
    name = "Microsoft.Compute/HighCostGetVMScaleSetResource"
    assert budget.observe(CallKind.SCALE_SET_VM_LIST, {name: 1}, now=0.0, resource="/a") is None
    # At half, the line is half the bucket.
    half = Budget(share=0.5)
    assert half.observe(CallKind.SCALE_SET_VM_LIST, {name: 14}, now=0.0, resource="/a") > 0


def test_counters_that_are_not_budgets_never_hold() -> None:
    """`VmssQueuedVMOperations;0` comes with every write Azure accepts (recorded)."""
    budget = Budget(share=0.2)
    header = (
        "Microsoft.Compute/VMScaleSetActionsSubscriptionMaximum;1499,"
        "Microsoft.Compute/VMScaleSetBatchedVMRequestsSubscriptionMaximum;5996,"
        "Microsoft.Compute/VmssQueuedVMOperations;0"
    )
    headers = {"x-ms-ratelimit-remaining-resource": header}
    assert budget.observe_headers(CallKind.SCALE_SET_UPDATE, headers, 0.0, resource="/a") is None
    assert budget.reserve(CallKind.SCALE_SET_UPDATE, 0.1, resource="/b").wait == 0.0


def test_names_without_a_window_refill_at_the_documented_rate() -> None:
    """`GetVMScaleSetResource` is 36 calls refilled at 12 a minute (not 36 in 60 s)."""
    budget = Budget(share=0.2)
    name = "Microsoft.Compute/GetVMScaleSetResource"
    until = budget.observe(CallKind.SCALE_SET_GET, {name: 2}, now=0.0, resource="/a")
    # The documented size (36) counts although only 2 were ever seen; 7.2 is the app's share.
    assert until == pytest.approx((0.2 * 36 - 2) / (12 / 60))
    name = "Microsoft.Compute/VMScaleSetBatchedVMRequestsSubscriptionMaximum"
    assert budget.observe(CallKind.SCALE_SET_UPDATE, {name: 6000}, now=0.0) is None
    # Not on the limits page: its size is the highest seen, refilled in three minutes.
    until = budget.observe(CallKind.SCALE_SET_UPDATE, {name: 600}, now=1.0)
    assert until == pytest.approx(1.0 + (1200 - 600) / (6000 / 180))


def test_a_short_per_scale_set_policy_holds_only_that_scale_set() -> None:
    budget = Budget(share=0.2)
    low = {"Microsoft.Compute/VMScaleSetActionsResource": 1}
    until = budget.observe(CallKind.SCALE_SET_UPDATE, low, now=0.0, resource="/A")
    assert until == pytest.approx((0.2 * 12 - 1) / (4 / 60))
    assert budget.reserve(CallKind.SCALE_SET_UPDATE, 0.0, resource="/a").wait == until
    assert budget.reserve(CallKind.SCALE_SET_UPDATE, 0.0, resource="/b").wait == 0.0
    # A subscription-wide shortage holds every scale set.
    low = {"Microsoft.Compute/VMScaleSetActionsSubscriptionMaximum": 10}
    budget.observe(CallKind.SCALE_SET_UPDATE, low, now=0.0, resource="/A")
    assert budget.reserve(CallKind.SCALE_SET_UPDATE, 0.0, resource="/c").wait > 0


def test_subscription_audit_of_a_thousand_sets_fits_the_share() -> None:
    """Spending only what `reserve` hands out never exceeds the share of Azure's buckets."""
    budget = Budget(share=0.2)
    now, spent = 0.0, 0
    for i in range(1000):
        reservation = budget.reserve(CallKind.SCALE_SET_VM_LIST, now, resource=f"/s/{i}")
        now = max(now, reservation.wait + now)
        spent += 1
    # 20% of the 1080 burst plus 20% of 360/min over the elapsed time.
    allowed = 0.2 * VMSS_HIGH_COST_GET_SUB.burst + 0.2 * 360 / 60 * now
    assert spent <= allowed + 1
    assert now == pytest.approx((1000 - 216) / (0.2 * 360 / 60), rel=0.01)


def test_share_must_be_a_fraction() -> None:
    with pytest.raises(ValueError, match="share"):
        Budget(share=0)
    assert ARM_READS.scope is Scope.SUBSCRIPTION


def test_arm_subscription_headers_count_too() -> None:
    budget = Budget(share=0.2)
    headers = {"x-ms-ratelimit-remaining-subscription-reads": "249"}
    assert budget.observe_headers(CallKind.SCALE_SET_GET, headers, now=0.0) is None
    # 10 left of 249 seen: hold reads until ARM has refilled to the app's 20% (25/s).
    until = budget.observe_headers(
        CallKind.SCALE_SET_GET, {"x-ms-ratelimit-remaining-subscription-reads": "10"}, now=1.0
    )
    assert until == pytest.approx(1.0 + (0.2 * 249 - 10) / (249 / 10))
