//! The proxy's own view of Credyt's wire shapes (request and response bodies it uses).
//! Amounts go out as JSON numbers written from their exact decimal text.

use std::collections::BTreeMap;

use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

use crate::domain::{CustomerId, DataValue, Debit, UsageEvent};

#[derive(Debug, Deserialize)]
pub struct AccountContext {
    pub account_id: String,
    pub environment: String,
}

#[derive(Debug, Deserialize)]
pub struct Page<T> {
    pub items: Vec<T>,
}

#[derive(Debug, Deserialize)]
pub struct ConnectedAccount {
    pub id: String,
    #[serde(default)]
    pub external_id: Option<String>,
}

#[derive(Debug, Deserialize)]
pub struct Customer {
    pub id: String,
    #[serde(default)]
    pub external_id: Option<String>,
}

#[derive(Debug, Deserialize)]
pub struct Created {
    pub id: String,
}

#[derive(Debug, Serialize)]
pub struct CreateCustomer<'a> {
    pub name: &'a str,
    pub external_id: &'a str,
}

/// `POST /accounts` body (a connected account; platform-level, no `X-CREDYT-ACCOUNT`).
#[derive(Debug, Serialize)]
pub struct CreateAccount<'a> {
    pub name: &'a str,
    pub external_id: &'a str,
}

/// `POST /webhooks` body.
#[derive(Debug, Serialize)]
pub struct CreateWebhook<'a> {
    pub url: &'a str,
    /// Left out: Credyt's default, every topic (`["*"]`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub topics: Option<&'a [String]>,
    /// true: the events of the platform's connected accounts (C4P).
    pub connect: bool,
}

/// `POST /webhooks` answer: the signing secret is in it (and, per the SDK, only in it).
#[derive(Debug, Deserialize)]
pub struct CreatedWebhook {
    pub id: String,
    pub secret: String,
}

/// One item of `GET /webhooks` (no secret).
#[derive(Debug, Deserialize)]
pub struct WebhookDestination {
    pub id: String,
    pub url: String,
    #[serde(default)]
    pub topics: Vec<String>,
    #[serde(default)]
    pub connect: bool,
    #[serde(default = "enabled_by_default")]
    pub enabled: bool,
}

fn enabled_by_default() -> bool {
    true
}

/// `GET /customers/{id}/wallet` answer.
#[derive(Debug, Deserialize)]
pub struct Wallet {
    #[serde(default)]
    pub accounts: Vec<WalletAccount>,
}

/// One wallet account of [`Wallet`]: one (name, asset) and its available balance.
#[derive(Debug, Deserialize)]
pub struct WalletAccount {
    #[serde(default = "default_account_name")]
    pub name: String,
    pub asset: String,
    /// Exact: read from the JSON number's text.
    #[serde(with = "rust_decimal::serde::arbitrary_precision")]
    pub available: Decimal,
}

fn default_account_name() -> String {
    "default".to_string()
}

/// `POST /customers/{id}/wallet/charges` body.
#[derive(Debug, Serialize)]
pub struct ChargeRequest<'a> {
    pub transaction_id: String,
    pub asset: &'a str,
    #[serde(with = "rust_decimal::serde::arbitrary_precision")]
    pub amount: Decimal,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub subject: Option<&'a str>,
    pub description: String,
    pub metadata: BTreeMap<&'static str, String>,
    /// The SDK types `input_volume` as an integer: sent only when the volume is whole.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub input_volume: Option<i64>,
    #[serde(
        skip_serializing_if = "Option::is_none",
        with = "rust_decimal::serde::arbitrary_precision_option"
    )]
    pub unit_price: Option<Decimal>,
    #[serde(
        skip_serializing_if = "Option::is_none",
        with = "rust_decimal::serde::arbitrary_precision_option"
    )]
    pub volume_rate: Option<Decimal>,
    /// Typed integer in the SDK: sent only when whole.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub package_size: Option<i64>,
}

