//! Whether the nodes have room for a strategy that runs the new release
//! beside the serving one on every node until the switch (blue/green):
//! memory per node doubles meanwhile, so a node must report free memory
//! for one more copy of what its serving release holds now (or the new
//! release's container limit, if larger), with a tenth on top. A side
//! release running there (one kept warm) is stopped before the new one
//! starts: its memory counts as free; the new release itself kept warm
//! is reused and needs nothing.

use crate::store::NodeRecord;

/// One node without room, for the refusal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Shortfall {
    pub node: String,
    pub free_bytes: u64,
    pub needs_bytes: u64,
    pub release_id: String,
}

impl std::fmt::Display for Shortfall {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} has {} MiB free, another copy of {} needs {} MiB",
            self.node,
            self.free_bytes >> 20,
            self.release_id,
            self.needs_bytes >> 20
        )
    }
}

/// The nodes among `nodes` running `service` that report too little free
/// memory for a second release of it, `release_id`, of `instances`
/// processes (`limit_bytes`: a process's container memory limit, 0 for
/// none). A process is judged to need what one of the serving release's
/// holds now. A node that reports no figures or
/// no memory use of its release is not judged: there is nothing to judge
/// by.
pub fn memory_shortfalls<'a>(
    nodes: impl IntoIterator<Item = &'a NodeRecord>,
    service: &str,
    release_id: &str,
    limit_bytes: u64,
    instances: u32,
) -> Vec<Shortfall> {
    nodes
        .into_iter()
        .filter_map(|node| {
            let figures = node.figures.as_ref()?;
            let serving = node.services.iter().find(|s| s.service == service)?;
            if serving.memory_bytes == 0 || figures.memory_total_bytes == 0 {
                return None;
            }
            let side = serving.side.as_ref();
            if side.is_some_and(|s| s.release_id == release_id) {
                return None;
            }
            let free = figures
                .memory_total_bytes
                .saturating_sub(figures.memory_used_bytes)
                .saturating_add(side.map_or(0, |s| s.memory_bytes));
            let per_process = serving.memory_bytes / u64::from(serving.instances.max(1));
            let copy = per_process
                .max(limit_bytes)
                .saturating_mul(u64::from(instances.max(1)));
            let needs = copy.saturating_add(copy / 10);
            (free < needs).then(|| Shortfall {
                node: node.name.clone(),
                free_bytes: free,
                needs_bytes: needs,
                release_id: serving.release_id.clone(),
            })
        })
        .collect()
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use crate::store::{Figures, ServiceStatus};

    /// A node serving web-v1, its memory in MiB.
    pub(in crate::rollout) fn node(name: &str, total: u64, used: u64, serving: u64) -> NodeRecord {
        NodeRecord {
            name: name.into(),
            figures: Some(Figures {
                memory_total_bytes: total << 20,
                memory_used_bytes: used << 20,
                ..Default::default()
            }),
            services: vec![ServiceStatus {
                service: "web".into(),
                release_id: "web-v1".into(),
                memory_bytes: serving << 20,
                ..Default::default()
            }],
            id: name.into(),
            address: "10.0.0.1".into(),
            labels: Default::default(),
            agent_version: String::new(),
            agent_build: String::new(),
            capabilities: Vec::new(),
            status: crate::store::NodeStatus::Ready,
            registered_at_ms: 0,
            last_seen_ms: 0,
            services_at_ms: 0,
            cert_serial: String::new(),
            cert_expires_at_ms: 0,
            cert_ca: String::new(),
            trust_bundle: String::new(),
        }
    }

    #[test]
    fn a_node_without_room_for_a_second_copy_is_named_with_its_figures() {
        let nodes = [
            node("roomy", 4096, 1024, 500),
            node("tight", 4096, 3600, 500),
            node("limit", 4096, 2048, 100),
        ];
        let short = memory_shortfalls(&nodes, "web", "web-v2", 0, 1);
        assert_eq!(
            short.iter().map(ToString::to_string).collect::<Vec<_>>(),
            ["tight has 496 MiB free, another copy of web-v1 needs 550 MiB"]
        );
        // The new release's container limit counts when it is larger.
        let short = memory_shortfalls(&nodes, "web", "web-v2", 2000 << 20, 1);
        let names: Vec<&str> = short.iter().map(|s| s.node.as_str()).collect();
        assert_eq!(names, ["tight", "limit"], "2200 MiB fit into roomy's 3072");
        // Not known: not judged.
        let mut unknown = node("new", 4096, 4000, 0);
        assert!(memory_shortfalls([&unknown], "web", "web-v2", 0, 1).is_empty());
        unknown.figures = None;
        assert!(memory_shortfalls([&unknown], "web", "web-v2", 2000 << 20, 1).is_empty());
        assert!(memory_shortfalls(&nodes, "worker", "worker-v2", 0, 1).is_empty());
        // A release kept warm there is stopped first: its memory is free
        // for the new one; the warm release deployed again needs nothing.
        let mut warm = node("warm", 4096, 3600, 500);
        warm.services[0].side = Some(crate::store::SideStatus {
            release_id: "web-v0".into(),
            memory_bytes: 400 << 20,
            retire_at_ms: -1,
            ..Default::default()
        });
        assert!(memory_shortfalls([&warm], "web", "web-v2", 0, 1).is_empty());
        warm.services[0].side.as_mut().unwrap().memory_bytes = 0;
        assert_eq!(memory_shortfalls([&warm], "web", "web-v2", 0, 1).len(), 1);
        assert!(memory_shortfalls([&warm], "web", "web-v0", 0, 1).is_empty());
    }

    #[test]
    fn a_scaled_release_needs_room_for_each_of_its_processes() {
        // 3 processes serving, 600 MiB in all: 200 MiB each.
        let mut scaled = node("scaled", 4096, 2048, 600);
        scaled.services[0].instances = 3;
        assert!(memory_shortfalls([&scaled], "web", "web-v2", 0, 3).is_empty());
        // Scaled up to 10: 2000 MiB and a tenth do not fit into 2048.
        let short = memory_shortfalls([&scaled], "web", "web-v2", 0, 10);
        assert_eq!(short[0].needs_bytes, 2200 << 20);
        // A container limit counts per process.
        let short = memory_shortfalls([&scaled], "web", "web-v2", 700 << 20, 3);
        assert_eq!(short[0].needs_bytes, 2310 << 20);
    }
}
