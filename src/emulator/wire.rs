//! The emulator's own wire types: what Credyt (as modelled by `credyt-api==0.2.0`) sends and
//! accepts. Deliberately independent of the proxy's Credyt client so a shared misreading of the
//! API cannot hide in both.
//!
//! Contract: request structs keep required fields optional so handlers can answer a 422
//! `ValidationProblem` naming each missing field instead of a generic 400; every amount that
//! goes out is a JSON **number** (`rust_decimal::serde::arbitrary_precision`), exact, never f64.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// Free-form `metadata` (Credyt types it string -> string; kept as given).
pub(crate) type Metadata = Map<String, Value>;

/// RFC 7807 problem body (`ProblemDetails`, or `ValidationProblem` when `errors` is set).
#[derive(Serialize)]
pub(crate) struct Problem {
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub title: &'static str,
    pub status: u16,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub errors: Option<BTreeMap<String, Vec<String>>>,
}

/// `{items, total_count, limit, offset}` offset page.
#[derive(Serialize)]
pub(crate) struct Page<T> {
    pub items: Vec<T>,
    pub total_count: usize,
    pub limit: usize,
    pub offset: usize,
}

#[derive(Serialize)]
pub(crate) struct IdOnly {
    pub id: String,
}

// ---- accounts -------------------------------------------------------------------------------

#[derive(Deserialize)]
pub(crate) struct CreateAccountRequest {
    pub name: Option<String>,
    pub external_id: Option<String>,
    pub metadata: Option<Metadata>,
}

#[derive(Serialize)]
pub(crate) struct ConnectedAccount {
    pub id: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub external_id: Option<String>,
    pub name: String,
    pub created_at: DateTime<Utc>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub metadata: Option<Metadata>,
}

#[derive(Serialize)]
pub(crate) struct AccountContext {
    pub account_id: String,
    pub environment: &'static str,
    pub org_id: String,
    pub name: String,
}

// ---- customers ------------------------------------------------------------------------------

#[derive(Deserialize)]
pub(crate) struct CreateCustomerRequest {
    pub name: Option<String>,
    pub external_id: Option<String>,
    pub email: Option<String>,
    pub metadata: Option<Metadata>,
    pub subscriptions: Option<Vec<Value>>,
    pub external_accounts: Option<Vec<Value>>,
}

#[derive(Serialize)]
pub(crate) struct CreateCustomerResponse {
    pub id: String,
    /// Always empty: the emulator has no products to subscribe to.
    pub subscriptions: Vec<Value>,
}

#[derive(Deserialize)]
pub(crate) struct UpdateCustomerRequest {
    pub name: Option<String>,
    pub external_id: Option<String>,
    pub email: Option<String>,
}

#[derive(Serialize)]
pub(crate) struct CustomerSummary {
    pub id: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub external_id: Option<String>,
    pub name: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub email: Option<String>,
    pub active_subscription_count: u32,
}

#[derive(Serialize)]
pub(crate) struct GetCustomerResponse {
    #[serde(flatten)]
    pub summary: CustomerSummary,
    pub created_at: DateTime<Utc>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub metadata: Option<Metadata>,
    pub subscriptions: Vec<Value>,
    pub external_accounts: Vec<Value>,
}

// ---- wallet ---------------------------------------------------------------------------------

#[derive(Serialize)]
pub(crate) struct WalletAccountSummary {
    pub id: String,
    pub name: String,
    pub asset: String,
    #[serde(with = "rust_decimal::serde::arbitrary_precision")]
    pub available: Decimal,
}

#[derive(Serialize)]
pub(crate) struct GetWalletResponse {
    pub accounts: Vec<WalletAccountSummary>,
}

#[derive(Serialize)]
pub(crate) struct WalletAccountDetails {
    #[serde(flatten)]
    pub summary: WalletAccountSummary,
    #[serde(with = "rust_decimal::serde::arbitrary_precision")]
    pub pending_in: Decimal,
    #[serde(with = "rust_decimal::serde::arbitrary_precision")]
    pub pending_out: Decimal,
}

