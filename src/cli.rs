//! The command line: `serve`, `sandbox`, `emulator`, `check-config`, `check-pricing`, `quote`,
//! `tenant-key`, `tenant create|rotate-key|list`, `webhooks register`, `dlq list|replay`.
//! Startup code: errors here are `anyhow` and end the process with a message.

use std::io::Read;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};

use crate::app::Application;
use crate::config::Settings;

/// The onboarding commands (`tenant ...`, `webhooks register`).
mod onboard;

#[derive(Parser, Debug)]
#[command(
    name = "credyt-proxy",
    version,
    about = "Usage-metering sidecar for Credyt for Platforms"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the proxy.
    Serve {
        /// The configuration file (TOML; `CREDYT_PROXY__SECTION__KEY` variables override it).
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Run the proxy against an in-process Credyt emulator with demo data (works from any
    /// directory; its data is throw-away).
    Sandbox {
        /// Folder with your own config.toml, tenants.toml and seed.json (e.g.
        /// `examples/sandbox`); without it the demo files built into the binary are used.
        #[arg(long)]
        dir: Option<PathBuf>,
        /// Where the sandbox keeps its throw-away data: it creates
        /// `credyt-proxy-sandbox-<pid>` in this folder and deletes it on exit.
        #[arg(long, env = SANDBOX_DATA_DIR_ENV, default_value_os_t = std::env::temp_dir())]
        data_dir: PathBuf,
        /// Tenant port of the proxy (the image sets 0.0.0.0:8080 through the variable).
        #[arg(
            long,
            env = "CREDYT_PROXY_SANDBOX_LISTEN",
            default_value = "127.0.0.1:8080"
        )]
        listen: SocketAddr,
        /// Admin port of the proxy.
        #[arg(
            long,
            env = "CREDYT_PROXY_SANDBOX_ADMIN_LISTEN",
            default_value = "127.0.0.1:9090"
        )]
        admin_listen: SocketAddr,
        /// Port of the embedded emulator.
        #[arg(
            long,
            env = "CREDYT_PROXY_SANDBOX_EMULATOR_LISTEN",
            default_value = "127.0.0.1:8081"
        )]
        emulator_listen: SocketAddr,
        /// Listener of the proxy's webhook relay (the embedded emulator posts its webhooks
        /// there).
        #[arg(
            long,
            env = "CREDYT_PROXY_SANDBOX_WEBHOOKS_LISTEN",
            default_value = "127.0.0.1:8082"
        )]
        webhooks_listen: SocketAddr,
    },
    /// Run the Credyt emulator alone.
    Emulator {
        /// Address the emulator listens on (port 0 picks a free one).
        #[arg(long, default_value = "127.0.0.1:8081")]
        listen: SocketAddr,
        /// Accepted platform key(s) (`X-CREDYT-API-KEY`).
        #[arg(long = "platform-key", required = true)]
        platform_keys: Vec<String>,
        /// JSON seed file (accounts, customers, balances, thresholds).
        #[arg(long)]
        seed: Option<PathBuf>,
        /// Actix workers.
        #[arg(long, default_value_t = 1)]
        workers: usize,
    },
    /// Validate a configuration file (and its environment overrides) and exit, reporting
    /// every problem at once.
    CheckConfig {
        /// The configuration file to check.
        file: PathBuf,
    },
    /// Validate a pricing directory and exit.
    CheckPricing {
        /// The pricing directory (price books and assignments.toml).
        dir: PathBuf,
    },
    /// Price one event (a Credyt usage event object as JSON on stdin) and print the quote, the
    /// same JSON `POST /v1/quote` answers.
    Quote {
        /// The pricing directory (price books and assignments.toml).
        #[arg(long)]
        pricing: PathBuf,
        /// The tenant id whose price book prices the event.
        #[arg(long)]
        tenant: String,
        /// The tenants file: when given, a tenant id absent from it is an error
        /// (`unknown_tenant`) instead of being priced with the default book.
        #[arg(long)]
        tenants: Option<PathBuf>,
        /// Rate prices with `tiering` as if the running total were this (default: 0; the CLI
        /// reads no outbox).
        #[arg(long)]
        total: Option<String>,
    },
    /// Print a fresh tenant API key and the hash line for the tenants file.
    TenantKey,
    /// Onboard and manage tenants: their Credyt connected accounts, keys and tenants-file
    /// entries (see docs/onboarding.md).
    Tenant {
        #[command(subcommand)]
        action: TenantAction,
    },
    /// The platform's Credyt webhook destinations.
    Webhooks {
        #[command(subcommand)]
        action: WebhooksAction,
    },
    /// Inspect or replay the outbox's dead letters (the proxy must be stopped: the outbox
    /// directory is locked while it runs).
    Dlq {
        #[command(subcommand)]
        action: DlqAction,
    },
}

