//! Running a test inside tokio with a ringsock driver of each engine.

use std::future::Future;

use ringsock::runtime::Builder;
use ringsock::tokio::Driver;
use ringsock::Backend;

use super::{BACKENDS, TEST_LIMIT};

/// A current-thread tokio runtime with I/O and timers, as a tokio program has.
pub fn tokio_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime")
}

/// A driver of `backend` for the tokio runtime this runs in; `None`, said on stderr,
/// where io_uring cannot start and CI does not require it (`RINGSOCK_REQUIRE_URING`).
pub fn driver_or_skip(backend: Backend) -> Option<Driver> {
    match Driver::with_builder(Builder::new().backend(backend)) {
        Ok(driver) => Some(driver),
        Err(err)
            if backend == Backend::Uring
                && std::env::var_os("RINGSOCK_REQUIRE_URING").is_none() =>
        {
            eprintln!("skipped on io_uring: {err}");
            None
        }
        Err(err) => panic!("cannot start the {backend} driver inside tokio: {err}"),
    }
}

/// Runs `test` inside a fresh tokio runtime and a ringsock driver of each engine, with
/// the driver current; fails (not hangs) past TEST_LIMIT, measured by tokio's clock.
pub fn on_each_driver_in_tokio<F, Fut>(test: F)
where
    F: Fn(Backend) -> Fut,
    Fut: Future<Output = ()>,
{
    for backend in BACKENDS {
        tokio_runtime().block_on(async {
            let Some(mut driver) = driver_or_skip(backend) else {
                return;
            };
            let run = driver.run_until(test(backend));
            if tokio::time::timeout(TEST_LIMIT, run).await.is_err() {
                panic!("test did not finish within {TEST_LIMIT:?} on {backend} inside tokio");
            }
        });
    }
}

/// Runs `test` inside a fresh tokio runtime with a driver of each engine, handing it
/// the driver (for tests about where it is current).
pub fn with_each_driver_in_tokio<F, Fut>(test: F)
where
    F: Fn(Backend, Driver) -> Fut,
    Fut: Future<Output = ()>,
{
    for backend in BACKENDS {
        tokio_runtime().block_on(async {
            let Some(driver) = driver_or_skip(backend) else {
                return;
            };
            if tokio::time::timeout(TEST_LIMIT, test(backend, driver))
                .await
                .is_err()
            {
                panic!("test did not finish within {TEST_LIMIT:?} on {backend} inside tokio");
            }
        });
    }
}
