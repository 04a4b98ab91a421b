//! Which engine a runtime uses, and the settings it is started with.

use std::fmt;

use super::caps::Capabilities;

/// Which engine a runtime should use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Backend {
    /// io_uring when the kernel allows it, else epoll (the default).
    #[default]
    Auto,
    /// io_uring only; starting fails with a clear error where it is unavailable.
    Uring,
    /// The readiness-based epoll engine.
    Epoll,
}

impl Backend {
    /// The choice named by `RINGSOCK_BACKEND` (`uring`, `epoll`, `auto`), if set.
    ///
    /// An unknown value is an error rather than a silent default, so a typo in CI cannot
    /// quietly test the wrong engine.
    pub fn from_env() -> crate::Result<Option<Backend>> {
        match std::env::var("RINGSOCK_BACKEND") {
            Ok(value) => value
                .parse()
                .map(Some)
                .map_err(|err: crate::Error| err.in_variable("RINGSOCK_BACKEND")),
            Err(std::env::VarError::NotPresent) => Ok(None),
            Err(std::env::VarError::NotUnicode(_)) => Err(crate::Error::invalid_input(
                "RINGSOCK_BACKEND is not valid UTF-8",
            )),
        }
    }
}

impl std::str::FromStr for Backend {
    type Err = crate::Error;

    fn from_str(s: &str) -> crate::Result<Backend> {
        match s {
            "auto" => Ok(Backend::Auto),
            "uring" | "io_uring" | "io-uring" => Ok(Backend::Uring),
            "epoll" | "poll" => Ok(Backend::Epoll),
            other => Err(crate::Error::invalid_input(format!(
                "unknown backend {other:?}: expected uring, epoll or auto"
            ))),
        }
    }
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Backend::Auto => "auto",
            Backend::Uring => "uring",
            Backend::Epoll => "epoll",
        })
    }
}

/// The engine a runtime actually runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DriverKind {
    /// io_uring.
    Uring,
    /// epoll readiness.
    Epoll,
}

impl fmt::Display for DriverKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DriverKind::Uring => "io_uring",
            DriverKind::Epoll => "epoll",
        })
    }
}

/// Tunables of a driver.
#[derive(Debug, Clone, Copy)]
pub(crate) struct DriverConfig {
    /// Submission queue entries of the io_uring.
    pub(crate) ring_entries: u32,
    /// Capabilities the io_uring engine must not use even where the kernel has them.
    pub(crate) disabled: Capabilities,
    /// Another event loop waits for this driver (see `Driver::notify_fd`): the io_uring
    /// engine registers an eventfd and keeps only ring flags under which it is signalled.
    pub(crate) notify: bool,
}

impl Default for DriverConfig {
    fn default() -> Self {
        DriverConfig {
            ring_entries: 1024,
            disabled: Capabilities::none(),
            notify: false,
        }
    }
}
