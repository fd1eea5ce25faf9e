//! Bad input on every mutating operator call: a clear error, nothing
//! changed, and the coordinator keeps serving.

use std::time::Duration;

use cutover_integration_tests::{Cluster, Tuning};
use cutover_proto::v1 as pb;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_a_clear_error_and_changes_nothing() {
    let cluster = Cluster::start(1, Tuning::default()).await;
    cluster
        .wait_for_nodes(Duration::from_secs(10), |n| n.len() == 1 && n[0].connected)
        .await;
    let mut c = cluster.operator().await;
    let mut refusals: Vec<(&str, tonic::Status)> = Vec::new();
    macro_rules! refused {
        ($label:expr, $call:expr) => {
            match $call.await {
                Ok(answer) => panic!("{} was accepted: {:?}", $label, answer),
                Err(status) => refusals.push(($label, status)),
            }
        };
    }
    let deploy = |env: &str, spec: String| pb::DeployRequest {
        spec,
        spec_file: "cutover.toml".into(),
        env: env.into(),
        version: "v1".into(),
        artifact: Some(pb::Artifact {
            url: "coordinator:".into(),
            digest: format!("sha256:{}", "a".repeat(64)),
        }),
        ..Default::default()
    };
    let spec = "app = \"shop\"\n[services.web]\ncommand = [\"x\"]\nlisten = \":8080\"\n[services.web.health]\npath = \"/\"\n[environments.test]\nnodes = { env = \"test\" }\n";
    refused!("deploy to an empty env", c.deploy(deploy("", spec.into())));
    refused!(
        "deploy to ../prod",
        c.deploy(deploy("../prod", spec.into()))
    );
    refused!(
        "deploy of a spec with a NUL",
        c.deploy(deploy("test", spec.replace("shop", "sh\0op")))
    );
    refused!(
        "deploy of a 5 MiB spec",
        c.deploy(deploy("test", "#".repeat(5 << 20)))
    );
    refused!(
        "deploy of an artifact digest that is not one",
        c.deploy(pb::DeployRequest {
            artifact: Some(pb::Artifact {
                url: "coordinator:".into(),
                digest: "md5:abc".into(),
            }),
            ..deploy("test", spec.into())
        })
    );
    refused!(
        "deploy of a bad image reference",
        c.deploy(pb::DeployRequest {
            image: "Bad Image".into(),
            ..deploy(
                "test",
                spec.replace("command = [\"x\"]", "runtime = \"docker\"")
            )
        })
    );
    // A migration or hook that cannot run as written: the error names the
    // file, the key and the value, before anything is created.
    let migrate = |table: &str| format!("{spec}{table}");
    for (label, table, key) in [
        (
            "a migration of an unknown service",
            "[migrate]\nservice = \"api\"\ncommand = [\"m\"]\n",
            "migrate.service",
        ),
        (
            "a contract migration before the cutover",
            "[migrate]\nservice = \"web\"\ncommand = [\"m\"]\nphase = \"contract\"\n",
            "migrate.phase",
        ),
        (
            "a migration without a command",
            "[migrate]\nservice = \"web\"\ncommand = []\n",
            "migrate.command",
        ),
        (
            "a migration with a timeout of 0",
            "[migrate]\nservice = \"web\"\ncommand = [\"m\"]\ntimeout = \"0s\"\n",
            "migrate.timeout",
        ),
        (
            "a hook without a command",
            "[[hooks]]\nat = \"pre_deploy\"\ncommand = []\n",
            "hooks[0].command",
        ),
    ] {
        let status = c
            .deploy(deploy("test", migrate(table)))
            .await
            .expect_err(label);
        assert_eq!(
            status.code(),
            tonic::Code::InvalidArgument,
            "{label}: {status:?}"
        );
        assert!(
            status
                .message()
                .contains(&format!("cutover.toml: key `{key}`")),
            "{label}: {}",
            status.message()
        );
        refusals.push((label, status));
    }
    refused!(
        "rollback of a/b",
        c.rollback(pb::RollbackRequest {
            env: "test".into(),
            service: "a/b".into(),
            ..Default::default()
        })
    );
    refused!(
        "control of a rollout id with a newline",
        c.control_rollout(pb::ControlRolloutRequest {
            id: "web-1\n".into(),
            action: pb::RolloutAction::Pause as i32,
            ..Default::default()
        })
    );
    refused!(
        "an operator named a/b",
        c.create_operator(pb::CreateOperatorRequest {
            name: "a/b".into(),
            role: "viewer".into(),
            ..Default::default()
        })
    );
    refused!(
        "an operator with an empty role",
        c.create_operator(pb::CreateOperatorRequest {
            name: "eve".into(),
            ..Default::default()
        })
    );
    refused!(
        "an operator with a request that is not one",
        c.create_operator(pb::CreateOperatorRequest {
            name: "eve".into(),
            role: "viewer".into(),
            csr_pem:
                "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n"
                    .into(),
            ..Default::default()
        })
    );
    refused!(
        "a secret named ../x",
        c.set_secret(pb::SetSecretRequest {
            env: "test".into(),
            name: "../x".into(),
            value: b"v".to_vec(),
            ..Default::default()
        })
    );
    refused!(
        "a secret in an empty env",
        c.set_secret(pb::SetSecretRequest {
            env: String::new(),
            name: "X".into(),
            value: b"v".to_vec(),
            ..Default::default()
        })
    );
    refused!(
        "a secret of 65 KiB",
        c.set_secret(pb::SetSecretRequest {
            env: "test".into(),
            name: "X".into(),
            value: vec![b'v'; 65 << 10],
            ..Default::default()
        })
    );
    refused!(
        "a secret rotated every second",
        c.set_secret(pb::SetSecretRequest {
            env: "test".into(),
            name: "X".into(),
            value: b"v".to_vec(),
            rotate_every_ms: Some(1000),
        })
    );
    refused!(
        "a secret that is not UTF-8",
        c.set_secret(pb::SetSecretRequest {
            env: "test".into(),
            name: "X".into(),
            value: vec![0xff, 0xfe],
            ..Default::default()
        })
    );
    refused!(
        "a secret with a control character in its name",
        c.remove_secret(pb::RemoveSecretRequest {
            env: "test".into(),
            name: "X\u{7}".into(),
        })
    );
    refused!(
        "a token that lives 0 s",
        c.create_token(pb::CreateTokenRequest::default())
    );
    refused!(
        "a token with a label key with a space",
        c.create_token(pb::CreateTokenRequest {
            labels: [("a b".to_string(), "x".to_string())].into(),
            ttl_ms: 60_000,
            uses: 1,
        })
    );
    refused!(
        "revoking node a/b",
        c.revoke_node(pb::RevokeNodeRequest { node: "a/b".into() })
    );
    refused!(
        "revoking an unknown token",
        c.revoke_token(pb::RevokeTokenRequest { id: String::new() })
    );
    refused!(
        "pinging an unknown node",
        c.ping_node(pb::PingNodeRequest {
            node: "nope".into(),
            timeout_ms: 100,
        })
    );

    for (label, status) in &refusals {
        let message = status.message();
        assert!(
            !message.is_empty()
                && !message.contains("panicked")
                && status.code() != tonic::Code::Internal
                && status.code() != tonic::Code::Unknown,
            "{label}: not a clear error: {status:?}"
        );
    }

    // Nothing changed, and the coordinator still answers.
    let nodes = c
        .list_nodes(pb::ListNodesRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(nodes.nodes.len(), 1);
    let rollouts = c
        .list_rollouts(pb::ListRolloutsRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(rollouts.rollouts.is_empty(), "{rollouts:?}");
    let operators = c
        .list_operators(pb::ListOperatorsRequest {})
        .await
        .unwrap()
        .into_inner();
    // Only the caller, an admin issued offline, recorded at its first call.
    let names: Vec<&str> = operators
        .operators
        .iter()
        .map(|o| o.name.as_str())
        .collect();
    assert_eq!(names, ["tester"], "{operators:?}");
    let secrets = c
        .list_secrets(pb::ListSecretsRequest { env: "test".into() })
        .await
        .unwrap()
        .into_inner();
    assert!(secrets.secrets.is_empty(), "{secrets:?}");
    let tokens = c
        .list_tokens(pb::ListTokensRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(tokens.tokens.is_empty(), "{tokens:?}");
    for (label, status) in refusals {
        println!("{label}: {:?}: {}", status.code(), status.message());
    }
}
