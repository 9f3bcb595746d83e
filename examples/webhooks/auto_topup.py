"""Auto top-up: credit an end user's wallet when credyt-proxy relays a balance_threshold_hit.

    pip install credyt-api==0.2.0 standardwebhooks
    python3 examples/webhooks/auto_topup.py --port 8090 --secret whsec_... \\
        --credyt-url http://127.0.0.1:8081 --platform-key sandbox-platform-key --amount 10.00

The platform runs this: it holds the platform key. Each top-up is an `external_topup` wallet
adjustment on the tenant's connected account (X-CREDYT-ACCOUNT) whose transaction_id derives
from the webhook-id, so a retried or redelivered webhook credits once. It answers 204 only after
Credyt accepted the adjustment, and 500 otherwise, which makes credyt-proxy retry.
"""

import argparse
import json
import os
import uuid
from decimal import Decimal
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from corehttp.credentials import ServiceKeyCredential
from credytapi import CredytApiClient, models
from standardwebhooks import Webhook, WebhookVerificationError

# Never change it: the same webhook-id must always give the same transaction_id.
TOPUP_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "credyt-proxy:examples:auto-topup")


def top_up(client, event, webhook_id, amount, asset):
    """Credits the wallet account that fell below its threshold; None if the event is not one."""
    data = event["data"]
    account_name, _, account_asset = data.get("account_id", "").partition(":")
    if event["type"] != "balance_threshold_hit" or account_asset.upper() != asset:
        return None
    # A real platform charges the end user through its PSP here, keyed on the same id.
    transaction_id = str(uuid.uuid5(TOPUP_NAMESPACE, webhook_id))
    client.wallets.customer_wallet_ops.create_adjustment(
        data["customer_id"],
        models.CreateAdjustmentRequest(
            transaction_id=transaction_id, account_name=account_name, asset=asset,
            amount=amount, reason="external_topup", description="Automatic top-up",
            metadata={"webhook_id": webhook_id},
        ),
        headers={"X-CREDYT-ACCOUNT": event["account"]},
    )
    return transaction_id


def main():
    parser = argparse.ArgumentParser(description="Top up wallets on balance_threshold_hit.")
    parser.add_argument("--port", type=int, default=8090)
    parser.add_argument("--secret", default=os.environ.get("TENANT_WEBHOOK_SECRET"))
    parser.add_argument("--credyt-url", default="https://api.credyt.ai")
    parser.add_argument("--platform-key", default=os.environ.get("CREDYT_PLATFORM_KEY"))
    parser.add_argument("--amount", type=Decimal, default=Decimal("10.00"))
    parser.add_argument("--asset", type=str.upper, default="USD")
    args = parser.parse_args()
    if not args.secret or not args.platform_key:
        parser.error("--secret (or TENANT_WEBHOOK_SECRET) and --platform-key "
                     "(or CREDYT_PLATFORM_KEY) are required")
    if args.amount <= 0:
        parser.error("--amount must be positive (a negative adjustment debits)")
    webhook = Webhook(args.secret)
    client = CredytApiClient(ServiceKeyCredential(args.platform_key), endpoint=args.credyt_url)

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            body = self.rfile.read(int(self.headers.get("content-length", 0)))
            try:
                webhook.verify(body, dict(self.headers), json_parse=False)
            except WebhookVerificationError as err:
                print(f"rejected ({err})", flush=True)
                return self.answer(400)
            event = json.loads(body, parse_float=Decimal)
            webhook_id, data = self.headers["webhook-id"], event["data"]
            try:
                transaction_id = top_up(client, event, webhook_id, args.amount, args.asset)
            except Exception as err:  # Credyt refused or is unreachable: the relay retries
                print(f"top-up failed for {webhook_id}: {err!r}", flush=True)
                return self.answer(500)
            if transaction_id:  # a redelivery prints the same transaction: Credyt applies it once
                user = event["customer"]["external_id"] or data["customer_id"]
                print(f"top-up {transaction_id}: {user} (tenant {event['tenant']}) "
                      f"+{args.amount} {args.asset}, {data['account_id']} was {data['available']} "
                      f"(threshold {data['threshold']})", flush=True)
            self.answer(204)

        def answer(self, status):
            self.send_response(status)
            self.end_headers()

        def log_message(self, *args):  # one line per top-up is printed above
            pass

    print(f"listening on http://127.0.0.1:{args.port}/, Credyt at {args.credyt_url}", flush=True)
    ThreadingHTTPServer(("127.0.0.1", args.port), Handler).serve_forever()


if __name__ == "__main__":
    main()
