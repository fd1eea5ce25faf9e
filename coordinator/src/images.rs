//! Pins container images for releases: a tag is resolved to its manifest
//! digest here, once per deploy, so every node pulls the same image even if
//! the tag moves during the rollout. The coordinator resolves (rather than
//! the first agent) because a deploy is accepted or refused before any node
//! is asked anything: a typo'd tag or a refused login fails the `deploy`
//! command itself, and the release record holds the digest from the start.

use std::path::Path;

use cutover_common::fetch::{FetchError, HttpFetcher};
use cutover_common::registry::{resolve_digest, ImageRef, RegistryCredential, RegistryError};

pub struct ImageResolver {
    fetcher: HttpFetcher,
    credentials: Vec<RegistryCredential>,
}

/// An image reference pinned for a release.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PinnedImage {
    /// `REGISTRY/REPOSITORY@sha256:<hex>`.
    pub image: String,
    /// The tag it was resolved from, if any: the default version label.
    pub tag: Option<String>,
}

impl ImageResolver {
    /// `ca` adds a PEM CA for registries behind a private one.
    pub fn new(
        ca: Option<&Path>,
        credentials: Vec<RegistryCredential>,
    ) -> Result<Self, FetchError> {
        Ok(Self {
            fetcher: HttpFetcher::new(ca)?,
            credentials,
        })
    }

    pub async fn pin(&self, reference: &str) -> Result<PinnedImage, RegistryError> {
        let parsed = ImageRef::parse(reference)?;
        let digest = resolve_digest(&self.fetcher, &parsed, &self.credentials).await?;
        let image = parsed.pinned(&digest);
        if parsed.digest.is_none() {
            tracing::info!(%reference, %image, "image tag resolved");
        }
        Ok(PinnedImage {
            image,
            tag: parsed.tag,
        })
    }
}
