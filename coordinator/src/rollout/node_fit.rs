//! Whether the nodes a rollout targets can run it: their agents know the
//! commands and settings of its strategy and release, and, for a strategy
//! that runs two releases side by side, they have the memory.

use super::{capacity, RolloutError, Target};
use crate::registry::NodeView;
use crate::strategy::StrategyKind;

/// What agents must announce to run a canary's commands.
const CANARY_CAPABILITIES: [&str; 2] = ["command.stage_release", "command.set_traffic"];

/// What agents must announce to run more than one process of a release.
const INSTANCES_CAPABILITY: &str = "release.instances";

/// The names of the nodes among `views` (those serving `service`, when
/// named) whose agents do not announce every one of `capabilities`.
fn lacking<'a>(
    views: &'a [NodeView],
    capabilities: &[&str],
    service: Option<&str>,
) -> Vec<&'a str> {
    views
        .iter()
        .filter(|v| service.is_none_or(|s| v.record.services.iter().any(|have| have.service == s)))
        .filter(|v| {
            !capabilities
                .iter()
                .all(|c| v.record.capabilities.iter().any(|have| have == c))
        })
        .map(|v| v.record.name.as_str())
        .collect()
}

/// Refuses `target` (of `service`) if a node among `reachable` could not
/// run it through: better than failing half-way.
pub(super) fn check(
    target: &Target,
    service: &str,
    reachable: &[NodeView],
) -> Result<(), RolloutError> {
    let release = &target.release;
    // A canary runs on nodes that serve a release; their agents must
    // know its commands, or it would fail half-way.
    if target.strategy_to_run().canary().is_some() {
        let old = lacking(reachable, &CANARY_CAPABILITIES, Some(service));
        if !old.is_empty() {
            return Err(RolloutError::AgentsTooOld {
                nodes: old.join(", "),
                what:
                    "a canary (they do not announce command.stage_release and command.set_traffic)"
                        .into(),
                instead: "deploy with another strategy",
            });
        }
    }
    // An agent from before `cutover scale` would run one process of
    // the release and report it as the release: not what was chosen.
    if release.instances > 1 {
        let old = lacking(reachable, &[INSTANCES_CAPABILITY], None);
        if !old.is_empty() {
            return Err(RolloutError::AgentsTooOld {
                nodes: old.join(", "),
                what: format!(
                    "{} processes of {service} per node (they do not announce {INSTANCES_CAPABILITY})",
                    release.instances
                ),
                instead: "scale it to 1 until they are",
            });
        }
    }
    if matches!(target.strategy_to_run().kind, StrategyKind::BlueGreen(_)) {
        let limit = release.container.as_ref().map_or(0, |c| c.memory_bytes);
        let short = capacity::memory_shortfalls(
            reachable.iter().map(|v| &v.record),
            service,
            &release.release_id,
            limit,
            super::scale::instances_of(release),
        );
        if !short.is_empty() {
            return Err(RolloutError::NoRoom(short));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view(name: &str, capabilities: &[&str], serving: bool) -> NodeView {
        let mut record = super::super::capacity::tests::node(name, 4096, 1024, 100);
        record.capabilities = capabilities.iter().map(|c| c.to_string()).collect();
        if !serving {
            record.services.clear();
        }
        NodeView {
            record,
            connected: true,
            heartbeat_age: std::time::Duration::ZERO,
            revoked: false,
        }
    }

    #[test]
    fn nodes_whose_agents_lack_a_capability_are_named() {
        let views = [
            view(
                "new",
                &[
                    "command.stage_release",
                    "command.set_traffic",
                    INSTANCES_CAPABILITY,
                ],
                true,
            ),
            view("old", &["command.stage_release"], true),
            view("idle", &[], false),
        ];
        assert_eq!(lacking(&views, &CANARY_CAPABILITIES, Some("web")), ["old"]);
        assert_eq!(
            lacking(&views, &[INSTANCES_CAPABILITY], None),
            ["old", "idle"],
            "every target node runs the processes, serving or not"
        );
    }
}
