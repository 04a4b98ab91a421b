//! Name lookups off the loop: one process-wide pool of at most [`RESOLVER_THREADS`]
//! threads runs `getaddrinfo`, at most [`RESOLVER_QUEUE`] lookups wait for it, and each
//! lookup is given up after the runtime's resolve timeout.

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use super::{resolve_blocking, HostName, HostNameKind};
use crate::runtime::blocking::{Limits, Panicked, Pool, Refused};
use crate::runtime::{self, timeout_lenient};
use crate::{Error, Result, SocketErrorStatus};

/// The most resolver threads alive at once, in the whole process. They start as lookups
/// arrive and end after ten seconds without one.
pub const RESOLVER_THREADS: usize = 4;

/// The most lookups waiting for a resolver thread, in the whole process. One more fails
/// at once with [`SocketErrorStatus::ResolverQueueFull`].
pub const RESOLVER_QUEUE: usize = 256;

/// How long a lookup may take, queueing included, unless the runtime was built with
/// another [`runtime::Builder::resolve_timeout`].
pub const DEFAULT_RESOLVE_TIMEOUT: Duration = Duration::from_secs(5);

/// How long an idle resolver thread waits for another lookup before it ends.
const RESOLVER_IDLE: Duration = Duration::from_secs(10);

/// The resolver threads' name, as `/proc/self/task/*/comm` shows it (15 bytes at most).
const RESOLVER_THREAD_NAME: &str = "ringsock-resolv";

/// The resolver's counters at one moment (see [`resolver_stats`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct ResolverStats {
    /// Resolver threads alive now.
    pub threads: usize,
    /// The most resolver threads alive at once since the process started; never more
    /// than [`RESOLVER_THREADS`].
    pub peak_threads: usize,
    /// Lookups waiting for a thread now.
    pub queued: usize,
    /// Lookups running on a thread now, abandoned ones included (see [`resolve`]).
    pub running: usize,
}

/// Resolves `host` to socket addresses with `port`, without blocking the loop.
///
/// IP literals are converted at once, as by [`resolve_blocking`]. Names go to
/// `getaddrinfo` on one of at most [`RESOLVER_THREADS`] resolver threads shared by the
/// whole process. Every failure is an [`Error::Resolve`] naming the host (except that a
/// thread that cannot be started is an [`Error::Io`]), and its status says which:
///
/// - [`SocketErrorStatus::ResolverQueueFull`] at once when [`RESOLVER_QUEUE`] lookups
///   are already waiting: try again later.
/// - [`SocketErrorStatus::ConnectionTimedOut`] when no answer came within the
///   runtime's resolve timeout ([`DEFAULT_RESOLVE_TIMEOUT`] unless set with
///   [`runtime::Builder::resolve_timeout`]), time spent waiting in the queue included.
/// - the resolver's own statuses (`HostNotFound`, ...) as for [`resolve_blocking`].
///
/// Dropping the future abandons the lookup: one still waiting leaves the queue, but
/// `getaddrinfo` cannot be interrupted, so one already running keeps its thread until
/// the call returns, and its answer is then discarded. A resolver that hangs can thus
/// occupy every thread; later lookups wait in the queue and time out.
///
/// Fails when no ringsock runtime runs on this thread: the timeout needs its timers.
pub async fn resolve(host: &HostName, port: u16) -> Result<Vec<SocketAddr>> {
    if host.kind() != HostNameKind::DomainName {
        return resolve_blocking(host, port);
    }
    let limit = runtime::resolve_timeout()
        .map_err(|err| Error::io(format!("resolve {:?}", host.raw_name()), err))?;
    let owned = host.clone();
    lookup(resolver(), host.raw_name(), limit, move || {
        resolve_blocking(&owned, port)
    })
    .await
}

/// The resolver's counters now: how many threads it runs and how many lookups wait.
pub fn resolver_stats() -> ResolverStats {
    let stats = resolver().stats();
    ResolverStats {
        threads: stats.threads,
        peak_threads: stats.peak_threads,
        queued: stats.queued,
        running: stats.running,
    }
}

