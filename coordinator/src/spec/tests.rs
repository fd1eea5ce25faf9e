//! The spec's parsing, checks and resolution, key by key.

use prost::Message as _;

use super::*;
use crate::hooks::HookAt;

const GOOD: &str = r#"
app = "shop"

[services.web]
command = ["python3", "app.py"]
listen = ":8080"
nodes = { role = "web" }
drain_timeout = "10s"
[services.web.env]
APP_NAME = "shop"
[services.web.health]
path = "/health"
interval = "1s"
timeout = "1s"
healthy_threshold = 2
healthy_deadline = "30s"
[[services.web.smoke]]
path = "/"
expect_status = 200

[strategy]
kind = "rolling"
batch = "25%"
max_unavailable = 0
min_healthy_time = "5s"
progress_deadline = "10m"
auto_rollback = true

[environments.local]
nodes = { env = "local" }
[environments.local.env]
APP_ENV = "local"
"#;

/// Service web of `spec` resolved in environment local at v1.
fn resolve_web(spec: &AppSpec) -> Result<Resolved, SpecError> {
    spec.resolve(
        "cutover.toml",
        "local",
        "web",
        "v1",
        Some(&artifact()),
        None,
    )
}

fn artifact() -> pb::Artifact {
    pb::Artifact {
        url: "coordinator:".into(),
        digest: format!("sha256:{}", "a".repeat(64)),
    }
}

fn error_of(text: &str) -> SpecError {
    AppSpec::parse(text, "cutover.toml").expect_err("spec must be refused")
}

#[test]
fn the_documented_shape_resolves_to_a_release() {
    let spec = AppSpec::parse(GOOD, "cutover.toml").unwrap();
    let resolved = resolve_web(&spec).unwrap();
    assert_eq!(
        resolved.selector,
        [
            ("env".into(), "local".into()),
            ("role".into(), "web".into())
        ]
        .into()
    );
    assert_eq!(resolved.strategy.batches().batch, BatchSize::Percent(25));
    let release = &resolved.release;
    assert!(
        release.release_id.starts_with("web-v1-"),
        "{}",
        release.release_id
    );
    assert_eq!(
        release.env.get("APP_ENV").map(String::as_str),
        Some("local")
    );
    assert_eq!(
        release.env.get("APP_NAME").map(String::as_str),
        Some("shop")
    );
    let Some(pb::release::Kind::Web(web)) = &release.kind else {
        panic!("a service with `listen` is a web service")
    };
    assert_eq!(web.drain_timeout_ms, 10_000);
    assert_eq!(web.smoke.len(), 1);
    assert!(web.also_listen.is_empty());
    // More addresses are part of the release: another id.
    let moving = GOOD.replace(
        "listen = \":8080\"",
        "listen = \":8080\"\nalso_listen = [\":9090\"]",
    );
    let moving = resolve_web(&AppSpec::parse(&moving, "cutover.toml").unwrap()).unwrap();
    let Some(pb::release::Kind::Web(moving_web)) = &moving.release.kind else {
        panic!("a web service")
    };
    assert_eq!(moving_web.also_listen, [":9090"]);
    assert_ne!(moving.release.release_id, release.release_id);
    // The same inputs give the same id; another command gives another.
    let again = resolve_web(&spec).unwrap();
    assert_eq!(again.release.release_id, release.release_id);
    let changed = AppSpec::parse(&GOOD.replace("app.py", "app2.py"), "cutover.toml").unwrap();
    let other = resolve_web(&changed).unwrap();
    assert_ne!(other.release.release_id, release.release_id);
}

