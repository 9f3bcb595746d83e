"""A tenant's application uses the official SDK (credyt-api==0.2.0) against the proxy with its
own key only, and reads exactly what the platform reads from Credyt for the tenant's account.

Env: PROXY_URL, TENANT_KEY (the tenant), CREDYT_BASE_URL, CREDYT_API_KEY, ACCOUNT (the
platform, directly), END_USER, EVENT_ID, TRANSACTION_ID (the charge the event makes).
Exits non-zero on any difference; prints the customer id.
"""

import datetime
import os
import sys
import time
import uuid
from decimal import Decimal

from corehttp.credentials import ServiceKeyCredential
from corehttp.exceptions import HttpResponseError, ResourceNotFoundError
from credytapi import CredytApiClient, models


def check(cond, message):
    if not cond:
        print(f"FAILED: {message}", file=sys.stderr)
        sys.exit(1)


def same(a, b, what):
    a = a.as_dict() if hasattr(a, "as_dict") else a
    b = b.as_dict() if hasattr(b, "as_dict") else b
    check(a == b, f"{what}: through the proxy {a!r}, directly {b!r}")


def main():
    env = os.environ
    tenant = CredytApiClient(ServiceKeyCredential(env["TENANT_KEY"]), endpoint=env["PROXY_URL"])
    platform = CredytApiClient(
        ServiceKeyCredential(env["CREDYT_API_KEY"]), endpoint=env["CREDYT_BASE_URL"]
    )
    h = {"X-CREDYT-ACCOUNT": env["ACCOUNT"]}
    user = env["END_USER"]

    # The tenant creates its end user, then finds it by external id: Credyt answers 303, which
    # the SDK does not follow; its Location is a path on the proxy.
    created = tenant.customers.create(models.CreateCustomerRequest(name=user, external_id=user))
    try:
        tenant.customers.list(external_id=user)
        check(False, "the external-id lookup should answer 303")
    except HttpResponseError as e:
        check(e.status_code == 303, f"lookup status {e.status_code}")
        location = e.response.headers["Location"]
    check(location == f"/customers/{created.id}", f"Location {location}")
    found = tenant.customers.get(location.rsplit("/", 1)[1])
    check(found.id == created.id and found.external_id == user, "the customer found")
    same(found, platform.customers.get(created.id, headers=h), "customer")

    # The platform funds the wallet; the tenant's usage goes through the proxy and is charged.
    platform.wallets.customer_wallet_ops.create_adjustment(
        created.id,
        models.CreateAdjustmentRequest(
            transaction_id=str(uuid.uuid4()), asset="USD", amount=Decimal("10"),
            reason="external_topup",
        ),
        headers=h,
    )
    tenant.events.send_usage(
        models.UsageRequest(
            customer_external_id=user,
            events=[
                models.UsageEvent(
                    id=env["EVENT_ID"], event_type="video_promoted",
                    occurred_at=datetime.datetime.now(datetime.timezone.utc),
                )
            ],
        )
    )
    ops = tenant.wallets.customer_wallet_ops
    for _ in range(200):
        account = ops.get_account(created.id, "default:USD")
        if Decimal(str(account.available)) == Decimal("9.50"):
            break
        time.sleep(0.05)
    check(Decimal(str(account.available)) == Decimal("9.50"), f"available {account.available}")
    direct = platform.wallets.customer_wallet_ops
    same(account, direct.get_account(created.id, "default:USD", headers=h), "wallet account")
    same(ops.get_customer_wallet(created.id), direct.get_customer_wallet(created.id, headers=h), "wallet")
    tx = env["TRANSACTION_ID"]
    same(ops.get_transaction(created.id, tx), direct.get_transaction(created.id, tx, headers=h), "transaction")
    same(tenant.events.list(), platform.events.list(headers=h), "events")
    same(tenant.customers.list(), platform.customers.list(headers=h), "customers")

    # Another account's customer is not there for the tenant, even when the tenant's SDK names
    # the other account in the header the platform would use.
    forged = {"X-CREDYT-ACCOUNT": env["FOREIGN_ACCOUNT"], "x-credyt-account": env["FOREIGN_ACCOUNT"]}
    for headers in ({}, forged):
        try:
            tenant.customers.get(env["FOREIGN_CUSTOMER"], headers=headers)
            check(False, f"another account's customer was readable with {headers}")
        except ResourceNotFoundError:
            pass
    same(tenant.customers.list(headers=forged), platform.customers.list(headers=h), "customers, forged header")
    print(created.id)


if __name__ == "__main__":
    main()
