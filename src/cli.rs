//! The command line: `serve`, `sandbox`, `emulator`, `check-config`, `check-pricing`, `quote`,
//! `tenant-key`. Startup code: errors here are `anyhow` and end the process with a message.

use std::io::Read;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};

use crate::app::Application;
use crate::config::Settings;

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
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Run the proxy against an in-process Credyt emulator with demo data.
    Sandbox {
        /// Folder with config.toml, tenants.toml and seed.json.
        #[arg(long, default_value = "examples/sandbox")]
        dir: PathBuf,
        /// Tenant port of the proxy.
        #[arg(long, default_value = "127.0.0.1:8080")]
        listen: SocketAddr,
        /// Admin port of the proxy.
        #[arg(long, default_value = "127.0.0.1:9090")]
        admin_listen: SocketAddr,
        /// Port of the embedded emulator.
        #[arg(long, default_value = "127.0.0.1:8081")]
        emulator_listen: SocketAddr,
    },
    /// Run the Credyt emulator alone.
    Emulator {
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
    /// Validate a configuration file (and its environment overrides) and exit.
    CheckConfig { file: PathBuf },
    /// Validate a pricing directory and exit.
    CheckPricing { dir: PathBuf },
    /// Price one event (JSON on stdin) and print the breakdown.
    Quote {
        #[arg(long)]
        pricing: PathBuf,
        #[arg(long)]
        tenant: String,
    },
    /// Print a fresh tenant API key and the hash line for the tenants file.
    TenantKey,
    /// Inspect or replay the outbox's dead letters (the proxy must be stopped: the outbox
    /// directory is locked while it runs).
    Dlq {
        #[command(subcommand)]
        action: DlqAction,
    },
}

#[derive(Subcommand, Debug)]
pub enum DlqAction {
    /// List dead letters as JSON lines.
    List {
        /// The outbox directory (`outbox.dir` of the config).
        #[arg(long)]
        data_dir: PathBuf,
    },
    /// Move dead letters back to the pending queue (all, or the given sequence numbers).
    Replay {
        #[arg(long)]
        data_dir: PathBuf,
        #[arg(long = "seq")]
        seqs: Vec<u64>,
    },
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
        Command::Quote { pricing, tenant } => {
            let set = crate::pricing::PricingSet::load_dir(&pricing)
                .map_err(|e| anyhow::anyhow!("pricing rejected:\n{e}"))?;
            let mut input = String::new();
            std::io::stdin().read_to_string(&mut input)?;
            match crate::pricing::quote_json(&set, &tenant, &input) {
                Ok(v) => {
                    println!("{}", serde_json::to_string_pretty(&v)?);
                    Ok(ExitCode::SUCCESS)
                }
                Err(e) => {
                    eprintln!("error: {e}");
                    Ok(ExitCode::FAILURE)
                }
            }
        }
        Command::TenantKey => {
            let (key, hash) = crate::identity::tenants::generate_key();
            println!("key:  {key}");
            println!("hash: {hash}");
            println!();
            println!("give the key to the tenant; put the hash in its tenants-file entry:");
            println!("key_hashes = [\"{hash}\"]");
            Ok(ExitCode::SUCCESS)
        }
        Command::Dlq { action } => match action {
            DlqAction::List { data_dir } => {
                let letters = crate::outbox::dlq_list(&data_dir)?;
                for letter in &letters {
                    println!("{}", serde_json::to_string(letter)?);
                }
                eprintln!("{} dead letter(s)", letters.len());
                Ok(ExitCode::SUCCESS)
            }
            DlqAction::Replay { data_dir, seqs } => {
                let only = (!seqs.is_empty()).then_some(seqs.as_slice());
                let n = crate::outbox::dlq_replay(&data_dir, only)?;
                println!(
                    "{n} dead letter(s) moved back to pending; they are sent at the next start"
                );
                Ok(ExitCode::SUCCESS)
            }
        },
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
            listen,
            admin_listen,
            emulator_listen,
        } => {
            sandbox(&dir, listen, admin_listen, emulator_listen).await?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn load_settings(path: &Path) -> anyhow::Result<Settings> {
    Settings::load(path).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
}

/// The platform key of the sandbox's embedded emulator.
pub const SANDBOX_PLATFORM_KEY: &str = "sandbox-platform-key";
/// The sandbox's demo tenant key. Demo only: it is public, in this repository.
pub const SANDBOX_DEMO_KEY: &str = "cpk_DEMO_sandbox_only_not_a_secret";

async fn sandbox(
    dir: &Path,
    listen: SocketAddr,
    admin_listen: SocketAddr,
    emulator_listen: SocketAddr,
) -> anyhow::Result<()> {
    let mut settings = load_settings(&dir.join("config.toml"))?;
    crate::telemetry::init(&settings.log);

    let config = crate::emulator::EmulatorConfig {
        platform_keys: vec![SANDBOX_PLATFORM_KEY.to_string()],
        ..Default::default()
    };
    let listener = TcpListener::bind(emulator_listen)
        .with_context(|| format!("binding the emulator on {emulator_listen}"))?;
    let emulator = crate::emulator::start(config, listener).await?;
    emulator.apply_seed(&crate::emulator::Seed::from_file(&dir.join("seed.json"))?)?;

    settings.credyt.base_url = emulator.url();
    settings.credyt.api_key = crate::config::Secret::new(SANDBOX_PLATFORM_KEY);
    settings.server.listen = listen;
    settings.server.admin_listen = admin_listen;
    // A fresh outbox per sandbox run, removed on exit.
    let data = std::env::temp_dir().join(format!("credyt-proxy-sandbox-{}", std::process::id()));
    settings.outbox.dir = data.join("outbox");
    let app = Application::build(settings).await?;

    let proxy = format!("http://{}", app.tenant_addr());
    let now = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    let event_id = format!("demo-{}", uuid::Uuid::new_v4().simple());
    println!(
        "\ncredyt-proxy sandbox is running\n\
         \n  proxy (tenant API): {proxy}\
         \n  proxy admin:        http://{admin}\
         \n  credyt emulator:    {emu}  (platform key: {SANDBOX_PLATFORM_KEY})\
         \n  demo tenant key:    {SANDBOX_DEMO_KEY}   <- DEMO KEY, sandbox only\
         \n\npost a usage event for demo end user `demo-user-1` (0.50 USD per video_promoted):\n\
         \ncurl -sS -X POST {proxy}/v1/events -H 'Content-Type: application/json' -H 'X-CREDYT-API-KEY: {SANDBOX_DEMO_KEY}' -d '{{\"customer_external_id\":\"demo-user-1\",\"events\":[{{\"id\":\"{event_id}\",\"event_type\":\"video_promoted\",\"occurred_at\":\"{now}\"}}]}}'\n\
         \nsee the wallet debited on the emulator:\n\
         \ncurl -sS {emu}/_emulator/state -H 'X-CREDYT-API-KEY: {SANDBOX_PLATFORM_KEY}'\n\
         \nstop with ctrl-c\n",
        admin = app.admin_addr(),
        emu = emulator.url(),
    );
    app.run_until_stopped().await;
    emulator.stop().await;
    let _ = std::fs::remove_dir_all(&data);
    Ok(())
}
