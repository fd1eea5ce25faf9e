//! A color per release, told apart at a glance: each service's releases
//! in view get distinct hues from one palette, the older releases first,
//! so a release keeps its color while newer ones come (and the new
//! release of a rollout never looks like the one it replaces).

use std::collections::{BTreeMap, HashMap};

use cutover_proto::v1 as pb;

/// Hues far enough apart to name at a glance: blue, orange, green,
/// purple, red, teal, gold, magenta, lime, indigo.
const HUES: [u32; 10] = [212, 28, 140, 275, 2, 178, 48, 318, 95, 245];

/// FNV-1a: stable across runs and builds, unlike the std hasher.
fn slot(release_id: &str) -> usize {
    let hash = release_id.bytes().fold(0xcbf29ce484222325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x100000001b3)
    });
    (hash % HUES.len() as u64) as usize
}

/// How far apart two hues are on the wheel, in degrees.
fn apart(a: u32, b: u32) -> u32 {
    let d = a.abs_diff(b);
    d.min(360 - d)
}

/// Hues closer than this look alike on a tile.
const ALIKE: u32 = 45;

/// From `own` on, the first free slot whose hue is far from every taken
/// one; else the first free slot; else `own` (more releases than hues).
fn pick(own: usize, taken: &[bool; HUES.len()]) -> usize {
    let from_own = (0..HUES.len()).map(|i| (own + i) % HUES.len());
    let far = |at: usize| (0..HUES.len()).all(|t| !taken[t] || apart(HUES[t], HUES[at]) >= ALIKE);
    from_own
        .clone()
        .find(|&at| !taken[at] && far(at))
        .or_else(|| from_own.clone().find(|&at| !taken[at]))
        .unwrap_or(own)
}

#[derive(Debug, Default)]
pub struct Colors(HashMap<String, u32>);

impl Colors {
    /// Each service's releases in view, oldest first: those its rollouts
    /// named (`rollouts` newest first), then its current release, then any
    /// other a node runs; each takes its own slot of the palette, or the
    /// next one no older release of the service holds.
    pub fn assign(
        rollouts: &[pb::Rollout],
        fleet: &[pb::FleetService],
        nodes: &[pb::Node],
    ) -> Colors {
        let mut order: BTreeMap<String, Vec<String>> = BTreeMap::new();
        let mut add = |service: &str, id: &str| {
            let ids = order.entry(service.to_string()).or_default();
            if !id.is_empty() && !ids.iter().any(|i| i == id) {
                ids.push(id.to_string());
            }
        };
        for r in rollouts.iter().rev() {
            for release in [&r.previous_release, &r.release].into_iter().flatten() {
                add(&r.service, &release.id);
            }
        }
        for s in fleet {
            if let Some(release) = &s.release {
                add(&s.service, &release.id);
            }
        }
        for s in nodes.iter().flat_map(|n| &n.services) {
            add(&s.service, &s.release_id);
            if let Some(side) = &s.side {
                add(&s.service, &side.release_id);
            }
        }
        let mut colors = HashMap::new();
        for ids in order.values() {
            let mut taken = [false; HUES.len()];
            for id in ids {
                let at = pick(slot(id), &taken);
                taken[at] = true;
                colors.insert(id.clone(), HUES[at]);
            }
        }
        Colors(colors)
    }

    /// The hue of a release; one no view placed has its own slot's.
    pub fn hue(&self, release_id: &str) -> u32 {
        self.0
            .get(release_id)
            .copied()
            .unwrap_or(HUES[slot(release_id)])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rollout(service: &str, from: Option<&str>, to: &str) -> pb::Rollout {
        let info = |id: &str| pb::ReleaseInfo {
            id: id.into(),
            ..Default::default()
        };
        pb::Rollout {
            service: service.into(),
            previous_release: from.map(info),
            release: Some(info(to)),
            ..Default::default()
        }
    }

    #[test]
    fn a_services_releases_never_share_a_color_and_keep_theirs() {
        // Ten releases of one service, each rolled out over the one before.
        let ids: Vec<String> = (1..=10).map(|v| format!("web-v{v}-{v:08x}")).collect();
        let mut rollouts = Vec::new();
        let mut before: Vec<(String, u32)> = Vec::new();
        for (i, id) in ids.iter().enumerate() {
            let from = i.checked_sub(1).map(|p| ids[p].as_str());
            rollouts.insert(0, rollout("web", from, id));
            let colors = Colors::assign(&rollouts, &[], &[]);
            let hues: Vec<u32> = ids[..=i].iter().map(|id| colors.hue(id)).collect();
            let mut distinct = hues.clone();
            distinct.sort();
            distinct.dedup();
            assert_eq!(distinct.len(), hues.len(), "{hues:?}");
            for (id, hue) in &before {
                assert_eq!(colors.hue(id), *hue, "{id} kept its color");
            }
            // The first releases in view are far apart on the wheel.
            for (x, a) in hues.iter().take(4).enumerate() {
                for b in hues.iter().take(4).skip(x + 1) {
                    assert!(apart(*a, *b) >= ALIKE, "{hues:?}");
                }
            }
            before = ids[..=i].iter().cloned().zip(hues).collect();
        }
        // Another service's releases are colored on their own.
        let other = Colors::assign(&[rollout("worker", None, &ids[0])], &[], &[]);
        assert_eq!(other.hue(&ids[0]), HUES[slot(&ids[0])]);
    }
}
