//! TLS misused (both engines): a TLS socket (and a plain socket's output stream) used
//! where its runtime does not run fails with `WrongRuntime` before it changes anything,
//! never panics or hangs, and goes on working on its own runtime; TLS does not start
//! under a waiting plain read.

mod tls_certs;
mod util;

use std::future::Future;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use ringsock::runtime::{timeout, Builder, Runtime};
use ringsock::tls::{ProtectionLevel, TlsAcceptor};
use ringsock::{HostName, SocketErrorStatus, StreamSocket, StreamSocketListener};
use tls_certs::Ca;

const OPS: [&str; 6] = [
    "write_all",
    "read",
    "input read",
    "output write and flush",
    "shutdown_write",
    "upgrade_to_tls",
];

fn localhost() -> HostName {
    HostName::new("localhost").unwrap()
}

/// A connected pair on the running runtime: the client and the server's end, over TLS
/// when `ca` is given.
async fn pair(ca: Option<&Ca>) -> (StreamSocket, StreamSocket) {
    let listener =
        StreamSocketListener::bind_host(&HostName::new("127.0.0.1").unwrap(), "0").unwrap();
    let port = listener.local_addr().unwrap().port().to_string();
    let acceptor = ca.map(|ca| TlsAcceptor::new(ca.server()).unwrap());
    let server = ringsock::spawn(async move {
        let socket = listener.accept().await.unwrap();
        if let Some(acceptor) = acceptor {
            socket.accept_tls(&acceptor).await.unwrap();
        }
        socket
    });
    let client = StreamSocket::new();
    match ca {
        Some(ca) => {
            client.control().set_trusted_roots(ca.roots()).unwrap();
            client
                .connect_with(&localhost(), &port, ProtectionLevel::Tls13)
                .await
                .unwrap();
        }
        None => client.connect(&localhost(), &port).await.unwrap(),
    }
    (client, server.await)
}

/// One use of `client` by name.
async fn misuse(client: &StreamSocket, op: &str) -> ringsock::Result<()> {
    match op {
        "write_all" => client.write_all(b"lost?".to_vec()).await.0.map(drop),
        "read" => client.read(Vec::with_capacity(8)).await.0.map(drop),
        "input read" => client.input_stream().read(8).await.map(drop),
        "shutdown_write" => client.shutdown_write().await,
        "upgrade_to_tls" => {
            client
                .upgrade_to_tls(ProtectionLevel::Tls13, &localhost())
                .await
        }
        _ => {
            let output = client.output_stream();
            output.write(b"lost?".to_vec()).await?;
            output.flush().await
        }
    }
}

/// Polls `future` outside any runtime until it is ready (a few polls at most).
fn poll_outside<F: Future>(future: F) -> F::Output {
    let mut future = std::pin::pin!(future);
    let mut cx = Context::from_waker(Waker::noop());
    for _ in 0..100 {
        if let Poll::Ready(output) = future.as_mut().poll(&mut cx) {
            return output;
        }
    }
    panic!("still pending after 100 polls outside any runtime");
}

fn runtime(backend: ringsock::Backend) -> Option<Runtime> {
    util::build_or_skip(Builder::new().backend(backend), backend)
}

/// `op` on `client` inside a runtime of its own (`backend`): `WrongRuntime`, at once.
fn misuse_on_another_runtime(
    backend: ringsock::Backend,
    client: &StreamSocket,
    op: &str,
    what: &str,
) {
    let other = Builder::new().backend(backend).build().unwrap();
    let said = other.block_on(async {
        timeout(Duration::from_secs(10), misuse(client, op))
            .await
            .unwrap_or_else(|_| panic!("{what}: hung"))
    });
    assert_wrong_runtime(said, what);
}

fn assert_wrong_runtime(said: ringsock::Result<()>, what: &str) {
    match said {
        Err(err) => assert_eq!(
            err.status(),
            SocketErrorStatus::WrongRuntime,
            "{what}: {err}"
        ),
        Ok(()) => panic!("{what}: succeeded"),
    }
}

/// Inside another runtime's `block_on`, with the socket's own runtime alive or dropped,
/// and outside any runtime once it was dropped: `WrongRuntime` at once, TLS or not.
#[test]
fn a_socket_used_where_its_runtime_does_not_run_is_wrong_runtime() {
    for backend in util::BACKENDS {
        for tls in [true, false] {
            for own_alive in [true, false] {
                for op in OPS {
                    let Some(home) = runtime(backend) else { return };
                    let ca = Ca::new("elsewhere");
                    let (client, server) = home.block_on(pair(tls.then_some(&ca)));
                    let what = format!("{backend:?} tls {tls} own alive {own_alive}: {op}");
                    let mut home = Some(home);
                    if !own_alive {
                        drop(server);
                        drop(home.take());
                        assert_wrong_runtime(poll_outside(misuse(&client, op)), &what);
                    }
                    misuse_on_another_runtime(backend, &client, op, &what);
                    drop(client);
                }
            }
        }
    }
}