#[derive(Subcommand, Debug)]
pub enum TenantAction {
    /// Add a tenant: find its Credyt connected account by external id or create it, generate
    /// its key (and webhook secret), append its entry to the tenants file, print the secrets
    /// once.
    Create {
        /// The proxy's configuration file (Credyt base URL and platform key, tenants.file).
        #[arg(long, short)]
        config: PathBuf,
        /// The tenant id (1 to 64 characters; must not be in the tenants file yet).
        #[arg(long)]
        id: String,
        /// The tenant's display name (also the connected account's name at Credyt).
        #[arg(long)]
        name: String,
        /// The connected account's external id at Credyt (default: the tenant id).
        #[arg(long)]
        external_id: Option<String>,
        /// Relay Credyt's webhooks for this tenant's account to this http(s) URL, signed with a
        /// fresh `whsec_` secret.
        #[arg(long)]
        webhook_url: Option<String>,
        /// Write nothing: print the `[[tenants]]` block to add to a tenants file kept
        /// elsewhere (e.g. a Kubernetes Secret).
        #[arg(long)]
        print: bool,
    },
    /// Give a tenant a new key (printed once) next to its current one(s).
    RotateKey {
        /// The proxy's configuration file (its tenants.file is edited).
        #[arg(
            long,
            short,
            required_unless_present = "tenants",
            conflicts_with = "tenants"
        )]
        config: Option<PathBuf>,
        /// The tenants file to edit (instead of --config), e.g. a copy of a Kubernetes Secret.
        #[arg(long)]
        tenants: Option<PathBuf>,
        /// The tenant id.
        id: String,
        /// Remove the tenant's other key(s): only the new key works once the proxy reloads.
        #[arg(long)]
        retire_old: bool,
    },
    /// List the tenants: id, account, number of keys, webhook URL; never a key, hash or
    /// secret.
    List {
        /// The proxy's configuration file (its tenants.file is listed).
        #[arg(
            long,
            short,
            required_unless_present = "tenants",
            conflicts_with = "tenants"
        )]
        config: Option<PathBuf>,
        /// The tenants file to list (instead of --config).
        #[arg(long)]
        tenants: Option<PathBuf>,
        /// One JSON array instead of text lines.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand, Debug)]
pub enum WebhooksAction {
    /// Register a webhook destination at Credyt for the events of every connected account
    /// (`connect: true`) and print its signing secret once.
    Register {
        /// The proxy's configuration file (Credyt base URL and platform key).
        #[arg(long, short)]
        config: PathBuf,
        /// The https URL Credyt delivers to (the proxy's webhook relay).
        #[arg(long)]
        url: String,
        /// A topic to receive (repeat for several); none: every topic.
        #[arg(long = "topic")]
        topics: Vec<String>,
    },
    /// Inspect or replay the relay's dead letters: webhooks no tenant owns, or whose tenant
    /// endpoint failed every attempt (`--data-dir` is `webhooks.dir`; the proxy must be
    /// stopped: the directory is locked while it runs).
    Dlq {
        #[command(subcommand)]
        action: DlqAction,
    },
}

