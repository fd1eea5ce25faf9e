//! Container image references and registries: parsing `REGISTRY/REPO:TAG`
//! the way docker does, registry credentials from config, and resolving a
//! tag to the digest of its manifest over the registry HTTP API v2, so a
//! release pins exactly one image whatever the tag says later.

use std::path::PathBuf;

use base64::Engine as _;
use bytes::Bytes;
use http_body_util::Empty;
use sha2::{Digest as _, Sha256};

use crate::fetch::{read_small, HttpFetcher};

/// Manifest kinds asked for: a multi-platform index first, so the digest is
/// the one `docker pull TAG` records, then single manifests.
const MANIFEST_TYPES: &str = "application/vnd.oci.image.index.v1+json, application/vnd.docker.distribution.manifest.list.v2+json, application/vnd.docker.distribution.manifest.v2+json, application/vnd.oci.image.manifest.v1+json";

const DOCKER_HUB: &str = "docker.io";

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("image reference {reference:?}: {reason}")]
    Invalid { reference: String, reason: String },
    #[error("image {image} not found: registry {registry} has no tag {tag} in {repository}")]
    NotFound {
        image: String,
        registry: String,
        repository: String,
        tag: String,
    },
    #[error("registry {registry} refused access to {image} ({status}); check the credentials for {registry} in the config")]
    AuthRefused {
        image: String,
        registry: String,
        status: u16,
    },
    #[error("cannot resolve image {image} at registry {registry}: {reason}")]
    Failed {
        image: String,
        registry: String,
        reason: String,
    },
}

/// `[REGISTRY/]REPOSITORY[:TAG][@sha256:HEX]`, normalized as docker does:
/// no registry means Docker Hub, and a one-part Hub name is in `library/`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageRef {
    pub registry: String,
    pub repository: String,
    pub tag: Option<String>,
    /// `sha256:<64 hex>`.
    pub digest: Option<String>,
}

/// The registry part of an image reference: the first path component when
/// it has a dot or a port or is `localhost`, else Docker Hub.
pub fn registry_of(image: &str) -> &str {
    match image.split_once('/') {
        Some((first, _)) if first.contains(['.', ':']) || first == "localhost" => first,
        _ => DOCKER_HUB,
    }
}

pub fn is_sha256_digest(text: &str) -> bool {
    text.strip_prefix("sha256:")
        .is_some_and(|hex| hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit()))
}

impl ImageRef {
    pub fn parse(reference: &str) -> Result<Self, RegistryError> {
        let invalid = |reason: &str| RegistryError::Invalid {
            reference: reference.to_string(),
            reason: reason.to_string(),
        };
        if reference.is_empty() || reference.len() > 512 {
            return Err(invalid("must be 1 to 512 characters"));
        }
        let (rest, digest) = match reference.split_once('@') {
            Some((rest, digest)) if is_sha256_digest(digest) => (rest, Some(digest.to_string())),
            Some(_) => return Err(invalid("the part after '@' must be sha256:<64 hex digits>")),
            None => (reference, None),
        };
        let registry = registry_of(rest);
        let path = if rest.starts_with(&format!("{registry}/")) && registry != DOCKER_HUB
            || rest.starts_with("docker.io/")
        {
            &rest[registry.len() + 1..]
        } else {
            rest
        };
        // A colon after the last slash starts the tag (one before it is a
        // registry port, handled above).
        let (repository, tag) = match path.rsplit_once(':') {
            Some((repo, tag)) if !tag.contains('/') => (repo, Some(tag.to_string())),
            _ => (path, None),
        };
        let repo_ok = !repository.is_empty()
            && repository.split('/').all(|part| {
                !part.is_empty()
                    && part.bytes().all(|b| {
                        b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b)
                    })
            });
        if !repo_ok {
            return Err(invalid(
                "the repository must be lowercase letters, digits, '.', '_', '-' in '/'-separated parts",
            ));
        }
        if let Some(tag) = &tag {
            let tag_ok = !tag.is_empty()
                && tag.len() <= 128
                && tag
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
            if !tag_ok {
                return Err(invalid(
                    "the tag must be 1 to 128 of a-z, A-Z, 0-9, '.', '_', '-'",
                ));
            }
        }
        let repository = if registry == DOCKER_HUB && !repository.contains('/') {
            format!("library/{repository}")
        } else {
            repository.to_string()
        };
        Ok(Self {
            registry: registry.to_string(),
            repository,
            tag,
            digest,
        })
    }

    /// `REGISTRY/REPOSITORY@DIGEST`, what every node pulls.
    pub fn pinned(&self, digest: &str) -> String {
        format!("{}/{}@{digest}", self.registry, self.repository)
    }

    /// The host that serves the registry API.
    fn api_host(&self) -> &str {
        if self.registry == DOCKER_HUB {
            "registry-1.docker.io"
        } else {
            &self.registry
        }
    }

    /// Plain HTTP only for a registry on loopback, as docker allows by
    /// default; everything else over TLS.
    fn scheme(&self) -> &'static str {
        let host = self
            .registry
            .rsplit_once(':')
            .map_or(self.registry.as_str(), |(host, _)| host);
        if host == "localhost" || host.starts_with("127.") || host == "[::1]" {
            "http"
        } else {
            "https"
        }
    }
}

