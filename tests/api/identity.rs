//! Identity under change: a tenants-file reload takes effect on the next request, what was
//! accepted before keeps its account, and "not found" answers are cached, not re-asked.

use std::time::Duration;

use rust_decimal_macros::dec;
use serde_json::{json, Value};

use super::proxy::{account_of, ago, emu_post, eventually, usd_charges, Options, World};

/// Creates a connected account with `external_id` in the emulator; returns its id.
async fn account(w: &World, external_id: &str) -> String {
    let acc = emu_post(
        &w.http,
        &w.emulator,
        "/accounts",
        None,
        json!({"name": external_id, "external_id": external_id}),
    )
    .await;
    acc["id"].as_str().unwrap().to_string()
}

fn one_event(user: &str, id: &str) -> Value {
    json!({"customer_external_id": user, "events": [
        {"id": id, "event_type": "video_promoted", "occurred_at": ago(5)}]})
}

/// Tenant B of the test world is `account_external_id = "tenant-b"`, `create_customers =
/// false`, `forward = "charges"`; this points it at the account `tenant-c`.
fn move_b_to_c(text: String) -> String {
    text.replace(
        "account_external_id = \"tenant-b\"",
        "account_external_id = \"tenant-c\"",
    )
}

/// The id of the customer with `external_id`, in whichever account.
fn customer_id(state: &Value, external_id: &str) -> Option<String> {
    state["accounts"]
        .as_array()?
        .iter()
        .flat_map(|a| a["customers"].as_array().into_iter().flatten())
        .find(|c| c["external_id"] == external_id)
        .map(|c| c["id"].as_str().unwrap().to_string())
}

#[actix_web::test]
async fn a_reload_that_changes_account_create_customers_or_forward_applies_to_the_next_request() {
    let w = World::start().await;
    let acc_c = account(&w, "tenant-c").await;
    let in_b = w.customer(&w.b.account, "mover", "20").await;
    let in_c = w.customer(&acc_c, "mover", "20").await;

    // Before: an unknown end user is not created, and the miss is cached.
    let r = w
        .post("/events", &w.b.key, &one_event("newbie", "n1"))
        .await;
    assert_eq!(r.status(), 404);
    // `create_customers` switched on: the cached "not found" does not hold the creation back.
    w.edit_tenants(|t| t.replace("create_customers = false", "create_customers = true"))
        .await;
    let r = w
        .post("/events", &w.b.key, &one_event("newbie", "n2"))
        .await;
    assert_eq!(r.status(), 204);
    let state = w.state().await;
    let newbie = customer_id(&state, "newbie").expect("newbie was created");
    assert_eq!(
        account_of(&state, &newbie).as_deref(),
        Some(w.b.account.as_str())
    );

    assert_eq!(
        w.post("/events", &w.b.key, &one_event("mover", "m1"))
            .await
            .status(),
        204
    );
    assert_eq!(usd_charges(&w.state().await, &in_b), (1, dec!(0.50)));
    w.edit_tenants(move_b_to_c).await;
    // The very next request charges the customer of the new account, not the old one.
    assert_eq!(
        w.post("/events", &w.b.key, &one_event("mover", "m2"))
            .await
            .status(),
        204
    );
    let state = w.state().await;
    assert_eq!(usd_charges(&state, &in_c), (1, dec!(0.50)));
    assert_eq!(
        usd_charges(&state, &in_b),
        (1, dec!(0.50)),
        "B's is untouched"
    );

    // `forward` switched to events: the next event goes to Credyt's /events, not priced here.
    w.edit_tenants(|t| {
        t.replace(
            "create_customers = true\nforward = \"charges\"",
            "create_customers = true\nforward = \"events\"",
        )
    })
    .await;
    let r = w
        .post("/v1/events", &w.b.key, &one_event("mover", "m3"))
        .await;
    assert_eq!(r.status(), 200);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["results"][0]["status"], "accepted", "{body}");
    assert_eq!(body["results"][0]["fees"], json!([]), "{body}");
    let stored = w
        .http
        .get(format!("{}/events/m3", w.emulator.url()))
        .header("X-CREDYT-API-KEY", super::proxy::PLATFORM_KEY)
        .header("X-CREDYT-ACCOUNT", &acc_c)
        .send()
        .await
        .unwrap();
    assert_eq!(stored.status(), 200);
    assert_eq!(usd_charges(&w.state().await, &in_c), (1, dec!(0.50)));
    w.stop().await;
}

#[actix_web::test]
async fn what_was_accepted_before_a_reload_keeps_its_account() {
    // Durable, with the forwarder off: both records wait in the outbox across the reload.
    let w = World::start_with(Options {
        ack: "durable",
        outbox_config: "forwarder = false\n".into(),
        ..Default::default()
    })
    .await;
    let acc_c = account(&w, "tenant-c").await;
    let in_b = w.customer(&w.b.account, "mover", "20").await;
    let in_c = w.customer(&acc_c, "mover", "20").await;
    assert_eq!(
        w.post("/events", &w.b.key, &one_event("mover", "before"))
            .await
            .status(),
        204
    );
    w.edit_tenants(move_b_to_c).await;
    assert_eq!(
        w.post("/events", &w.b.key, &one_event("mover", "after"))
            .await
            .status(),
        204
    );
    // Deliver now (a new proxy on the same outbox, forwarder on, the new tenants file).
    let w = w.restart("").await;
    eventually(Duration::from_secs(10), "both charges", || async {
        let state = w.state().await;
        (usd_charges(&state, &in_b).0 + usd_charges(&state, &in_c).0 == 2).then_some(())
    })
    .await;
    let state = w.state().await;
    assert_eq!(
        usd_charges(&state, &in_b),
        (1, dec!(0.50)),
        "accepted on B's account, charged there"
    );
    assert_eq!(usd_charges(&state, &in_c), (1, dec!(0.50)));
    w.stop().await;
}

#[actix_web::test]
async fn an_unknown_account_is_looked_up_once_within_the_negative_ttl() {
    let w = World::start().await;
    w.edit_tenants(|t| {
        t.replace(
            "account_external_id = \"tenant-b\"",
            "account_external_id = \"no-such-tenant\"",
        )
    })
    .await;
    for i in 0..3 {
        let r = w
            .post("/events", &w.b.key, &one_event("anyone", &format!("u{i}")))
            .await;
        assert_eq!(r.status(), 404);
        let body: Value = r.json().await.unwrap();
        assert_eq!(body["code"], "account_not_found");
    }
    let lookups = w
        .requests()
        .await
        .iter()
        .filter(|r| {
            r["method"] == "GET"
                && r["path"] == "/accounts"
                && r["query"].as_str().unwrap_or("").contains("no-such-tenant")
        })
        .count();
    assert_eq!(lookups, 1, "the negative answer is cached");
    w.stop().await;
}
