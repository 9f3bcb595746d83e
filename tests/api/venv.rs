//! Python virtualenvs under `target/` for the tests that drive Python tools: the official SDK
//! (`sdk.rs`) and kubernetes-validate (`kubernetes.rs`).
//!
//! Contract: `python(name, requirement)` returns the interpreter of the virtualenv
//! `target/<name>` with `requirement` (a pinned pip requirement) installed, creating it on first
//! use under a file lock so parallel tests and processes never race; a virtualenv made for
//! another requirement is made again. A machine without `python3` fails loudly (these tests are
//! never skipped).

use std::fs::File;
use std::path::PathBuf;
use std::process::Command;

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

/// The python of `target/<name>`, with `requirement` installed (created once, under a lock).
pub fn python(name: &str, requirement: &str) -> PathBuf {
    let target = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target");
    let venv = target.join(name);
    let python = venv.join("bin").join("python");
    // Written last, naming what was installed: present with this requirement means complete.
    let marker = venv.join(".installed");
    let installed = || std::fs::read_to_string(&marker).is_ok_and(|r| r == requirement);
    if installed() {
        return python;
    }
    std::fs::create_dir_all(&target).unwrap();
    let lock_path = target.join(format!("{name}.lock"));
    let lock = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .unwrap();
    lock.lock()
        .unwrap_or_else(|e| panic!("locking {}: {e}", lock_path.display()));
    if !installed() {
        let status = Command::new("python3").arg("--version").output();
        assert!(
            status.as_ref().is_ok_and(|o| o.status.success()),
            "python3 is required for target/{name} (install python3 with the venv module): {status:?}"
        );
        if venv.exists() {
            std::fs::remove_dir_all(&venv).unwrap();
        }
        run_checked(
            Command::new("python3").args(["-m", "venv"]).arg(&venv),
            &format!("creating target/{name}"),
        );
        run_checked(
            Command::new(&python)
                .args([
                    "-m",
                    "pip",
                    "install",
                    "--quiet",
                    "--disable-pip-version-check",
                ])
                // Several requirements: separated by spaces.
                .args(requirement.split_whitespace()),
            &format!("installing {requirement} into target/{name}"),
        );
        std::fs::write(&marker, requirement).unwrap();
    }
    lock.unlock().unwrap();
    python
}
