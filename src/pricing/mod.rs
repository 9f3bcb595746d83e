//! Price books (placeholder API until the pricing engine lands; replaced wholesale by it).

use std::path::Path;
use std::sync::Arc;

use crate::domain::{Fee, UsageEvent};

#[derive(Debug, thiserror::Error)]
pub enum PricingError {
    #[error("no price for event type `{0}`")]
    UnknownEventType(String),
}

impl PricingError {
    pub fn code(&self) -> &'static str {
        "unknown_event_type"
    }
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct LoadErrors(pub String);

pub struct PricingSet;

impl PricingSet {
    pub fn version(&self) -> &str {
        "none"
    }
    pub fn hash(&self) -> &str {
        "none"
    }
    pub fn price(&self, _tenant: &str, event: &UsageEvent) -> Result<Vec<Fee>, PricingError> {
        Err(PricingError::UnknownEventType(event.event_type.clone()))
    }
}

pub struct Pricing(Arc<PricingSet>);

impl Pricing {
    pub fn load(_dir: &Path) -> Result<Pricing, LoadErrors> {
        Ok(Pricing(Arc::new(PricingSet)))
    }
    pub fn current(&self) -> Arc<PricingSet> {
        self.0.clone()
    }
    pub fn spawn_watcher(
        self: &Arc<Self>,
        _interval: std::time::Duration,
    ) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async {})
    }
}
