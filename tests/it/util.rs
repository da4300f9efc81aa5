//! Helpers to run the real binary.

use std::path::PathBuf;
use std::process::{Command, Output};

pub fn ekid() -> Command {
    Command::new(env!("CARGO_BIN_EXE_ekid"))
}

pub fn dataset(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("datasets")
        .join(name)
}

/// Runs `ekid ARGS`, asserting success, and returns stdout.
pub fn run_ok(args: &[&str]) -> String {
    let out = ekid().args(args).output().expect("spawn ekid");
    assert_success(&out, args);
    String::from_utf8(out.stdout).expect("utf-8 stdout")
}

pub fn assert_success(out: &Output, args: &[&str]) {
    assert!(
        out.status.success(),
        "ekid {args:?} failed: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}
