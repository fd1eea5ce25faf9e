//! Incident levers through the real `cutover` binary, at real node
//! proxies: maintenance answers 503 with the message to everyone but the
//! allowed network and the bypass cookie, survives an agent restart, is
//! lifted with no failed request after; a throttle at 100 rps lets 100 ± 5 %
//! through each second and answers 429 to the rest; pause-traffic holds
//! requests across a 2 s pause and delivers every one after resume-traffic;
//! bad input changes nothing.

use std::sync::mpsc;
use std::time::{Duration, Instant};

use cutover_integration_tests::cli::{cluster_of, two_builds, Cli};
use cutover_integration_tests::load::Load;
use cutover_integration_tests::{body, http_get, http_get_with, spawn_agent, Cluster};
use serde_json::Value;

/// The status code of a raw HTTP response.
fn status(response: &str) -> u16 {
    response
        .split(' ')
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP response: {response:?}"))
}

fn header<'a>(response: &'a str, name: &str) -> Option<&'a str> {
    let head = response.split("\r\n\r\n").next().unwrap_or_default();
    head.lines().skip(1).find_map(|line| {
        let (key, value) = line.split_once(':')?;
        key.eq_ignore_ascii_case(name).then(|| value.trim())
    })
}

/// Deploys the test app as `web` to the cluster's nodes; its port.
fn deploy_web(cli: &Cli, admin: &std::path::Path, dir: &std::path::Path) -> u16 {
    let (v1, _) = two_builds(dir);
    let port =
        cutover_common::net::allocate_port([127, 0, 0, 1].into(), &(40000..=44999), &[]).unwrap();
    let spec = dir.join("cutover.toml");
    std::fs::write(
        &spec,
        format!(
            r#"
app = "shop"
[services.web]
command = ["python3", "app.py"]
listen = ":{port}"
[services.web.health]
path = "/health"
interval = "100ms"
healthy_deadline = "5s"
[strategy]
batch = 1
min_healthy_time = "200ms"
[environments.production]
nodes = {{ env = "production" }}
"#
        ),
    )
    .unwrap();
    let (ok, text) = cli.deploy(
        admin,
        &spec.display().to_string(),
        "production",
        "v1",
        &v1,
        &["--wait"],
    );
    assert!(ok, "{text}");
    port
}

