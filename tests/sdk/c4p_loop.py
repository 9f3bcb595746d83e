"""The C4P loop's middle through the official SDK (credyt-api==0.2.0).

Env: CREDYT_BASE_URL, CREDYT_API_KEY (the platform), ACCOUNT (the tenant's connected account),
PROXY_URL, TENANT_KEY (the tenant's proxy key), END_USER (the end user's external id).
The platform creates the end user in the tenant's account and credits 10 USD; the tenant, with
its own key against the proxy only, sends one 0.50 USD usage event at a time until the wallet
is below 5 USD (11 events), waiting for each charge to land. Prints the customer id.
"""

import datetime
import os
import sys
import time
import uuid
from decimal import Decimal

from corehttp.credentials import ServiceKeyCredential
from credytapi import CredytApiClient
from credytapi import models


def main():
    platform = CredytApiClient(
        ServiceKeyCredential(os.environ["CREDYT_API_KEY"]), endpoint=os.environ["CREDYT_BASE_URL"]
    )
    h = {"X-CREDYT-ACCOUNT": os.environ["ACCOUNT"]}
    user = os.environ["END_USER"]
    customer = platform.customers.create(
        models.CreateCustomerRequest(name=user, external_id=user), headers=h
    )
    wallets = platform.wallets.customer_wallet_ops
    wallets.create_adjustment(
        customer.id,
        models.CreateAdjustmentRequest(
            transaction_id=str(uuid.uuid4()),
            asset="USD",
            amount=Decimal("10"),
            reason="external_topup",
            description="prepaid credits",
        ),
        headers=h,
    )
    tenant = CredytApiClient(
        ServiceKeyCredential(os.environ["TENANT_KEY"]), endpoint=os.environ["PROXY_URL"]
    )
    for i in range(11):
        now = datetime.datetime.now(datetime.timezone.utc)
        tenant.events.send_usage(
            models.UsageRequest(
                customer_external_id=user,
                events=[
                    models.UsageEvent(
                        id=f"{user}-{i}", event_type="video_promoted", occurred_at=now
                    )
                ],
            )
        )
        expected = Decimal("10") - Decimal("0.50") * (i + 1)
        for _ in range(200):
            account = wallets.get_account(customer.id, "default:USD", headers=h)
            if Decimal(str(account.available)) == expected:
                break
            time.sleep(0.05)
        else:
            print(f"FAILED: the wallet never reached {expected}", file=sys.stderr)
            sys.exit(1)
    print(customer.id)


if __name__ == "__main__":
    main()
