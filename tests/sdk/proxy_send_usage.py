"""A tenant uses the official SDK (credyt-api==0.2.0) against credyt-proxy, changing nothing but
the base URL and the key.

Env: PROXY_URL, TENANT_KEY, CUSTOMER_EXTERNAL_ID, MODE (`ok` or `bad`), RUN (a unique prefix).
- ok:  send_usage with a video_promoted event and a response_completed event (1,000,000 input
       and 500,000 output tokens) must return None (the SDK accepts only 204).
- bad: a batch whose second event is 1 day in the future must raise HttpResponseError 422 with a
       ValidationProblem naming `events[1].occurred_at`.
Prints a JSON summary; exits non-zero on any mismatch.
"""

import datetime
import json
import os
import sys

from corehttp.credentials import ServiceKeyCredential
from corehttp.exceptions import HttpResponseError
from credytapi import CredytApiClient
from credytapi import models


def fail(message):
    print(f"FAILED: {message}", file=sys.stderr)
    sys.exit(1)


def main():
    client = CredytApiClient(
        ServiceKeyCredential(os.environ["TENANT_KEY"]), endpoint=os.environ["PROXY_URL"]
    )
    run = os.environ["RUN"]
    user = os.environ["CUSTOMER_EXTERNAL_ID"]
    now = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(seconds=5)
    if os.environ["MODE"] == "ok":
        result = client.events.send_usage(
            models.UsageRequest(
                customer_external_id=user,
                events=[
                    models.UsageEvent(id=f"{run}-1", event_type="video_promoted", occurred_at=now),
                    models.UsageEvent(
                        id=f"{run}-2",
                        event_type="response_completed",
                        occurred_at=now,
                        subject="resp-1",
                        data={"input_tokens": 1000000, "output_tokens": 500000, "model": "gpt-5.1"},
                    ),
                ],
            )
        )
        if result is not None:
            fail(f"send_usage returned {result!r}")
        # The same batch again is idempotent and still a clean 204.
        client.events.send_usage(
            models.UsageRequest(
                customer_external_id=user,
                events=[models.UsageEvent(id=f"{run}-1", event_type="video_promoted", occurred_at=now)],
            )
        )
        print(json.dumps({"sent": 2}))
        return
    try:
        client.events.send_usage(
            models.UsageRequest(
                customer_external_id=user,
                events=[
                    models.UsageEvent(id=f"{run}-ok", event_type="video_promoted", occurred_at=now),
                    models.UsageEvent(
                        id=f"{run}-future",
                        event_type="video_promoted",
                        occurred_at=now + datetime.timedelta(days=1),
                    ),
                ],
            )
        )
    except HttpResponseError as e:
        body = e.response.json() if e.response is not None else None
        if e.status_code != 422:
            fail(f"status {e.status_code}, body {body}")
        errors = (body or {}).get("errors", {})
        if "events[1].occurred_at" not in errors:
            fail(f"errors do not name events[1].occurred_at: {body}")
        print(json.dumps({"status": e.status_code, "errors": errors}))
        return
    fail("send_usage accepted a batch with an invalid event")


if __name__ == "__main__":
    main()
