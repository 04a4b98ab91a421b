//! Helpers of the CLI tests.
#![allow(dead_code)]

use std::time::Duration;

pub mod echo_server;
pub mod tunnel_pair;

/// How long a wait for something that must happen may take before the test fails
/// (instead of hanging). Never used to make something happen.
pub const MUST_HAPPEN: Duration = Duration::from_secs(20);
