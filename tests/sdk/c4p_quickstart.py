"""The C4P quickstart through the official SDK (credyt-api==0.2.0).

Env: CREDYT_BASE_URL, CREDYT_API_KEY. Creates a connected account, a customer on it (via
X-CREDYT-ACCOUNT), credits 20 USD, charges 0.35 USD, checks 19.65 exactly, replays both
transaction ids (nothing may change), sends a usage event, and prints a JSON summary.
Exits non-zero on any mismatch.
"""

import datetime
import json
import os
import sys
import uuid
from decimal import Decimal

from corehttp.credentials import ServiceKeyCredential
from credytapi import CredytApiClient
from credytapi import models


def check(cond, message):
    if not cond:
        print(f"FAILED: {message}", file=sys.stderr)
        sys.exit(1)


def main():
    base = os.environ["CREDYT_BASE_URL"]
    key = os.environ["CREDYT_API_KEY"]
    client = CredytApiClient(ServiceKeyCredential(key), endpoint=base)

    tenant = uuid.uuid4().hex[:12]
    account = client.accounts.create(
        models.CreateAccountRequest(name="BingoLingo", external_id=tenant)
    )
    acc = account.id
    check(acc.startswith("acc_") and len(acc) == 30, f"account id shape: {acc}")
    h = {"X-CREDYT-ACCOUNT": acc}

    ctx = client.accounts.get_context(headers=h)
    check(ctx.account_id == acc, f"context under X-CREDYT-ACCOUNT: {ctx.account_id}")
    listed = client.accounts.list(external_id=tenant)
    check(listed.total_count == 1 and listed.items_property[0].id == acc, "account listing")

    customer = client.customers.create(
        models.CreateCustomerRequest(
            name="Francis Gutmann DDS", external_id=uuid.uuid4().hex
        ),
        headers=h,
    )
    cust = customer.id
    check(cust.startswith("cust_") and customer.subscriptions == [], "customer create")
    fetched = client.customers.get(cust, headers=h)
    check(fetched.id == cust and fetched.name == "Francis Gutmann DDS", "customer get")

    wallet = client.wallets.customer_wallet_ops
    topup_tx = str(uuid.uuid4())
    charge_tx = str(uuid.uuid4())
    adj = wallet.create_adjustment(
        cust,
        models.CreateAdjustmentRequest(
            transaction_id=topup_tx,
            asset="USD",
            amount=Decimal("20"),
            reason="external_topup",
            metadata={"payment_id": str(uuid.uuid4())},
        ),
        headers=h,
    )
    check(adj.id == topup_tx, f"adjustment id echoes transaction_id: {adj.id}")
    charge = wallet.create_charge(
        cust,
        models.CreateChargeRequest(
            transaction_id=charge_tx,
            asset="USD",
            amount=Decimal("0.35"),
            description="quickstart charge",
        ),
        headers=h,
    )

    def available():
        account = wallet.get_account(cust, "default:USD", headers=h)
        return Decimal(str(account.available))

    check(available() == Decimal("19.65"), f"available after charge: {available()}")

    # Replays with the same transaction ids (even with other amounts) change nothing.
    adj2 = wallet.create_adjustment(
        cust,
        models.CreateAdjustmentRequest(
            transaction_id=topup_tx, asset="USD", amount=Decimal("20"), reason="external_topup"
        ),
        headers=h,
    )
    wallet.create_charge(
        cust,
        models.CreateChargeRequest(transaction_id=charge_tx, asset="USD", amount=Decimal("0.35")),
        headers=h,
    )
    wallet.create_charge(
        cust,
        models.CreateChargeRequest(transaction_id=charge_tx, asset="USD", amount=Decimal("7")),
        headers=h,
    )
    check(adj2.id == adj.id and adj2.created_at == adj.created_at, "adjustment replay")
    check(available() == Decimal("19.65"), f"available after replays: {available()}")

    tx = wallet.get_transaction(cust, charge_tx, headers=h)
    check(tx.type == "fee" and Decimal(str(tx.amount)) == Decimal("0.35"), "charge transaction")
    summary = wallet.get_customer_wallet(cust, headers=h)
    check([a.id for a in summary.accounts] == ["default:USD"], "wallet accounts")

    event_id = str(uuid.uuid4())
    now = datetime.datetime.now(datetime.timezone.utc)
    result = client.events.send_usage(
        models.UsageRequest(
            customer_id=cust,
            events=[
                models.UsageEvent(
                    id=event_id,
                    event_type="video_promoted",
                    occurred_at=now,
                    data={"count": 1, "model": "demo"},
                )
            ],
        ),
        headers=h,
    )
    check(result is None, "send_usage returns None on 204")
    event = client.events.get(event_id, headers=h)
    check(event.customer_id == cust and event.fees == [], "stored event")

    print(
        json.dumps(
            {
                "account_id": acc,
                "customer_id": cust,
                "available": str(available()),
                "charge_id": charge_tx,
                "charge_created_at": getattr(charge, "get", lambda k: None)("created_at"),
                "event_id": event_id,
            }
        )
    )


if __name__ == "__main__":
    main()
