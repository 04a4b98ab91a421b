//! StreamSocketListener when descriptors run out and when connections flood in: the
//! back-off after TooManyOpenFiles, and the bound on connections taken before the
//! program asks. Each scenario runs alone in a child process (see `util::child`), on
//! every accept path: io_uring with multishot accept, io_uring with one ACCEPT per
//! connection, and epoll.

mod util;

use std::pin::pin;

use ringsock::{SocketErrorStatus, StreamSocketListener};
use util::child::{self, ACCEPT_PATHS};

#[test]
fn accept_reports_too_many_open_files_backs_off_and_recovers() {
    for path in ACCEPT_PATHS {
        child::run_alone("emfile_child", path);
    }
}

#[test]
#[ignore = "run in a child process by accept_reports_too_many_open_files_backs_off_and_recovers"]
fn emfile_child() {
    let Some(path) = child::path() else { return };
    let (builder, backend) = child::runtime_for(&path);
    util::on_runtime_of(builder, backend, &|_| async {
        let listener = util::loopback_listener();
        let addr = listener.local_addr().unwrap();

        // Every free descriptor taken but one, which the client socket takes.
        let (soft, _) = util::nofile_limit();
        let hogs = util::hog_descriptors(1);
        let client = util::connect(addr).await;

        // The connection waits in the backlog; taking it needs a descriptor.
        let err = util::must("accept", listener.accept())
            .await
            .expect_err("no descriptor is free");
        assert_eq!(err.status(), SocketErrorStatus::TooManyOpenFiles, "{err}");
        assert_eq!(err.raw_os_error(), Some(libc::EMFILE));
        let stats = listener.accept_stats();
        assert_eq!(stats.exhausted, 1);
        assert_eq!(stats.backoff, StreamSocketListener::ACCEPT_BACKOFF_FIRST);

        // The next accept does not try again at once: it waits out the back-off (a loop
        // that logs and retries cannot spin), then fails the same way, waiting longer.
        {
            let mut next = pin!(listener.accept());
            assert!(util::poll_once(next.as_mut()).await.is_pending());
            let err = util::must("accept", next).await.expect_err("still none");
            assert_eq!(err.status(), SocketErrorStatus::TooManyOpenFiles, "{err}");
        }
        let stats = listener.accept_stats();
        assert_eq!(stats.exhausted, 2);
        assert_eq!(
            stats.backoff,
            2 * StreamSocketListener::ACCEPT_BACKOFF_FIRST
        );

        // Descriptors free up: the waiting connection is accepted and works.
        drop(hogs);
        let server = util::must("accept", listener.accept())
            .await
            .expect("accept after descriptors were freed");
        assert_eq!(server.peer_addr().unwrap(), client.local_addr().unwrap());
        assert_eq!(listener.accept_stats().backoff, std::time::Duration::ZERO);
        ringsock::spawn(util::echo(server));
        util::round_trip(&client, b"still serving").await;
        // And new connections too.
        let (next, _) = util::connected_pair(&listener).await;
        drop(next);

        // Out of descriptors again while no accept waits: a multishot armed in the
        // background meets EMFILE and holds it. Once descriptors are back, the next
        // accept takes the connection, not that stale error (and its back-off).
        let hogs = util::hog_descriptors(1);
        let late = util::connect(addr).await;
        util::must("the background accept to meet the shortage", async {
            while listener.accept_stats().background {
                ringsock::runtime::sleep(std::time::Duration::from_millis(1)).await;
            }
        })
        .await;
        // What the background accept holds is an error, not an open descriptor.
        assert_eq!(listener.accept_stats().pending, 0);
        drop(hogs);
        let server = util::must("accept", listener.accept())
            .await
            .expect("accept once descriptors are back");
        assert_eq!(server.peer_addr().unwrap(), late.local_addr().unwrap());
        util::set_nofile_soft(soft);
        println!("{}", child::passed("emfile_child", &path));
    });
}

/// Connections the kernel may hand a multishot accept after it reached its bound and
/// before the pause lands. With the program's loop running, that is what arrived since
/// its last turn: here the clients connect one by one on the same loop.
const SLACK: usize = 4;

/// Connections of the flood, more than a listener holds.
const FLOOD: usize = 300;

#[test]
fn a_listener_holds_at_most_max_pending_connections_nobody_took() {
    for path in ACCEPT_PATHS {
        child::run_alone("max_pending_child", path);
    }
}

