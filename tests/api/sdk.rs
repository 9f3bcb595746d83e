//! Runs scripts under `tests/sdk/` with the official Python SDK (`credyt-api==0.2.0`).
//!
//! Contract: `python()` returns the interpreter of a virtualenv at `target/sdk-venv` holding the
//! SDK (`venv.rs`: created on first use under a file lock so parallel tests and processes never
//! race); a machine without `python3` fails loudly (these tests are never skipped).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use super::venv;

/// The pinned SDK the tests speak through.
pub const SDK_REQUIREMENT: &str = "credyt-api==0.2.0";

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The venv's python, with the SDK installed (created once, under a lock).
pub fn python() -> PathBuf {
    venv::python("sdk-venv", SDK_REQUIREMENT)
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
