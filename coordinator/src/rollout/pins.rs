//! What a deploy pins once, before anything is created: each image's
//! digest (every node of the deploy runs the same one), the version label,
//! each secret's version.

use std::collections::BTreeMap;

use super::planner::DeployRequest;
use super::{RolloutError, Rollouts};
use crate::images::PinnedImage;
use crate::spec::{AppSpec, Resolved};

impl Rollouts {
    /// Each image pinned once: every service (and node) of this deploy runs
    /// the same digest. Returns the pins by reference and each docker
    /// service's pinned image.
    pub(super) async fn pin_images<'a>(
        &self,
        spec: &AppSpec,
        services: &'a [String],
        request: &DeployRequest,
    ) -> Result<(BTreeMap<String, PinnedImage>, BTreeMap<&'a str, String>), RolloutError> {
        let mut pinned: BTreeMap<String, PinnedImage> = BTreeMap::new();
        let mut images = BTreeMap::new();
        for service in services {
            let spec_image = spec.services[service].image.clone();
            if spec.services[service].runtime != "docker" {
                continue;
            }
            let Some(reference) = request.image.clone().or(spec_image) else {
                continue; // resolve() says what is missing
            };
            if !pinned.contains_key(&reference) {
                let image = self.images.pin(&reference).await?;
                pinned.insert(reference.clone(), image);
            }
            images.insert(service.as_str(), pinned[&reference].image.clone());
        }
        Ok((pinned, images))
    }

    /// Secrets are pinned to their current versions, which the release id
    /// covers: a new version is a new release, rolled out like one.
    pub(super) async fn pin_secrets(&self, service: &mut Resolved) -> Result<(), RolloutError> {
        let release = &mut service.release;
        for secret in &mut release.secrets {
            secret.version = self.secrets.current(&service.env, &secret.name).await?;
        }
        if !release.secrets.is_empty() {
            release.release_id = crate::spec::release_id(release);
        }
        Ok(())
    }
}

/// The release's version label: the operator's, or else the tag of the
/// images deployed when they all have the same one.
pub(super) fn version_label(
    request: &DeployRequest,
    pinned: &BTreeMap<String, PinnedImage>,
) -> Result<String, RolloutError> {
    if !request.version.is_empty() {
        return Ok(request.version.clone());
    }
    let tags: std::collections::BTreeSet<_> =
        pinned.values().filter_map(|p| p.tag.clone()).collect();
    match (tags.len(), pinned.values().all(|p| p.tag.is_some())) {
        (1, true) => Ok(tags.into_iter().next().expect("one tag")),
        _ => Err(RolloutError::NoVersion(
            "give the release a version label with --version (it defaults to the image's tag only when every image of the deploy has the same one)".into(),
        )),
    }
}
