//! mTLS for every connection between cutover processes.
//!
//! Both ends are built on rustls directly (not tonic's TLS feature) so the
//! server can hand the verified peer identity to the gRPC layer and, later,
//! swap CAs and certificates at run time for rotation.

use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use serde::Deserialize;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::{TlsAcceptor, TlsConnector};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::server::Connected;
use tonic::transport::{Channel, Endpoint};

use crate::identity::{certificate_facts, Identity};

/// A TLS handshake that has not finished by then is dropped, so a client that
/// opens sockets and says nothing cannot pin the accept path.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Handshakes in progress at once; further connections wait in the kernel's
/// accept queue, so unauthenticated clients cannot pin unbounded memory.
const MAX_PENDING_HANDSHAKES: usize = 512;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {what} {}: {}", .path.display(), crate::fsutil::explain_io(.path, .source))]
    Read {
        what: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error("{what} {path} holds no PEM {expected}")]
    Empty {
        what: &'static str,
        path: PathBuf,
        expected: &'static str,
    },
    #[error("tls configuration rejected: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("client certificate verifier: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
    #[error("invalid coordinator url {url:?}: {reason}")]
    BadUrl { url: String, reason: String },
    #[error("cannot connect to {url}: {reason}")]
    Connect { url: String, reason: String },
    #[error("the CA bundle is not usable: {0}")]
    BadBundle(String),
}

/// The innermost error of a chain: tonic nests "transport error" wrappers
/// around the one message an operator needs (connection refused, bad
/// certificate, timed out).
pub fn root_cause(error: &(dyn std::error::Error + 'static)) -> String {
    let mut current = error;
    while let Some(source) = current.source() {
        current = source;
    }
    current.to_string()
}

/// The files of one side's mTLS identity.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct TlsFiles {
    /// The CA that signs every cutover certificate (PEM).
    pub ca_cert: PathBuf,
    /// This process's certificate (PEM).
    pub cert: PathBuf,
    /// Its private key (PEM, keep it 0600).
    pub key: PathBuf,
}

impl TlsFiles {
    /// The standard file names for `stem` in a PKI dir.
    pub fn in_dir(dir: &Path, stem: &str) -> Self {
        Self {
            ca_cert: dir.join(crate::pki::CA_CERT),
            cert: dir.join(format!("{stem}.crt")),
            key: dir.join(format!("{stem}.key")),
        }
    }

    /// The identity carried by our own certificate.
    pub fn identity(&self) -> Result<Option<Identity>, TlsError> {
        let certs = load_certs(&self.cert, "certificate")?;
        Ok(certificate_facts(&certs[0]).ok().and_then(|f| f.identity))
    }
}

/// Installs ring as the process-wide rustls provider. Called first thing by
/// every binary; later calls (tests start many nodes in one process) are no-ops.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

pub fn load_certs(
    path: &Path,
    what: &'static str,
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = std::fs::read(path).map_err(|source| TlsError::Read {
        what,
        path: path.to_path_buf(),
        source,
    })?;
    let certs: Vec<_> = rustls_pemfile::certs(&mut pem.as_slice())
        .collect::<Result<_, _>>()
        .map_err(|source| TlsError::Read {
            what,
            path: path.to_path_buf(),
            source,
        })?;
    if certs.is_empty() {
        return Err(TlsError::Empty {
            what,
            path: path.to_path_buf(),
            expected: "certificate",
        });
    }
    Ok(certs)
}

fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let what = "private key";
    let pem = std::fs::read(path).map_err(|source| TlsError::Read {
        what,
        path: path.to_path_buf(),
        source,
    })?;
    rustls_pemfile::private_key(&mut pem.as_slice())
        .map_err(|source| TlsError::Read {
            what,
            path: path.to_path_buf(),
            source,
        })?
        .ok_or_else(|| TlsError::Empty {
            what,
            path: path.to_path_buf(),
            expected: "private key",
        })
}

fn root_store(path: &Path) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in load_certs(path, "CA certificate")? {
        roots.add(cert)?;
    }
    Ok(roots)
}

/// The CAs of a trust bundle, checked strictly: every PEM block must be a
/// certificate a root store takes, and there must be one. A bundle that
/// passes can be written where a client config will load it.
pub fn parse_bundle(pem: &str) -> Result<Vec<crate::identity::CertificateFacts>, TlsError> {
    let bad = |reason: String| TlsError::BadBundle(reason);
    let blocks = pem.matches("-----BEGIN ").count();
    let certs: Vec<CertificateDer<'static>> = rustls_pemfile::certs(&mut pem.as_bytes())
        .collect::<Result<_, _>>()
        .map_err(|e| bad(e.to_string()))?;
    if certs.is_empty() || certs.len() != blocks {
        return Err(bad(format!(
            "{} of its {blocks} PEM blocks are certificates",
            certs.len()
        )));
    }
    let mut roots = RootCertStore::empty();
    certs
        .iter()
        .map(|der| {
            roots.add(der.clone())?;
            certificate_facts(der).map_err(|e| bad(e.to_string()))
        })
        .collect()
}