#[test]
fn bad_specs_name_file_key_and_value() {
    let e = error_of(&GOOD.replace(
        "drain_timeout = \"10s\"",
        "drain_timeout = \"10s\"\ndrain_timout = \"5s\"",
    ));
    assert_eq!(e.key, "services.web.drain_timout");
    assert!(e.message.contains("unknown field"), "{e}");
    eprintln!("{e}");
    let e = error_of(&GOOD.replace("interval = \"1s\"", "interval = \"1x\""));
    assert_eq!(e.key, "services.web.health.interval");
    assert!(
        e.to_string()
            .starts_with("cutover.toml: key `services.web.health.interval`"),
        "{e}"
    );
    assert!(e.message.contains("1x"), "{e}");
    eprintln!("{e}");
    let e = error_of(&GOOD.replace("batch = \"25%\"", "batch = 0"));
    assert_eq!(e.key, "strategy.batch");
    assert!(e.message.contains("0 is not a batch size"), "{e}");
    let e = error_of(&GOOD.replace("[services.web.health]\npath = \"/health\"\ninterval = \"1s\"\ntimeout = \"1s\"\nhealthy_threshold = 2\nhealthy_deadline = \"30s\"\n", ""));
    assert_eq!(e.key, "services.web.health", "{e}");
    let e = error_of(&GOOD.replace("listen = \":8080\"", "listen = \"8080\""));
    assert_eq!(e.key, "services.web.listen");
    assert!(e.message.contains("\"8080\""), "{e}");
    let e = error_of(&GOOD.replace(
        "listen = \":8080\"",
        "listen = \":8080\"\nalso_listen = [\":9090\", \":8080\"]",
    ));
    assert_eq!(e.key, "services.web.also_listen");
    assert!(e.message.contains("\":8080\" is listed twice"), "{e}");
    let e = error_of(&GOOD.replace(
        "listen = \":8080\"",
        "listen = \":8080\"\nalso_listen = [\"9090\"]",
    ));
    assert_eq!(e.key, "services.web.also_listen");
    let e = error_of(&GOOD.replace("app = \"shop\"", "app = \"shop\"\n[[oops"));
    assert!(e.message.starts_with("not valid TOML"), "{e}");
}

#[test]
fn release_ids_stay_what_earlier_versions_computed() {
    // Ids are compared with stored ones to recognise a release deployed
    // again: the hash must not move when the wire type changes shape
    // (web and worker became a oneof, which prost encodes at tag 7).
    let text = format!(
        "{GOOD}\n[services.horizon]\ncommand = [\"php\", \"artisan\", \"horizon\"]\nstop_signal = \"quit\"\nstop_command = [\"php\", \"artisan\", \"horizon:terminate\"]\n"
    );
    let spec = AppSpec::parse(&text, "cutover.toml").unwrap();
    let web = resolve_web(&spec).unwrap().release;
    let worker = spec
        .resolve(
            "cutover.toml",
            "local",
            "horizon",
            "v1",
            Some(&artifact()),
            None,
        )
        .unwrap()
        .release;
    assert_eq!(web.release_id, "web-v1-33c1932c");
    assert_eq!(worker.release_id, "horizon-v1-a703644a");
}

#[test]
fn a_deploy_of_several_services_runs_them_in_the_declared_order_web_first_by_default() {
    let worker =
        |name: &str| format!("\n[services.{name}]\ncommand = [\"php\", \"artisan\", \"{name}\"]\n");
    let text = format!("{GOOD}{}{}", worker("horizon"), worker("audit"));
    let spec = AppSpec::parse(&text, "cutover.toml").unwrap();
    assert_eq!(
        spec.services_for(None, "cutover.toml").unwrap(),
        ["web", "audit", "horizon"],
        "web services first, then workers by name"
    );
    let ordered = format!("order = [\"horizon\"]\n{text}");
    let spec = AppSpec::parse(&ordered, "cutover.toml").unwrap();
    assert_eq!(
        spec.services_for(None, "cutover.toml").unwrap(),
        ["horizon", "web", "audit"]
    );
    let e = AppSpec::parse(&format!("order = [\"api\"]\n{text}"), "f").unwrap_err();
    assert_eq!(e.key, "order");
    assert!(
        e.message.contains("\"api\"") && e.message.contains("horizon"),
        "{e}"
    );
    let e = AppSpec::parse(&format!("order = [\"web\", \"web\"]\n{text}"), "f").unwrap_err();
    assert!(e.message.contains("twice"), "{e}");
}

