//! The binary itself: `check-config`, `sandbox`, `quote`, run as a user would.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use rust_decimal_macros::dec;
use serde_json::{json, Value};

use super::proxy::{ago, repo, World};

fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_credyt-proxy"));
    c.current_dir(repo());
    c
}

#[test]
fn check_config_reports_all_three_mistakes_and_fails() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("bad.toml");
    std::fs::write(
        &file,
        "[server]\nlisten = \"localhost-8080\"\n[credyt]\napi_key = \"\"\n[ingest]\nack = \"eventually\"\n",
    )
    .unwrap();
    let out = bin().arg("check-config").arg(&file).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("3 problem(s)"), "{err}");
    for key in ["server.listen", "credyt.api_key", "ingest.ack"] {
        assert!(err.contains(key), "{key} not reported:\n{err}");
    }
    let ok = bin()
        .arg("check-config")
        .arg("examples/sandbox/config.toml")
        .output()
        .unwrap();
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
}

#[test]
fn check_config_reports_unknown_keys_and_wrong_types_with_the_invalid_values() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("typos.toml");
    std::fs::write(
        &file,
        "[server]\nlisten_adress = \"127.0.0.1:1\"\nworkers = \"two\"\nshutdown_grace_ms = 0\n\
         [credyt]\napi_key = \"k\"\n[ingest]\nack = \"eventually\"\n\
         [outbox]\nforwarder = \"yes please\"\n[metrics]\nport = 1\n",
    )
    .unwrap();
    let out = bin()
        .arg("check-config")
        .arg(&file)
        .env("CREDYT_PROXY__IDENTITY__TTL", "5")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("7 problem(s)"), "{err}");
    for line in [
        "server.listen_adress: unknown key",
        "server.workers: expected",
        "server.shutdown_grace_ms: must be greater than 0",
        "ingest.ack: `eventually` is not one of",
        "outbox.forwarder: expected a boolean",
        "metrics: unknown section",
        "identity.ttl: unknown key (set in the environment)",
    ] {
        assert!(err.contains(line), "`{line}` not reported:\n{err}");
    }
}

#[test]
fn the_example_config_needs_the_real_platform_key_from_the_environment() {
    let refused = bin()
        .args(["check-config", "examples/config.toml"])
        .env_remove("CREDYT_PROXY__CREDYT__API_KEY")
        .output()
        .unwrap();
    assert!(!refused.status.success());
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(
        err.contains("credyt.api_key: is the placeholder")
            && err.contains("CREDYT_PROXY__CREDYT__API_KEY"),
        "{err}"
    );
    // `serve` refuses to start with it for the same reason.
    let serve = bin()
        .args(["serve", "--config", "examples/config.toml"])
        .env_remove("CREDYT_PROXY__CREDYT__API_KEY")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut serve = Guard(serve);
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = serve.0.try_wait().unwrap() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "serve started with the placeholder key"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(!status.success());
    let mut err = String::new();
    std::io::Read::read_to_string(&mut serve.0.stderr.take().unwrap(), &mut err).unwrap();
    assert!(err.contains("placeholder"), "{err}");
    // The README's command: the key from the environment.
    let ok = bin()
        .args(["check-config", "examples/config.toml"])
        .env("CREDYT_PROXY__CREDYT__API_KEY", "key_live_from_a_secret")
        .output()
        .unwrap();
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
}