/// Waits until `check` holds of the node list (as `cutover nodes` shows
/// it), or panics saying `what`.
async fn wait_for_nodes(
    cli: &Cli,
    by: &std::path::Path,
    what: &str,
    check: impl Fn(&Value) -> bool,
) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let nodes = cli.json(by, &["nodes"]);
        if check(&nodes) {
            return;
        }
        assert!(Instant::now() < deadline, "{what}: {nodes:#}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn maintenance_of(nodes: &Value, node: &str) -> Value {
    nodes
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["name"] == node)
        .and_then(|n| n["services"].as_array())
        .and_then(|s| s.iter().find(|s| s["service"] == "web"))
        .map(|s| s["levers"]["maintenance"].clone())
        .unwrap_or(Value::Null)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn maintenance_answers_503_but_to_the_allowed_and_survives_an_agent_restart() {
    let mut cluster = cluster_of(&[("node-1", "production"), ("node-2", "production")]).await;
    let dir = tempfile::tempdir().unwrap();
    let (cli, admin) = Cli::as_admin(&cluster, dir.path());
    let pete = cli.operator(&admin, "pete", "production");
    let port = deploy_web(&cli, &admin, dir.path());
    let nodes = [format!("127.0.0.11:{port}"), format!("127.0.0.12:{port}")];

    // Bad input changes nothing.
    for (args, says) in [
        (vec!["--allow", "10.0.0.0"], "10.0.0.0"),
        (vec!["--node", "node-9"], "node-9"),
    ] {
        let mut all = vec!["maintenance", "on", "web", "--env", "production"];
        all.extend(args);
        let (ok, text) = cli.run(&pete, &all);
        assert!(!ok && text.contains(says), "{text}");
    }
    let (ok, text) = cli.run(
        &pete,
        &["maintenance", "on", "worker", "--env", "production"],
    );
    assert!(!ok && text.contains("no current release"), "{text}");
    let levers = cli.json(&pete, &["levers"]);
    assert_eq!(
        levers,
        Value::Array(Vec::new()),
        "refused changes set nothing"
    );
    for node in &nodes {
        assert_eq!(status(&http_get(node, "/")), 200);
    }

    let (ok, text) = cli.run(
        &pete,
        &[
            "maintenance",
            "on",
            "web",
            "--env",
            "production",
            "--message",
            "Back at 04:00 UTC",
            "--retry-after",
            "300",
            "--allow",
            "127.0.0.99/32",
            "--bypass-secret",
        ],
    );
    assert!(ok, "{text}");
    assert!(
        text.contains("node-1 applied") && text.contains("node-2 applied"),
        "{text}"
    );
    let bypass = text
        .split_whitespace()
        .find(|word| word.starts_with("/_cutover/bypass/"))
        .unwrap_or_else(|| panic!("no bypass path: {text}"))
        .to_string();
    for node in &nodes {
        let response = http_get(node, "/");
        assert_eq!(status(&response), 503, "{response}");
        assert_eq!(body(&response), "Back at 04:00 UTC\n");
        assert_eq!(header(&response, "retry-after"), Some("300"));
        // A client of the allowed network reaches the app; one beside it
        // does not.
        let allowed = get_from("127.0.0.99", node).await;
        assert_eq!(status(&allowed), 200, "{allowed}");
        let other = get_from("127.0.0.98", node).await;
        assert_eq!(status(&other), 503);
        // The bypass link sets the cookie, the cookie passes.
        let link = http_get(node, &bypass);
        assert_eq!(status(&link), 302, "{link}");
        let cookie = header(&link, "set-cookie")
            .unwrap()
            .split(';')
            .next()
            .unwrap()
            .to_string();
        let passed = http_get_with(node, "/", &[("cookie", &cookie)]);
        assert_eq!(status(&passed), 200, "{passed}");
    }
    // Shown where an operator looks: nodes, levers, events, metrics; the
    // bypass secret nowhere.
    // Heartbeats bring what the proxies apply.
    wait_for_nodes(&cli, &pete, "both nodes report maintenance", |n| {
        !maintenance_of(n, "node-1").is_null() && !maintenance_of(n, "node-2").is_null()
    })
    .await;
    let (ok, table) = cli.run(&pete, &["nodes"]);
    assert!(ok && table.contains("(maintenance)"), "{table}");
    let secret = bypass.trim_start_matches("/_cutover/bypass/");
    let levers = cli.json(&pete, &["levers", "--env", "production"]);
    let text = levers.to_string();
    assert!(!text.contains(secret), "{text}");
    assert_eq!(levers[0]["lever"], "maintenance", "{levers:#}");
    assert_eq!(
        levers[0]["applied"],
        serde_json::json!(["node-1", "node-2"])
    );
    assert!(!cli.json(&pete, &["nodes"]).to_string().contains(secret));
    // A deploy under maintenance keeps it: the levers are the proxy's,
    // not the release's.
    let (_, v2) = two_builds(dir.path());
    let spec = dir.path().join("cutover.toml").display().to_string();
    let (ok, text) = cli.deploy(&admin, &spec, "production", "v2", &v2, &["--wait"]);
    assert!(ok, "{text}");
    assert_eq!(
        status(&http_get(&nodes[0], "/")),
        503,
        "maintenance outlives a deploy"
    );
    // Lifting a node's own lever leaves the environment's, and says so.
    let (ok, text) = cli.run(
        &pete,
        &[
            "maintenance",
            "off",
            "web",
            "--env",
            "production",
            "--node",
            "node-1",
        ],
    );
    assert!(ok && text.contains("was not set"), "{text}");
    assert!(
        text.contains("the environment-wide maintenance still applies to node-1"),
        "{text}"
    );
    let (ok, events) = cli.run(&pete, &["events"]);
    assert!(
        ok && events.contains("maintenance set for web in production"),
        "{events}"
    );
    let metrics = cluster.metrics();
    assert!(
        metrics.contains(
            r#"cutover_lever_set{env="production",service="web",lever="maintenance",node=""} 1"#
        ),
        "{metrics}"
    );
    wait_for_metric(
        &cluster,
        r#"cutover_proxy_lever_responses{node="node-1",service="web",outcome="maintenance"}"#,
    )
    .await;

    // An agent restart keeps maintenance: the first request after it is
    // answered 503 again.
    let agent = cluster.agents.remove(0);
    let name = agent.name.clone();
    agent.stop().await;
    let mut config = cluster.agent_config(&name);
    config.labels = [("env".to_string(), "production".to_string())].into();
    cluster.agents.push(spawn_agent(config.clone()).await);
    let response = wait_for_answer(&nodes[0]).await;
    assert_eq!(status(&response), 503, "{response}");

    // Lifted while node-1 is away: it comes back with its recorded
    // maintenance and the reconciler lifts it there too.
    let agent = cluster.agents.pop().unwrap();
    agent.stop().await;
    wait_for_nodes(&cli, &pete, "node-1 disconnected", |n| {
        n.as_array()
            .unwrap()
            .iter()
            .any(|n| n["name"] == "node-1" && n["connected"] == false)
    })
    .await;
    let (ok, text) = cli.run(&pete, &["maintenance", "off", "web", "--env", "production"]);
    assert!(ok, "{text}");
    assert!(
        text.contains("maintenance lifted") && text.contains("node-2 applied"),
        "{text}"
    );
    assert!(!text.contains("node-1 applied"), "node-1 is away: {text}");
    assert_eq!(status(&http_get(&nodes[1], "/")), 200);
    cluster.agents.push(spawn_agent(config).await);
    wait_for_nodes(
        &cli,
        &pete,
        "node-1's maintenance lifted by the reconciler",
        |n| maintenance_of(n, "node-1").is_null() && maintenance_of(n, "node-2").is_null(),
    )
    .await;
    // No failed request once lifted.
    let targets = nodes.iter().map(|n| n.parse().unwrap()).collect();
    let load = Load::start(targets, "/", 4);
    load.wait_for_sent(0, 300, "after the lift").await;
    let report = load.stop().await;
    assert_eq!(report.failed, 0, "{:?}", report.failures);
    let (ok, text) = cli.run(&pete, &["maintenance", "off", "web", "--env", "production"]);
    assert!(ok && text.contains("was not set"), "{text}");
    assert_eq!(cli.json(&pete, &["levers"]), Value::Array(Vec::new()));
}

