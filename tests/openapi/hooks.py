"""schemathesis hooks of tests/api/openapi.rs: the document's example time stands for now.

The proxy accepts a usage event only within a window around the present
(`ingest.past_window_secs` back, `ingest.future_skew_secs` ahead), which the fixed `occurred_at`
of the document's examples cannot stay in. So an `occurred_at` equal to EXAMPLE_TIME is sent as
the present instant: the examples phase then reaches accepted events (with their fees),
duplicates and quotes, and their answers are checked against the document like every other.
Generated values are sent as generated.
"""

from datetime import datetime, timezone

import schemathesis

# The `occurred_at` of every example in docs/openapi.json.
EXAMPLE_TIME = "2026-06-01T00:00:00Z"


def _to_now(event):
    if isinstance(event, dict) and event.get("occurred_at") == EXAMPLE_TIME:
        event["occurred_at"] = datetime.now(timezone.utc).isoformat()


@schemathesis.hook
def before_call(context, case, kwargs):
    body = case.body
    if not isinstance(body, dict):
        return
    # POST /v1/quote: the body is one event; POST /events and /v1/events: a UsageRequest.
    _to_now(body)
    events = body.get("events")
    if isinstance(events, list):
        for event in events:
            _to_now(event)