/// Body of both adjustments and charges (charges ignore `reason`, adjustments the breakdown).
#[derive(Deserialize)]
pub(crate) struct MovementRequest {
    pub transaction_id: Option<String>,
    pub account_name: Option<String>,
    pub asset: Option<String>,
    pub amount: Option<Decimal>,
    pub reason: Option<String>,
    pub description: Option<String>,
    pub subject: Option<String>,
    pub metadata: Option<Metadata>,
}

/// `{id, created_at}`: the adjustment response, and the emulator's charge response (§12.1).
#[derive(Serialize, Clone)]
pub(crate) struct MovementResponse {
    pub id: String,
    pub created_at: DateTime<Utc>,
}

#[derive(Serialize)]
pub(crate) struct GetTransactionResponse {
    pub id: String,
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub account_id: String,
    pub asset: String,
    #[serde(with = "rust_decimal::serde::arbitrary_precision")]
    pub amount: Decimal,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub metadata: Option<Metadata>,
    pub created_at: DateTime<Utc>,
    pub executed_at: DateTime<Utc>,
}

// ---- webhooks -------------------------------------------------------------------------------

#[derive(Deserialize)]
pub(crate) struct CreateWebhookRequest {
    pub url: Option<String>,
    pub topics: Option<Vec<String>>,
    pub connect: Option<bool>,
}

#[derive(Deserialize)]
pub(crate) struct UpdateWebhookRequest {
    pub url: Option<String>,
    pub topics: Option<Vec<String>>,
    pub enabled: Option<bool>,
}

#[derive(Serialize)]
pub(crate) struct CreateWebhookResponse {
    pub id: String,
    pub secret: String,
    pub created_at: DateTime<Utc>,
}

#[derive(Serialize)]
pub(crate) struct WebhookDestinationWire {
    pub id: String,
    pub url: String,
    pub topics: Vec<String>,
    pub connect: bool,
    pub enabled: bool,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub secret: Option<String>,
}

#[derive(Serialize)]
pub(crate) struct WebhookList {
    pub items: Vec<WebhookDestinationWire>,
    pub total_count: usize,
}

/// The C4P `balance_threshold_hit` delivery, exactly the shape on the C4P page.
#[derive(Serialize)]
pub(crate) struct ThresholdHitEnvelope<'a> {
    pub id: &'a str,
    pub account: &'a str,
    pub event_type: &'static str,
    pub occurred_at: String,
    pub data: ThresholdHitData<'a>,
}

#[derive(Serialize)]
pub(crate) struct ThresholdHitData<'a> {
    pub customer_id: &'a str,
    pub account_id: &'a str,
    #[serde(with = "rust_decimal::serde::arbitrary_precision")]
    pub available: Decimal,
    #[serde(with = "rust_decimal::serde::arbitrary_precision")]
    pub threshold: Decimal,
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::str::FromStr;

    #[test]
    fn amounts_go_out_as_exact_json_numbers() {
        let w = WalletAccountSummary {
            id: "default:USD".into(),
            name: "default".into(),
            asset: "USD".into(),
            available: Decimal::from_str("19.65").unwrap(),
        };
        let s = serde_json::to_string(&w).unwrap();
        assert_eq!(
            s,
            r#"{"id":"default:USD","name":"default","asset":"USD","available":19.65}"#
        );
    }

    #[test]
    fn amounts_come_in_exactly_including_exponent_form() {
        let r: MovementRequest =
            serde_json::from_str(r#"{"amount": 5e-05, "transaction_id": "t"}"#).unwrap();
        assert_eq!(r.amount, Some(Decimal::from_str("0.00005").unwrap()));
        let r: MovementRequest = serde_json::from_str(r#"{"amount": 0.1}"#).unwrap();
        assert_eq!(r.amount, Some(Decimal::from_str("0.1").unwrap()));
        let r: MovementRequest = serde_json::from_str(r#"{"amount": "0.35"}"#).unwrap();
        assert_eq!(r.amount, Some(Decimal::from_str("0.35").unwrap()));
    }
}
