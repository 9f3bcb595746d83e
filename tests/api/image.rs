//! The shipped image, run for real on the local Docker engine: the Dockerfile's runtime stage
//! as written (its text from `FROM debian:bookworm-slim AS runtime` to the end), with the
//! binary of this `cargo test` in place of the build stage. The binary is put at the build
//! stage's path (`/out/credyt-proxy`) in an image of its own (`docker import`), which the
//! test's Dockerfile names as its `build` stage; the legacy builder builds every stage of a
//! Dockerfile, so the shipped file itself would compile the project again.
//!
//! Docker and the base image are needed: `debian:bookworm-slim`, which
//! `deploy/image/build-base.sh` builds on a machine that cannot pull it (these tests run it;
//! it does nothing when the image is there). Without them the tests fail when `CI=true` and
//! are skipped, saying why, elsewhere.
//!
//! Every container and volume has a name unique to the run and is removed when its test ends,
//! failed or not; so are the two images, once no test of the run uses them.

use std::collections::BTreeMap;
use std::net::TcpListener;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use credyt_proxy::cli::SANDBOX_DEMO_KEY;
use rust_decimal::Decimal;
use serde_json::{json, Value};

use super::proxy::{
    ago, emu_clear_faults, emu_customer, emu_faults, emu_requests, emu_state, eventually, metric,
    repo, start_emulator, tenant_a_account, total_charges, usd_charges, wallet, PLATFORM_KEY,
};

/// The first line of the Dockerfile's runtime stage.
const RUNTIME_STAGE: &str = "FROM debian:bookworm-slim AS runtime";
/// The base image's tag on the local engine.
const BASE: &str = "debian:bookworm-slim";
/// The proxy's user in the image.
const UID: &str = "10001";
/// `docker stop -t`: the kubelet's default grace period.
const STOP_TIMEOUT_SECS: u64 = 30;

