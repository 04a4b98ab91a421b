//! Runtime: the life of tasks and the resources they hold.

mod util;

use std::io::Read;
use std::time::Duration;

use ringsock::runtime::{sleep, Builder};

#[test]
fn dropping_a_runtime_drops_its_pending_tasks_and_closes_their_sockets() {
    util::on_each_backend(|backend| async move {
        let listener = util::std_listener();
        // A runtime of its own, dropped while its tasks still wait: one on a read in the
        // driver, one on a timer.
        let runtime = Builder::new().backend(backend).build().unwrap();
        let peers = runtime.block_on(async {
            let (reader, reader_peer) = util::pair_with_std_peer(&listener).await;
            let (sleeper, sleeper_peer) = util::pair_with_std_peer(&listener).await;
            ringsock::spawn(async move {
                let _ = reader.read(Vec::with_capacity(8)).await;
                panic!("nothing is ever sent to this socket");
            });
            ringsock::spawn(async move {
                sleep(Duration::from_secs(3600)).await;
                drop(sleeper);
            });
            util::yield_now().await;
            [reader_peer, sleeper_peer]
        });
        drop(runtime);

        // Their futures were dropped with the runtime, closing their sockets: each peer
        // reads end of stream (the read gives up after MUST_HAPPEN instead of hanging).
        for (i, mut peer) in peers.into_iter().enumerate() {
            peer.set_read_timeout(Some(util::MUST_HAPPEN)).unwrap();
            let mut buf = [0u8; 8];
            // A thread with io_uring work may see EINTR in a blocking call: retry those.
            let read = (0..100)
                .map(|_| peer.read(&mut buf))
                .find(|r| !matches!(r, Err(e) if e.kind() == std::io::ErrorKind::Interrupted));
            match read {
                Some(Ok(n)) => assert_eq!(n, 0, "task {i}"),
                Some(Err(err)) => panic!("task {i}: its socket was not closed: {err}"),
                None => panic!("task {i}: every read was interrupted"),
            }
        }
    });
}