/// A call made from another runtime leaves the connection whole at home: nothing it
/// was given is sent, and both ways still carry what they are given there.
#[test]
fn a_socket_misused_from_another_runtime_still_works_at_home() {
    for backend in util::BACKENDS {
        for tls in [true, false] {
            for op in [
                "write_all",
                "read",
                "output write and flush",
                "upgrade_to_tls",
            ] {
                let Some(home) = runtime(backend) else { return };
                let ca = Ca::new("home");
                let (client, server) = home.block_on(pair(tls.then_some(&ca)));
                let what = format!("{backend:?} tls {tls}: {op}");
                misuse_on_another_runtime(backend, &client, op, &what);
                home.block_on(async {
                    let output = client.output_stream();
                    output.write(b"home ".to_vec()).await.unwrap();
                    output.flush().await.expect(&what);
                    client.write_all(b"again\n".to_vec()).await.0.expect(&what);
                    let line = server.input_stream().read_line().await.expect(&what);
                    assert_eq!(line.as_deref(), Some("home again"), "{what}");
                    server.write_all(b"back\n".to_vec()).await.0.expect(&what);
                    let line = client.input_stream().read_line().await.expect(&what);
                    assert_eq!(line.as_deref(), Some("back"), "{what}");
                });
            }
        }
    }
}

/// A TLS read given up on leaves its receive in flight; read again from another
/// runtime (its own alive or dropped) or outside any, the socket says `WrongRuntime`
/// rather than awaiting that receive where it cannot run.
#[test]
fn a_tls_read_given_up_on_and_read_elsewhere_is_wrong_runtime() {
    for backend in util::BACKENDS {
        for own_alive in [true, false] {
            let Some(home) = runtime(backend) else { return };
            let ca = Ca::new("inflight");
            let (client, server) = home.block_on(async {
                let (client, server) = pair(Some(&ca)).await;
                let read = timeout(Duration::from_millis(5), client.read(Vec::with_capacity(8)));
                assert!(read.await.is_err(), "nothing was sent");
                (client, server)
            });
            let what = format!("{backend:?} own alive {own_alive}");
            let mut home = Some(home);
            if !own_alive {
                drop(server);
                drop(home.take());
                assert_wrong_runtime(poll_outside(misuse(&client, "read")), &what);
            }
            misuse_on_another_runtime(backend, &client, "read", &what);
        }
    }
}

/// TLS started while a plain read waits on the socket would feed the handshake's bytes
/// to that read: the start is refused (`ResourceBusy`, nothing sent), and once the read
/// is dropped the upgrade goes through and carries data both ways.
#[test]
fn tls_does_not_start_under_a_waiting_plain_read() {
    util::on_each_backend(|backend| async move {
        let ca = Ca::new("busy");
        let listener =
            StreamSocketListener::bind_host(&HostName::new("127.0.0.1").unwrap(), "0").unwrap();
        let port = listener.local_addr().unwrap().port().to_string();
        let acceptor = TlsAcceptor::new(ca.server()).unwrap();
        let server = ringsock::spawn(async move {
            let socket = listener.accept().await.unwrap();
            socket.accept_tls(&acceptor).await.unwrap();
            socket.write_all(b"secret\n".to_vec()).await.0.unwrap();
            socket
        });
        let client = StreamSocket::new();
        client.control().set_trusted_roots(ca.roots()).unwrap();
        client.connect(&localhost(), &port).await.unwrap();
        let mut read = Box::pin(client.read(Vec::with_capacity(64)));
        std::future::poll_fn(|cx| {
            assert!(
                read.as_mut().poll(cx).is_pending(),
                "{backend}: nothing was sent"
            );
            Poll::Ready(())
        })
        .await;
        let refused = client
            .upgrade_to_tls(ProtectionLevel::Tls13, &localhost())
            .await
            .expect_err("TLS under a waiting read");
        assert_eq!(
            refused.status(),
            SocketErrorStatus::ResourceBusy,
            "{backend}: {refused}"
        );
        drop(read);
        client
            .upgrade_to_tls(ProtectionLevel::Tls13, &localhost())
            .await
            .expect("TLS once the read is gone");
        let line = client.input_stream().read_line().await.unwrap();
        assert_eq!(line.as_deref(), Some("secret"), "{backend}");
        drop(server.await);
    });
}
