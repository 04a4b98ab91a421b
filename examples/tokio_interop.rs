//! ringsock inside a tokio program: a ringsock driver turned by tokio, ringsock sockets
//! awaited beside tokio's timers, a tokio-util codec over a ringsock socket, and tokio's
//! own TcpStream talking to a ringsock listener.
//!
//! `cargo run --example tokio_interop` (the `tokio` feature; examples get it from the
//! crate's dev-dependencies)

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use ringsock::{HostName, StreamSocket, StreamSocketListener};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio_util::codec::{Framed, LinesCodec};

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    // Created on this tokio thread; it waits in tokio's reactor, not in a thread of its own.
    let mut driver = ringsock::tokio::Driver::new()?;
    println!("ringsock driver: {}", driver.driver_kind());
    driver
        .run_until(async {
            let listener = StreamSocketListener::bind_host(&HostName::new("127.0.0.1")?, "0")?;
            let addr = listener.local_addr()?;

            // The server: a ringsock task answering lines through tokio-util's codec.
            let server = ringsock::spawn(async move {
                for _ in 0..2 {
                    let socket = listener.accept().await?;
                    let mut lines = Framed::new(socket, LinesCodec::new());
                    while let Some(line) = lines.next().await {
                        let line = line.map_err(|err| ringsock::Error::from(std::io::Error::other(err)))?;
                        lines
                            .send(format!("echo: {line}"))
                            .await
                            .map_err(|err| ringsock::Error::from(std::io::Error::other(err)))?;
                    }
                }
                Ok::<_, ringsock::Error>(())
            });

            // A ringsock client, raced against a tokio timer.
            let client = StreamSocket::new();
            tokio::select! {
                connected = client.connect_addr(addr) => connected?,
                _ = tokio::time::sleep(Duration::from_secs(5)) => return Err("connect timed out".into()),
            }
            let mut lines = Framed::new(client, LinesCodec::new());
            lines.send("hello from ringsock").await?;
            println!("{}", lines.next().await.ok_or("no reply")??);
            drop(lines);

            // tokio's own TcpStream against the ringsock listener.
            let tokio_client = tokio::net::TcpStream::connect(addr).await?;
            let (reader, mut writer) = tokio_client.into_split();
            writer.write_all(b"hello from tokio\n").await?;
            let mut reply = String::new();
            BufReader::new(reader).read_line(&mut reply).await?;
            print!("{reply}");
            drop(writer);

            server.await?;
            Ok::<_, Box<dyn std::error::Error>>(())
        })
        .await
}
