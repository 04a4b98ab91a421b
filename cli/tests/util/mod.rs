//! Helpers of the CLI tests.
#![allow(dead_code)]

pub mod echo_server;
pub mod tunnel_pair;