#[test]
#[ignore = "run in a child process by a_listener_holds_at_most_max_pending_connections_nobody_took"]
fn max_pending_child() {
    let Some(path) = child::path() else { return };
    let (builder, backend) = child::runtime_for(&path);
    util::on_runtime_of(builder, backend, &|_| async {
        // The clients and what the listener holds, with room to spare.
        util::raise_nofile(2048);
        let listener = util::loopback_listener();
        let addr = listener.local_addr().unwrap();
        let max = StreamSocketListener::DEFAULT_MAX_PENDING;
        assert_eq!(listener.max_pending(), max);
        // Only the multishot accept takes connections before the program asks.
        let background = path == "uring";
        let kept_in_background = |n: usize| if background { n } else { 0 };

        // The first accept starts the background accept.
        let (_first_client, _first_server) = util::connected_pair(&listener).await;
        let mut clients = Vec::new();
        let baseline = child::open_descriptors();
        // Descriptors the listener holds: all the process has beyond the baseline and
        // the clients (accepted sockets are dropped as soon as they are taken).
        let held = |clients: usize| child::open_descriptors() - baseline - clients;

        // 1. max_pending connections while the program does not accept: taken in the
        // background, and then it pauses.
        for _ in 0..max {
            clients.push(util::connect(addr).await);
        }
        let expected = kept_in_background(max);
        util::must("the background accept to take them and pause", async {
            while listener.accept_stats().pending < expected || listener.accept_stats().background {
                util::yield_now().await;
            }
        })
        .await;
        assert_eq!(listener.accept_stats().pending, expected);
        assert_eq!(held(clients.len()), expected);

        // 2. Taken down to half, it resumes.
        for _ in 0..max / 2 {
            drop(
                util::must("accept", listener.accept())
                    .await
                    .expect("accept"),
            );
        }
        assert_eq!(listener.accept_stats().background, background);

        // 3. A flood while the program does not accept: at most max_pending held (plus
        // the slack), the rest waits in the kernel's backlog.
        for _ in 0..FLOOD {
            clients.push(util::connect(addr).await);
        }
        util::must("the background accept to pause", async {
            while listener.accept_stats().background {
                util::yield_now().await;
            }
        })
        .await;
        let pending = listener.accept_stats().pending;
        assert_eq!(held(clients.len()), pending);
        assert!(
            (kept_in_background(max)..=kept_in_background(max + SLACK)).contains(&pending),
            "{pending} connections held, max_pending {max}"
        );

        // 4. The program takes them all; the bound holds throughout.
        for taken in 0..(max - max / 2 + FLOOD) {
            drop(
                util::must("accept", listener.accept())
                    .await
                    .expect("accept"),
            );
            let stats = listener.accept_stats();
            let now_held = held(clients.len());
            assert!(
                now_held <= kept_in_background(max + SLACK),
                "{now_held} held after taking {taken}"
            );
            if !stats.background {
                assert_eq!(now_held, stats.pending, "after taking {taken}");
            }
        }
        assert_eq!(listener.accept_stats().pending, 0);
        assert_eq!(held(clients.len()), 0);

        // 5. It still serves, and takes new connections in the background again.
        let (client, server) = util::connected_pair(&listener).await;
        ringsock::spawn(util::echo(server));
        util::round_trip(&client, b"after the flood").await;
        assert_eq!(listener.accept_stats().background, background);
        println!("{}", child::passed("max_pending_child", &path));
    });
}

#[test]
fn max_pending_is_at_least_one() {
    util::on_each_backend(|_| async {
        let listener = util::loopback_listener();
        let err = listener.set_max_pending(0).expect_err("0 is refused");
        assert_eq!(err.status(), SocketErrorStatus::InvalidArgument, "{err}");
        assert_eq!(
            listener.max_pending(),
            StreamSocketListener::DEFAULT_MAX_PENDING
        );
        listener.set_max_pending(1).expect("1 is fine");
        assert_eq!(listener.max_pending(), 1);
        // One at a time still serves connection after connection.
        for i in 0..3 {
            let (client, server) = util::connected_pair(&listener).await;
            ringsock::spawn(util::echo(server));
            util::round_trip(&client, format!("connection {i}").as_bytes()).await;
        }
    });
}