/// Server side: TLS 1.3 only. A client certificate, when presented, must
/// be signed by our CA; a client without one is let through the handshake
/// only to reach the enrollment service (every other service refuses a
/// connection without an identity). The chain sent includes the CA, so a
/// joining agent can pin it by fingerprint.
pub fn server_config(files: &TlsFiles) -> Result<Arc<ServerConfig>, TlsError> {
    install_crypto_provider();
    let verifier = WebPkiClientVerifier::builder(Arc::new(root_store(&files.ca_cert)?))
        .allow_unauthenticated()
        .build()?;
    let mut chain = load_certs(&files.cert, "certificate")?;
    chain.extend(load_certs(&files.ca_cert, "CA certificate")?);
    let mut config = ServerConfig::builder_with_protocol_versions(&[&rustls::version::TLS13])
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, load_key(&files.key)?)?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

pub fn client_config(files: &TlsFiles) -> Result<Arc<ClientConfig>, TlsError> {
    install_crypto_provider();
    let mut config = ClientConfig::builder_with_protocol_versions(&[&rustls::version::TLS13])
        .with_root_certificates(root_store(&files.ca_cert)?)
        .with_client_auth_cert(
            load_certs(&files.cert, "certificate")?,
            load_key(&files.key)?,
        )?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

/// `sha256:<hex>` of a DER certificate: what `cutover-agent join` pins.
pub fn fingerprint(der: &[u8]) -> String {
    use sha2::Digest as _;
    let hash = sha2::Sha256::digest(der);
    format!(
        "sha256:{}",
        hash.iter().map(|b| format!("{b:02x}")).collect::<String>()
    )
}

/// The fingerprint of the CA certificate in `path`.
pub fn ca_fingerprint(path: &Path) -> Result<String, TlsError> {
    Ok(fingerprint(&load_certs(path, "CA certificate")?[0]))
}

/// A client without a certificate that trusts the one CA whose certificate
/// has `fingerprint` and comes in the server's chain: the first contact of
/// a joining agent, which has no CA file yet.
pub fn pinned_client_config(fingerprint: &str) -> Arc<ClientConfig> {
    install_crypto_provider();
    let mut config = ClientConfig::builder_with_protocol_versions(&[&rustls::version::TLS13])
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(PinnedCa {
            fingerprint: fingerprint.to_ascii_lowercase(),
        }))
        .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec()];
    Arc::new(config)
}

/// Verifies the server against the CA it sends, if that CA is the pinned
/// one; the usual checks (signature chain, name, validity) then apply.
#[derive(Debug)]
struct PinnedCa {
    fingerprint: String,
}