/// Kills the child when dropped, so a failing test leaves no process behind.
struct Guard(std::process::Child);

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn sh(line: &str) -> String {
    let out = Command::new("sh").arg("-c").arg(line).output().unwrap();
    assert!(
        out.status.success(),
        "{line}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// The sandbox's banner, read up to `stop with ctrl-c`.
struct Banner {
    post: String,
    state: String,
    data: std::path::PathBuf,
}

fn read_banner(stdout: std::process::ChildStdout) -> Banner {
    let mut lines = BufReader::new(stdout).lines();
    let (mut post, mut state, mut data) = (None, None, None);
    while let Some(Ok(line)) = lines.next() {
        if line.starts_with("curl") && line.contains("/v1/events") {
            post = Some(line);
        } else if line.starts_with("curl") && line.contains("/_emulator/state") {
            state = Some(line);
        } else if let Some(rest) = line.trim().strip_prefix("sandbox data:") {
            assert!(rest.contains("throw-away"), "{line}");
            data = rest.split_whitespace().next().map(std::path::PathBuf::from);
        } else if line.contains("stop with ctrl-c") {
            break;
        }
    }
    Banner {
        post: post.expect("a curl line to post"),
        state: state.expect("a curl line for state"),
        data: data.expect("a line saying where the sandbox keeps its data"),
    }
}

/// The sandbox on free ports, started in `cwd`, its data under `data_parent`.
fn spawn_sandbox(cwd: &std::path::Path, data_parent: &std::path::Path) -> std::process::Child {
    let mut cmd = bin();
    cmd.current_dir(cwd)
        .args([
            "sandbox",
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
            "--emulator-listen",
            "127.0.0.1:0",
            "--webhooks-listen",
            "127.0.0.1:0",
        ])
        .env("RUST_LOG", "warn")
        .env("CREDYT_PROXY_SANDBOX_DATA_DIR", data_parent)
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    cmd.spawn().unwrap()
}

#[test]
fn sandbox_starts_and_its_printed_curl_debits_the_demo_wallet() {
    // Not the repository root: the sandbox's demo files are built in.
    let cwd = tempfile::tempdir().unwrap();
    let data_parent = tempfile::tempdir().unwrap();
    let mut child = spawn_sandbox(cwd.path(), data_parent.path());
    let pid = child.id();
    let stdout = child.stdout.take().unwrap();
    let guard = Guard(child);
    let banner = read_banner(stdout);
    assert!(
        banner.data.starts_with(data_parent.path()) && banner.data.is_dir(),
        "{}",
        banner.data.display()
    );
    let posted = sh(&banner.post);
    assert!(
        posted.ends_with('\n'),
        "printed JSON must end with a newline: {posted:?}"
    );
    let answer: Value = serde_json::from_str(&posted).unwrap();
    assert_eq!(answer["accepted"], 1, "{answer}");
    assert_eq!(answer["results"][0]["fees"][0]["amount"], "0.50");
    // The forwarder charges the demo wallet shortly after the durable answer.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let text = sh(&banner.state);
        assert!(text.ends_with('\n'));
        let s: Value = serde_json::from_str(&text).unwrap();
        let available =
            super::proxy::wallet(&s, "cust_4dem0000000000000000000001", "USD").map(|w| w.0);
        if available == Some(dec!(19.50)) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "demo wallet not debited: {available:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // SIGKILL (the guard): the sandbox's own cleanup cannot run, and still nothing of it is
    // left in the system temp dir, and the test's own folder goes with the test.
    drop(guard);
    let default_place = std::env::temp_dir().join(format!("credyt-proxy-sandbox-{pid}"));
    assert!(
        !default_place.exists(),
        "{} left behind",
        default_place.display()
    );
    drop(data_parent);
    assert!(
        !banner.data.exists(),
        "{} left behind",
        banner.data.display()
    );
}

#[test]
fn sandbox_deletes_its_data_when_stopped() {
    let cwd = tempfile::tempdir().unwrap();
    let data_parent = tempfile::tempdir().unwrap();
    let mut child = spawn_sandbox(cwd.path(), data_parent.path());
    let stdout = child.stdout.take().unwrap();
    let mut guard = Guard(child);
    let banner = read_banner(stdout);
    assert!(banner.data.join("outbox").is_dir());
    sh(&format!("kill -TERM {}", guard.0.id()));
    let deadline = Instant::now() + Duration::from_secs(30);
    while guard.0.try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline, "sandbox did not stop on SIGTERM");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        !banner.data.exists(),
        "{} left behind",
        banner.data.display()
    );
}

