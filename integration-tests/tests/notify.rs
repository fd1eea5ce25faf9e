//! Webhooks (`[[notify]]`) as a receiver meets them, through the real
//! binaries: every event of a deploy, of a failed migration and of a failed
//! cutover, in order, signed with the environment's secret (the receiver
//! checks the HMAC), only the events a target asks for, the spec's change
//! taking effect at the next deploy, still sent after a coordinator
//! restart; and a dead receiver that neither slows a rollout down nor goes
//! unnoticed (`cutover events`).

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use cutover_integration_tests::{app_archive, DevCluster};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use serde_json::Value;

/// What the receiver signs with, set as secret HOOK_KEY of environment
/// local.
const SECRET: &str = "hook-s3cret-value";

/// One webhook as the receiver got it.
#[derive(Debug, Clone)]
struct Hook {
    path: String,
    event_header: String,
    delivery_header: String,
    body: Value,
    raw: Bytes,
    signature: Option<String>,
    /// Whether the signature matched the body; `None` without one.
    signed: Option<bool>,
}

impl Hook {
    fn event(&self) -> &str {
        self.body["event"].as_str().unwrap_or_default()
    }
}

/// A webhook receiver on loopback answering 200, on a runtime of its own
/// (the tests drive the CLI synchronously).
struct Receiver {
    addr: SocketAddr,
    hooks: Arc<Mutex<Vec<Hook>>>,
    _runtime: tokio::runtime::Runtime,
}

