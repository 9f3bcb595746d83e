//! `credyt-proxy tenant create|rotate-key|list` and `credyt-proxy webhooks register`.
//!
//! Order of `tenant create`, so that a refusal leaves nothing behind: everything that can be
//! refused without Credyt is refused first (an id already in the file, an external id a tenant
//! already uses, an entry the proxy would not accept); then the connected account is found by
//! its external id or created (one account however often the command runs); then the entry is
//! appended and written atomically (see [`crate::identity::onboard`]). The key and the webhook
//! secret are printed only after the file is written. A Credyt failure names the step and
//! leaves the tenants file unchanged.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;

use crate::config::Settings;
use crate::identity::onboard::{self as file_edit, NewTenant, NewWebhook, TenantsFile};
use crate::identity::tenants::{generate_key, WebhookSecret};
use crate::upstream::{CredytClient, UpstreamError};

/// What `tenant create` was asked for.
pub struct CreateRequest {
    pub id: String,
    pub name: String,
    pub external_id: String,
    pub webhook_url: Option<String>,
    pub print: bool,
}

const NOTHING_REGISTERED: &str = "nothing was registered";

/// Stands in for the account while the entry is checked before Credyt is called.
const PLACEHOLDER_ACCOUNT: &str = "acc_placeholder";

fn settings(config: &Path) -> anyhow::Result<Settings> {
    Settings::load(config).map_err(|e| anyhow::anyhow!("{}: {e}", config.display()))
}

/// A failed Credyt call: the step, the whole cause chain, what Credyt said, and `outcome` (what
/// was left as it was).
fn credyt_failed(step: &dyn std::fmt::Display, e: &UpstreamError, outcome: &str) -> anyhow::Error {
    let mut message = format!("{step}: {}", crate::upstream::error_chain(e));
    if let UpstreamError::Status { body, .. } = e {
        if !body.trim().is_empty() {
            message.push_str(&format!("\ncredyt said: {}", body.trim()));
        }
    }
    if e.is_auth_refused() {
        message.push_str("\ncheck the platform key (credyt.api_key or credyt.api_key_file)");
    }
    message.push('\n');
    message.push_str(outcome);
    anyhow::anyhow!(message)
}

/// `tenant create`.
pub async fn create(config: &Path, req: CreateRequest) -> anyhow::Result<ExitCode> {
    let settings = settings(config)?;
    let mut file = TenantsFile::open(&settings.tenants.file)?;
    file.ensure_id_free(&req.id)?;
    file.ensure_account_free(None, &req.external_id)?;
    if !req.print {
        file.check_writable().context(
            "the tenants file cannot be written here (for a file kept elsewhere, e.g. a \
             kubernetes secret, use --print)",
        )?;
    }
    let (key, key_hash) = generate_key();
    let webhook = req.webhook_url.as_ref().map(|url| NewWebhook {
        url: url.clone(),
        secret: WebhookSecret::generate(),
    });
    let mut tenant = NewTenant {
        id: req.id.clone(),
        name: req.name.clone(),
        key_hash,
        account: PLACEHOLDER_ACCOUNT.to_string(),
        webhook,
    };
    // The entry as the proxy would read it, before anything exists at Credyt.
    let mut trial = file.clone();
    trial.add_tenant(&tenant)?;
    trial.validate()?;

    let client = CredytClient::new(&settings.credyt).context("the credyt client")?;
    let account = client
        .find_or_create_account(&req.name, &req.external_id)
        .await
        .map_err(|e| credyt_failed(&e, e.upstream(), "the tenants file is unchanged"))?;
    let how = if account.created {
        "created at credyt"
    } else {
        "found at credyt"
    };
    let kept = || {
        format!(
            "tenant `{}` not added; its connected account {} ({how}, external id `{}`) stays \
             there and running the command again uses it",
            req.id, account.id, req.external_id
        )
    };
    // Another tenant's account: running again would not help, so no "run again" hint.
    file.ensure_account_free(Some(account.id.as_str()), &req.external_id)?;
    tenant.account = account.id.to_string();
    file.add_tenant(&tenant).with_context(kept)?;

    if req.print {
        file.validate().with_context(kept)?;
        println!(
            "tenant `{}`: connected account {} ({how}); nothing written",
            req.id, account.id
        );
    } else {
        file.save().with_context(kept)?;
        println!(
            "tenant `{}` added to {} (connected account {}, {how})",
            req.id,
            file.path().display(),
            account.id
        );
    }
    println!("key: {key}");
    if let Some(w) = &tenant.webhook {
        println!("webhook secret: {}", w.secret);
    }
    println!();
    println!(
        "give the key to the tenant now: it is not shown again (the tenants file keeps only its \
         hash)"
    );
    if let Some(w) = &tenant.webhook {
        println!(
            "the proxy relays the account's credyt webhooks to {}, signed with the webhook \
             secret (standard webhooks): give it to the tenant to verify them",
            w.url
        );
    }
    if req.print {
        println!();
        println!("add this block to the tenants file:");
        println!();
        print!("{}", file_edit::entry_block(&tenant));
    } else {
        println!("the proxy picks the new entry up by itself (tenants.reload_interval_ms)");
    }
    Ok(ExitCode::SUCCESS)
}

