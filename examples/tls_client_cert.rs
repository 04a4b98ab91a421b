//! "Providing a client certificate with the StreamSocket class" from the
//! Windows.Networking.Sockets guide, in ringsock:
//!
//! ```csharp
//! var socket = new StreamSocket();
//! Windows.Security.Cryptography.Certificates.Certificate certificate = await GetClientCert();
//! socket.Control.ClientCertificate = certificate;
//! await socket.ConnectAsync(destination, SocketProtectionLevel.Tls12);
//! ```
//!
//! The example starts its own TLS echo server, which requires client certificates signed
//! by a CA it makes up on the spot (certificates generated with rcgen), connects to it
//! with a client certificate, and then once more without one to show the status a
//! refused client gets.
//!
//! Run it with `cargo run --example tls_client_cert`.

use ringsock::tls::{Identity, ProtectionLevel, TlsAcceptor, TrustedRoots};
use ringsock::{HostName, StreamSocket, StreamSocketListener};

/// A throw-away PKI: one CA, a server certificate for localhost, a client certificate.
struct Pki {
    ca_pem: String,
    server: Identity,
    client: Identity,
}

fn make_pki() -> Result<Pki, Box<dyn std::error::Error>> {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
        KeyPair, KeyUsagePurpose,
    };
    let ca_key = KeyPair::generate()?;
    let mut ca = CertificateParams::new(Vec::<String>::new())?;
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(DnType::CommonName, "tls_client_cert example CA");
    ca.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca_pem = ca.self_signed(&ca_key)?.pem();
    let issuer = Issuer::new(ca, ca_key);

    let leaf = |names: Vec<String>, usage| -> Result<Identity, Box<dyn std::error::Error>> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(names.clone())?;
        params
            .distinguished_name
            .push(DnType::CommonName, names[0].as_str());
        params.extended_key_usages = vec![usage];
        let cert = params.signed_by(&key, &issuer)?;
        Ok(Identity::from_pem(
            cert.pem().as_bytes(),
            key.serialize_pem().as_bytes(),
        )?)
    };
    let server = leaf(
        vec!["localhost".into(), "127.0.0.1".into()],
        ExtendedKeyUsagePurpose::ServerAuth,
    )?;
    let client = leaf(
        vec!["example-client".into()],
        ExtendedKeyUsagePurpose::ClientAuth,
    )?;
    Ok(Pki {
        ca_pem,
        server,
        client,
    })
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let pki = make_pki()?;
    ringsock::block_on(async {
        // The server: TLS echo of one line per connection, client certificates required.
        let roots = TrustedRoots::from_pem(pki.ca_pem.as_bytes())?;
        let acceptor = TlsAcceptor::builder(pki.server.clone())
            .require_client_certificate(roots.clone())
            .build()?;
        let listener = StreamSocketListener::bind_host(&HostName::new("127.0.0.1")?, "0")?;
        let port = listener.local_addr()?.port().to_string();
        println!("server is listening on port {port}...");
        let server = ringsock::spawn(async move {
            for _ in 0..2 {
                let socket = listener.accept().await?;
                if let Err(err) = socket.accept_tls(&acceptor).await {
                    println!("server refused a client: {} ({err})", err.status());
                    continue;
                }
                let info = socket.tls_info().expect("handshake done");
                println!(
                    "server: {} with {}, client certificate of {} bytes",
                    info.protection_level,
                    info.cipher_suite,
                    info.peer_certificate().map_or(0, |cert| cert.der().len())
                );
                let mut input = socket.input_stream();
                if let Some(request) = input.read_line().await? {
                    println!("server received the request: {request:?}");
                    let output = socket.output_stream();
                    output.write(format!("{request}\n")).await?;
                    output.flush().await?;
                    println!("server sent back the response: {request:?}");
                }
                // Dropping the socket sends close_notify and closes the connection.
            }
            Ok::<_, ringsock::Error>(())
        });

        // The client: the Windows guide's snippet.
        let destination = HostName::new("localhost")?;
        let socket = StreamSocket::new();
        let certificate = get_client_cert(&pki);
        socket.control().set_client_certificate(certificate)?;
        // Our made-up CA signed the server's certificate; a real client keeps the
        // system's roots and skips this line.
        socket.control().set_trusted_roots(roots.clone())?;
        socket
            .connect_with(&destination, &port, ProtectionLevel::Tls12)
            .await?;
        println!(
            "client connected with {}",
            socket.tls_info().expect("handshake done").protection_level
        );
        let request = "Hello, World!";
        let output = socket.output_stream();
        output.write(format!("{request}\n")).await?;
        output.flush().await?;
        println!("client sent the request: {request:?}");
        let response = socket.input_stream().read_line().await?;
        println!("client received the response: {response:?}");
        drop(output);
        drop(socket);
        println!("client closed its socket");

        // A client without a certificate: the failure's status says what is missing.
        let socket = StreamSocket::new();
        socket.control().set_trusted_roots(roots)?;
        let refused = match socket
            .connect_with(&destination, &port, ProtectionLevel::Tls12)
            .await
        {
            Err(err) => Err(err),
            // With TLS 1.3 the server's refusal arrives with the first read.
            Ok(()) => socket.input_stream().read_line().await.map(|_| ()),
        };
        match refused {
            Err(err) => println!("client without a certificate: {} ({err})", err.status()),
            Ok(()) => println!("client without a certificate was let in (unexpected)"),
        }
        drop(socket);
        server.await?;
        Ok::<_, ringsock::Error>(())
    })?;
    Ok(())
}

/// The Windows guide's `GetClientCert()`: here, the certificate our made-up CA issued.
fn get_client_cert(pki: &Pki) -> Identity {
    pki.client.clone()
}