impl Receiver {
    fn start() -> Self {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let listener = runtime
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .unwrap();
        let addr = listener.local_addr().unwrap();
        let hooks: Arc<Mutex<Vec<Hook>>> = Arc::default();
        let log = hooks.clone();
        runtime.spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let log = log.clone();
                let service = hyper::service::service_fn(move |request| {
                    let log = log.clone();
                    async move {
                        let hook = hook(request).await;
                        log.lock().unwrap().push(hook);
                        Ok::<_, std::convert::Infallible>(hyper::Response::new(Full::new(
                            Bytes::new(),
                        )))
                    }
                });
                tokio::spawn(
                    hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service),
                );
            }
        });
        Self {
            addr,
            hooks,
            _runtime: runtime,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// What `path` got about rollout `id`, in the order it came.
    fn hooks(&self, path: &str, id: &str) -> Vec<Hook> {
        self.hooks
            .lock()
            .unwrap()
            .iter()
            .filter(|h| h.path == path && h.body["rollout"] == id)
            .cloned()
            .collect()
    }

    /// Waits until `path` got `count` webhooks about rollout `id`.
    fn wait_for(&self, path: &str, id: &str, count: usize, timeout: Duration) -> Vec<Hook> {
        let deadline = Instant::now() + timeout;
        loop {
            let hooks = self.hooks(path, id);
            if hooks.len() >= count {
                return hooks;
            }
            assert!(
                Instant::now() < deadline,
                "{path} got {} of {count} webhooks of {id} within {timeout:?}: {hooks:#?}",
                hooks.len()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Reads a request and checks its signature as a receiver would: the
/// HMAC-SHA256 of the raw body under the shared secret, in hex.
async fn hook(request: hyper::Request<hyper::body::Incoming>) -> Hook {
    let (parts, body) = request.into_parts();
    let body = body.collect().await.unwrap().to_bytes();
    let header = |name: &str| {
        parts
            .headers
            .get(name)
            .map(|v| v.to_str().unwrap().to_string())
    };
    let signature = header("x-cutover-signature");
    let signed = signature.as_ref().map(|signature| {
        let hex = signature.strip_prefix("sha256=").unwrap_or_default();
        let tag: Option<Vec<u8>> = (0..hex.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(hex.get(i..i + 2)?, 16).ok())
            .collect();
        let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, SECRET.as_bytes());
        tag.is_some_and(|tag| ring::hmac::verify(&key, &body, &tag).is_ok())
    });
    assert_eq!(
        header("content-type").as_deref(),
        Some("application/json"),
        "{parts:?}"
    );
    Hook {
        path: parts.uri.path().to_string(),
        event_header: header("x-cutover-event").unwrap_or_default(),
        delivery_header: header("x-cutover-delivery").unwrap_or_default(),
        body: serde_json::from_slice(&body).unwrap(),
        raw: body,
        signature,
        signed,
    }
}

/// Whether docs/spec.md's Python check accepts the hook's signature.
fn python_says_signed(hook: &Hook, secret: &str) -> bool {
    let docs = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/spec.md"),
    )
    .unwrap();
    let check = docs
        .split("```python\n")
        .find(|block| block.contains("def signed("))
        .and_then(|block| block.split("```").next())
        .expect("docs/spec.md shows how a receiver checks a signature");
    let dir = tempfile::tempdir().unwrap();
    let body = dir.path().join("body.json");
    std::fs::write(&body, &hook.raw).unwrap();
    let program = format!(
        "{check}\nimport sys\nprint(signed(sys.argv[1].encode(), open(sys.argv[2], 'rb').read(), sys.argv[3]))\n"
    );
    let output = std::process::Command::new("python3")
        .args(["-c", &program, secret])
        .arg(&body)
        .arg(hook.signature.as_deref().unwrap_or_default())
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    match String::from_utf8_lossy(&output.stdout).trim() {
        "True" => true,
        "False" => false,
        other => panic!("the documented check printed {other:?}"),
    }
}

fn events(hooks: &[Hook]) -> Vec<&str> {
    hooks.iter().map(Hook::event).collect()
}

/// The web app in environment local on `port`; `env` adds lines to its
/// environment, `tail` tables to the spec.
fn spec(port: u16, version: &str, env: &str, min_healthy_time: &str, tail: &str) -> String {
    format!(
        r#"
app = "shop"

[services.web]
command = ["python3", "app.py"]
listen = ":{port}"
drain_timeout = "1s"
stop_grace = "1s"
[services.web.env]
VERSION = "{version}"
{env}
[services.web.health]
path = "/health"
interval = "100ms"
healthy_deadline = "3s"

[strategy]
batch = 1
min_healthy_time = "{min_healthy_time}"

[environments.local]
nodes = {{ env = "local" }}
{tail}"#
    )
}

/// A `[[notify]]` table.
fn notify(url: &str, more: &str) -> String {
    format!("\n[[notify]]\nurl = \"{url}\"\n{more}\n")
}

struct Fixture {
    cluster: DevCluster,
    port: u16,
    archive: String,
}

impl Fixture {
    fn new() -> Self {
        let cluster = DevCluster::up(2);
        let (url, _) = app_archive(cluster.dir.path());
        let port = cutover_common::net::allocate_port([127, 0, 0, 1].into(), &(40000..=44999), &[])
            .unwrap();
        Self {
            cluster,
            port,
            archive: url.trim_start_matches("file://").to_string(),
        }
    }

    fn cli(&self, args: &[&str], input: &str) -> std::process::Output {
        self.cluster.cutover_with_input(args, input)
    }

    /// Deploys `text` as `version` and waits for the rollout to end;
    /// returns its status.
    fn deploy(&self, text: &str, version: &str) -> Value {
        let file = self.cluster.path(&format!("cutover-{version}.toml"));
        std::fs::write(&file, text).unwrap();
        let file = file.display().to_string();
        let args = [
            "deploy",
            "-f",
            &file,
            "--env",
            "local",
            "--version",
            version,
            "--artifact",
            &self.archive,
            "--wait",
        ];
        let output = self.cli(&args, "");
        let list = self.cli(&["rollout", "list", "-o", "json"], "");
        let list: Value = serde_json::from_slice(&list.stdout).unwrap();
        let id = list[0]["id"].as_str().unwrap().to_string();
        let status = self.status(&id);
        assert!(
            status["release"]["version"] == version,
            "the deploy of {version} made no rollout: {}{}\n{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr),
            self.cluster.log_tails()
        );
        status
    }

    fn status(&self, id: &str) -> Value {
        let output = self.cli(&["rollout", "status", id, "-o", "json"], "");
        serde_json::from_slice(&output.stdout).unwrap()
    }

    /// The messages of the event log's `notify` events.
    fn notify_events(&self) -> Vec<String> {
        let output = self.cli(&["events", "--limit", "10000", "-o", "json"], "");
        let all: Value = serde_json::from_slice(&output.stdout).unwrap();
        all.as_array()
            .unwrap()
            .iter()
            .filter(|e| e["kind"] == "notify")
            .map(|e| e["message"].as_str().unwrap().to_string())
            .collect()
    }
}

fn id(status: &Value) -> String {
    status["id"].as_str().unwrap().to_string()
}

#[test]
fn webhooks_follow_deploys_signed_and_filtered_and_survive_a_restart() {
    let f = Fixture::new();
    let receiver = Receiver::start();
    let set = f.cli(&["secret", "set", "--env", "local", "HOOK_KEY"], SECRET);
    assert!(
        set.status.success(),
        "{}",
        String::from_utf8_lossy(&set.stderr)
    );
    let signed = notify(&receiver.url("/all"), "secret = \"HOOK_KEY\"");
    let endings = notify(
        &receiver.url("/endings"),
        "events = [\"succeeded\", \"failed\", \"rolled_back\"]",
    );

    // 1. A deploy: started, then succeeded; the filtered target only the end.
    let v1 = f.deploy(
        &spec(f.port, "v1", "", "300ms", &format!("{signed}{endings}")),
        "v1",
    );
    assert_eq!(v1["state"], "succeeded", "{v1:#}");
    let hooks = receiver.wait_for("/all", &id(&v1), 2, Duration::from_secs(10));
    assert_eq!(events(&hooks), ["started", "succeeded"]);
    for hook in &hooks {
        assert_eq!(hook.signed, Some(true), "signed with HOOK_KEY: {hook:#?}");
        assert_eq!(hook.event_header, hook.event());
        assert_eq!(
            hook.delivery_header,
            hook.body["delivery"].as_str().unwrap()
        );
        let body = &hook.body;
        assert_eq!(body["app"], "shop");
        assert_eq!(body["env"], "local");
        assert_eq!(body["service"], "web");
        assert_eq!(body["kind"], "deploy");
        assert_eq!(body["release"], v1["release"]["id"]);
        assert_eq!(body["version"], "v1");
        assert_eq!(body["previous_release"], Value::Null, "a first deploy");
        assert_eq!(body["operator"], v1["created_by"]);
        assert!(body["at"].as_str().unwrap().ends_with('Z'), "{body}");
        assert!(!body["message"].as_str().unwrap().is_empty(), "{body}");
    }
    // The check docs/spec.md shows a receiver agrees, and catches a
    // wrong secret.
    assert!(python_says_signed(&hooks[0], SECRET));
    assert!(!python_says_signed(&hooks[0], "another-secret"));
    assert_eq!(hooks[0].body["state"], "running");
    assert_eq!(hooks[1].body["state"], "succeeded");
    assert_ne!(hooks[0].delivery_header, hooks[1].delivery_header);
    let ends = receiver.wait_for("/endings", &id(&v1), 1, Duration::from_secs(10));
    assert_eq!(events(&ends), ["succeeded"]);
    assert_eq!(ends[0].signed, None, "no secret, no signature");

    // 2. A failing migration, with the spec's targets changed: the change
    // takes effect at this deploy (nothing more to /endings).
    let migrations = notify(
        &receiver.url("/migrations"),
        "events = [\"migration_failed\"]",
    );
    let failing = "\n[migrate]\nservice = \"web\"\ncommand = [\"sh\", \"-c\", \"echo schema locked; exit 3\"]\n";
    let v2 = f.deploy(
        &spec(
            f.port,
            "v2",
            "",
            "300ms",
            &format!("{signed}{migrations}{failing}"),
        ),
        "v2",
    );
    assert_eq!(v2["state"], "rolled_back", "{v2:#}");
    let hooks = receiver.wait_for("/all", &id(&v2), 4, Duration::from_secs(10));
    assert_eq!(
        events(&hooks),
        [
            "started",
            "migration_started",
            "migration_failed",
            "rolled_back"
        ]
    );
    assert!(hooks.iter().all(|h| h.signed == Some(true)), "{hooks:#?}");
    assert_eq!(hooks[0].body["previous_release"], v1["release"]["id"]);
    let failed = &hooks[2].body;
    assert!(
        failed["message"]
            .as_str()
            .unwrap()
            .contains("schema locked"),
        "{failed}"
    );
    assert!(
        failed["node"].as_str().unwrap().starts_with("node-"),
        "{failed}"
    );
    let only = receiver.wait_for("/migrations", &id(&v2), 1, Duration::from_secs(10));
    assert_eq!(events(&only), ["migration_failed"]);

    // 3. A release failing its health check on the first node: rolled back.
    let v3 = f.deploy(
        &spec(f.port, "v3", "HEALTH = \"fail\"", "300ms", &signed),
        "v3",
    );
    assert_eq!(v3["state"], "rolled_back", "{v3:#}");
    let hooks = receiver.wait_for("/all", &id(&v3), 2, Duration::from_secs(10));
    assert_eq!(events(&hooks), ["started", "rolled_back"]);
    assert!(
        hooks[1].body["message"]
            .as_str()
            .unwrap()
            .contains("/health"),
        "{:#}",
        hooks[1].body
    );

    // 4. A rollout resumed after a coordinator crash keeps its webhooks.
    let file = f.cluster.path("cutover-v4.toml");
    std::fs::write(&file, spec(f.port, "v4", "", "2s", &signed)).unwrap();
    let started = f.cli(
        &[
            "-o",
            "json",
            "deploy",
            "-f",
            file.to_str().unwrap(),
            "--env",
            "local",
            "--version",
            "v4",
            "--artifact",
            &f.archive,
        ],
        "",
    );
    let v4: Value = serde_json::from_slice(&started.stdout).unwrap();
    let v4 = v4["id"].as_str().unwrap().to_string();
    receiver.wait_for("/all", &v4, 1, Duration::from_secs(10));
    f.cluster.kill_and_restart_coordinator();
    let hooks = receiver.wait_for("/all", &v4, 2, Duration::from_secs(60));
    assert_eq!(
        events(&hooks),
        ["started", "succeeded"],
        "no repeat after the restart"
    );
    let status = f.status(&v4);
    assert_eq!(status["state"], "succeeded", "{status:#}");
    assert!(
        status["timeline"]
            .as_array()
            .unwrap()
            .iter()
            .any(|t| t["kind"] == "recovered"),
        "the coordinator restarted mid-rollout: {status:#}"
    );

    // 5. A rollback has no spec: it notifies where the deploy of the
    // release it leaves did.
    let back = f.cli(&["rollback", "web", "--env", "local", "--wait"], "");
    assert!(
        back.status.success(),
        "{}",
        String::from_utf8_lossy(&back.stderr)
    );
    let list = f.cli(&["rollout", "list", "-o", "json"], "");
    let list: Value = serde_json::from_slice(&list.stdout).unwrap();
    let rollback = list[0]["id"].as_str().unwrap().to_string();
    let hooks = receiver.wait_for("/all", &rollback, 2, Duration::from_secs(10));
    assert_eq!(events(&hooks), ["started", "succeeded"]);
    assert!(hooks
        .iter()
        .all(|h| h.body["kind"] == "rollback" && h.signed == Some(true)));
    assert_eq!(hooks[1].body["release"], v1["release"]["id"]);
    assert!(f.notify_events().is_empty(), "{:?}", f.notify_events());
}

#[test]
fn a_dead_receiver_does_not_slow_a_rollout_and_its_failure_shows_in_the_event_log() {
    let f = Fixture::new();
    let receiver = Receiver::start();
    // Connections are accepted (the listen backlog) and never answered.
    let dead_listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead = format!(
        "http://{}/dead?token=abc",
        dead_listener.local_addr().unwrap()
    );
    let live = notify(&receiver.url("/live"), "");
    let v1 = f.deploy(&spec(f.port, "v1", "", "1s", &live), "v1");
    assert_eq!(v1["state"], "succeeded", "{v1:#}");

    // The same kind of rollout with and without the dead receiver.
    let took = |version: &str, tail: &str| {
        let started = Instant::now();
        let status = f.deploy(&spec(f.port, version, "", "1s", tail), version);
        assert_eq!(status["state"], "succeeded", "{status:#}");
        (status, started.elapsed())
    };
    let (_, without) = took("v2", &live);
    let timeout = Duration::from_secs(3);
    let tail = format!(
        "{}{live}{}",
        notify(&dead, "timeout = \"3s\""),
        notify(&receiver.url("/unsigned"), "secret = \"NOPE\"")
    );
    let (v3, with) = took("v3", &tail);
    eprintln!("rollout with a dead receiver: {with:?}, without: {without:?}");
    assert!(
        with < without + timeout,
        "a dead receiver slowed the rollout down: {with:?}, {without:?} without it"
    );
    // The live receiver did not wait for the dead one.
    let hooks = receiver.wait_for("/live", &id(&v3), 2, Duration::from_secs(2));
    assert_eq!(events(&hooks), ["started", "succeeded"]);
    assert!(receiver.hooks("/unsigned", &id(&v3)).is_empty());

    // Each failure, once its attempts are spent, in the event log with the
    // next step, naming the URL without its query.
    let host = dead
        .trim_start_matches("http://")
        .split('/')
        .next()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(45);
    let messages = loop {
        let messages = f.notify_events();
        if messages.iter().any(|m| m.contains("/dead")) && messages.len() >= 3 {
            break messages;
        }
        assert!(
            Instant::now() < deadline,
            "no failure in the event log within 45s: {messages:#?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    let v3 = id(&v3);
    assert!(
        messages.contains(&format!(
            "webhook started of rollout {v3} to http://{host}/dead failed after 4 attempts: no answer within 3s; check that the receiver is up, reachable from the coordinator and answers within 3s; rollouts go on regardless"
        )),
        "{messages:#?}"
    );
    for event in ["started", "succeeded"] {
        assert!(
            messages.contains(&format!(
                "webhook {event} of rollout {v3} to {} not sent: no secret NOPE in environment local; set it with `cutover secret set --env local NOPE`",
                receiver.url("/unsigned")
            )),
            "{messages:#?}"
        );
    }
    assert!(messages.iter().all(|m| !m.contains("abc")), "{messages:#?}");
}