/// The process-wide resolver pool, made on first use.
fn resolver() -> &'static Arc<Pool> {
    static RESOLVER: OnceLock<Arc<Pool>> = OnceLock::new();
    RESOLVER.get_or_init(|| {
        Arc::new(Pool::new(
            RESOLVER_THREAD_NAME,
            Limits {
                threads: RESOLVER_THREADS,
                queue: RESOLVER_QUEUE,
                idle: RESOLVER_IDLE,
            },
        ))
    })
}

/// Runs `work`, the lookup of `host`, on `pool` for at most `limit`. Separate from
/// [`resolve`] so tests can give a small pool and a lookup of their own.
async fn lookup<W>(
    pool: &Arc<Pool>,
    host: &str,
    limit: Duration,
    work: W,
) -> Result<Vec<SocketAddr>>
where
    W: FnOnce() -> Result<Vec<SocketAddr>> + Send + 'static,
{
    let failed = |status, message: String| Error::Resolve {
        host: host.to_owned(),
        status,
        message,
    };
    let task = match pool.submit(work) {
        Ok(task) => task,
        Err(Refused::QueueFull { capacity }) => {
            return Err(failed(
                SocketErrorStatus::ResolverQueueFull,
                format!(
                    "the resolver is busy: {capacity} lookups are already waiting for its {} \
                     threads; try again later",
                    pool.limits().threads
                ),
            ))
        }
        Err(Refused::Spawn(err)) => {
            return Err(Error::io(
                format!("resolve {host:?}: start a resolver thread"),
                err,
            ))
        }
    };
    // On time-out the task is dropped, which abandons the lookup.
    match timeout_lenient(limit, task).await {
        Ok(Ok(result)) => result,
        Ok(Err(Panicked)) => Err(failed(
            SocketErrorStatus::Unknown,
            "the lookup panicked".to_owned(),
        )),
        Err(_) => Err(failed(
            SocketErrorStatus::ConnectionTimedOut,
            format!("timed out: no answer within {limit:?}"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::future::{poll_fn, Future};
    use std::pin::Pin;
    use std::task::Poll;

    use crate::runtime::blocking::tests::{gated, Gate, MUST_HAPPEN};
    use crate::runtime::on_each_backend;

    fn small_pool(threads: usize, queue: usize) -> Arc<Pool> {
        Arc::new(Pool::new(
            "ringsock-test",
            Limits {
                threads,
                queue,
                idle: Duration::from_secs(10),
            },
        ))
    }

    fn one_address() -> Result<Vec<SocketAddr>> {
        Ok(vec![SocketAddr::from(([127, 0, 0, 1], 80))])
    }

    /// A lookup polled once, so queued or running, and still pending.
    async fn submitted<'a, W>(
        pool: &'a Arc<Pool>,
        host: &'a str,
        limit: Duration,
        work: W,
    ) -> Pin<Box<impl Future<Output = Result<Vec<SocketAddr>>> + 'a>>
    where
        W: FnOnce() -> Result<Vec<SocketAddr>> + Send + 'static,
    {
        let mut future = Box::pin(lookup(pool, host, limit, work));
        let polled = poll_fn(|cx| Poll::Ready(future.as_mut().poll(cx).is_pending())).await;
        assert!(polled, "the lookup of {host} ended at once");
        future
    }

    /// A lookup of `host` that runs on `pool` until its gate opens.
    async fn running<'a>(
        pool: &'a Arc<Pool>,
        host: &'a str,
        limit: Duration,
    ) -> (
        Gate,
        Pin<Box<impl Future<Output = Result<Vec<SocketAddr>>> + 'a>>,
    ) {
        let (gate, work) = gated(one_address);
        let lookup = submitted(pool, host, limit, work).await;
        gate.wait_started();
        (gate, lookup)
    }

    #[test]
    fn a_slow_lookup_times_out_naming_the_host() {
        on_each_backend(|| async {
            let pool = small_pool(1, 4);
            // Running before the deadline can pass, so what times out is a running
            // lookup (blocking the loop meanwhile only delays the timer).
            let limit = Duration::from_millis(20);
            let (slow, slow_lookup) = running(&pool, "slow.example", limit).await;
            let err = slow_lookup.await.expect_err("the lookup never answers");
            assert_eq!(err.status(), SocketErrorStatus::ConnectionTimedOut, "{err}");
            assert!(
                matches!(&err, Error::Resolve { host, .. } if host == "slow.example"),
                "{err:?}"
            );
            assert_eq!(
                err.to_string(),
                "cannot resolve \"slow.example\": timed out: no answer within 20ms"
            );
            // The abandoned lookup holds its thread until it returns; then the thread
            // serves the next lookup.
            slow.open();
            let next = lookup(&pool, "next.example", MUST_HAPPEN, one_address).await;
            assert_eq!(next.unwrap().len(), 1);
        });
    }

    #[test]
    fn a_full_queue_fails_at_once_with_resolver_queue_full() {
        on_each_backend(|| async {
            let pool = small_pool(1, 1);
            let (gate, first) = running(&pool, "first.example", MUST_HAPPEN).await;
            let second = submitted(&pool, "second.example", MUST_HAPPEN, one_address).await;

            let err = lookup(&pool, "third.example", MUST_HAPPEN, one_address)
                .await
                .expect_err("the queue is full");
            assert_eq!(err.status(), SocketErrorStatus::ResolverQueueFull, "{err}");
            assert!(
                matches!(&err, Error::Resolve { host, .. } if host == "third.example"),
                "{err:?}"
            );
            let text = err.to_string();
            assert!(
                text.contains("the resolver is busy: 1 lookups are already waiting"),
                "{text}"
            );

            gate.open();
            assert_eq!(first.await.unwrap().len(), 1);
            assert_eq!(second.await.unwrap().len(), 1);
        });
    }

    #[test]
    fn a_dropped_lookup_is_abandoned() {
        on_each_backend(|| async {
            let pool = small_pool(1, 4);
            let (gate, first) = running(&pool, "running.example", MUST_HAPPEN).await;
            let (queued, work) = gated(one_address);
            let second = submitted(&pool, "queued.example", MUST_HAPPEN, work).await;
            assert_eq!(pool.stats().queued, 1);

            // Not started: it leaves the queue, and its lookup is dropped unrun.
            drop(second);
            assert_eq!(pool.stats().queued, 0);
            assert!(queued.dropped_unrun());
            // Running: getaddrinfo cannot be stopped; its answer is dropped when it
            // returns, and the thread is free again.
            drop(first);
            gate.open();
            assert!(pool.wait_until(MUST_HAPPEN, |s| s.running == 0 && s.queued == 0));
            let next = lookup(&pool, "next.example", MUST_HAPPEN, one_address).await;
            assert_eq!(next.unwrap().len(), 1);
            assert_eq!(pool.stats().peak_threads, 1);
        });
    }

    #[test]
    fn literals_need_no_thread_and_names_need_a_runtime() {
        let host = HostName::new("127.0.0.1").unwrap();
        let addrs = crate::block_on(resolve(&host, 80)).unwrap();
        assert_eq!(addrs, [SocketAddr::from(([127, 0, 0, 1], 80))]);

        // Polled outside any runtime: refused, rather than hung or timed out at once.
        let host = HostName::new("localhost").unwrap();
        let mut future = std::pin::pin!(resolve(&host, 80));
        let poll = future
            .as_mut()
            .poll(&mut std::task::Context::from_waker(std::task::Waker::noop()));
        match poll {
            Poll::Ready(Err(err)) => {
                assert!(err.to_string().contains("no ringsock runtime"), "{err}")
            }
            other => panic!("expected an error, got {other:?}"),
        }
    }
}
