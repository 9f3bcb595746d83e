//! Runs scripts under `tests/sdk/` with the official Python SDK (`credyt-api==0.2.0`).
//!
//! Contract: `python()` returns the interpreter of a virtualenv at `target/sdk-venv` holding the
//! SDK, creating it on first use under a file lock so parallel tests and processes never race;
//! a machine without `python3` fails loudly (these tests are never skipped).

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The pinned SDK the tests speak through.
pub const SDK_REQUIREMENT: &str = "credyt-api==0.2.0";

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn run_checked(cmd: &mut Command, what: &str) {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("{what}: cannot run {cmd:?}: {e} (is python3 installed?)"));
    assert!(
        out.status.success(),
        "{what} failed ({}):\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The venv's python, with the SDK installed (created once, under a lock).
pub fn python() -> PathBuf {
    let target = root().join("target");
    let venv = target.join("sdk-venv");
    let python = venv.join("bin").join("python");
    // Written last, so its presence means a complete install.
    let marker = venv.join(".credyt-api-0.2.0-installed");
    if marker.exists() {
        return python;
    }
    std::fs::create_dir_all(&target).unwrap();
    let lock = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(target.join("sdk-venv.lock"))
        .unwrap();
    lock.lock().expect("locking target/sdk-venv.lock");
    if !marker.exists() {
        let status = Command::new("python3").arg("--version").output();
        assert!(
            status.as_ref().is_ok_and(|o| o.status.success()),
            "python3 is required for the SDK tests (install python3 with the venv module): {status:?}"
        );
        if venv.exists() {
            std::fs::remove_dir_all(&venv).unwrap();
        }
        run_checked(
            Command::new("python3").args(["-m", "venv"]).arg(&venv),
            "creating target/sdk-venv",
        );
        run_checked(
            Command::new(&python).args([
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
                SDK_REQUIREMENT,
            ]),
            "installing credyt-api into target/sdk-venv",
        );
        std::fs::write(&marker, SDK_REQUIREMENT).unwrap();
    }
    lock.unlock().unwrap();
    python
}

/// Runs `tests/sdk/<script>` with the venv's python and the given environment.
pub fn run_script(script: &str, env: &[(&str, &str)]) -> Output {
    let path: PathBuf = root().join("tests").join("sdk").join(script);
    assert!(
        Path::new(&path).exists(),
        "no such SDK script: {}",
        path.display()
    );
    let mut cmd = Command::new(python());
    cmd.arg(&path).env("PYTHONUNBUFFERED", "1");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output()
        .unwrap_or_else(|e| panic!("running {}: {e}", path.display()))
}
