//! The coordinator's states as the operator API carries them: the one place
//! they are mapped. Their printed names come from the wire enums
//! (`as_str` in the proto crate), so the CLI, the logs, the metrics and the
//! timeline spell every state the same way.

use cutover_proto::v1 as pb;

use super::deployment::{DeploymentState, StepState};
use super::model::{NodeState, RolloutState};
use crate::store::ReleaseState;

impl From<RolloutState> for pb::RolloutState {
    fn from(state: RolloutState) -> Self {
        match state {
            RolloutState::Pending => pb::RolloutState::Pending,
            RolloutState::Running => pb::RolloutState::Running,
            RolloutState::Paused => pb::RolloutState::Paused,
            RolloutState::Held => pb::RolloutState::Held,
            RolloutState::Succeeded => pb::RolloutState::Succeeded,
            RolloutState::Failed => pb::RolloutState::Failed,
            RolloutState::RollingBack => pb::RolloutState::RollingBack,
            RolloutState::RolledBack => pb::RolloutState::RolledBack,
            RolloutState::Aborted => pb::RolloutState::Aborted,
            RolloutState::AwaitingApproval => pb::RolloutState::AwaitingApproval,
        }
    }
}

impl From<NodeState> for pb::RolloutNodeState {
    fn from(state: NodeState) -> Self {
        match state {
            NodeState::Pending => pb::RolloutNodeState::Pending,
            NodeState::Preparing => pb::RolloutNodeState::Preparing,
            NodeState::Prepared => pb::RolloutNodeState::Prepared,
            NodeState::Activating => pb::RolloutNodeState::Activating,
            NodeState::Switched => pb::RolloutNodeState::Switched,
            NodeState::Unchanged => pb::RolloutNodeState::Unchanged,
            NodeState::Failed => pb::RolloutNodeState::Failed,
            NodeState::RollingBack => pb::RolloutNodeState::RollingBack,
            NodeState::RolledBack => pb::RolloutNodeState::RolledBack,
            NodeState::Staging => pb::RolloutNodeState::Staging,
            NodeState::Canary => pb::RolloutNodeState::Canary,
            NodeState::Weighting => pb::RolloutNodeState::Weighting,
            NodeState::Stopping => pb::RolloutNodeState::Stopping,
            NodeState::Stopped => pb::RolloutNodeState::Stopped,
        }
    }
}

impl From<DeploymentState> for pb::DeploymentState {
    fn from(state: DeploymentState) -> Self {
        match state {
            DeploymentState::Running => pb::DeploymentState::Running,
            DeploymentState::RollingBack => pb::DeploymentState::RollingBack,
            DeploymentState::Succeeded => pb::DeploymentState::Succeeded,
            DeploymentState::Failed => pb::DeploymentState::Failed,
            DeploymentState::RolledBack => pb::DeploymentState::RolledBack,
            DeploymentState::Aborted => pb::DeploymentState::Aborted,
        }
    }
}

impl From<StepState> for pb::DeploymentStepState {
    fn from(state: StepState) -> Self {
        match state {
            StepState::Waiting => pb::DeploymentStepState::Waiting,
            StepState::Running => pb::DeploymentStepState::Running,
            StepState::Succeeded => pb::DeploymentStepState::Succeeded,
            StepState::Unchanged => pb::DeploymentStepState::Unchanged,
            StepState::Failed => pb::DeploymentStepState::Failed,
            StepState::RolledBack => pb::DeploymentStepState::RolledBack,
            StepState::RollbackFailed => pb::DeploymentStepState::RollbackFailed,
            StepState::NotStarted => pb::DeploymentStepState::NotStarted,
        }
    }
}

impl From<ReleaseState> for pb::ReleaseState {
    fn from(state: ReleaseState) -> Self {
        match state {
            ReleaseState::Deploying => pb::ReleaseState::Deploying,
            ReleaseState::Stable => pb::ReleaseState::Stable,
            ReleaseState::Failed => pb::ReleaseState::Failed,
            ReleaseState::RolledBack => pb::ReleaseState::RolledBack,
            ReleaseState::Aborted => pb::ReleaseState::Aborted,
            ReleaseState::Reverted => pb::ReleaseState::Reverted,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The stored form (serde) and the printed one must stay the same
    /// words: operators read one, scripts the other, and both predate the
    /// wire enums.
    fn same<T: serde::Serialize>(state: T, printed: &str) {
        assert_eq!(serde_json::to_value(state).unwrap(), printed);
    }

    #[test]
    fn every_state_prints_as_it_is_stored() {
        use NodeState as N;
        use RolloutState as R;
        for s in [
            R::Pending,
            R::Running,
            R::Paused,
            R::Succeeded,
            R::Failed,
            R::RollingBack,
            R::RolledBack,
            R::Aborted,
        ] {
            same(s, s.as_str());
        }
        for s in [
            N::Pending,
            N::Preparing,
            N::Prepared,
            N::Activating,
            N::Switched,
            N::Unchanged,
            N::Failed,
            N::RollingBack,
            N::RolledBack,
        ] {
            same(s, s.as_str());
        }
        use DeploymentState as D;
        for s in [
            D::Running,
            D::RollingBack,
            D::Succeeded,
            D::Failed,
            D::RolledBack,
            D::Aborted,
        ] {
            same(s, s.as_str());
        }
        use StepState as S;
        for s in [
            S::Waiting,
            S::Running,
            S::Succeeded,
            S::Unchanged,
            S::Failed,
            S::RolledBack,
            S::RollbackFailed,
            S::NotStarted,
        ] {
            same(s, s.as_str());
        }
        use ReleaseState as L;
        for s in [
            L::Deploying,
            L::Stable,
            L::Failed,
            L::RolledBack,
            L::Aborted,
            L::Reverted,
        ] {
            same(s, s.as_str());
        }
    }
}
