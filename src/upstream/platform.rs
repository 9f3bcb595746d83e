//! Platform-level Credyt calls used to onboard tenants: connected accounts and webhook
//! destinations (`credyt-proxy tenant create`, `credyt-proxy webhooks register`).
//!
//! Contract: these calls act on the platform account itself, so they never carry
//! `X-CREDYT-ACCOUNT`. They are made by the command line, once per command, and are not
//! retried here: a failure is returned classified as any [`UpstreamError`], and the operator
//! runs the command again. That is safe because onboarding is keyed on the account's
//! `external_id` (unique at Credyt): [`CredytClient::find_or_create_account`] finds the account
//! an earlier, interrupted run created instead of creating a second one.

use reqwest::StatusCode;

use super::{traced, wire, CredytClient, UpstreamError};
use crate::domain::AccountId;
use crate::telemetry::metrics::Operation;

/// A connected account found or created by [`CredytClient::find_or_create_account`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OnboardedAccount {
    pub id: AccountId,
    /// Whether this call created it (false: it existed already).
    pub created: bool,
}

/// Which step of [`CredytClient::find_or_create_account`] failed.
#[derive(Debug, thiserror::Error)]
pub enum AccountSetupError {
    #[error("looking up the connected account with external id `{external_id}` failed")]
    Lookup {
        external_id: String,
        #[source]
        source: UpstreamError,
    },
    #[error("creating the connected account with external id `{external_id}` failed")]
    Create {
        external_id: String,
        #[source]
        source: UpstreamError,
    },
}

impl AccountSetupError {
    /// The Credyt error underneath.
    pub fn upstream(&self) -> &UpstreamError {
        match self {
            AccountSetupError::Lookup { source, .. } | AccountSetupError::Create { source, .. } => {
                source
            }
        }
    }
}

impl CredytClient {
    /// `POST /accounts {name, external_id}`: a new connected account; its id.
    pub async fn create_account(
        &self,
        name: &str,
        external_id: &str,
    ) -> Result<AccountId, UpstreamError> {
        let call = async {
            let body = wire::CreateAccount { name, external_id };
            let req = self
                .request(reqwest::Method::POST, "/accounts", None)
                .json(&body);
            let created: wire::Created =
                Self::json(self.send(Operation::CreateAccount, req).await?).await?;
            Ok(AccountId::new(created.id))
        };
        traced(
            Operation::CreateAccount.call(),
            None,
            0,
            std::iter::empty(),
            call,
        )
        .await
    }

    /// The connected account with `external_id`, created (named `name`) if there is none.
    /// Running it twice makes one account: the second run finds the first one's. A 409 on
    /// creation (created meanwhile by someone else) is answered by looking it up again.
    pub async fn find_or_create_account(
        &self,
        name: &str,
        external_id: &str,
    ) -> Result<OnboardedAccount, AccountSetupError> {
        let lookup = |source| AccountSetupError::Lookup {
            external_id: external_id.to_string(),
            source,
        };
        if let Some(id) = self.find_account(external_id).await.map_err(lookup)? {
            return Ok(OnboardedAccount { id, created: false });
        }
        match self.create_account(name, external_id).await {
            Ok(id) => Ok(OnboardedAccount { id, created: true }),
            Err(UpstreamError::Status { status, .. }) if status == StatusCode::CONFLICT => {
                match self.find_account(external_id).await.map_err(lookup)? {
                    Some(id) => Ok(OnboardedAccount { id, created: false }),
                    None => Err(AccountSetupError::Create {
                        external_id: external_id.to_string(),
                        source: UpstreamError::Decode(
                            "credyt answered 409 conflict but has no account with this external id"
                                .into(),
                        ),
                    }),
                }
            }
            Err(source) => Err(AccountSetupError::Create {
                external_id: external_id.to_string(),
                source,
            }),
        }
    }

    /// `POST /webhooks {url, topics, connect}`: a webhook destination of the platform; its id
    /// and signing secret (Credyt shows the secret at creation).
    pub async fn create_webhook(
        &self,
        url: &str,
        topics: Option<&[String]>,
        connect: bool,
    ) -> Result<wire::CreatedWebhook, UpstreamError> {
        let call = async {
            let body = wire::CreateWebhook {
                url,
                topics,
                connect,
            };
            let req = self
                .request(reqwest::Method::POST, "/webhooks", None)
                .json(&body);
            Self::json(self.send(Operation::CreateWebhook, req).await?).await
        };
        traced(
            Operation::CreateWebhook.call(),
            None,
            0,
            std::iter::empty(),
            call,
        )
        .await
    }

    /// `GET /webhooks?connect=`: the platform's webhook destinations (without secrets).
    pub async fn list_webhooks(
        &self,
        connect: bool,
    ) -> Result<Vec<wire::WebhookDestination>, UpstreamError> {
        let call = async {
            let req = self
                .request(reqwest::Method::GET, "/webhooks", None)
                .query(&[("connect", if connect { "true" } else { "false" })]);
            let page: wire::Page<wire::WebhookDestination> =
                Self::json(self.send(Operation::ListWebhooks, req).await?).await?;
            Ok(page.items)
        };
        traced(
            Operation::ListWebhooks.call(),
            None,
            0,
            std::iter::empty(),
            call,
        )
        .await
    }
}
