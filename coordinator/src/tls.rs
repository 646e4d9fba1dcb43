//! The coordinator's side of mTLS: TLS 1.3 only, handshakes done before a connection
//! reaches tonic. A client certificate, when presented, must chain to the consortium
//! CA and not be revoked; a client without one reaches only the enrolment service
//! (the [`crate::auth::RoleGate`]s refuse it everywhere else). Each connection of an
//! identity is closed when that identity is revoked.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context as TaskContext, Poll};
use std::time::Duration;

use anyhow::{Context, Result};
use medfl_proto::transport::Profile;
use medfl_shared::identity::Identity;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_stream::StreamExt as _;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::revocation::{Revocations, issued_secs};

/// A handshake that takes longer than this is dropped (slow-loris guard).
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The CA's verifier, then the revocation list.
#[derive(Debug)]
struct RevocationAware {
    inner: Arc<dyn ClientCertVerifier>,
    revocations: Arc<Revocations>,
}

impl ClientCertVerifier for RevocationAware {
    fn offer_client_auth(&self) -> bool {
        true
    }
    fn client_auth_mandatory(&self) -> bool {
        false
    }
    fn root_hint_subjects(&self) -> &[rustls::DistinguishedName] {
        self.inner.root_hint_subjects()
    }
    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let verified = self.inner.verify_client_cert(end_entity, intermediates, now)?;
        if let (Ok(identity), Some(issued)) = (Identity::from_cert_der(end_entity), issued_secs(end_entity))
            && self.revocations.is_revoked(&identity, issued)
        {
            return Err(rustls::Error::InvalidCertificate(rustls::CertificateError::Revoked));
        }
        Ok(verified)
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// Client certificates: optional, from the consortium CA, not revoked.
fn client_verifier(profile: &Profile, revocations: Arc<Revocations>) -> Result<Arc<dyn ClientCertVerifier>> {
    let mut roots = rustls::RootCertStore::empty();
    for ca in CertificateDer::pem_slice_iter(profile.ca_pem.as_bytes()) {
        roots
            .add(ca.context("parse consortium CA")?)
            .context("add consortium CA")?;
    }
    let verifier = WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        Arc::new(rustls::crypto::ring::default_provider()),
    )
    .allow_unauthenticated()
    .build()
    .context("build client-certificate verifier")?;
    Ok(Arc::new(RevocationAware {
        inner: verifier,
        revocations,
    }))
}

/// A TLS 1.3 server configuration with `cert_pem` (a chain) and `key_pem`, the
/// consortium's client verifier and `alpn`.
fn config_with(
    profile: &Profile,
    revocations: Arc<Revocations>,
    cert_pem: &str,
    key_pem: &str,
    alpn: &[u8],
) -> Result<Arc<rustls::ServerConfig>> {
    let certs = CertificateDer::pem_slice_iter(cert_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .context("parse the server certificate")?;
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).context("parse the server key")?;
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .context("select TLS 1.3")?
        .with_client_cert_verifier(client_verifier(profile, revocations)?)
        .with_single_cert(certs, key)
        .context("load the server certificate and key")?;
    config.alpn_protocols = vec![alpn.to_vec()];
    Ok(Arc::new(config))
}

/// Builds the rustls server configuration from the coordinator's profile.
pub fn server_config(profile: &Profile, revocations: Arc<Revocations>) -> Result<Arc<rustls::ServerConfig>> {
    config_with(profile, revocations, &profile.cert_pem, &profile.key_pem, b"h2")
        .context("the coordinator's certificate")
}

/// The dashboard's configuration: HTTP/1.1 with a web certificate (`cert_pem`,
/// `key_pem`), and the same optional consortium client certificates as gRPC.
pub fn dashboard_config(
    profile: &Profile,
    revocations: Arc<Revocations>,
    cert_pem: &str,
    key_pem: &str,
) -> Result<Arc<rustls::ServerConfig>> {
    config_with(profile, revocations, cert_pem, key_pem, b"http/1.1").context("the dashboard's certificate")
}

/// Accepts TCP connections until `shutdown` and completes the TLS handshake of each on
/// its own task (so a slow client delays no one), yielding the connections whose
/// handshake succeeded within [`HANDSHAKE_TIMEOUT`], with their peer address.
pub fn handshakes(
    listener: TcpListener,
    config: Arc<rustls::ServerConfig>,
    shutdown: CancellationToken,
) -> tokio::sync::mpsc::Receiver<(TlsStream<TcpStream>, std::net::SocketAddr)> {
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    let acceptor = TlsAcceptor::from(config);
    tokio::spawn(async move {
        loop {
            let (tcp, peer) = tokio::select! {
                _ = shutdown.cancelled() => break,
                accepted = listener.accept() => match accepted {
                    Ok(pair) => pair,
                    Err(error) => {
                        warn!(%error, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            let _ = tcp.set_nodelay(true);
            let (acceptor, tx) = (acceptor.clone(), tx.clone());
            tokio::spawn(async move {
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                    Ok(Ok(stream)) => {
                        let _ = tx.send((stream, peer)).await;
                    }
                    Ok(Err(error)) => debug!(%peer, %error, "tls handshake refused"),
                    Err(_) => debug!(%peer, "tls handshake timed out"),
                }
            });
        }
    });
    rx
}

/// The identity of a TLS connection's client certificate, if it presented one.
pub fn peer_identity(stream: &TlsStream<TcpStream>) -> Option<(Identity, i64)> {
    let leaf = stream.get_ref().1.peer_certificates()?.first()?;
    Some((Identity::from_cert_der(leaf).ok()?, issued_secs(leaf)?))
}

/// The gRPC port's connections: each handshake done, each wrapped so that revoking its
/// identity closes it.
pub fn incoming(
    listener: TcpListener,
    config: Arc<rustls::ServerConfig>,
    revocations: Arc<Revocations>,
    shutdown: CancellationToken,
) -> impl futures::Stream<Item = Result<Guarded, std::io::Error>> {
    ReceiverStream::new(handshakes(listener, config, shutdown)).map(move |(stream, _)| {
        let revoked = match peer_identity(&stream) {
            Some((id, _)) => revocations.track(&id),
            None => CancellationToken::new(),
        };
        Ok(Guarded {
            inner: stream,
            revoked: Box::pin(revoked.cancelled_owned()),
        })
    })
}

/// A TLS connection that fails its next read or write once its identity is revoked,
/// which makes the HTTP/2 server drop it (and every stream on it).
pub struct Guarded {
    inner: TlsStream<TcpStream>,
    revoked: Pin<Box<tokio_util::sync::WaitForCancellationFutureOwned>>,
}

impl Guarded {
    fn check(&mut self, cx: &mut TaskContext<'_>) -> Result<(), std::io::Error> {
        match self.revoked.as_mut().poll(cx) {
            Poll::Ready(()) => Err(std::io::Error::new(
                std::io::ErrorKind::ConnectionAborted,
                "the peer's identity was revoked",
            )),
            Poll::Pending => Ok(()),
        }
    }
}

use std::future::Future as _;

impl AsyncRead for Guarded {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        self.check(cx)?;
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for Guarded {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        self.check(cx)?;
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

impl tonic::transport::server::Connected for Guarded {
    type ConnectInfo = <TlsStream<TcpStream> as tonic::transport::server::Connected>::ConnectInfo;
    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}
