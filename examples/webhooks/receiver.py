"""Watch the webhooks credyt-proxy relays to a tenant: verify each, print one line, answer 204.

    pip install standardwebhooks
    python3 examples/webhooks/receiver.py --port 8090 --secret whsec_...

The secret may come from TENANT_WEBHOOK_SECRET instead. A bad signature answers 400.
"""

import argparse
import json
import os
from decimal import Decimal
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from standardwebhooks import Webhook, WebhookVerificationError


def describe(event):
    customer = event.get("customer") or {}
    data = event["data"]
    line = f"{event['timestamp']} {event['type']} tenant={event['tenant']}"
    if customer:
        line += f" customer={customer['external_id'] or customer['id']}"
    if "available" in data and "threshold" in data:
        line += f" {data.get('account_id', '?')} available={data['available']}"
        line += f" threshold={data['threshold']}"
    return line


def main():
    parser = argparse.ArgumentParser(description="Print the webhooks credyt-proxy relays.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8090)
    parser.add_argument("--secret", default=os.environ.get("TENANT_WEBHOOK_SECRET"))
    args = parser.parse_args()
    if not args.secret:
        parser.error("--secret or TENANT_WEBHOOK_SECRET is required")
    webhook = Webhook(args.secret)
    seen = set()  # webhook-id of every webhook received: a retry or a redelivery repeats it

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            body = self.rfile.read(int(self.headers.get("content-length", 0)))
            try:
                # The raw bytes, before any parsing; also refuses a timestamp 5 min off.
                webhook.verify(body, dict(self.headers), json_parse=False)
            except WebhookVerificationError as err:
                print(f"rejected ({err})", flush=True)
                self.send_response(400)
                self.end_headers()
                return
            event = json.loads(body, parse_float=Decimal)  # money stays exact
            webhook_id = self.headers["webhook-id"]
            again = " (again)" if webhook_id in seen else ""
            seen.add(webhook_id)
            print(f"{describe(event)} id={webhook_id}{again}", flush=True)
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args):  # one line per webhook is printed above
            pass

    print(f"listening on http://{args.host}:{args.port}/", flush=True)
    ThreadingHTTPServer((args.host, args.port), Handler).serve_forever()


if __name__ == "__main__":
    main()
