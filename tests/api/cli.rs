//! The binary itself: `check-config` and `sandbox`, run as a user would.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use rust_decimal_macros::dec;

use super::proxy::repo;

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

#[test]
fn sandbox_starts_and_its_printed_curl_debits_the_demo_wallet() {
    let mut child = bin()
        .args([
            "sandbox",
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
            "--emulator-listen",
            "127.0.0.1:0",
        ])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let _guard = Guard(child);
    let mut lines = BufReader::new(stdout).lines();
    let (mut post, mut state) = (None, None);
    while let Some(Ok(line)) = lines.next() {
        if line.starts_with("curl") && line.contains("/v1/events") {
            post = Some(line);
        } else if line.starts_with("curl") && line.contains("/_emulator/state") {
            state = Some(line);
        } else if line.contains("stop with ctrl-c") {
            break;
        }
    }
    let (post, state) = (
        post.expect("a curl line to post"),
        state.expect("a curl line for state"),
    );
    let answer: serde_json::Value = serde_json::from_str(&sh(&post)).unwrap();
    assert_eq!(answer["accepted"], 1, "{answer}");
    assert_eq!(answer["results"][0]["fees"][0]["amount"], "0.50");
    // The forwarder charges the demo wallet shortly after the durable answer.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let s: serde_json::Value = serde_json::from_str(&sh(&state)).unwrap();
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
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("1.25") && text.contains("10.00"), "{text}");
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