fn whole(d: Option<Decimal>) -> Option<i64> {
    use rust_decimal::prelude::ToPrimitive;
    d.filter(|v| v.fract().is_zero()).and_then(|v| v.to_i64())
}

impl<'a> ChargeRequest<'a> {
    pub fn from_debit(debit: &'a Debit) -> ChargeRequest<'a> {
        let fee = &debit.fee;
        let description = match (&fee.price_name, &debit.description) {
            (Some(name), _) => name.to_string(),
            (None, Some(d)) => d.clone(),
            (None, None) => format!("usage {}", fee.price_id),
        };
        let mut metadata = BTreeMap::new();
        metadata.insert("source", "credyt-proxy".to_string());
        metadata.insert("tenant", debit.tenant.to_string());
        metadata.insert("event_id", debit.event_id.to_string());
        metadata.insert("price_id", fee.price_id.to_string());
        metadata.insert("price_book", fee.book.to_string());
        metadata.insert("price_book_version", fee.book_version.to_string());
        metadata.insert("pricing_hash", fee.pricing_hash.to_string());
        ChargeRequest {
            transaction_id: debit.transaction_id.to_string(),
            asset: &fee.asset,
            amount: fee.amount,
            subject: debit.subject.as_deref(),
            description,
            metadata,
            input_volume: whole(fee.volume),
            unit_price: fee.unit_price,
            volume_rate: fee.volume_rate,
            package_size: whole(fee.package_size),
        }
    }
}

impl<'a> ChargeRequest<'a> {
    /// A coalesced charge: the exact sum of the members' amounts (all in one asset, for one
    /// customer), the batch id as `transaction_id`, the member events in metadata.
    pub fn coalesced(batch: uuid::Uuid, debits: &[&'a Debit]) -> ChargeRequest<'a> {
        let asset = debits.first().map_or("", |d| &*d.fee.asset);
        let amount = debits.iter().map(|d| d.fee.amount).sum();
        let mut metadata = BTreeMap::new();
        metadata.insert("source", "credyt-proxy".to_string());
        if let Some(first) = debits.first() {
            metadata.insert("tenant", first.tenant.to_string());
            metadata.insert("pricing_hash", first.fee.pricing_hash.to_string());
        }
        metadata.insert("coalesced", debits.len().to_string());
        let events: Vec<String> = debits
            .iter()
            .map(|d| format!("{}/{}", d.event_id, d.fee.price_id))
            .collect();
        metadata.insert("events", events.join(","));
        ChargeRequest {
            transaction_id: batch.to_string(),
            asset,
            amount,
            subject: None,
            description: format!("{} usage fees", debits.len()),
            metadata,
            input_volume: None,
            unit_price: None,
            volume_rate: None,
            package_size: None,
        }
    }
}

/// `POST /events` body.
#[derive(Debug, Serialize)]
pub struct UsageRequest<'a> {
    pub customer_id: &'a str,
    pub events: Vec<WireEvent<'a>>,
}

#[derive(Debug, Serialize)]
pub struct WireEvent<'a> {
    pub id: &'a str,
    pub event_type: &'a str,
    pub occurred_at: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub subject: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub description: Option<&'a str>,
    pub data: &'a BTreeMap<String, DataValue>,
}

impl<'a> UsageRequest<'a> {
    pub fn new(
        customer: &'a CustomerId,
        events: impl Iterator<Item = &'a UsageEvent>,
    ) -> UsageRequest<'a> {
        UsageRequest {
            customer_id: customer.as_str(),
            events: events
                .map(|e| WireEvent {
                    id: e.id.as_str(),
                    event_type: &e.event_type,
                    occurred_at: e
                        .occurred_at
                        .to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true),
                    subject: e.subject.as_deref(),
                    description: e.description.as_deref(),
                    data: &e.data,
                })
                .collect(),
        }
    }
}