/// A registry login as the config files write it.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegistryLogin {
    /// The registry as image references name it: `ghcr.io`,
    /// `registry.example.com:5000`; `docker.io` for Docker Hub.
    pub registry: String,
    pub username: String,
    /// A file holding the password or token (keep it 0600); read at start.
    pub password_file: PathBuf,
}

/// Credentials for one registry, read from a [`RegistryLogin`].
#[derive(Clone, PartialEq, Eq)]
pub struct RegistryCredential {
    pub registry: String,
    pub username: String,
    pub password: String,
}

impl std::fmt::Debug for RegistryCredential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegistryCredential")
            .field("registry", &self.registry)
            .field("username", &self.username)
            .finish_non_exhaustive()
    }
}

impl RegistryLogin {
    pub fn credential(&self) -> Result<RegistryCredential, String> {
        let password = std::fs::read_to_string(&self.password_file).map_err(|e| {
            format!(
                "cannot read the password file {} of registry {}: {e}",
                self.password_file.display(),
                self.registry
            )
        })?;
        Ok(RegistryCredential {
            registry: self.registry.clone(),
            username: self.username.clone(),
            password: password.trim_end_matches(['\r', '\n']).to_string(),
        })
    }
}

/// Reads every login's password file; the first that fails is the error.
pub fn load_credentials(logins: &[RegistryLogin]) -> Result<Vec<RegistryCredential>, String> {
    logins.iter().map(RegistryLogin::credential).collect()
}

fn basic(credential: &RegistryCredential) -> String {
    let pair = format!("{}:{}", credential.username, credential.password);
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(pair)
    )
}

/// One `key="value"` parameter of a WWW-Authenticate challenge.
fn challenge_param(challenge: &str, key: &str) -> Option<String> {
    let start = challenge.find(&format!("{key}=\""))? + key.len() + 2;
    let end = challenge[start..].find('"')? + start;
    Some(challenge[start..end].to_string())
}

