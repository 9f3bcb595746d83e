//! Price books: local pricing of usage events, modelled on Credyt's product prices.
//!
//! Contract: a [`PricingSet`] is one validated, immutable snapshot of the pricing directory
//! (books, assets, tenant assignments), identified by the sha256 of its content. Pricing an
//! event ([`PricingSet::price`]) is pure and lock-free: tenant -> book, `occurred_at` -> the
//! book version in force, `event_type` -> its prices, one fee per price, each rounded once
//! (`money::round_fee`). [`Pricing`] is the hot-reloadable handle the server shares.
//! The file format is documented in `pricing/README.md`.
//!
//! Submodules: `book` (validated model), `load` (read + parse + validate), `money` (exact
//! decimals, assets, the rounding rule), `engine` (rate an event), `reload` (hot reload),
//! `quote` (the one quote shape of `credyt-proxy quote` and `POST /v1/quote`; `check-pricing`),
//! `period` (tiers over a running total per billing period: what the outbox rates).

pub mod book;
pub mod engine;
pub mod load;
pub mod money;
pub mod period;
pub mod quote;
pub mod reload;

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

pub use engine::PricingError;
pub use load::{LoadError, LoadErrors};
pub use quote::{check_dir, parse_event, quote_json, Quote, QuoteError};
pub use reload::Pricing;

use crate::domain::{Fee, UsageEvent};
use book::ResolvedBook;

/// One validated, immutable set of books and assignments.
#[derive(Debug)]
pub struct PricingSet {
    pub(crate) books: HashMap<String, Arc<ResolvedBook>>,
    pub(crate) tenants: HashMap<String, Arc<ResolvedBook>>,
    pub(crate) default: Option<Arc<ResolvedBook>>,
    pub(crate) hash: Arc<str>,
    pub(crate) version: String,
}

impl PricingSet {
    /// Reads, parses and validates the whole directory; every mistake is in the error.
    pub fn load_dir(dir: &Path) -> Result<PricingSet, LoadErrors> {
        load::build(&load::read_dir_files(dir)?)
    }

    /// Human label of the set: `<version key>+<hash prefix>`, or the hash prefix alone.
    pub fn version(&self) -> &str {
        &self.version
    }

    /// sha256 hex of the loaded files (names and contents).
    pub fn hash(&self) -> &str {
        &self.hash
    }

    /// The book a tenant uses: its assignment, else the default book.
    pub fn book_for(&self, tenant: &str) -> Option<&ResolvedBook> {
        self.tenants
            .get(tenant)
            .or(self.default.as_ref())
            .map(|b| b.as_ref())
    }

    /// A book by name (assigned or not).
    pub fn book(&self, name: &str) -> Option<&ResolvedBook> {
        self.books.get(name).map(|b| b.as_ref())
    }

    /// Names of all books, sorted.
    pub fn book_names(&self) -> Vec<&str> {
        let mut names: Vec<&str> = self.books.keys().map(String::as_str).collect();
        names.sort_unstable();
        names
    }

    /// Prices one event for one tenant: one fee per price of its `event_type`, or one error
    /// for the whole event.
    pub fn price(&self, tenant: &str, event: &UsageEvent) -> Result<Vec<Fee>, PricingError> {
        let book = self
            .book_for(tenant)
            .ok_or_else(|| PricingError::UnknownTenant {
                tenant: tenant.to_owned(),
            })?;
        engine::price_event(book, &self.hash, event)
    }

    /// As [`PricingSet::price`], plus one [`period::PeriodPart`] per price with `tiering`:
    /// those fees are rated at a running total of zero here, and get their amount when the
    /// outbox rates the part against the customer's total (see the `period` module). Without
    /// such prices the parts are empty (no allocation).
    pub fn price_parts(
        &self,
        tenant: &str,
        event: &UsageEvent,
    ) -> Result<(Vec<Fee>, Vec<period::PeriodPart>), PricingError> {
        let book = self
            .book_for(tenant)
            .ok_or_else(|| PricingError::UnknownTenant {
                tenant: tenant.to_owned(),
            })?;
        let mut parts = Vec::new();
        let fees = engine::price_event_parts(book, &self.hash, event, &mut parts)?;
        Ok((fees, parts))
    }
}
