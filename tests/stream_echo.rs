//! A line echoed through a listener and a stream socket, on both drivers.

mod util;

use ringsock::{HostName, StreamSocket, StreamSocketListener};

#[test]
fn echo_of_a_line() {
    util::on_each_backend(|_| async {
        let listener =
            StreamSocketListener::bind_host(&HostName::new("127.0.0.1").unwrap(), "0").unwrap();
        let port = listener.local_addr().unwrap().port().to_string();
        let server = ringsock::spawn(async move {
            let socket = listener.accept().await.unwrap();
            let mut input = socket.input_stream();
            let line = input.read_line().await.unwrap().unwrap();
            socket
                .write_all(format!("{line}\n").into_bytes())
                .await
                .0
                .unwrap();
            line
        });
        let socket = StreamSocket::new();
        socket
            .connect(&HostName::new("localhost").unwrap(), &port)
            .await
            .unwrap();
        socket
            .write_all(b"Hello, World!\n".to_vec())
            .await
            .0
            .unwrap();
        let reply = socket.input_stream().read_line().await.unwrap();
        assert_eq!(reply.as_deref(), Some("Hello, World!"));
        assert_eq!(server.await, "Hello, World!");
    });
}
