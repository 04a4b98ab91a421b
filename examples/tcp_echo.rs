//! The TCP echo example of the Windows.Networking.Sockets guide: a StreamSocketListener
//! and a StreamSocket in one program.
//!
//! `cargo run --example tcp_echo`

use ringsock::{Error, HostName, StreamSocket, StreamSocketListener};

fn main() -> ringsock::Result<()> {
    ringsock::block_on(async {
        // Port 0: the kernel picks a free port (the Windows guide used 1337).
        let listener = StreamSocketListener::bind("0")?;
        let port = listener.local_addr()?.port().to_string();
        println!("server is listening...");

        // ConnectionReceived: read a line, echo it back.
        let server = ringsock::spawn(async move {
            let socket = listener.accept().await?;
            let request = socket.input_stream().read_line().await?.unwrap_or_default();
            println!("server received the request: \"{request}\"");
            let output = socket.output_stream();
            output.write(format!("{request}\n")).await?;
            output.flush().await?;
            println!("server sent back the response: \"{request}\"");
            Ok::<_, Error>(())
        });

        let socket = StreamSocket::new();
        println!("client is trying to connect...");
        socket.connect(&HostName::new("localhost")?, &port).await?;
        println!("client connected");
        let output = socket.output_stream();
        output.write("Hello, World!\n").await?;
        output.flush().await?;
        println!("client sent the request: \"Hello, World!\"");
        let response = socket.input_stream().read_line().await?.unwrap_or_default();
        println!("client received the response: \"{response}\"");
        server.await?;
        Ok(())
    })
}