#[test]
fn a_release_over_the_size_limit_is_refused_naming_its_largest_value() {
    let big = "x".repeat(MAX_RELEASE_BYTES);
    let text = GOOD.replace("APP_ENV = \"local\"", "APP_ENV = \"local\"\nSMALL = \"1\"");
    let text = text.replace(
        "APP_NAME = \"shop\"",
        &format!(
            "APP_NAME = \"shop\"\nBLOB = \"{}\"",
            &big[..MAX_RELEASE_BYTES / 2]
        ),
    );
    let spec = AppSpec::parse(&text, "cutover.toml").unwrap();
    let release = resolve_web(&spec).unwrap();
    assert!(release.release.encoded_len() < MAX_RELEASE_BYTES);
    let text = GOOD.replace(
        "APP_ENV = \"local\"",
        &format!(
            "APP_ENV = \"local\"\nBLOB = \"{}\"",
            &big[..MAX_RELEASE_BYTES / 2]
        ),
    );
    let text = text.replace(
        "APP_NAME = \"shop\"",
        &format!(
            "APP_NAME = \"shop\"\nBLOB2 = \"{}\"",
            &big[..MAX_RELEASE_BYTES / 2 - 10]
        ),
    );
    let spec = AppSpec::parse(&text, "cutover.toml").unwrap();
    let e = resolve_web(&spec).unwrap_err();
    assert_eq!(e.key, "environments.local.env.BLOB", "{e}");
    assert!(e.message.contains("over the 256 KiB limit"), "{e}");
    let huge = "x".repeat(MAX_SPEC_BYTES);
    let e = AppSpec::parse(&format!("{GOOD}\n# {huge}"), "cutover.toml").unwrap_err();
    assert!(e.message.contains("over the 1024 KiB limit"), "{e}");
}

#[test]
fn resolving_names_missing_environments_and_services() {
    let spec = AppSpec::parse(GOOD, "cutover.toml").unwrap();
    let e = spec
        .resolve(
            "cutover.toml",
            "production",
            "web",
            "v1",
            Some(&artifact()),
            None,
        )
        .unwrap_err();
    assert_eq!(e.key, "environments");
    assert!(
        e.message.contains("\"production\"") && e.message.contains("local"),
        "{e}"
    );
    let e = spec.services_for(Some("api"), "cutover.toml").unwrap_err();
    assert!(e.message.contains("\"api\""), "{e}");
    let e = spec
        .resolve(
            "cutover.toml",
            "local",
            "web",
            "v 1",
            Some(&artifact()),
            None,
        )
        .unwrap_err();
    assert!(e.message.contains("version \"v 1\""), "{e}");
}

#[test]
fn stop_signals_are_sent_by_their_name_and_unknown_ones_refused_at_deploy() {
    let with_signal = |signal: &str| {
        GOOD.replace(
            "drain_timeout = \"10s\"",
            &format!("drain_timeout = \"10s\"\nstop_signal = {signal:?}"),
        )
    };
    for (spelling, name) in [
        ("SIGTERM", "SIGTERM"),
        ("quit", "SIGQUIT"),
        ("3", "SIGQUIT"),
    ] {
        let spec = AppSpec::parse(&with_signal(spelling), "cutover.toml").unwrap();
        let resolved = resolve_web(&spec).unwrap();
        assert_eq!(resolved.release.stop_signal, name, "{spelling}");
    }
    // What an agent would refuse never reaches one.
    for bad in ["SIGSTOP", "SIGRTMIN+3", "NOPE", ""] {
        let e = error_of(&with_signal(bad));
        assert_eq!(e.key, "services.web.stop_signal", "{e}");
        assert!(e.message.contains(&format!("{bad:?}")), "{e}");
    }
}

#[test]
fn env_var_names_follow_the_secret_name_rule() {
    let long = "A".repeat(129);
    let e = error_of(&GOOD.replace("APP_NAME = \"shop\"", &format!("{long} = \"x\"")));
    assert_eq!(e.key, format!("services.web.env.{long}"), "{e}");
    assert!(
        e.message.contains("not an environment variable name"),
        "{e}"
    );
    let e = error_of(&GOOD.replace("APP_ENV = \"local\"", "1X = \"local\""));
    assert_eq!(e.key, "environments.local.env.1X", "{e}");
    let e = error_of(&GOOD.replace(
        "drain_timeout = \"10s\"",
        "drain_timeout = \"10s\"\nsecrets = [\"DB-PASSWORD\"]",
    ));
    assert_eq!(e.key, "services.web.secrets[0]", "{e}");
    assert!(e.message.contains("\"DB-PASSWORD\""), "{e}");
}