/// `tenant rotate-key`.
pub fn rotate_key(
    config: Option<&Path>,
    tenants: Option<&Path>,
    id: &str,
    retire_old: bool,
) -> anyhow::Result<ExitCode> {
    let path = tenants_path(config, tenants)?;
    let mut file = TenantsFile::open(&path)?;
    if !file.exists() {
        anyhow::bail!("{}: no such file", path.display());
    }
    let (key, key_hash) = generate_key();
    let count = file.rotate_key(id, &key_hash, retire_old)?;
    file.save()?;
    if retire_old {
        println!(
            "tenant `{id}`: new key; its other keys are removed from {} and stop working when \
             the proxy reloads it",
            file.path().display()
        );
    } else {
        println!(
            "tenant `{id}`: new key added to {} ({count} keys now, all of them work)",
            file.path().display()
        );
    }
    println!("key: {key}");
    println!();
    println!(
        "give the key to the tenant now: it is not shown again (the tenants file keeps only its \
         hash)"
    );
    if !retire_old {
        println!(
            "once the tenant uses it, take the old hash out of key_hashes (or rotate again with \
             --retire-old, which leaves only a newer key)"
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// The tenants file: `--tenants`, or the `tenants.file` of `--config`.
fn tenants_path(config: Option<&Path>, tenants: Option<&Path>) -> anyhow::Result<PathBuf> {
    match (tenants, config) {
        (Some(t), _) => Ok(t.to_path_buf()),
        (None, Some(c)) => Ok(settings(c)?.tenants.file),
        (None, None) => anyhow::bail!("give --config or --tenants"),
    }
}

/// `tenant list`.
pub fn list(config: Option<&Path>, tenants: Option<&Path>, json: bool) -> anyhow::Result<ExitCode> {
    let path = tenants_path(config, tenants)?;
    let file = TenantsFile::open(&path)?;
    if !file.exists() {
        anyhow::bail!("{}: no such file", path.display());
    }
    // A list of a file the proxy refuses would mislead: say what is wrong instead.
    file.validate()
        .with_context(|| format!("{} is not a valid tenants file", path.display()))?;
    let summaries = file.summaries()?;
    if json {
        println!("{}", serde_json::to_string_pretty(&summaries)?);
        return Ok(ExitCode::SUCCESS);
    }
    let rows: Vec<[String; 4]> = summaries
        .into_iter()
        .map(|s| {
            let account = match (s.account, s.account_external_id) {
                (Some(a), _) => a,
                (None, Some(e)) => format!("external_id={e}"),
                (None, None) => "-".into(),
            };
            let keys = format!("{} key{}", s.keys, if s.keys == 1 { "" } else { "s" });
            [
                s.id,
                account,
                keys,
                s.webhook_url.unwrap_or_else(|| "-".into()),
            ]
        })
        .collect();
    let mut widths = [0usize; 3];
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row.iter()) {
            *w = (*w).max(cell.chars().count());
        }
    }
    for [id, account, keys, webhook] in &rows {
        println!(
            "{id:<w0$}  {account:<w1$}  {keys:<w2$}  {webhook}",
            w0 = widths[0],
            w1 = widths[1],
            w2 = widths[2]
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// `webhooks register`.
pub async fn register_webhook(
    config: &Path,
    url: &str,
    topics: &[String],
) -> anyhow::Result<ExitCode> {
    let parsed = reqwest::Url::parse(url).with_context(|| format!("--url `{url}`"))?;
    if !matches!(parsed.scheme(), "http" | "https") || !parsed.has_host() {
        anyhow::bail!("--url `{url}` is not an http(s) URL");
    }
    if topics.iter().any(|t| t.trim().is_empty()) {
        anyhow::bail!("--topic must not be empty");
    }
    let settings = settings(config)?;
    let client = CredytClient::new(&settings.credyt).context("the credyt client")?;
    let existing = client.list_webhooks(true).await.map_err(|e| {
        credyt_failed(
            &"listing the platform's connected-account webhook destinations",
            &e,
            NOTHING_REGISTERED,
        )
    })?;
    if let Some(d) = existing.iter().find(|d| d.url == url) {
        anyhow::bail!(
            "credyt already delivers connected-account events to {url} (destination {}{}); not \
             registering a second one: every event would arrive twice",
            d.id,
            if d.enabled { "" } else { ", disabled" }
        );
    }
    let topics = (!topics.is_empty()).then_some(topics);
    let created = client
        .create_webhook(url, topics, true)
        .await
        .map_err(|e| credyt_failed(&"creating the webhook destination", &e, NOTHING_REGISTERED))?;
    let topic_list = topics.map_or_else(|| "*".to_string(), |t| t.join(", "));
    println!(
        "webhook destination {} registered at credyt: events of every connected account \
         (topics: {topic_list}) go to {url}",
        created.id
    );
    println!("signing secret: {}", created.secret);
    println!();
    println!(
        "keep the secret now. the proxy's webhook relay verifies credyt's deliveries with it; put \
         it in the proxy's configuration:"
    );
    println!();
    println!("[webhooks]");
    println!("credyt_secrets = [\"{}\"]", created.secret);
    println!();
    println!(
        "or in the environment: CREDYT_PROXY__WEBHOOKS__CREDYT_SECRETS={}",
        created.secret
    );
    Ok(ExitCode::SUCCESS)
}
