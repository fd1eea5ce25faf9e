//! The `cutover.v1` wire types and gRPC services: the only place they are
//! defined.
#![forbid(unsafe_code)]

pub mod v1 {
    #![allow(clippy::all)]
    tonic::include_proto!("cutover.v1");
}

/// etcd's v3 API, clients only: what the coordinator's etcd store speaks
/// (see `etcd/README.md`).
pub mod etcd {
    pub mod mvccpb {
        #![allow(clippy::all)]
        tonic::include_proto!("mvccpb");
    }
    pub mod authpb {
        #![allow(clippy::all)]
        tonic::include_proto!("authpb");
    }
    pub mod etcdserverpb {
        #![allow(clippy::all)]
        tonic::include_proto!("etcdserverpb");
    }
}

/// How each state prints: its name without the prefix, in lowercase, the
/// spelling operators (and scripts reading `--json`) have always seen.
macro_rules! state_names {
    ($($state:ident { $($variant:ident => $name:literal,)* })*) => {$(
        impl v1::$state {
            pub fn as_str(self) -> &'static str {
                match self {
                    v1::$state::Unspecified => "unspecified",
                    $(v1::$state::$variant => $name,)*
                }
            }
        }
    )*};
}

state_names! {
    ServerRole {
        Single => "single",
        Leading => "leading",
        Following => "following",
    }
    JobKind {
        Job => "job",
        Backup => "backup",
        RestoreTest => "restore_test",
    }
    JobRunState {
        Running => "running",
        Succeeded => "succeeded",
        Failed => "failed",
        TimedOut => "timed_out",
        Lost => "lost",
        Skipped => "skipped",
    }
    RolloutState {
        Pending => "pending",
        Running => "running",
        Paused => "paused",
        Succeeded => "succeeded",
        Failed => "failed",
        RollingBack => "rolling_back",
        RolledBack => "rolled_back",
        Aborted => "aborted",
        Held => "held",
        AwaitingApproval => "awaiting_approval",
    }
    RolloutNodeState {
        Pending => "pending",
        Preparing => "preparing",
        Prepared => "prepared",
        Activating => "activating",
        Switched => "switched",
        Unchanged => "unchanged",
        Failed => "failed",
        RollingBack => "rolling_back",
        RolledBack => "rolled_back",
        Staging => "staging",
        Canary => "canary",
        Weighting => "weighting",
        Stopping => "stopping",
        Stopped => "stopped",
    }
    DeploymentState {
        Running => "running",
        RollingBack => "rolling_back",
        Succeeded => "succeeded",
        Failed => "failed",
        RolledBack => "rolled_back",
        Aborted => "aborted",
    }
    DeploymentStepState {
        Waiting => "waiting",
        Running => "running",
        Succeeded => "succeeded",
        Unchanged => "unchanged",
        Failed => "failed",
        RolledBack => "rolled_back",
        RollbackFailed => "rollback_failed",
        NotStarted => "not_started",
    }
    ReleaseState {
        Deploying => "deploying",
        Stable => "stable",
        Failed => "failed",
        RolledBack => "rolled_back",
        Aborted => "aborted",
        Reverted => "reverted",
    }
}

#[cfg(test)]
mod tests {
    use super::v1 as pb;
    use prost::Message;

    /// `Release` as it was before `web` and `worker` became a oneof: two
    /// plain fields, 7 and 10. Coordinators store releases encoded, so
    /// those bytes must still decode, and the other way round.
    #[derive(Clone, PartialEq, Message)]
    struct ReleaseBeforeTheOneof {
        #[prost(string, tag = "1")]
        release_id: String,
        #[prost(message, optional, tag = "7")]
        web: Option<pb::WebService>,
        #[prost(string, tag = "8")]
        stop_signal: String,
        #[prost(message, optional, tag = "10")]
        worker: Option<pb::Worker>,
    }

    #[test]
    fn states_print_as_their_proto_names_without_the_prefix() {
        fn check(value: i32, prefix: &str, proto: Option<&str>, printed: Option<&str>) {
            let expected = proto.map(|name| name.strip_prefix(prefix).unwrap().to_lowercase());
            assert_eq!(printed.map(str::to_string), expected, "{value}");
        }
        for value in 0..16 {
            let rollout = pb::RolloutState::try_from(value).ok();
            check(
                value,
                "ROLLOUT_STATE_",
                rollout.map(|s| s.as_str_name()),
                rollout.map(|s| s.as_str()),
            );
            let node = pb::RolloutNodeState::try_from(value).ok();
            check(
                value,
                "ROLLOUT_NODE_STATE_",
                node.map(|s| s.as_str_name()),
                node.map(|s| s.as_str()),
            );
            let deployment = pb::DeploymentState::try_from(value).ok();
            check(
                value,
                "DEPLOYMENT_STATE_",
                deployment.map(|s| s.as_str_name()),
                deployment.map(|s| s.as_str()),
            );
            let step = pb::DeploymentStepState::try_from(value).ok();
            check(
                value,
                "DEPLOYMENT_STEP_STATE_",
                step.map(|s| s.as_str_name()),
                step.map(|s| s.as_str()),
            );
            let kind = pb::JobKind::try_from(value).ok();
            check(
                value,
                "JOB_KIND_",
                kind.map(|s| s.as_str_name()),
                kind.map(|s| s.as_str()),
            );
            let run = pb::JobRunState::try_from(value).ok();
            check(
                value,
                "JOB_RUN_STATE_",
                run.map(|s| s.as_str_name()),
                run.map(|s| s.as_str()),
            );
            let release = pb::ReleaseState::try_from(value).ok();
            check(
                value,
                "RELEASE_STATE_",
                release.map(|s| s.as_str_name()),
                release.map(|s| s.as_str()),
            );
        }
    }

    #[test]
    fn web_and_worker_keep_their_field_numbers() {
        let web = pb::WebService {
            listen: ":8080".into(),
            ..Default::default()
        };
        let worker = pb::Worker {
            min_healthy_time_ms: 15_000,
            ..Default::default()
        };
        for (old, kind) in [
            (
                ReleaseBeforeTheOneof {
                    release_id: "web-v1-0123abcd".into(),
                    web: Some(web.clone()),
                    stop_signal: "SIGQUIT".into(),
                    worker: None,
                },
                pb::release::Kind::Web(web),
            ),
            (
                ReleaseBeforeTheOneof {
                    release_id: "horizon-v1-0123abcd".into(),
                    web: None,
                    stop_signal: "SIGQUIT".into(),
                    worker: Some(worker.clone()),
                },
                pb::release::Kind::Worker(worker),
            ),
        ] {
            let new = pb::Release::decode(old.encode_to_vec().as_slice()).unwrap();
            assert_eq!(new.release_id, old.release_id);
            assert_eq!(new.stop_signal, "SIGQUIT");
            assert_eq!(new.kind.as_ref(), Some(&kind));
            let back = ReleaseBeforeTheOneof::decode(new.encode_to_vec().as_slice()).unwrap();
            assert_eq!(back, old);
        }
    }
}