#[test]
fn hooks_go_to_the_rollout_or_into_the_release_by_where_they_run() {
    let hooks = r#"
[[hooks]]
at = "pre_activate"
command = ["php", "artisan", "config:cache"]
[[hooks]]
at = "pre_deploy"
command = ["php", "artisan", "down:check"]
timeout = "1m"
[[hooks]]
at = "post_deploy"
command = ["notify"]
service = "worker"
"#;
    let worker = "\n[services.worker]\ncommand = [\"php\", \"artisan\", \"horizon\"]\n";
    let spec = AppSpec::parse(&format!("{GOOD}{worker}{hooks}"), "cutover.toml").unwrap();
    let web = resolve_web(&spec).unwrap();
    assert_eq!(
        web.hooks.len(),
        1,
        "run-once hooks without a service go with web"
    );
    assert_eq!(web.hooks[0].at, HookAt::PreDeploy);
    assert_eq!(web.hooks[0].timeout_ms, 60_000);
    assert_eq!(web.release.hooks.len(), 1);
    assert_eq!(
        web.release.hooks[0].command,
        ["php", "artisan", "config:cache"]
    );
    let worker = spec
        .resolve(
            "cutover.toml",
            "local",
            "worker",
            "v1",
            Some(&artifact()),
            None,
        )
        .unwrap();
    assert_eq!(worker.hooks.len(), 1);
    assert_eq!(worker.hooks[0].at, HookAt::PostDeploy);
    assert_eq!(
        worker.release.hooks.len(),
        1,
        "activate hooks: every service"
    );
    // A hook is part of the release it runs in.
    assert_ne!(
        web.release.release_id,
        resolve_web(&AppSpec::parse(GOOD, "cutover.toml").unwrap())
            .unwrap()
            .release
            .release_id
    );

    let e = error_of(&format!(
        "{GOOD}\n[[hooks]]\nat = \"pre_deploy\"\ncommand = []\n"
    ));
    assert_eq!(e.key, "hooks[0].command", "{e}");
    let e = error_of(&format!(
        "{GOOD}\n[[hooks]]\nat = \"post_deploy\"\ncommand = [\"x\"]\ntimeout = \"0s\"\n"
    ));
    assert_eq!(e.key, "hooks[0].timeout", "{e}");
    let e = error_of(&format!(
        "{GOOD}\n[[hooks]]\nat = \"later\"\ncommand = [\"x\"]\n"
    ));
    assert_eq!(e.key, "hooks[0].at", "{e}");
    let docker = "\n[services.api]\nruntime = \"docker\"\nimage = \"ghcr.io/acme/api:1\"\n";
    let e = error_of(&format!(
        "{GOOD}{docker}\n[[hooks]]\nat = \"pre_activate\"\ncommand = [\"x\"]\n"
    ));
    assert_eq!(e.key, "hooks[0]", "{e}");
    assert!(
        e.message.contains("service api runs as a docker container"),
        "{e}"
    );
    let e = error_of(&format!(
        "{GOOD}{docker}\n[migrate]\nservice = \"api\"\ncommand = [\"migrate\"]\n"
    ));
    assert_eq!(e.key, "migrate.service", "{e}");
}

#[test]
fn docker_services_take_an_image_and_refuse_process_only_settings() {
    let docker = GOOD.replace(
        "command = [\"python3\", \"app.py\"]",
        "runtime = \"docker\"\nimage = \"ghcr.io/acme/shop:1.4\"\nmemory = \"512MiB\"\ncpus = 1.5\ninit = true",
    );
    let spec = AppSpec::parse(&docker, "cutover.toml").unwrap();
    let pinned = format!("ghcr.io/acme/shop@sha256:{}", "b".repeat(64));
    let resolved = spec
        .resolve("cutover.toml", "local", "web", "v1", None, Some(&pinned))
        .unwrap();
    let release = &resolved.release;
    assert!(release.artifact.is_none());
    assert!(release.command.is_empty(), "the image's own command");
    let container = release.container.clone().unwrap();
    assert_eq!(container.image, pinned);
    assert_eq!(container.memory_bytes, 512 << 20);
    assert_eq!(container.cpus, 1.5);
    assert!(container.init);
    // Another digest is another release.
    let other = spec
        .resolve(
            "cutover.toml",
            "local",
            "web",
            "v1",
            None,
            Some(&pinned.replace('b', "c")),
        )
        .unwrap();
    assert_ne!(other.release.release_id, release.release_id);
    // What an agent would refuse is refused here, in the agent's words.
    let e = spec
        .resolve("cutover.toml", "local", "web", "v1", None, Some("shop:1.4"))
        .unwrap_err();
    assert_eq!(e.key, "services.web", "{e}");
    assert!(
        e.message
            .contains("would be refused: container.image: \"shop:1.4\" is not pinned"),
        "{e}"
    );
    // A docker service needs an image, a process service an artifact.
    let e = resolve_web(&spec).unwrap_err();
    assert!(e.message.contains("--image"), "{e}");
    let process = AppSpec::parse(GOOD, "cutover.toml").unwrap();
    let e = process
        .resolve("cutover.toml", "local", "web", "v1", None, Some(&pinned))
        .unwrap_err();
    assert!(e.message.contains("--artifact"), "{e}");

    let e = error_of(&docker.replace("cpus = 1.5", "cpus = -1"));
    assert_eq!(e.key, "services.web.cpus");
    let e = error_of(&docker.replace("ghcr.io/acme/shop:1.4", "Shop:1.4"));
    assert_eq!(e.key, "services.web.image");
    let e = error_of(&docker.replace("init = true", "network = \"overlay\""));
    assert_eq!(e.key, "services.web.network");
    let e = error_of(&GOOD.replace("listen = \":8080\"", "listen = \":8080\"\nimage = \"shop\""));
    assert_eq!(e.key, "services.web.image");
    assert!(e.message.contains("runtime = \"docker\""), "{e}");
    let e = error_of(&GOOD.replace("runtime", "x").replace(
        "command = [\"python3\", \"app.py\"]",
        "runtime = \"podman\"",
    ));
    assert_eq!(e.key, "services.web.runtime");
}