/// Resolves `image`'s tag to the digest of its manifest: pinned references
/// come back as they are, without a request. Follows the registry's auth
/// challenge (a bearer token, or basic auth) with `credentials` for its
/// registry, or anonymously.
pub async fn resolve_digest(
    fetcher: &HttpFetcher,
    image: &ImageRef,
    credentials: &[RegistryCredential],
) -> Result<String, RegistryError> {
    if let Some(digest) = &image.digest {
        return Ok(digest.clone());
    }
    let tag = image.tag.clone().unwrap_or_else(|| "latest".to_string());
    let shown = format!("{}/{}:{tag}", image.registry, image.repository);
    let failed = |reason: String| RegistryError::Failed {
        image: shown.clone(),
        registry: image.registry.clone(),
        reason,
    };
    let credential = credentials.iter().find(|c| c.registry == image.registry);
    let url = format!(
        "{}://{}/v2/{}/manifests/{tag}",
        image.scheme(),
        image.api_host(),
        image.repository
    );
    let ask = |method: http::Method, authorization: Option<&str>| {
        let mut request = http::Request::builder()
            .method(method)
            .uri(&url)
            .header(http::header::ACCEPT, MANIFEST_TYPES);
        if let Some(value) = authorization {
            request = request.header(http::header::AUTHORIZATION, value);
        }
        request
            .body(Empty::<Bytes>::new())
            .map_err(|e| failed(e.to_string()))
    };
    let mut authorization: Option<String> = None;
    let mut response = fetcher
        .send(ask(http::Method::HEAD, None)?)
        .await
        .map_err(|e| failed(e.to_string()))?;
    if response.status() == http::StatusCode::UNAUTHORIZED {
        let challenge = response
            .headers()
            .get(http::header::WWW_AUTHENTICATE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string();
        authorization = Some(if challenge.to_ascii_lowercase().starts_with("bearer") {
            bearer_token(fetcher, &challenge, credential)
                .await
                .map_err(|e| match e {
                    TokenError::Refused(status) => RegistryError::AuthRefused {
                        image: shown.clone(),
                        registry: image.registry.clone(),
                        status,
                    },
                    TokenError::Failed(reason) => failed(reason),
                })?
        } else {
            match credential {
                Some(credential) => basic(credential),
                None => {
                    return Err(RegistryError::AuthRefused {
                        image: shown.clone(),
                        registry: image.registry.clone(),
                        status: 401,
                    })
                }
            }
        });
        response = fetcher
            .send(ask(http::Method::HEAD, authorization.as_deref())?)
            .await
            .map_err(|e| failed(e.to_string()))?;
    }
    match response.status() {
        status if status.is_success() => {}
        http::StatusCode::NOT_FOUND => {
            return Err(RegistryError::NotFound {
                image: shown.clone(),
                registry: image.registry.clone(),
                repository: image.repository.clone(),
                tag,
            })
        }
        status @ (http::StatusCode::UNAUTHORIZED | http::StatusCode::FORBIDDEN) => {
            return Err(RegistryError::AuthRefused {
                image: shown.clone(),
                registry: image.registry.clone(),
                status: status.as_u16(),
            })
        }
        status => return Err(failed(format!("the registry answered {status}"))),
    }
    let header = response
        .headers()
        .get("docker-content-digest")
        .and_then(|v| v.to_str().ok())
        .filter(|d| is_sha256_digest(d))
        .map(str::to_string);
    if let Some(digest) = header {
        return Ok(digest);
    }
    // Registries that leave the header out of HEAD: the digest is the
    // manifest's own hash.
    let response = fetcher
        .send(ask(http::Method::GET, authorization.as_deref())?)
        .await
        .map_err(|e| failed(e.to_string()))?;
    if !response.status().is_success() {
        return Err(failed(format!(
            "the registry answered {} to GET of the manifest",
            response.status()
        )));
    }
    let body = read_small(response, 4 << 20)
        .await
        .map_err(|e| failed(e.to_string()))?;
    let hash = Sha256::digest(&body);
    Ok(format!(
        "sha256:{}",
        hash.iter().map(|b| format!("{b:02x}")).collect::<String>()
    ))
}

enum TokenError {
    Refused(u16),
    Failed(String),
}

/// Gets a bearer token from the challenge's realm, with basic credentials
/// when we have them (anonymous pulls of public images otherwise).
async fn bearer_token(
    fetcher: &HttpFetcher,
    challenge: &str,
    credential: Option<&RegistryCredential>,
) -> Result<String, TokenError> {
    let realm = challenge_param(challenge, "realm").ok_or_else(|| {
        TokenError::Failed(format!("auth challenge without a realm: {challenge:?}"))
    })?;
    let mut url = realm;
    let mut separator = if url.contains('?') { '&' } else { '?' };
    for key in ["service", "scope"] {
        if let Some(value) = challenge_param(challenge, key) {
            url.push(separator);
            url.push_str(key);
            url.push('=');
            url.push_str(&value.replace(' ', "%20"));
            separator = '&';
        }
    }
    let mut request = http::Request::get(&url);
    if let Some(credential) = credential {
        request = request.header(http::header::AUTHORIZATION, basic(credential));
    }
    let request = request
        .body(Empty::new())
        .map_err(|e| TokenError::Failed(format!("token url {url:?}: {e}")))?;
    let response = fetcher
        .send(request)
        .await
        .map_err(|e| TokenError::Failed(e.to_string()))?;
    let status = response.status();
    if status == http::StatusCode::UNAUTHORIZED || status == http::StatusCode::FORBIDDEN {
        return Err(TokenError::Refused(status.as_u16()));
    }
    if !status.is_success() {
        return Err(TokenError::Failed(format!(
            "the token service answered {status}"
        )));
    }
    let body = read_small(response, 1 << 20)
        .await
        .map_err(|e| TokenError::Failed(e.to_string()))?;
    let json: serde_json::Value = serde_json::from_slice(&body)
        .map_err(|e| TokenError::Failed(format!("the token service answered bad JSON: {e}")))?;
    json.get("token")
        .or_else(|| json.get("access_token"))
        .and_then(|t| t.as_str())
        .map(|t| format!("Bearer {t}"))
        .ok_or_else(|| TokenError::Failed("the token service answered no token".into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parsed(text: &str) -> (String, String, Option<String>, Option<String>) {
        let r = ImageRef::parse(text).unwrap();
        (r.registry, r.repository, r.tag, r.digest)
    }

    #[test]
    fn references_normalize_as_docker_does() {
        assert_eq!(
            parsed("nginx"),
            ("docker.io".into(), "library/nginx".into(), None, None)
        );
        assert_eq!(
            parsed("nginx:1.25"),
            (
                "docker.io".into(),
                "library/nginx".into(),
                Some("1.25".into()),
                None
            )
        );
        assert_eq!(
            parsed("docker.io/acme/shop:v2"),
            (
                "docker.io".into(),
                "acme/shop".into(),
                Some("v2".into()),
                None
            )
        );
        assert_eq!(
            parsed("127.0.0.1:5000/shop/web:v1"),
            (
                "127.0.0.1:5000".into(),
                "shop/web".into(),
                Some("v1".into()),
                None
            )
        );
        let digest = format!("sha256:{}", "a".repeat(64));
        assert_eq!(
            parsed(&format!("ghcr.io/acme/web@{digest}")),
            (
                "ghcr.io".into(),
                "acme/web".into(),
                None,
                Some(digest.clone())
            )
        );
        let r = ImageRef::parse("localhost:5000/web:v1").unwrap();
        assert_eq!(r.pinned(&digest), format!("localhost:5000/web@{digest}"));
        assert_eq!(r.scheme(), "http");
        assert_eq!(
            ImageRef::parse("ghcr.io/acme/web").unwrap().scheme(),
            "https"
        );
    }

    #[test]
    fn bad_references_say_what_is_wrong() {
        for bad in ["", "Shop/Web", "web@sha256:123", "web:", "a//b", "web:v 1"] {
            let error = ImageRef::parse(bad).unwrap_err().to_string();
            assert!(error.contains(&format!("{bad:?}")), "{error}");
        }
    }

    #[test]
    fn challenges_are_read() {
        let c = r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/nginx:pull""#;
        assert_eq!(
            challenge_param(c, "realm").as_deref(),
            Some("https://auth.docker.io/token")
        );
        assert_eq!(
            challenge_param(c, "scope").as_deref(),
            Some("repository:library/nginx:pull")
        );
        assert_eq!(challenge_param(c, "missing"), None);
    }
}
