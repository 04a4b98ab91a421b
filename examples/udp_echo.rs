//! The UDP echo client and server of the Windows.Networking.Sockets guide ("Build a basic
//! UDP socket client and server"), in library calls: the server binds a port and echoes
//! each message back to the client's port through GetOutputStreamAsync; the client binds
//! its own port, sends a request through a second socket's output stream and waits for the
//! response on its own.
//!
//! ```sh
//! cargo run --example udp_echo            # ports picked by the kernel
//! cargo run --example udp_echo 1337 1336  # the Windows guide's server and client ports
//! ```

use std::time::Duration;

use ringsock::{runtime, DatagramSocket, HostName, Result};

fn main() {
    let mut args = std::env::args().skip(1);
    let server_port = args.next().unwrap_or_else(|| "0".into());
    let client_port = args.next().unwrap_or_else(|| "0".into());
    if let Err(err) = ringsock::block_on(run(&server_port, &client_port)) {
        // SocketError.GetStatus(...) in the Windows guide: the status, else the message.
        eprintln!("{}: {err}", err.status());
        std::process::exit(1);
    }
}

async fn run(server_port: &str, client_port: &str) -> Result<()> {
    // StartServer: bind, then handle MessageReceived.
    let server = DatagramSocket::new();
    println!("server is about to bind...");
    server.bind(server_port)?;
    let server_port = server.local_addr()?.port().to_string();
    println!("server is bound to port number {server_port}");

    // StartClient: bind the client's own port; its responses arrive there.
    let client = DatagramSocket::new();
    println!("client is about to bind...");
    client.bind(client_port)?;
    let client_port = client.local_addr()?.port().to_string();
    println!("client is bound to port number {client_port}");

    let server_task = ringsock::spawn(async move {
        // ServerDatagramSocket_MessageReceived
        let mut messages = server.messages();
        let message = messages.next().await?;
        let request = message.text()?.trim().to_owned();
        println!("server received the request: \"{request}\"");
        // Echo the request back as the response, to the client's port.
        let output = server
            .output_stream_to(&message.remote_host(), &client_port)
            .await?;
        output.write(format!("{request}\n")).await?;
        output.flush().await?;
        println!("server sent back the response: \"{request}\"");
        drop(messages);
        drop(server);
        println!("server closed its socket");
        Ok::<_, ringsock::Error>(())
    });

    // Send a request to the echo server through a second socket's output stream.
    let request = "Hello, World!";
    {
        let sender = DatagramSocket::new();
        let output = sender
            .output_stream_to(&HostName::new("localhost")?, &server_port)
            .await?;
        output.write(format!("{request}\n")).await?;
        output.flush().await?;
    }
    println!("client sent the request: \"{request}\"");

    // ClientDatagramSocket_MessageReceived (bounded: UDP may lose the datagram).
    let response = runtime::timeout(Duration::from_secs(2), client.recv()).await??;
    println!(
        "client received the response: \"{}\"",
        response.text()?.trim()
    );
    drop(client);
    println!("client closed its socket");
    server_task.await
}
