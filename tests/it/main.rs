//! The one integration-test binary: every test here runs the real `ekid` executable.

mod abuse_bodies;
mod abuse_connections;
mod abuse_storage;
mod calibration;
mod cluster;
mod cluster_util;
mod daemon;
mod durability;
mod eval_cli;
mod hardening;
mod page;
mod replay;
mod util;