#[test]
fn sandbox_with_a_dir_without_its_files_says_to_pass_dir() {
    let empty = tempfile::tempdir().unwrap();
    let data_parent = tempfile::tempdir().unwrap();
    let out = bin()
        .current_dir(empty.path())
        .args(["sandbox", "--dir", "examples/sandbox"])
        .env("CREDYT_PROXY_SANDBOX_DATA_DIR", data_parent.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--dir"), "{err}");
    // A failed start leaves no data folder either.
    assert_eq!(std::fs::read_dir(data_parent.path()).unwrap().count(), 0);
}

#[test]
fn check_pricing_and_quote_work_from_the_command_line() {
    let ok = bin().args(["check-pricing", "pricing"]).output().unwrap();
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("broken.toml"),
        "[[versions]]\neffective_from = 2026-01-01T00:00:00Z\n[[versions.prices]]\nid = \"p\"\nname = \"p\"\nevent_type = \"e\"\nusage_type = \"unit\"\nasset = \"NOPE\"\nunit_price = -1\n",
    )
    .unwrap();
    let bad = bin().arg("check-pricing").arg(dir.path()).output().unwrap();
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("broken.toml"));

    let mut quote = bin()
        .args(["quote", "--pricing", "pricing", "--tenant", "demo"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    quote
        .stdin
        .take()
        .unwrap()
        .write_all(br#"{"id":"q1","event_type":"response_completed","occurred_at":"2026-06-01T00:00:00Z","data":{"input_tokens":1000000,"output_tokens":1000000}}"#)
        .unwrap();
    let out = quote.wait_with_output().unwrap();
    assert!(out.status.success());
    let q: Value = serde_json::from_slice(&out.stdout).unwrap();
    // Amounts are decimal strings, as in every JSON answer of the proxy.
    assert_eq!(q["fees"][0]["amount"], "1.25", "{q}");
    assert_eq!(q["fees"][1]["amount"], "10.00", "{q}");
    assert_eq!(q["totals"]["USD"], "11.25", "{q}");
    assert_eq!(q["book"]["name"], "standard");
    assert_eq!(q["book"]["source"], "assigned");
    assert!(q["book"]["version"].is_string(), "{q}");
}

/// Runs `credyt-proxy quote ARGS` with `event` on stdin.
fn run_quote(args: &[&str], event: &str) -> std::process::Output {
    use std::io::Write;
    let mut child = bin()
        .arg("quote")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(event.as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

#[test]
fn quote_with_a_tenants_file_refuses_a_tenant_it_does_not_list() {
    let event = r#"{"id":"q1","event_type":"video_promoted","occurred_at":"2026-06-01T00:00:00Z"}"#;
    let tenants = "examples/sandbox/tenants.toml";
    let known = run_quote(
        &[
            "--pricing",
            "pricing",
            "--tenants",
            tenants,
            "--tenant",
            "demo",
        ],
        event,
    );
    assert!(
        known.status.success(),
        "{}",
        String::from_utf8_lossy(&known.stderr)
    );
    let out = run_quote(
        &[
            "--pricing",
            "pricing",
            "--tenants",
            tenants,
            "--tenant",
            "dmeo",
        ],
        event,
    );
    assert!(!out.status.success());
    assert!(out.stdout.is_empty());
    let problem: Value = serde_json::from_slice(&out.stderr).unwrap();
    assert_eq!(problem["code"], "validation_failed", "{problem}");
    let why = problem["errors"]["tenant"][0].as_str().unwrap();
    assert!(
        why.contains("dmeo") && why.contains("(unknown_tenant)"),
        "{why}"
    );
    // Without a tenants file the unknown id is priced, and the answer says with which book.
    let default = run_quote(&["--pricing", "pricing", "--tenant", "dmeo"], event);
    let q: Value = serde_json::from_slice(&default.stdout).unwrap();
    assert_eq!(q["book"]["source"], "default", "{q}");
}

#[test]
fn quote_errors_are_problem_json_with_the_api_codes() {
    let bad_json = run_quote(&["--pricing", "pricing", "--tenant", "demo"], "{\"id\":");
    assert!(!bad_json.status.success());
    let problem: Value = serde_json::from_slice(&bad_json.stderr).unwrap();
    assert_eq!(problem["code"], "invalid_json", "{problem}");
    assert_eq!(problem["status"], 400);
    let unknown = run_quote(
        &["--pricing", "pricing", "--tenant", "demo"],
        r#"{"id":"q","event_type":"no_such_event","occurred_at":"2026-06-01T00:00:00Z"}"#,
    );
    assert!(!unknown.status.success());
    let problem: Value = serde_json::from_slice(&unknown.stderr).unwrap();
    assert_eq!(problem["code"], "validation_failed", "{problem}");
    assert_eq!(problem["status"], 422);
    let why = problem["errors"]["event"][0].as_str().unwrap();
    assert!(why.contains("(unknown_event_type)"), "{why}");
}

#[actix_web::test]
async fn quote_from_the_cli_and_the_api_is_one_shape_and_fees_match_v1_events() {
    let w = World::start().await;
    w.customer(&w.a.account, "shape-user", "100").await;
    let event = json!({"id": "shape-1", "event_type": "response_completed", "occurred_at": ago(10),
                       "data": {"input_tokens": 1000000, "output_tokens": 1000000}});
    let r = w.post("/v1/quote", &w.a.key, &event).await;
    assert_eq!(r.status(), 200);
    let api: Value = r.json().await.unwrap();

    let out = run_quote(
        &["--pricing", "pricing", "--tenant", "tenant-a"],
        &event.to_string(),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let cli: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(cli, api);
    assert_eq!(api["totals"]["USD"], "11.25", "{api}");
    assert_eq!(api["book"]["name"], "standard", "{api}");

    // `/v1/events` answers the very same fee objects for the accepted event.
    let r = w
        .post(
            "/v1/events",
            &w.a.key,
            &json!({"customer_external_id": "shape-user", "events": [event]}),
        )
        .await;
    let accepted: Value = r.json().await.unwrap();
    assert_eq!(accepted["results"][0]["fees"], api["fees"], "{accepted}");
    w.stop().await;
}

#[test]
fn tenant_key_prints_a_key_and_its_hash() {
    let out = bin().arg("tenant-key").output().unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    let key = text.lines().find_map(|l| l.strip_prefix("key:  ")).unwrap();
    let hash = text.lines().find_map(|l| l.strip_prefix("hash: ")).unwrap();
    assert_eq!(credyt_proxy::identity::tenants::key_hash(key), hash);
}

/// `credyt-proxy quote ... | head` (a reader that is gone before the output is written) ends
/// quietly with success, as a Unix filter does, instead of panicking on the broken pipe.
#[test]
fn quote_into_a_closed_pipe_ends_quietly() {
    use std::io::Write;
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let mut child = bin()
        .args(["quote", "--pricing", "pricing", "--tenant", "demo"])
        .stdin(Stdio::piped())
        .stdout(writer)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(
            br#"{"id":"q1","event_type":"video_promoted","occurred_at":"2026-06-01T00:00:00Z"}"#,
        )
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{:?}: {stderr}", out.status);
    assert!(!stderr.contains("panicked"), "{stderr}");
}

/// `quote --total N` rates a period-tiered price as if the running total were N (the CLI reads
/// no outbox: zero without it), and shows the total used and the bands crossed.
#[test]
fn quote_rates_period_tiers_at_zero_or_at_the_given_total() {
    let event = r#"{"id":"q1","event_type":"tokens_used","occurred_at":"2026-01-05T00:00:00Z","data":{"tokens":500000}}"#;
    let books = "tests/golden/pricing/periods/books";
    let quote = |extra: &[&str]| -> Value {
        let mut args = vec!["--pricing", books, "--tenant", "t"];
        args.extend(extra);
        let out = run_quote(&args, event);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let zero = quote(&[]);
    assert_eq!(zero["fees"][0]["amount"], "1.00", "{zero}");
    assert_eq!(zero["running_totals"][0]["source"], "none");
    assert_eq!(zero["running_totals"][0]["window"], "2026-01");
    // As if 800,000 were used this month: 200,000 at 2.00 and 300,000 at 1.50 per million.
    let what_if = quote(&["--total", "800_000"]);
    assert_eq!(what_if["fees"][0]["amount"], "0.85", "{what_if}");
    let used = &what_if["running_totals"][0];
    assert_eq!(used["source"], "as_if");
    assert_eq!(used["total"], "800000");
    assert_eq!(used["total_after"], "1300000");
    assert_eq!(used["bands"].as_array().unwrap().len(), 2, "{used}");
    assert_eq!(used["bands"][1]["from"], "1000000");
    let out = run_quote(
        &["--pricing", books, "--tenant", "t", "--total", "-1"],
        event,
    );
    assert!(!out.status.success());
}

/// With `ack = "upstream"` there is no outbox to keep running totals in: a pricing directory
/// with period tiers is refused at start.
#[actix_web::test]
async fn upstream_ack_refuses_period_tiers_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let (_, hash) = credyt_proxy::identity::tenants::generate_key();
    std::fs::write(
        dir.path().join("tenants.toml"),
        format!("[[tenants]]\nid = \"t\"\nkey_hashes = [\"{hash}\"]\naccount = \"acc_1\"\n"),
    )
    .unwrap();
    let config = |pricing: &str| {
        format!(
            "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n\
             [credyt]\nbase_url = \"http://127.0.0.1:9\"\napi_key = \"k\"\ntimeout_ms = 200\n\
             [tenants]\nfile = \"tenants.toml\"\n[pricing]\ndir = \"{}\"\n\
             [ingest]\nack = \"upstream\"\n",
            super::proxy::repo().join(pricing).display()
        )
    };
    let settings = |pricing: &str| {
        credyt_proxy::config::Settings::from_toml(
            &config(pricing),
            dir.path(),
            Some(Default::default()),
        )
        .unwrap()
    };
    let err = credyt_proxy::app::Application::build(settings("tests/golden/pricing/periods/books"))
        .await
        .err()
        .expect("period tiers under ack = upstream must be refused");
    let message = format!("{err:#}");
    assert!(
        message.contains("tiering") && message.contains("durable"),
        "{message}"
    );
    // The same proxy with the shipped books (no period tiers) starts.
    let app = credyt_proxy::app::Application::build(settings("pricing"))
        .await
        .unwrap();
    app.stop().await;
}