impl rustls::client::danger::ServerCertVerifier for PinnedCa {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        let ca = intermediates
            .iter()
            .find(|cert| fingerprint(cert) == self.fingerprint)
            .ok_or_else(|| {
                rustls::Error::General(format!(
                    "the server's CA is not the one with fingerprint {}",
                    self.fingerprint
                ))
            })?;
        let mut roots = RootCertStore::empty();
        roots.add(ca.clone().into_owned())?;
        rustls::client::WebPkiServerVerifier::builder(Arc::new(roots))
            .build()
            .map_err(|e| rustls::Error::General(e.to_string()))?
            .verify_server_cert(end_entity, &[], server_name, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &rustls::crypto::ring::default_provider().signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &rustls::crypto::ring::default_provider().signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        rustls::crypto::ring::default_provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// What the server learned about a peer during the handshake; tonic puts it in
/// every request's extensions.
#[derive(Debug, Clone, Default)]
pub struct PeerInfo {
    pub remote_addr: Option<SocketAddr>,
    pub identity: Option<Identity>,
    pub serial: Option<String>,
    /// The certificate's validity, seconds since the epoch.
    pub not_before: Option<i64>,
    pub not_after: Option<i64>,
    /// Common name of the CA that signed it.
    pub issuer: Option<String>,
}

/// An accepted, handshaken mTLS connection.
pub struct TlsConn {
    stream: tokio_rustls::server::TlsStream<TcpStream>,
    peer: PeerInfo,
}

impl Connected for TlsConn {
    type ConnectInfo = PeerInfo;

    fn connect_info(&self) -> PeerInfo {
        self.peer.clone()
    }
}

impl AsyncRead for TlsConn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsConn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}

/// Accepts TCP connections and completes mTLS handshakes concurrently,
/// yielding only verified connections. Failed handshakes (no certificate,
/// another CA's certificate, garbage) are logged and dropped here, before any
/// gRPC code runs. Each handshake uses the newest configuration `config`
/// holds, so a CA rotation changes what is trusted and presented without a
/// restart or a dropped connection. Stops accepting when `shutdown` fires.
pub fn accept_mtls(
    listener: TcpListener,
    config: tokio::sync::watch::Receiver<Arc<ServerConfig>>,
    shutdown: CancellationToken,
) -> ReceiverStream<Result<TlsConn, io::Error>> {
    let (tx, rx) = tokio::sync::mpsc::channel(128);
    let handshakes = Arc::new(tokio::sync::Semaphore::new(MAX_PENDING_HANDSHAKES));
    tokio::spawn(async move {
        loop {
            let permit = tokio::select! {
                _ = shutdown.cancelled() => break,
                permit = handshakes.clone().acquire_owned() => permit.expect("semaphore never closed"),
            };
            let accepted = tokio::select! {
                _ = shutdown.cancelled() => break,
                accepted = listener.accept() => accepted,
            };
            let (tcp, remote) = match accepted {
                Ok(pair) => pair,
                Err(error) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(%error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let _ = tcp.set_nodelay(true);
            let acceptor = TlsAcceptor::from(config.borrow().clone());
            let tx = tx.clone();
            tokio::spawn(async move {
                let handshake = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await;
                drop(permit);
                match handshake {
                    Ok(Ok(stream)) => {
                        let facts = stream
                            .get_ref()
                            .1
                            .peer_certificates()
                            .and_then(|certs| certs.first())
                            .and_then(|leaf| certificate_facts(leaf).ok());
                        let peer = PeerInfo {
                            remote_addr: Some(remote),
                            identity: facts.as_ref().and_then(|f| f.identity.clone()),
                            not_before: facts.as_ref().map(|f| f.not_before),
                            not_after: facts.as_ref().map(|f| f.not_after),
                            issuer: facts.as_ref().map(|f| f.issuer.clone()),
                            serial: facts.map(|f| f.serial),
                        };
                        let _ = tx.send(Ok(TlsConn { stream, peer })).await;
                    }
                    Ok(Err(error)) => {
                        tracing::info!(%remote, %error, "tls handshake refused");
                    }
                    Err(_) => tracing::info!(%remote, "tls handshake timed out"),
                }
            });
        }
    });
    ReceiverStream::new(rx)
}

/// HTTP/2 and connection settings for a client channel.
#[derive(Debug, Clone)]
pub struct ChannelOptions {
    pub connect_timeout: Duration,
    pub keepalive_interval: Duration,
    pub keepalive_timeout: Duration,
}

impl Default for ChannelOptions {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(5),
            keepalive_interval: Duration::from_secs(10),
            keepalive_timeout: Duration::from_secs(5),
        }
    }
}

/// A parsed `https://host:port` coordinator address.
#[derive(Debug, Clone)]
pub struct CoordinatorUrl {
    pub url: String,
    pub host: String,
    pub port: u16,
}

impl CoordinatorUrl {
    pub fn parse(url: &str) -> Result<Self, TlsError> {
        let bad = |reason: &str| TlsError::BadUrl {
            url: url.to_string(),
            reason: reason.to_string(),
        };
        let rest = url
            .strip_prefix("https://")
            .ok_or_else(|| bad("it must start with https:// (every connection is mTLS)"))?;
        let authority = rest.trim_end_matches('/');
        let (host, port) = authority
            .rsplit_once(':')
            .ok_or_else(|| bad("it must name a port, e.g. https://coordinator:7443"))?;
        let port: u16 = port.parse().map_err(|_| bad("the port is not a number"))?;
        let host = host.trim_start_matches('[').trim_end_matches(']');
        if host.is_empty() {
            return Err(bad("the host is empty"));
        }
        Ok(Self {
            url: url.to_string(),
            host: host.to_string(),
            port,
        })
    }
}

impl CoordinatorUrl {
    /// Every coordinator of an installation, comma-separated
    /// (`https://c1:7443,https://c2:7443`): with several coordinators on
    /// etcd only the leader listens, and a client tries each in turn.
    pub fn parse_list(urls: &str) -> Result<Vec<Self>, TlsError> {
        let list: Vec<Self> = urls
            .split(',')
            .map(str::trim)
            .filter(|url| !url.is_empty())
            .map(Self::parse)
            .collect::<Result<_, _>>()?;
        if list.is_empty() {
            return Err(TlsError::BadUrl {
                url: urls.to_string(),
                reason: "it names no coordinator, e.g. https://coordinator:7443".into(),
            });
        }
        Ok(list)
    }
}

/// Dials the coordinator over mTLS and returns a gRPC channel. `server_name`
/// overrides the name checked against the coordinator's certificate (default:
/// the URL's host).
pub async fn connect(
    url: &CoordinatorUrl,
    server_name: Option<&str>,
    config: Arc<ClientConfig>,
    options: &ChannelOptions,
) -> Result<Channel, TlsError> {
    let (endpoint, connector) = dialer(url, server_name, config, options)?;
    endpoint
        .connect_with_connector(connector)
        .await
        .map_err(|error| TlsError::Connect {
            url: url.url.clone(),
            reason: root_cause(&error),
        })
}

/// A gRPC channel over mTLS to `url` that dials on first use and again
/// after the connection drops, so a peer that is down when the process
/// starts (an etcd member, say) is reached once it is back.
pub fn connect_lazy(
    url: &CoordinatorUrl,
    server_name: Option<&str>,
    config: Arc<ClientConfig>,
    options: &ChannelOptions,
) -> Result<Channel, TlsError> {
    let (endpoint, connector) = dialer(url, server_name, config, options)?;
    Ok(endpoint.connect_with_connector_lazy(connector))
}

/// The endpoint settings and the TLS connector `connect` and
/// `connect_lazy` share.
fn dialer(
    url: &CoordinatorUrl,
    server_name: Option<&str>,
    config: Arc<ClientConfig>,
    options: &ChannelOptions,
) -> Result<(Endpoint, TlsDialer), TlsError> {
    let name = server_name.unwrap_or(&url.host).to_string();
    let server_name = ServerName::try_from(name.clone()).map_err(|_| TlsError::BadUrl {
        url: url.url.clone(),
        reason: format!("{name:?} is not a valid server name"),
    })?;
    // Plain http scheme: TLS is done by our connector, not by tonic.
    let endpoint = Endpoint::from_shared(format!("http://{}:{}", bracket(&url.host), url.port))
        .map_err(|error| TlsError::Connect {
            url: url.url.clone(),
            reason: root_cause(&error),
        })?
        .connect_timeout(options.connect_timeout)
        .http2_keep_alive_interval(options.keepalive_interval)
        .keep_alive_timeout(options.keepalive_timeout)
        .keep_alive_while_idle(true)
        .tcp_nodelay(true);
    let dialer = TlsDialer {
        connector: TlsConnector::from(config),
        server_name,
        target: format!("{}:{}", url.host, url.port),
        timeout: options.connect_timeout,
    };
    Ok((endpoint, dialer))
}

/// Dials TCP and does the TLS handshake, within the connect timeout.
#[derive(Clone)]
struct TlsDialer {
    connector: TlsConnector,
    server_name: ServerName<'static>,
    target: String,
    timeout: Duration,
}

type Dialed = TokioIo<tokio_rustls::client::TlsStream<TcpStream>>;

impl tower::Service<http::Uri> for TlsDialer {
    type Response = Dialed;
    type Error = io::Error;
    type Future = std::pin::Pin<Box<dyn std::future::Future<Output = io::Result<Dialed>> + Send>>;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), io::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: http::Uri) -> Self::Future {
        let dialer = self.clone();
        Box::pin(async move {
            let handshake = async {
                let tcp = TcpStream::connect(&dialer.target).await?;
                tcp.set_nodelay(true)?;
                dialer.connector.connect(dialer.server_name, tcp).await
            };
            let tls = tokio::time::timeout(dialer.timeout, handshake)
                .await
                .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "tls connect timed out"))??;
            Ok(TokioIo::new(tls))
        })
    }
}

fn bracket(host: &str) -> String {
    if host.contains(':') {
        format!("[{host}]")
    } else {
        host.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn coordinator_urls() {
        let url = CoordinatorUrl::parse("https://127.0.0.1:7443").unwrap();
        assert_eq!((url.host.as_str(), url.port), ("127.0.0.1", 7443));
        let url = CoordinatorUrl::parse("https://[::1]:7443/").unwrap();
        assert_eq!(url.host, "::1");
        assert!(CoordinatorUrl::parse("http://x:1").is_err());
        let list = CoordinatorUrl::parse_list("https://a:1, https://b:2").unwrap();
        assert_eq!(list.iter().map(|u| u.port).collect::<Vec<_>>(), [1, 2]);
        assert!(CoordinatorUrl::parse_list(" , ").is_err());
        assert!(CoordinatorUrl::parse_list("https://a:1,http://b:2").is_err());
        assert!(CoordinatorUrl::parse("https://x").is_err());
    }
}