/// `GET /` from the client address `from`.
async fn get_from(from: &str, addr: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind(format!("{from}:0").parse().unwrap()).unwrap();
    let mut stream = socket.connect(addr.parse().unwrap()).await.unwrap();
    let request = format!("GET / HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    response
}

/// The first answer of a node proxy that is starting (connection refused
/// until it listens).
async fn wait_for_answer(addr: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if std::net::TcpStream::connect(addr).is_ok() {
            return http_get(addr, "/");
        }
        assert!(Instant::now() < deadline, "{addr} does not listen again");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn wait_for_metric(cluster: &Cluster, series: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let metrics = cluster.metrics();
        if metrics.lines().any(|l| {
            l.strip_prefix(series)
                .and_then(|v| v.trim().parse::<f64>().ok())
                .is_some_and(|v| v > 0.0)
        }) {
            return;
        }
        assert!(Instant::now() < deadline, "no {series} above 0: {metrics}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Requests from `clients` threads for `run`, each answer's status and
/// when it came (since the start).
fn hammer(addr: &str, clients: usize, run: Duration) -> Vec<(Duration, u16)> {
    let start = Instant::now();
    let (tx, rx) = mpsc::channel();
    let threads: Vec<_> = (0..clients)
        .map(|_| {
            let (tx, addr) = (tx.clone(), addr.to_string());
            std::thread::spawn(move || {
                while start.elapsed() < run {
                    let code = status(&http_get(&addr, "/checkout/pay"));
                    let _ = tx.send((start.elapsed(), code));
                }
            })
        })
        .collect();
    drop(tx);
    for thread in threads {
        thread.join().unwrap();
    }
    rx.into_iter().collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_throttle_lets_its_rate_through_and_a_pause_holds_requests_until_resumed() {
    let cluster = cluster_of(&[("node-1", "production")]).await;
    let dir = tempfile::tempdir().unwrap();
    let (cli, admin) = Cli::as_admin(&cluster, dir.path());
    let pete = cli.operator(&admin, "pete", "production");
    let port = deploy_web(&cli, &admin, dir.path());
    let node = format!("127.0.0.11:{port}");

    let (ok, text) = cli.run(
        &pete,
        &["throttle", "web", "--env", "production", "--per", "cookie"],
    );
    assert!(!ok && text.contains("--rps"), "{text}");
    let (ok, text) = cli.run(
        &pete,
        &[
            "throttle",
            "web",
            "--env",
            "production",
            "--rps",
            "100",
            "--per",
            "cookie",
        ],
    );
    assert!(!ok && text.contains("cookie"), "{text}");
    let (ok, text) = cli.run(
        &pete,
        &[
            "throttle",
            "web",
            "--env",
            "production",
            "--rps",
            "100",
            "--path-prefix",
            "/checkout",
        ],
    );
    assert!(
        ok && text.contains("100 rps (burst 100) per all on /checkout*"),
        "{text}"
    );
    let answers = tokio::task::spawn_blocking({
        let node = node.clone();
        move || hammer(&node, 8, Duration::from_millis(4500))
    })
    .await
    .unwrap();
    let others: Vec<u16> = answers
        .iter()
        .map(|(_, s)| *s)
        .filter(|s| ![200, 429].contains(s))
        .collect();
    assert!(others.is_empty(), "only 200 and 429: {others:?}");
    let throttled = answers.iter().filter(|(_, s)| *s == 429).count();
    assert!(
        throttled > 100,
        "the offered load is over the rate: {throttled} throttled"
    );
    // After the first second (the burst), each second lets the rate through.
    for second in 1..4 {
        let window = Duration::from_secs(second)..Duration::from_secs(second + 1);
        let passed = answers
            .iter()
            .filter(|(at, s)| *s == 200 && window.contains(at))
            .count();
        assert!(
            (95..=105).contains(&passed),
            "second {second}: {passed} passed"
        );
    }
    assert_eq!(status(&http_get(&node, "/")), 200, "other paths pass");
    let (ok, text) = cli.run(&pete, &["throttle", "web", "--env", "production", "--off"]);
    assert!(ok && text.contains("throttle lifted"), "{text}");
    let after = tokio::task::spawn_blocking({
        let node = node.clone();
        move || hammer(&node, 4, Duration::from_millis(500))
    })
    .await
    .unwrap();
    assert!(after.iter().all(|(_, s)| *s == 200));

    // A 2 s pause: held, not failed, and all delivered after the resume.
    let (ok, text) = cli.run(
        &pete,
        &[
            "pause-traffic",
            "web",
            "--env",
            "production",
            "--max-pause",
            "30s",
        ],
    );
    assert!(ok && text.contains("requests held up to 30s"), "{text}");
    let paused_at = Instant::now();
    let (tx, rx) = mpsc::channel();
    for _ in 0..20 {
        let (tx, node) = (tx.clone(), node.clone());
        std::thread::spawn(move || {
            let response = http_get(&node, "/");
            let _ = tx.send((status(&response), Instant::now()));
        });
    }
    drop(tx);
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(rx.try_recv().is_err(), "requests are held during the pause");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (ok, table) = cli.run(&pete, &["nodes"]);
        if ok && table.contains("(paused)") {
            break;
        }
        assert!(Instant::now() < deadline, "{table}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (ok, text) = cli.run(&pete, &["resume-traffic", "web", "--env", "production"]);
    assert!(ok && text.contains("pause lifted"), "{text}");
    let delivered: Vec<(u16, Instant)> = rx.iter().collect();
    assert_eq!(delivered.len(), 20);
    assert!(delivered.iter().all(|(s, _)| *s == 200), "{delivered:?}");
    assert!(delivered
        .iter()
        .all(|(_, at)| *at - paused_at >= Duration::from_secs(2)));
}