/// Runs `docker args`, with no input.
fn docker(args: &[&str]) -> Output {
    Command::new("docker")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

/// Runs `docker args` and returns its trimmed stdout; panics with its stderr unless it
/// succeeded.
fn docker_ok(args: &[&str]) -> String {
    let out = docker(args);
    assert!(
        out.status.success(),
        "docker {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

/// A name no other run on this engine uses.
fn unique(what: &str) -> String {
    let id = uuid::Uuid::new_v4().simple().to_string();
    format!(
        "credyt-proxy-test-{what}-{}-{}",
        std::process::id(),
        &id[..8]
    )
}

/// The runtime image and the binary's image of this run; removed when the last test of the
/// run that uses them is done.
struct Image {
    tag: String,
    binary: String,
}

impl Drop for Image {
    fn drop(&mut self) {
        let _ = docker(&["rmi", "--force", &self.tag, &self.binary]);
    }
}

/// The image shared by the tests running now.
static IMAGE: Mutex<Weak<Image>> = Mutex::new(Weak::new());

/// The image, built once for the tests that run together; `None` (skipped) when Docker or the
/// base image is missing outside CI.
fn image() -> Option<Arc<Image>> {
    let mut shared = IMAGE.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(image) = shared.upgrade() {
        return Some(image);
    }
    let image = Arc::new(build_image()?);
    *shared = Arc::downgrade(&image);
    Some(image)
}

/// Missing under CI is a failure, not a skip.
fn unavailable(why: &str) -> Option<Image> {
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "{why}: under CI the image tests must run (.ci/run builds the base image with \
         deploy/image/build-base.sh)"
    );
    eprintln!("skipped: {why}; CI runs this test");
    None
}

fn build_image() -> Option<Image> {
    let server = Command::new("docker")
        .args(["version", "--format", "{{.Server.Version}}"])
        .stdin(Stdio::null())
        .output();
    match server {
        Ok(out) if out.status.success() => {}
        Ok(out) => {
            return unavailable(&format!(
                "the Docker engine does not answer: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ))
        }
        Err(e) => return unavailable(&format!("no docker command: {e}")),
    }
    let started = Instant::now();
    let base = Command::new("bash")
        .arg(repo().join("deploy/image/build-base.sh"))
        .stdin(Stdio::null())
        .output()
        .unwrap();
    if !base.status.success() {
        let err = String::from_utf8_lossy(&base.stderr);
        let tail: Vec<&str> = err.lines().rev().take(20).collect();
        return unavailable(&format!(
            "the base image {BASE} cannot be built (deploy/image/build-base.sh): {}",
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        ));
    }
    let base_took = started.elapsed();

    let dockerfile = std::fs::read_to_string(repo().join("Dockerfile")).unwrap();
    let at = dockerfile
        .lines()
        .position(|l| l.trim_end() == RUNTIME_STAGE)
        .unwrap_or_else(|| panic!("the Dockerfile has no line `{RUNTIME_STAGE}`"));
    let runtime: Vec<&str> = dockerfile.lines().skip(at).collect();

    let image = Image {
        tag: format!("{}:latest", unique("image")),
        binary: format!("{}:latest", unique("binary")),
    };
    let dir = tempfile::tempdir().unwrap();
    // The binary's image: one file, at the build stage's path.
    let out = dir.path().join("bin/out");
    std::fs::create_dir_all(&out).unwrap();
    let binary = Path::new(env!("CARGO_BIN_EXE_credyt-proxy"));
    if std::fs::hard_link(binary, out.join("credyt-proxy")).is_err() {
        std::fs::copy(binary, out.join("credyt-proxy")).unwrap();
    }
    let mut tar = Command::new("tar")
        .arg("-C")
        .arg(dir.path().join("bin"))
        .args(["-c", "out"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let imported = Command::new("docker")
        .args(["import", "-", &image.binary])
        .stdin(tar.stdout.take().unwrap())
        .output()
        .unwrap();
    assert!(tar.wait().unwrap().success(), "tar of the binary failed");
    assert!(
        imported.status.success(),
        "docker import of the binary failed: {}",
        String::from_utf8_lossy(&imported.stderr)
    );

    // The context: what the runtime stage copies from the repository, and the test Dockerfile.
    let ctx = dir.path().join("context");
    std::fs::create_dir_all(ctx.join("deploy/kubernetes/base")).unwrap();
    std::fs::copy(
        repo().join("deploy/kubernetes/base/config.toml"),
        ctx.join("deploy/kubernetes/base/config.toml"),
    )
    .unwrap();
    std::fs::create_dir_all(ctx.join("pricing")).unwrap();
    for entry in std::fs::read_dir(repo().join("pricing")).unwrap() {
        let entry = entry.unwrap();
        if entry.file_type().unwrap().is_file() {
            std::fs::copy(entry.path(), ctx.join("pricing").join(entry.file_name())).unwrap();
        }
    }
    std::fs::write(
        ctx.join("Dockerfile"),
        format!("FROM {} AS build\n{}\n", image.binary, runtime.join("\n")),
    )
    .unwrap();
    let built = Command::new("docker")
        .args(["build", "--tag", &image.tag])
        .arg(&ctx)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(
        built.status.success(),
        "docker build of the runtime stage failed:\n{}\n{}",
        String::from_utf8_lossy(&built.stdout),
        String::from_utf8_lossy(&built.stderr)
    );
    eprintln!(
        "image: base ready in {base_took:?}, {} built in {:?}",
        image.tag,
        started.elapsed() - base_took
    );
    Some(image)
}

/// The containers and volumes of one test: removed when it ends, containers first (a volume
/// in use cannot be removed). A failing test shows the containers' logs.
struct Resources {
    containers: Vec<String>,
    volumes: Vec<String>,
}

impl Resources {
    fn new() -> Resources {
        Resources {
            containers: Vec::new(),
            volumes: Vec::new(),
        }
    }

    /// A new named volume.
    fn volume(&mut self) -> String {
        let name = unique("data");
        docker_ok(&["volume", "create", &name]);
        self.volumes.push(name.clone());
        name
    }

    /// A name for a container this test runs (removed with it).
    fn container(&mut self) -> String {
        let name = unique("proxy");
        self.containers.push(name.clone());
        name
    }
}

impl Drop for Resources {
    fn drop(&mut self) {
        for c in &self.containers {
            if std::thread::panicking() {
                let logs = docker(&["logs", "--tail", "60", c]);
                eprintln!(
                    "--- logs of {c}:\n{}{}",
                    String::from_utf8_lossy(&logs.stdout),
                    String::from_utf8_lossy(&logs.stderr)
                );
            }
            let _ = docker(&["rm", "--force", "--volumes", c]);
        }
        for v in &self.volumes {
            let _ = docker(&["volume", "rm", "--force", v]);
        }
    }
}

/// `http://` + the host address Docker published the container's `port` on.
fn published(container: &str, port: u16) -> String {
    let out = docker_ok(&["port", container, &format!("{port}/tcp")]);
    let addr = out
        .lines()
        .find(|l| l.starts_with("127.0.0.1:"))
        .unwrap_or_else(|| panic!("{port} is not published on 127.0.0.1: {out}"));
    format!("http://{addr}")
}

/// A port free on 127.0.0.1 now (for a container on the host's network).
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Waits for `/readyz` 200 on `admin`; panics early when the container stops.
async fn ready(http: &reqwest::Client, admin: &str, container: &str) {
    eventually(Duration::from_secs(60), "/readyz 200", || async {
        let running = docker_ok(&["inspect", "-f", "{{.State.Running}}", container]);
        assert_eq!(running, "true", "{container} stopped before it was ready");
        let r = http.get(format!("{admin}/readyz")).send().await.ok()?;
        (r.status() == 200).then_some(())
    })
    .await;
}

/// `docker stop -t 30`: (how long it took, the exit code).
fn stop(container: &str) -> (Duration, i64) {
    let started = Instant::now();
    docker_ok(&["stop", "-t", &STOP_TIMEOUT_SECS.to_string(), container]);
    let took = started.elapsed();
    let code = docker_ok(&["inspect", "-f", "{{.State.ExitCode}}", container]);
    (took, code.parse().unwrap())
}

/// `docker run IMAGE sandbox` in a read-only container as the image's user, with one volume
/// for its data and the tenant and admin ports published: ready, an event with the demo key is
/// acknowledged (204) and charged at the built-in emulator, the sandbox's data is in the volume
/// and nowhere else can be written (not even by root), and `docker stop` ends it with exit
/// code 0, its throw-away data deleted.
#[actix_web::test]
async fn the_sandbox_runs_out_of_the_box_read_only_as_user_10001() {
    let Some(image) = image() else { return };
    let mut res = Resources::new();
    let volume = res.volume();
    let name = res.container();
    docker_ok(&[
        "run",
        "--detach",
        "--name",
        &name,
        "--read-only",
        "--volume",
        &format!("{volume}:/var/lib/credyt-proxy"),
        "--publish",
        "127.0.0.1::8080",
        "--publish",
        "127.0.0.1::9090",
        "--publish",
        "127.0.0.1::8081",
        &image.tag,
        "sandbox",
    ]);
    let (tenant, admin, emulator) = (
        published(&name, 8080),
        published(&name, 9090),
        published(&name, 8081),
    );
    let http = reqwest::Client::new();
    ready(&http, &admin, &name).await;

    // Non-root: the image's user, and the user the proxy runs as.
    assert_eq!(
        docker_ok(&["image", "inspect", "-f", "{{.Config.User}}", &image.tag]),
        format!("{UID}:{UID}")
    );
    let status = docker_ok(&["exec", &name, "cat", "/proc/1/status"]);
    let ids = |field: &str| -> Vec<String> {
        let line = status
            .lines()
            .find(|l| l.starts_with(field))
            .unwrap_or_else(|| panic!("no {field} in {status}"));
        line.split_whitespace().skip(1).map(String::from).collect()
    };
    assert_eq!(ids("Uid:"), vec![UID; 4], "the proxy's uids");
    assert_eq!(ids("Gid:"), vec![UID; 4], "the proxy's gids");

    // An event with the demo key, acknowledged and then charged to the demo end user.
    let event = json!({
        "customer_external_id": "demo-user-1",
        "events": [{"id": unique("event"), "event_type": "video_promoted", "occurred_at": ago(5)}],
    });
    let r = http
        .post(format!("{tenant}/events"))
        .header("X-CREDYT-API-KEY", SANDBOX_DEMO_KEY)
        .json(&event)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204, "{:?}", r.text().await);
    let charged = eventually(
        Duration::from_secs(30),
        "the demo charge at the sandbox's emulator",
        || async {
            let state: Value = http
                .get(format!("{emulator}/_emulator/state"))
                .header("X-CREDYT-API-KEY", credyt_proxy::cli::SANDBOX_PLATFORM_KEY)
                .send()
                .await
                .ok()?
                .json()
                .await
                .ok()?;
            let (_, charges, total) = wallet(&state, "cust_4dem0000000000000000000001", "USD")?;
            (charges == 1).then_some(total)
        },
    )
    .await;
    assert_eq!(charged, Decimal::new(50, 2), "0.50 USD per video_promoted");

    // Its data (the outbox among it) is in the volume: CREDYT_PROXY_SANDBOX_DATA_DIR.
    let data = docker_ok(&["exec", &name, "ls", "/var/lib/credyt-proxy"]);
    assert!(data.starts_with("credyt-proxy-sandbox-"), "{data}");
    docker_ok(&[
        "exec",
        &name,
        "test",
        "-d",
        &format!("/var/lib/credyt-proxy/{data}/outbox"),
    ]);
    // Nothing else is writable, not even by root: the proxy never needed more.
    for path in ["/tmp/x", "/etc/credyt-proxy/x", "/x"] {
        let touch = docker(&["exec", "--user", "0", &name, "touch", path]);
        assert!(!touch.status.success(), "{path} is writable");
        let err = String::from_utf8_lossy(&touch.stderr);
        assert!(err.contains("Read-only file system"), "{path}: {err}");
    }

    let (took, code) = stop(&name);
    assert_eq!(code, 0, "the sandbox's exit code after docker stop");
    assert!(
        took < Duration::from_secs(10),
        "docker stop took {took:?}: the sandbox ignored SIGTERM"
    );
    let left = docker_ok(&[
        "run",
        "--rm",
        "--volume",
        &format!("{volume}:/data"),
        "--entrypoint",
        "ls",
        &image.tag,
        "-A",
        "/data",
    ]);
    assert_eq!(left, "", "the sandbox's throw-away data outlived it");
}

/// `docker stop` of `serve` with charges Credyt refuses (503): the container exits 0 before
/// Docker's timeout with the undelivered charges on its volume, and a new container on that
/// volume charges every acknowledged event exactly once. The image's own config and command,
/// read-only, the secrets mounted read-only, Credyt (the emulator of this test) and the ports
/// set from the environment.
#[actix_web::test]
async fn serve_drains_on_docker_stop_and_a_new_container_delivers_the_rest() {
    let Some(image) = image() else { return };
    let mut res = Resources::new();
    let volume = res.volume();
    let http = reqwest::Client::new();
    let emulator = start_emulator().await;
    let account = tenant_a_account(&http, &emulator).await;
    let (key, hash) = credyt_proxy::identity::tenants::generate_key();
    // The two secrets the image's config names, readable by the proxy's user.
    let secrets = tempfile::tempdir().unwrap();
    std::fs::write(secrets.path().join("platform-key"), PLATFORM_KEY).unwrap();
    std::fs::write(
        secrets.path().join("tenants.toml"),
        format!(
            "[[tenants]]\nid = \"tenant-a\"\nkey_hashes = [\"{hash}\"]\naccount = \"{account}\"\n\
             rate_limit = {{ per_second = 10000, burst = 10000 }}\n"
        ),
    )
    .unwrap();
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(secrets.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    // Shorter than the image's (25 s grace, 5 s drain delay), for a quick test.
    let (grace_ms, drain_delay_ms) = (4000, 1000);
    let run = |res: &mut Resources| {
        let name = res.container();
        let (listen, admin) = (free_port(), free_port());
        docker_ok(&[
            "run",
            "--detach",
            "--name",
            &name,
            "--network",
            "host",
            "--read-only",
            "--volume",
            &format!("{}:/etc/credyt-proxy/secrets:ro", secrets.path().display()),
            "--volume",
            &format!("{volume}:/var/lib/credyt-proxy"),
            "--env",
            &format!("CREDYT_PROXY__CREDYT__BASE_URL={}", emulator.url()),
            "--env",
            &format!("CREDYT_PROXY__SERVER__LISTEN=127.0.0.1:{listen}"),
            "--env",
            &format!("CREDYT_PROXY__SERVER__ADMIN_LISTEN=127.0.0.1:{admin}"),
            "--env",
            &format!("CREDYT_PROXY__SERVER__SHUTDOWN_GRACE_MS={grace_ms}"),
            "--env",
            &format!("CREDYT_PROXY__SHUTDOWN__DRAIN_DELAY_MS={drain_delay_ms}"),
            &image.tag,
        ]);
        (
            name,
            format!("http://127.0.0.1:{listen}"),
            format!("http://127.0.0.1:{admin}"),
        )
    };

    let users = ["image-user-0", "image-user-1"];
    let mut customers = BTreeMap::new();
    for user in users {
        customers.insert(user, emu_customer(&http, &emulator, &account, user).await);
    }
    // Credyt refuses every charge for now.
    emu_faults(
        &http,
        &emulator,
        json!([{"path_prefix": "/customers/", "method": "POST", "rate_503": 1.0}]),
    )
    .await;

    let (first, tenant, admin) = run(&mut res);
    ready(&http, &admin, &first).await;
    let mut expected: BTreeMap<&str, u64> = BTreeMap::new();
    for round in 0..2 {
        for user in users {
            let events: Vec<Value> = (0..5)
                .map(|i| json!({"id": format!("{user}-{round}-{i}"), "event_type": "video_promoted", "occurred_at": ago(5)}))
                .collect();
            let r = http
                .post(format!("{tenant}/events"))
                .header("X-CREDYT-API-KEY", &key)
                .json(&json!({"customer_external_id": user, "events": events}))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 204, "{:?}", r.text().await);
            *expected.entry(user).or_default() += 5;
        }
    }
    // The forwarder tried, and Credyt refused.
    eventually(Duration::from_secs(10), "a refused charge", || async {
        let log = emu_requests(&http, &emulator, 1000).await;
        log["requests"]
            .as_array()?
            .iter()
            .any(|r| r["status"] == 503)
            .then_some(())
    })
    .await;

    let (took, code) = stop(&first);
    assert_eq!(code, 0, "the exit code after docker stop");
    assert!(
        took < Duration::from_millis(grace_ms) + Duration::from_secs(10),
        "docker stop took {took:?} (grace {grace_ms} ms, docker's timeout {STOP_TIMEOUT_SECS} s)"
    );
    let logs = docker(&["logs", &first]);
    let undelivered = String::from_utf8_lossy(&logs.stdout)
        .lines()
        .chain(String::from_utf8_lossy(&logs.stderr).lines())
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| {
            v["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("outbox closed"))
        })
        .find_map(|v| v["undelivered"].as_u64());
    assert!(
        undelivered.is_some_and(|n| n > 0),
        "the outbox closed with {undelivered:?} undelivered records"
    );
    let state = emu_state(&http, &emulator).await;
    assert_eq!(total_charges(&state), 0, "a charge got through the fault");
    eprintln!(
        "image: docker stop took {took:?} (grace {grace_ms} ms), {} undelivered at exit",
        undelivered.unwrap_or_default()
    );

    // Credyt is back; a new container on the same volume delivers what the first one kept.
    emu_clear_faults(&http, &emulator).await;
    let (second, _, admin) = run(&mut res);
    ready(&http, &admin, &second).await;
    eventually(Duration::from_secs(30), "the outbox to drain", || async {
        (metric(&http, &admin, "credyt_proxy_outbox_depth").await? == 0).then_some(())
    })
    .await;
    let state = emu_state(&http, &emulator).await;
    let price = Decimal::new(50, 2);
    for (user, n) in &expected {
        assert_eq!(
            usd_charges(&state, &customers[user]),
            (*n, price * Decimal::from(*n)),
            "charges of {user}"
        );
    }
    assert_eq!(
        total_charges(&state),
        expected.values().sum::<u64>(),
        "charges outside the acknowledged events"
    );

    let (_, code) = stop(&second);
    assert_eq!(
        code, 0,
        "the second container's exit code after docker stop"
    );
    drop(res);
    emulator.stop().await;
}
