use super::*;

fn http(path: &str) -> pb::Check {
    pb::Check {
        probe: Some(pb::check::Probe::Http(pb::HttpProbe {
            path: path.into(),
            ..Default::default()
        })),
        timeout_ms: 0,
    }
}

fn exec(command: &[&str]) -> pb::Check {
    pb::Check {
        probe: Some(pb::check::Probe::Exec(pb::ExecProbe {
            command: command.iter().map(|s| s.to_string()).collect(),
        })),
        timeout_ms: 500,
    }
}

/// A web release with every optional number left 0.
fn web() -> pb::Release {
    pb::Release {
        release_id: "web-v1-0123abcd".into(),
        service: "web".into(),
        version: "v1".into(),
        artifact: Some(pb::Artifact {
            url: "coordinator:".into(),
            digest: format!("sha256:{}", "A".repeat(64)),
        }),
        command: vec!["./server".into()],
        env: [("B".to_string(), "2".to_string()), ("A".into(), "1".into())].into(),
        kind: Some(pb::release::Kind::Web(pb::WebService {
            listen: ":8080".into(),
            health: Some(http("/health")),
            smoke: vec![http("/")],
            ..Default::default()
        })),
        ..Default::default()
    }
}

fn worker(health: Option<pb::Check>) -> pb::Release {
    pb::Release {
        kind: Some(pb::release::Kind::Worker(pb::Worker {
            health,
            min_healthy_time_ms: 15_000,
            ..Default::default()
        })),
        ..web()
    }
}

fn in_container(mut release: pb::Release) -> pb::Release {
    release.artifact = None;
    release.command.clear();
    release.container = Some(pb::Container {
        image: format!("nginx@sha256:{}", "a".repeat(64)),
        ..Default::default()
    });
    release
}

fn refusal(release: &pb::Release) -> ReleaseError {
    ReleaseSpec::try_from(release).expect_err("the release must be refused")
}

#[test]
fn a_release_runs_as_many_processes_as_it_says_up_to_the_limit() {
    for n in [1, 3, MAX_INSTANCES] {
        let release = pb::Release {
            instances: n,
            ..web()
        };
        assert_eq!(ReleaseSpec::try_from(&release).unwrap().instances, n);
    }
}

#[test]
fn a_web_release_gets_every_default() {
    let spec = ReleaseSpec::try_from(&web()).unwrap();
    assert_eq!(spec.instances, 1, "0 on the wire: one process");
    assert_eq!(
        spec.env,
        [("A".into(), "1".into()), ("B".into(), "2".into())]
    );
    assert_eq!(spec.stop_signal, None);
    assert_eq!(spec.stop_grace, DEFAULT_STOP_GRACE);
    assert_eq!(spec.stop_timeout, Duration::ZERO);
    let Source::Artifact { digest, .. } = &spec.source else {
        panic!("an artifact release")
    };
    assert_eq!(digest.to_string(), format!("sha256:{}", "a".repeat(64)));
    let Kind::Web(web) = spec.kind else {
        panic!("a web release")
    };
    assert_eq!(web.listen, Listen::NodePort(8080));
    assert_eq!(
        web.gate,
        HealthGate {
            interval: DEFAULT_HEALTH_INTERVAL,
            healthy_threshold: 1,
            deadline: DEFAULT_HEALTHY_DEADLINE,
        }
    );
    assert_eq!(web.drain_timeout, DEFAULT_DRAIN_TIMEOUT);
    assert_eq!(web.health.timeout, DEFAULT_CHECK_TIMEOUT);
    let Probe::Http { expect_status, .. } = &web.health.probe else {
        panic!("an http check")
    };
    let (min, max) = rules::DEFAULT_HEALTH_STATUS;
    assert_eq!(*expect_status, min..=max);
    assert_eq!(web.smoke.len(), 1);
}

#[test]
fn numbers_on_the_wire_win_over_defaults() {
    let mut release = web();
    release.stop_signal = "quit".into();
    release.stop_grace_ms = 3_000;
    release.stop_timeout_ms = 4_000;
    if let Some(pb::release::Kind::Web(web)) = &mut release.kind {
        web.health_interval_ms = 100;
        web.healthy_threshold = 3;
        web.healthy_deadline_ms = 5_000;
        web.drain_timeout_ms = 7_000;
        web.listen = "127.0.0.1:9000".into();
    }
    let spec = ReleaseSpec::try_from(&release).unwrap();
    assert_eq!(spec.stop_signal, Some("SIGQUIT"), "the canonical name");
    assert_eq!(spec.stop_grace, Duration::from_secs(3));
    assert_eq!(spec.stop_timeout, Duration::from_secs(4));
    let Kind::Web(web) = spec.kind else {
        panic!("a web release")
    };
    assert_eq!(web.gate.interval, Duration::from_millis(100));
    assert_eq!(web.gate.healthy_threshold, 3);
    assert_eq!(web.gate.deadline, Duration::from_secs(5));
    assert_eq!(web.drain_timeout, Duration::from_secs(7));
    let node = "10.0.0.5".parse().unwrap();
    assert_eq!(web.listen.on(node), "127.0.0.1:9000".parse().unwrap());
    assert_eq!(
        Listen::NodePort(80).on(node),
        "10.0.0.5:80".parse().unwrap()
    );
}

