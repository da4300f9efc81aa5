//! The one integration-test binary: every test here runs the real `ekid` executable.

mod abuse_connections;
mod daemon;
mod durability;
mod eval_cli;
mod hardening;
mod replay;
mod util;