#[derive(Subcommand, Debug)]
pub enum DlqAction {
    /// List dead letters as JSON lines.
    List {
        /// The outbox directory (`outbox.dir` of the config; `webhooks.dir` for `webhooks dlq`).
        #[arg(long)]
        data_dir: PathBuf,
    },
    /// Move dead letters back to the pending queue (all, or the given sequence numbers).
    Replay {
        /// The outbox directory (`outbox.dir` of the config; `webhooks.dir` for `webhooks dlq`).
        #[arg(long)]
        data_dir: PathBuf,
        /// A dead letter's sequence number (repeat for several); none: all of them.
        #[arg(long = "seq")]
        seqs: Vec<u64>,
    },
}

/// Writes `lines` to stdout. A reader that went away (`| head`) ends the output quietly, as
/// for any Unix filter, instead of a panic.
fn write_stdout(lines: &[String]) -> std::io::Result<()> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    let written = lines
        .iter()
        .try_for_each(|l| writeln!(out, "{l}"))
        .and_then(|()| out.flush());
    match written {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        other => other,
    }
}

/// `dlq` and `webhooks dlq`: the same store, in `outbox.dir` or `webhooks.dir`.
fn dlq(action: DlqAction) -> anyhow::Result<ExitCode> {
    match action {
        DlqAction::List { data_dir } => {
            let letters = crate::outbox::dlq_list(&data_dir)?;
            let n = letters.len();
            // The same JSON as the admin port's listing, one per line.
            let mut lines = Vec::with_capacity(n);
            for letter in letters {
                lines.push(serde_json::to_string(&crate::admin::DeadLetterView::from(
                    letter,
                ))?);
            }
            write_stdout(&lines)?;
            eprintln!("{n} dead letter(s)");
            Ok(ExitCode::SUCCESS)
        }
        DlqAction::Replay { data_dir, seqs } => {
            let only = (!seqs.is_empty()).then_some(seqs.as_slice());
            let n = crate::outbox::dlq_replay(&data_dir, only)?;
            println!("{n} dead letter(s) moved back to pending; they are sent at the next start");
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// Parses the command line and runs it.
pub async fn run() -> ExitCode {
    let cli = Cli::parse();
    match dispatch(cli.command).await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn dispatch(command: Command) -> anyhow::Result<ExitCode> {
    match command {
        Command::Serve { config } => {
            let settings = load_settings(&config)?;
            crate::telemetry::init(&settings.log);
            let app = Application::build(settings).await?;
            app.run_until_stopped().await;
            Ok(ExitCode::SUCCESS)
        }
        Command::CheckConfig { file } => match Settings::load(&file) {
            Ok(_) => {
                println!("{}: ok", file.display());
                Ok(ExitCode::SUCCESS)
            }
            Err(e) => {
                eprint!("{}: {e}", file.display());
                Ok(ExitCode::FAILURE)
            }
        },
        Command::CheckPricing { dir } => match crate::pricing::check_dir(&dir) {
            Ok(summary) => {
                println!("{summary}");
                Ok(ExitCode::SUCCESS)
            }
            Err(e) => {
                eprintln!("{e}");
                Ok(ExitCode::FAILURE)
            }
        },
        Command::Quote {
            pricing,
            tenant,
            tenants,
            total,
        } => quote(&pricing, &tenant, tenants.as_deref(), total.as_deref()),
        Command::TenantKey => {
            let (key, hash) = crate::identity::tenants::generate_key();
            println!("key:  {key}");
            println!("hash: {hash}");
            println!();
            println!("give the key to the tenant; put the hash in its tenants-file entry:");
            println!("key_hashes = [\"{hash}\"]");
            Ok(ExitCode::SUCCESS)
        }
        Command::Tenant { action } => match action {
            TenantAction::Create {
                config,
                id,
                name,
                external_id,
                webhook_url,
                print,
            } => {
                let external_id = external_id.unwrap_or_else(|| id.clone());
                let request = onboard::CreateRequest {
                    id,
                    name,
                    external_id,
                    webhook_url,
                    print,
                };
                onboard::create(&config, request).await
            }
            TenantAction::RotateKey {
                config,
                tenants,
                id,
                retire_old,
            } => onboard::rotate_key(config.as_deref(), tenants.as_deref(), &id, retire_old),
            TenantAction::List {
                config,
                tenants,
                json,
            } => onboard::list(config.as_deref(), tenants.as_deref(), json),
        },
        Command::Webhooks { action } => match action {
            WebhooksAction::Register {
                config,
                url,
                topics,
            } => onboard::register_webhook(&config, &url, &topics).await,
            WebhooksAction::Dlq { action } => dlq(action),
        },
        Command::Dlq { action } => dlq(action),
        Command::Emulator {
            listen,
            platform_keys,
            seed,
            workers,
        } => {
            crate::telemetry::init(&crate::config::LogSettings {
                format: crate::config::LogFormat::Pretty,
                filter: "info".into(),
            });
            let config = crate::emulator::EmulatorConfig {
                platform_keys,
                workers,
                ..Default::default()
            };
            let listener =
                TcpListener::bind(listen).with_context(|| format!("binding {listen}"))?;
            let emulator = crate::emulator::start(config, listener).await?;
            if let Some(seed) = seed {
                emulator.apply_seed(&crate::emulator::Seed::from_file(&seed)?)?;
            }
            tracing::info!(addr = %emulator.addr, "credyt emulator ready");
            crate::shutdown::signal().await;
            emulator.stop().await;
            Ok(ExitCode::SUCCESS)
        }
        Command::Sandbox {
            dir,
            data_dir,
            listen,
            admin_listen,
            emulator_listen,
            webhooks_listen,
        } => {
            let ports = SandboxPorts {
                listen,
                admin_listen,
                emulator_listen,
                webhooks_listen,
            };
            sandbox(dir.as_deref(), &data_dir, ports).await?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn load_settings(path: &Path) -> anyhow::Result<Settings> {
    Settings::load(path).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
}

/// `credyt-proxy quote`: the [`crate::pricing::Quote`] on stdout, or the problem+json body the
/// tenant API would answer for the same failure on stderr (non-zero exit).
fn quote(
    pricing: &Path,
    tenant: &str,
    tenants: Option<&Path>,
    total: Option<&str>,
) -> anyhow::Result<ExitCode> {
    use crate::ingest::problem::ApiError;
    use crate::outcome::Rejection;
    use crate::pricing::quote::Totals;

    let totals = match total {
        None => Totals::Zero,
        Some(text) => match crate::pricing::money::parse_decimal(text, true) {
            Ok(t) if !t.is_sign_negative() || t.is_zero() => Totals::AsIf(t),
            Ok(t) => anyhow::bail!("--total: {t} is negative"),
            Err(e) => anyhow::bail!("--total: {e}"),
        },
    };

    let set = crate::pricing::PricingSet::load_dir(pricing)
        .map_err(|e| anyhow::anyhow!("pricing rejected:\n{e}"))?;
    if let Some(path) = tenants {
        // The quota is irrelevant here: only the ids are read.
        let quota = crate::ratelimit::TenantQuota {
            per_second: std::num::NonZeroU32::MIN,
            burst: std::num::NonZeroU32::MIN,
        };
        let table = crate::identity::Tenants::load(path, quota).map_err(|problems| {
            anyhow::anyhow!("tenants file rejected:\n{}", problems.join("\n"))
        })?;
        if table.current().get(tenant).is_none() {
            let e = ApiError::Validation(vec![Rejection {
                code: "unknown_tenant",
                field: "tenant".into(),
                message: format!("tenant `{tenant}` is not in {}", path.display()),
            }]);
            eprintln!("{}", String::from_utf8_lossy(&e.problem_json()));
            return Ok(ExitCode::FAILURE);
        }
    }
    let mut input = String::new();
    std::io::stdin().read_to_string(&mut input)?;
    let quote = crate::pricing::parse_event(&input)
        .and_then(|event| crate::pricing::Quote::build_with(&set, tenant, &event, totals));
    match quote {
        Ok(q) => {
            write_stdout(&[serde_json::to_string_pretty(&q)?])?;
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            eprintln!(
                "{}",
                String::from_utf8_lossy(&ApiError::from(e).problem_json())
            );
            Ok(ExitCode::FAILURE)
        }
    }
}

/// The platform key of the sandbox's embedded emulator.
pub const SANDBOX_PLATFORM_KEY: &str = "sandbox-platform-key";
/// The sandbox's demo tenant key. Demo only: it is public, in this repository.
pub const SANDBOX_DEMO_KEY: &str = "cpk_DEMO_sandbox_only_not_a_secret";
/// The demo tenant's webhook signing secret (in the demo tenants file). Public: sandbox only.
pub const SANDBOX_DEMO_WEBHOOK_SECRET: &str = "whsec_REVNT19zYW5kYm94X29ubHlfbm90X3NlY3JldF8zMmI=";
/// The variable that sets `credyt-proxy sandbox --data-dir`.
pub const SANDBOX_DATA_DIR_ENV: &str = "CREDYT_PROXY_SANDBOX_DATA_DIR";

/// The sandbox's demo files, built into the binary so the sandbox runs from any directory.
mod demo {
    pub const CONFIG: &str = include_str!("../examples/sandbox/config.toml");
    pub const TENANTS: &str = include_str!("../examples/sandbox/tenants.toml");
    pub const SEED: &str = include_str!("../examples/sandbox/seed.json");
    /// The shipped price books (every `*.toml` of `pricing/`; a test keeps the list whole).
    pub const PRICING: [(&str, &str); 3] = [
        ("assets.toml", include_str!("../pricing/assets.toml")),
        (
            "assignments.toml",
            include_str!("../pricing/assignments.toml"),
        ),
        ("standard.toml", include_str!("../pricing/standard.toml")),
    ];
}

/// The addresses the sandbox binds.
pub struct SandboxPorts {
    pub listen: SocketAddr,
    pub admin_listen: SocketAddr,
    pub emulator_listen: SocketAddr,
    pub webhooks_listen: SocketAddr,
}

/// The sandbox's data folder, deleted when the sandbox ends (also on a failed start).
struct ThrowAway(PathBuf);

impl Drop for ThrowAway {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Settings and seed of the sandbox: from `dir` when given, else the built-in demo files
/// (written into `data` so that the tenants file and price books have a home).
fn sandbox_files(
    dir: Option<&Path>,
    data: &Path,
) -> anyhow::Result<(Settings, crate::emulator::Seed)> {
    let Some(dir) = dir else {
        let pricing = data.join("pricing");
        std::fs::create_dir_all(&pricing)
            .with_context(|| format!("creating {}", pricing.display()))?;
        for (name, text) in demo::PRICING {
            std::fs::write(pricing.join(name), text)?;
        }
        let tenants = data.join("tenants.toml");
        std::fs::write(&tenants, demo::TENANTS)?;
        let mut settings = Settings::from_toml(demo::CONFIG, data, None)
            .map_err(|e| anyhow::anyhow!("the built-in sandbox config: {e}"))?;
        settings.tenants.file = tenants;
        settings.pricing.dir = pricing;
        let seed: crate::emulator::Seed =
            serde_json::from_str(demo::SEED).context("the built-in sandbox seed")?;
        return Ok((settings, seed));
    };
    let (config, seed) = (dir.join("config.toml"), dir.join("seed.json"));
    if !config.is_file() || !seed.is_file() {
        anyhow::bail!(
            "no sandbox files in {}: --dir must name a folder with config.toml, tenants.toml \
             and seed.json (e.g. --dir examples/sandbox), or leave --dir out to use the built-in \
             demo files",
            dir.display()
        );
    }
    let settings = load_settings(&config)?;
    let seed = crate::emulator::Seed::from_file(&seed)?;
    Ok((settings, seed))
}

/// Points the sandbox's destination at `url`.
async fn point_sandbox_destination(emulator: &str, id: &str, url: &str) -> anyhow::Result<()> {
    reqwest::Client::new()
        .patch(format!("{emulator}/webhooks/{id}"))
        .header("X-CREDYT-API-KEY", SANDBOX_PLATFORM_KEY)
        .json(&serde_json::json!({ "url": url }))
        .send()
        .await
        .and_then(|r| r.error_for_status())
        .context("pointing the emulator's webhook destination at the relay")?;
    Ok(())
}

/// Registers the relay as the platform's `connect: true` destination at the sandbox's
/// emulator: its id and signing secret.
async fn register_sandbox_destination(
    emulator: &str,
    relay_url: &str,
) -> anyhow::Result<(String, String)> {
    let created: serde_json::Value = reqwest::Client::new()
        .post(format!("{emulator}/webhooks"))
        .header("X-CREDYT-API-KEY", SANDBOX_PLATFORM_KEY)
        .json(&serde_json::json!({"url": relay_url, "connect": true}))
        .send()
        .await
        .and_then(|r| r.error_for_status())
        .context("registering the relay at the sandbox emulator")?
        .json()
        .await
        .context("reading the emulator's webhook destination")?;
    match (created["id"].as_str(), created["secret"].as_str()) {
        (Some(id), Some(secret)) => Ok((id.to_string(), secret.to_string())),
        _ => anyhow::bail!("the emulator's webhook destination has no id or secret: {created}"),
    }
}

async fn sandbox(
    dir: Option<&Path>,
    data_parent: &Path,
    ports: SandboxPorts,
) -> anyhow::Result<()> {
    // A fresh folder per sandbox run, removed on exit.
    let data = ThrowAway(data_parent.join(format!("credyt-proxy-sandbox-{}", std::process::id())));
    std::fs::create_dir_all(&data.0)
        .with_context(|| format!("creating the sandbox data folder {}", data.0.display()))?;
    let (mut settings, seed) = sandbox_files(dir, &data.0)?;
    crate::telemetry::init(&settings.log);

    let config = crate::emulator::EmulatorConfig {
        platform_keys: vec![SANDBOX_PLATFORM_KEY.to_string()],
        ..Default::default()
    };
    let emulator_listen = ports.emulator_listen;
    let listener = TcpListener::bind(emulator_listen)
        .with_context(|| format!("binding the emulator on {emulator_listen}"))?;
    let emulator = crate::emulator::start(config, listener).await?;
    emulator.apply_seed(&seed)?;

    settings.credyt.base_url = emulator.url();
    settings.credyt.api_key = crate::config::Secret::new(SANDBOX_PLATFORM_KEY);
    settings.server.listen = ports.listen;
    settings.server.admin_listen = ports.admin_listen;
    settings.outbox.dir = data.0.join("outbox");
    // The C4P loop: the platform's `connect: true` destination is the proxy's relay.
    let relay_url = format!(
        "http://{}{}",
        ports.webhooks_listen,
        settings
            .webhooks
            .as_ref()
            .map_or("/webhooks/credyt", |w| w.path.as_str())
    );
    let (destination, secret) = register_sandbox_destination(&emulator.url(), &relay_url).await?;
    let mut webhooks = settings.webhooks.take().unwrap_or_else(|| {
        crate::config::WebhookSettings::with_defaults(Vec::new(), data.0.join("webhooks"))
    });
    webhooks.credyt_secrets = vec![crate::config::Secret::new(secret)];
    webhooks.listen = ports.webhooks_listen;
    webhooks.dir = data.0.join("webhooks");
    let relay_path = webhooks.path.clone();
    settings.webhooks = Some(webhooks);
    let app = Application::build(settings).await?;
    // The relay's real address (port 0 picks one): where the emulator posts.
    let relay_url = match app.webhook_addr() {
        Some(addr) => {
            let ip = if addr.ip().is_unspecified() {
                std::net::IpAddr::from([127, 0, 0, 1])
            } else {
                addr.ip()
            };
            let url = format!("http://{}{relay_path}", SocketAddr::new(ip, addr.port()));
            point_sandbox_destination(&emulator.url(), &destination, &url).await?;
            url
        }
        None => relay_url,
    };
    // Listening before the banner: a ctrl-c right after it still cleans up.
    let signals = crate::shutdown::Signals::new();

    let proxy = format!("http://{}", app.tenant_addr());
    let now = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    let event_id = format!("demo-{}", uuid::Uuid::new_v4().simple());
    let files = dir.map_or_else(
        || "built in (pass --dir to use your own)".to_string(),
        |d| d.display().to_string(),
    );
    // `-w '\n'`: the JSON answers end without a newline; the shell prompt should not.
    println!(
        "\ncredyt-proxy sandbox is running\n\
         \n  proxy (tenant API): {proxy}\
         \n  proxy admin:        http://{admin}\
         \n  credyt emulator:    {emu}  (platform key: {SANDBOX_PLATFORM_KEY})\
         \n  demo tenant key:    {SANDBOX_DEMO_KEY}   <- DEMO KEY, sandbox only\
         \n  demo files:         {files}\
         \n  sandbox data:       {data}  (throw-away: deleted on exit)\
         \n\npost a usage event for demo end user `demo-user-1` (0.50 USD per video_promoted):\n\
         \ncurl -sS -w '\\n' -X POST {proxy}/v1/events -H 'Content-Type: application/json' -H 'X-CREDYT-API-KEY: {SANDBOX_DEMO_KEY}' -d '{{\"customer_external_id\":\"demo-user-1\",\"events\":[{{\"id\":\"{event_id}\",\"event_type\":\"video_promoted\",\"occurred_at\":\"{now}\"}}]}}'\n\
         \nsee the wallet debited on the emulator:\n\
         \ncurl -sS -w '\\n' {emu}/_emulator/state -H 'X-CREDYT-API-KEY: {SANDBOX_PLATFORM_KEY}'\n\
         \nwatch the relayed webhooks: below 5 USD (31 such events) the emulator sends\
         \nbalance_threshold_hit to the proxy's webhook relay ({relay_url}), which relays it to\
         \nthe demo tenant's endpoint http://127.0.0.1:8090/ (see examples/webhooks/README.md):\n\
         \npython3 examples/webhooks/receiver.py --port 8090 --secret {SANDBOX_DEMO_WEBHOOK_SECRET}\n\
         \nstop with ctrl-c\n",
        admin = app.admin_addr(),
        emu = emulator.url(),
        data = data.0.display(),
    );
    app.drain_on(signals).await;
    emulator.stop().await;
    drop(data);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    /// Every argument of every subcommand, nested ones included, with its `--help` text.
    fn args_without_help(cmd: &clap::Command, path: &str, missing: &mut Vec<String>) {
        for arg in cmd.get_arguments() {
            let id = arg.get_id().as_str();
            // clap's own --help / --version carry their help already.
            if matches!(id, "help" | "version") {
                continue;
            }
            let help = arg.get_help().map(|h| h.to_string()).unwrap_or_default();
            if help.trim().is_empty() {
                missing.push(format!("{path} {id}"));
            }
        }
        for sub in cmd.get_subcommands() {
            let sub_path = format!("{path} {}", sub.get_name());
            if sub.get_about().is_none() && sub.get_name() != "help" {
                missing.push(format!("{sub_path} (no about)"));
            }
            args_without_help(sub, &sub_path, missing);
        }
    }

    #[test]
    fn every_argument_of_every_subcommand_has_help() {
        let cmd = Cli::command();
        cmd.clone().debug_assert();
        let mut missing = Vec::new();
        args_without_help(&cmd, "credyt-proxy", &mut missing);
        assert!(missing.is_empty(), "arguments without help: {missing:?}");
    }

    #[test]
    fn the_built_in_sandbox_has_every_shipped_price_book() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("pricing");
        let mut shipped: Vec<String> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".toml") && !n.starts_with('.'))
            .collect();
        shipped.sort();
        let built_in: Vec<&str> = demo::PRICING.iter().map(|(n, _)| *n).collect();
        assert_eq!(shipped, built_in);
    }

    #[test]
    fn the_built_in_sandbox_files_load_anywhere() {
        let data = tempfile::tempdir().unwrap();
        let (settings, seed) = sandbox_files(None, data.path()).unwrap();
        assert_eq!(settings.tenants.file, data.path().join("tenants.toml"));
        crate::pricing::PricingSet::load_dir(&settings.pricing.dir).unwrap();
        assert!(!seed.accounts.is_empty());
    }

    #[test]
    fn a_sandbox_dir_without_the_files_names_the_flag() {
        let empty = tempfile::tempdir().unwrap();
        let data = tempfile::tempdir().unwrap();
        let err = sandbox_files(Some(empty.path()), data.path()).unwrap_err();
        assert!(err.to_string().contains("--dir"), "{err}");
    }
}