#[test]
fn a_worker_may_have_an_exec_check_or_none() {
    let spec = ReleaseSpec::try_from(&worker(None)).unwrap();
    let Kind::Worker(w) = spec.kind else {
        panic!("a worker")
    };
    assert_eq!(w.health, None);
    assert_eq!(w.min_healthy_time, Duration::from_secs(15));
    assert_eq!(w.gate.healthy_threshold, 1);
    let spec = ReleaseSpec::try_from(&worker(Some(exec(&["true"])))).unwrap();
    let Kind::Worker(w) = spec.kind else {
        panic!("a worker")
    };
    assert_eq!(w.health.map(|c| c.describe()), Some("exec true".into()));
}

#[test]
fn a_container_release_needs_no_command() {
    let spec = ReleaseSpec::try_from(&in_container(web())).unwrap();
    let Source::Container(container) = spec.source else {
        panic!("a container release")
    };
    assert!(!container.host_network);
    let mut release = in_container(web());
    release.container.as_mut().unwrap().network = "host".into();
    let spec = ReleaseSpec::try_from(&release).unwrap();
    assert!(matches!(
        spec.source,
        Source::Container(Container {
            host_network: true,
            ..
        })
    ));
}

#[test]
fn each_refusal_names_its_field() {
    type Change = Box<dyn Fn(&mut pb::Release)>;
    let cases: Vec<(&str, Change)> = vec![
        ("release_id", Box::new(|r| r.release_id = "../x".into())),
        ("service", Box::new(|r| r.service = "we b".into())),
        ("version", Box::new(|r| r.version = String::new())),
        ("artifact", Box::new(|r| r.artifact = None)),
        (
            "artifact",
            Box::new(|r| r.container = in_container(web()).container),
        ),
        (
            "artifact.digest",
            Box::new(|r| r.artifact.as_mut().unwrap().digest = "md5:x".into()),
        ),
        ("command", Box::new(|r| r.command.clear())),
        ("kind", Box::new(|r| r.kind = None)),
        ("instances", Box::new(|r| r.instances = MAX_INSTANCES + 1)),
        (
            "stop_signal",
            Box::new(|r| r.stop_signal = "SIGSTOP".into()),
        ),
        (
            "secrets[1].name",
            Box::new(|r| {
                r.secrets = ["DB_PASSWORD", "db-password"]
                    .map(|name| pb::SecretRef {
                        name: name.into(),
                        version: 1,
                    })
                    .into()
            }),
        ),
    ];
    for (field, change) in cases {
        let mut release = web();
        change(&mut release);
        let e = refusal(&release);
        assert_eq!(e.field, field, "{e}");
        assert!(e.to_string().starts_with(&format!("{field}: ")), "{e}");
        assert!(
            !e.problem.is_empty() && !e.problem.starts_with(char::is_uppercase),
            "{e}"
        );
    }
}

#[test]
fn web_refusals_name_their_field() {
    let with_web = |change: &dyn Fn(&mut pb::WebService)| {
        let mut release = web();
        if let Some(pb::release::Kind::Web(web)) = &mut release.kind {
            change(web);
        }
        refusal(&release)
    };
    let e = with_web(&|w| w.listen = "8080".into());
    assert_eq!(e.field, "web.listen");
    assert!(e.problem.contains("\":PORT\""), "{e}");
    assert_eq!(with_web(&|w| w.listen = ":http".into()).field, "web.listen");
    assert_eq!(with_web(&|w| w.health = None).field, "web.health");
    let e = with_web(&|w| w.health = Some(http("health")));
    assert_eq!(e.field, "web.health.http.path");
    assert!(e.problem.contains("\"health\""), "{e}");
    let e = with_web(&|w| {
        w.smoke = vec![http("/"), http("/")];
        if let Some(pb::check::Probe::Http(probe)) = &mut w.smoke[1].probe {
            probe.status_min = 299;
            probe.status_max = 200;
        }
    });
    assert_eq!(e.field, "web.smoke[1].http.status");
    assert!(e.problem.contains("reversed"), "{e}");
    let e = with_web(&|w| w.smoke = vec![pb::Check::default()]);
    assert_eq!(e.field, "web.smoke[0]");
    assert!(e.problem.starts_with("no probe"), "{e}");
    let e = with_web(&|w| w.health = Some(exec(&[])));
    assert_eq!(e.field, "web.health.exec.command");
}

#[test]
fn worker_and_container_refusals_name_their_field() {
    let e = refusal(&worker(Some(http("/health"))));
    assert_eq!(e.field, "worker.health");
    assert!(e.problem.contains("exec check"), "{e}");
    let e = refusal(&in_container(worker(Some(exec(&["true"])))));
    assert_eq!(e.field, "worker.health");
    assert!(e.problem.contains("not in the container"), "{e}");
    let mut release = in_container(web());
    if let Some(pb::release::Kind::Web(web)) = &mut release.kind {
        web.smoke = vec![exec(&["true"])];
    }
    assert_eq!(refusal(&release).field, "web.smoke");
    for (field, change) in [
        (
            "container.image",
            &(|c: &mut pb::Container| c.image = "nginx:latest".into())
                as &dyn Fn(&mut pb::Container),
        ),
        ("container.network", &|c| c.network = "overlay".into()),
        ("container.cpus", &|c| c.cpus = -1.0),
        ("container.cpus", &|c| c.cpus = f64::NAN),
    ] {
        let mut release = in_container(web());
        change(release.container.as_mut().unwrap());
        assert_eq!(refusal(&release).field, field);
    }
}
