//! HTTP(S) downloads of release artifacts: agents fetch them, the CLI hashes
//! a remote artifact once to pin a release to its digest. Public web roots,
//! plus an optional private CA for artifact servers behind one. The same
//! connector carries the coordinator's webhooks.

use std::path::Path;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("artifact CA {path}: {reason}")]
    Ca { path: String, reason: String },
    #[error("{0}")]
    Failed(String),
}

/// A connector for http:// and https:// URLs (see [`https_connector`]).
pub type HttpsConnector =
    hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>;

type HttpsClient = Client<HttpsConnector, Empty<Bytes>>;

/// The public web roots (webpki-roots).
pub fn public_roots() -> rustls::RootCertStore {
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    roots
}

/// A connector for http:// and https:// URLs, HTTP/1, trusting `roots`,
/// with the process's crypto provider (ring, see `tls`).
pub fn https_connector(roots: rustls::RootCertStore) -> HttpsConnector {
    crate::tls::install_crypto_provider();
    let tls = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .build()
}

pub struct HttpFetcher {
    client: HttpsClient,
}

impl HttpFetcher {
    /// `extra_ca` adds a PEM CA to the public web roots.
    pub fn new(extra_ca: Option<&Path>) -> Result<Self, FetchError> {
        let mut roots = public_roots();
        if let Some(path) = extra_ca {
            let ca_error = |reason: String| FetchError::Ca {
                path: path.display().to_string(),
                reason,
            };
            let certs =
                crate::tls::load_certs(path, "artifact CA").map_err(|e| ca_error(e.to_string()))?;
            for cert in certs {
                roots.add(cert).map_err(|e| ca_error(e.to_string()))?;
            }
        }
        Ok(Self {
            client: Client::builder(TokioExecutor::new()).build(https_connector(roots)),
        })
    }

    /// Starts a GET of `url` (http:// or https://); any status but 2xx is
    /// an error. The body follows with [`Download::chunk`].
    pub async fn get(&self, url: &str) -> Result<Download, FetchError> {
        let request = http::Request::get(url)
            .body(Empty::new())
            .map_err(|e| FetchError::Failed(format!("{url}: {e}")))?;
        let response = self.send(request).await?;
        if !response.status().is_success() {
            return Err(FetchError::Failed(format!(
                "server answered {}",
                response.status()
            )));
        }
        Ok(Download {
            body: response.into_body(),
        })
    }
}

impl HttpFetcher {
    /// Sends any bodiless request; the caller judges the status.
    pub async fn send(
        &self,
        request: http::Request<Empty<Bytes>>,
    ) -> Result<http::Response<hyper::body::Incoming>, FetchError> {
        self.client
            .request(request)
            .await
            .map_err(|e| FetchError::Failed(crate::error_chain(&e)))
    }
}

/// Reads a whole (small) response body, refusing one past `limit` bytes.
pub async fn read_small(
    response: http::Response<hyper::body::Incoming>,
    limit: usize,
) -> Result<Bytes, FetchError> {
    let mut download = Download {
        body: response.into_body(),
    };
    let mut body = Vec::new();
    while let Some(chunk) = download.chunk().await? {
        body.extend_from_slice(&chunk);
        if body.len() > limit {
            return Err(FetchError::Failed(format!(
                "response larger than {limit} bytes"
            )));
        }
    }
    Ok(body.into())
}

/// A response body on its way, read chunk by chunk: never held whole.
pub struct Download {
    body: hyper::body::Incoming,
}

impl Download {
    /// The next piece of the body; `None` at its end.
    pub async fn chunk(&mut self) -> Result<Option<Bytes>, FetchError> {
        while let Some(frame) = self.body.frame().await {
            let frame = frame.map_err(|e| FetchError::Failed(e.to_string()))?;
            if let Ok(data) = frame.into_data() {
                return Ok(Some(data));
            }
        }
        Ok(None)
    }
}
