//! The tokio ecosystem over ringsock sockets inside a tokio driver: tokio-rustls on
//! either end against ringsock's own TLS, ringsock's TLS stream through tokio's traits,
//! and hyper's HTTP/1.1 client and server.

mod tls_certs;
mod util;

use std::convert::Infallible;
use std::sync::Arc;

use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use ringsock::tls::{ProtectionLevel, TlsAcceptor};
use ringsock::{HostName, StreamSocket};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tls_certs::{Ca, LeafOptions};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use util::tokio_rt::on_each_driver_in_tokio;

fn rustls_client_config(ca: &Ca) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca.pem.as_bytes()) {
        roots.add(cert.expect("CA PEM")).expect("CA certificate");
    }
    Arc::new(
        rustls::ClientConfig::builder()
            .with_root_certificates(roots)
            .with_no_client_auth(),
    )
}

fn rustls_server_config(ca: &Ca) -> Arc<rustls::ServerConfig> {
    let leaf = ca.leaf(&["localhost", "127.0.0.1"], LeafOptions::default());
    let chain = CertificateDer::pem_slice_iter(leaf.cert_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .expect("leaf PEM");
    let key = PrivateKeyDer::from_pem_slice(leaf.key_pem.as_bytes()).expect("key PEM");
    Arc::new(
        rustls::ServerConfig::builder()
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .expect("server config"),
    )
}

/// tokio-rustls's client over a ringsock socket, against ringsock's TLS server.
#[test]
fn tokio_rustls_client_against_ringsock_tls_server() {
    on_each_driver_in_tokio(|backend| async move {
        let ca = Ca::new("tokio-rustls client test");
        let acceptor = TlsAcceptor::new(ca.server()).expect("acceptor");
        let listener = util::loopback_listener();
        let addr = listener.local_addr().unwrap();
        let server = ringsock::spawn(async move {
            let socket = listener.accept().await.expect("accept");
            socket
                .accept_tls(&acceptor)
                .await
                .expect("server handshake");
            util::echo(socket).await
        });
        let socket = util::connect(addr).await;
        let connector = tokio_rustls::TlsConnector::from(rustls_client_config(&ca));
        let name = ServerName::try_from("localhost").unwrap();
        let mut tls = connector.connect(name, socket).await.expect("handshake");
        let data = util::pseudo_random_bytes(3, 200_000);
        tls.write_all(&data).await.expect("write");
        tls.flush().await.expect("flush");
        let mut back = vec![0u8; data.len()];
        tls.read_exact(&mut back).await.expect("read");
        assert!(back == data, "the echo through TLS differs on {backend}");
        tls.shutdown().await.expect("close_notify and FIN");
        assert_eq!(util::must("server", server).await, data.len());
    });
}

/// tokio-rustls's server over an accepted ringsock socket, against ringsock's TLS
/// client used through tokio's traits.
#[test]
fn ringsock_tls_client_through_tokio_traits_against_tokio_rustls_server() {
    on_each_driver_in_tokio(|backend| async move {
        let ca = Ca::new("tokio-rustls server test");
        let acceptor = tokio_rustls::TlsAcceptor::from(rustls_server_config(&ca));
        let listener = util::loopback_listener();
        let addr = listener.local_addr().unwrap();
        let server = ringsock::spawn(async move {
            let socket = listener.accept().await.expect("accept");
            let tls = acceptor.accept(socket).await.expect("server handshake");
            let (mut reader, mut writer) = tokio::io::split(tls);
            let copied = tokio::io::copy(&mut reader, &mut writer)
                .await
                .expect("echo");
            writer.shutdown().await.expect("server shutdown");
            copied
        });
        let mut socket = StreamSocket::new();
        socket.control().set_trusted_roots(ca.roots()).unwrap();
        socket.connect_addr(addr).await.expect("connect");
        socket
            .upgrade_to_tls(ProtectionLevel::Tls13, &HostName::new("localhost").unwrap())
            .await
            .expect("client handshake");
        let data = util::pseudo_random_bytes(5, 300_000);
        AsyncWriteExt::write_all(&mut socket, &data)
            .await
            .expect("write");
        AsyncWriteExt::shutdown(&mut socket)
            .await
            .expect("shutdown");
        let mut back = Vec::new();
        AsyncReadExt::read_to_end(&mut socket, &mut back)
            .await
            .expect("read");
        assert!(back == data, "the echo through TLS differs on {backend}");
        assert_eq!(util::must("server", server).await, data.len() as u64);
    });
}

async fn answer(request: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    let path = request.uri().path().to_string();
    let body = request
        .into_body()
        .collect()
        .await
        .expect("request body")
        .to_bytes();
    let reply = format!("{path}: {} bytes", body.len());
    Ok(Response::new(Full::new(Bytes::from(reply))))
}

/// hyper's HTTP/1.1 server and client, both on ringsock sockets, keep-alive across
/// requests with and without bodies.
#[test]
fn hyper_http1_client_and_server_over_ringsock() {
    on_each_driver_in_tokio(|backend| async move {
        let listener = util::loopback_listener();
        let addr = listener.local_addr().unwrap();
        let server = ringsock::spawn(async move {
            let socket = listener.accept().await.expect("accept");
            hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(socket), hyper::service::service_fn(answer))
                .await
        });
        let socket = util::connect(addr).await;
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(socket))
            .await
            .expect("client handshake");
        let connection = ringsock::spawn(connection);
        for i in 0..20usize {
            let body = vec![b'x'; i * 1000];
            let request = Request::post(format!("/upload/{i}"))
                .header("host", "localhost")
                .body(Full::new(Bytes::from(body)))
                .unwrap();
            let response = sender.send_request(request).await.expect("response");
            assert_eq!(response.status(), 200);
            let text = response.into_body().collect().await.unwrap().to_bytes();
            assert_eq!(
                text,
                format!("/upload/{i}: {} bytes", i * 1000),
                "request {i} on {backend}"
            );
        }
        drop(sender);
        util::must("client connection", connection)
            .await
            .expect("client connection ends cleanly");
        util::must("server connection", server)
            .await
            .expect("server connection ends cleanly");
    });
}
