"""Azure Functions entry points (Python v2 programming model). Triggers only: decode, delegate.

Everything heavy (the Azure SDKs, Table Storage, the reconciler) is imported on first use in
`rebalancer.service`, so a cold start pays only for `azure.functions`.
"""

import logging

import azure.functions as func

from rebalancer.azure_operations import (
    EVENT_GRID_FUNCTION_NAME,
    FOLLOW_UP_FUNCTION_NAME,
    TIMER_FUNCTION_NAME,
)

app = func.FunctionApp()


@app.function_name(EVENT_GRID_FUNCTION_NAME)
@app.event_grid_trigger(arg_name="event")
def on_resource_event(event: func.EventGridEvent) -> None:
    """A scale set or VM changed somewhere in the subscription: reconcile that scale set now."""
    from rebalancer import service
    from rebalancer.events import envelope

    service.handle_event(*envelope(event))


@app.function_name(FOLLOW_UP_FUNCTION_NAME)
@app.queue_trigger(
    arg_name="message", queue_name="%REBALANCER_FOLLOW_UP_QUEUE%", connection="AzureWebJobsStorage"
)
def on_follow_up(message: func.QueueMessage) -> None:
    """An in-flight operation's follow-up is due (a message sent with a visibility delay), or
    an audit that ran out of time continues."""
    from rebalancer import service

    service.handle_follow_up(message.get_body().decode("utf-8", errors="replace"))


@app.function_name(TIMER_FUNCTION_NAME)
@app.timer_trigger(arg_name="timer", schedule="%REBALANCER_TIMER_SCHEDULE%", run_on_startup=False)
def on_timer(timer: func.TimerRequest) -> None:
    """Advance in-flight operations every tick; audit the subscription when the audit is due."""
    from rebalancer import service

    report = service.handle_timer(past_due=timer.past_due)
    log = logging.getLogger("rebalancer")
    if report is None:  # still a tick: the "timer stopped" alert counts these lines
        log.info("timer tick: nothing done (REBALANCER_MODE is off, or an error is logged above)")
    else:
        log.info(
            "timer tick: %d operation(s) advanced, %d scale set(s) audited, %d deferred",
            report.advanced,
            report.audited,
            report.deferred,
        )