#[test]
fn webhooks_are_checked_with_the_spec_and_go_with_every_service() {
    let text = format!(
        "{GOOD}\n[[notify]]\nurl = \"https://hooks.example.com/x\"\nevents = [\"failed\"]\n"
    );
    let spec = AppSpec::parse(&text, "cutover.toml").unwrap();
    let notify = resolve_web(&spec).unwrap().notify;
    assert_eq!(notify.len(), 1);
    assert_eq!(notify[0].url, "https://hooks.example.com/x");
    let e = error_of(&text.replace("https://", "ftp://"));
    assert!(
        e.to_string()
            .starts_with("cutover.toml: key `notify[0].url`: \"ftp://hooks.example.com/x\""),
        "{e}"
    );
    let e = error_of(&format!("{text}tiemout = \"1s\"\n"));
    assert_eq!(e.key, "notify[0].tiemout", "{e}");
}

#[test]
fn batch_sizes() {
    assert_eq!(BatchSize::Percent(25).nodes(5), 2);
    assert_eq!(BatchSize::Percent(100).nodes(5), 5);
    assert_eq!(BatchSize::Percent(1).nodes(5), 1);
    assert_eq!(BatchSize::Count(2).nodes(5), 2);
    assert_eq!(BatchSize::Count(9).nodes(5), 5);
}

#[test]
fn a_queue_probe_is_checked_and_its_gate_is_for_workers() {
    let with_queues = |table: &str| {
        GOOD.replace(
            "[[services.web.smoke]]",
            &format!("[services.web.queues]\n{table}\n[[services.web.smoke]]"),
        )
    };
    let e = error_of(&with_queues(
        "redis = \"10.0.0.5:6379\"\nnames = [\"default\"]\ngate = \"30s\"",
    ));
    assert_eq!(e.key, "services.web.queues.gate");
    assert!(e.message.contains("is for workers"), "{e}");
    let e = error_of(&with_queues("redis = \"10.0.0.5\"\nnames = [\"default\"]"));
    assert_eq!(e.key, "services.web.queues.redis");
    let e = error_of(&with_queues(
        "redis = \"10.0.0.5:6379\"\nnames = [\"default\"]\npassword_secret = \"REDIS_PASSWORD\"",
    ));
    assert_eq!(e.key, "services.web.queues.password_secret");
    assert!(e.message.contains("add it to `secrets`"), "{e}");
    // A probe without a gate is fine on any service, and travels with the
    // release.
    let spec = AppSpec::parse(
        &with_queues("redis = \"10.0.0.5:6379\"\nnames = [\"default\"]\nmax_depth = 100"),
        "cutover.toml",
    )
    .unwrap();
    let probe = resolve_web(&spec).unwrap().release.queues.unwrap();
    assert_eq!(
        (probe.redis.as_str(), probe.max_depth),
        ("10.0.0.5:6379", 100)
    );
}
