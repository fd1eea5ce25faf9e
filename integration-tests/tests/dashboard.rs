//! `cutover ui` in a real browser (Debian's chromium, headless, over
//! WebDriver) against a real local cluster of three agents: the fleet
//! shows each node with its release, a rollout started from the CLI
//! changes the tiles live, a deployer aborts one from its page, a viewer
//! sees no action and a forced one is refused, and bad addresses get a
//! clear page. A screenshot of each page is kept in
//! target/ui-screenshots/.

use std::time::Duration;

use cutover_integration_tests::browser::{Browser, Dashboard};
use cutover_integration_tests::cli::{cluster_of, two_builds, Cli};
use cutover_integration_tests::redis::{TestRedis, QUEUE_WORKER};
use cutover_integration_tests::{archive, APP};
use fantoccini::Locator;
use serde_json::{json, Value};

const NODES: [(&str, &str); 3] = [("node-1", "test"), ("node-2", "test"), ("node-3", "test")];

fn spec_text(port: u16, min_healthy_time: &str) -> String {
    format!(
        r#"
app = "shop"
[services.web]
command = ["python3", "app.py"]
listen = ":{port}"
[services.web.health]
path = "/health"
interval = "100ms"
healthy_deadline = "10s"
[strategy]
batch = 1
min_healthy_time = "{min_healthy_time}"
[environments.production]
nodes = {{ env = "test" }}
"#
    )
}

/// The release each node's tile shows, in node order.
const TILE_RELEASES: &str = r#"return [...document.querySelectorAll('.service[data-service="web"] .tile')].map(t => t.dataset.release);"#;

fn releases_of(value: Value) -> Vec<String> {
    value
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect()
}

/// The id of the current release of web in production.
fn current(cli: &Cli, config: &std::path::Path) -> String {
    let releases = cli.json(config, &["releases", "web", "--env", "production"]);
    releases
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["current"] == true)
        .map(|r| r["release"]["id"].as_str().unwrap().to_string())
        .expect("a current release")
}

fn newest_rollout(cli: &Cli, config: &std::path::Path) -> Value {
    cli.json(config, &["rollout", "list", "--service", "web"])[0].clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_shows_the_fleet_live_and_acts_as_its_operator() {
    let cluster = cluster_of(&NODES).await;
    let dir = tempfile::tempdir().unwrap();
    let (cli, admin) = Cli::as_admin(&cluster, dir.path());
    let dana = cli.operator(&admin, "dana", "production");
    let vic_dir = dir.path().join("vic");
    let (ok, text) = cli.run(
        &admin,
        &[
            "operator",
            "create",
            "vic",
            "--role",
            "viewer",
            "--out",
            vic_dir.to_str().unwrap(),
        ],
    );
    assert!(ok, "{text}");
    let vic = vic_dir.join("cli.toml");
    let (v1, v2) = two_builds(dir.path());
    let v3 = archive(
        dir.path(),
        "app-v3.tar.gz",
        &[("app.py", &format!("{APP}\n# v3\n"))],
    );
    let port =
        cutover_common::net::allocate_port([127, 0, 0, 1].into(), &(45000..=49999), &[]).unwrap();
    let quick = dir.path().join("cutover.toml");
    std::fs::write(&quick, spec_text(port, "1s")).unwrap();
    let quick = quick.display().to_string();
    // The first deploy of an environment pins its nodes: an admin's.
    let (ok, text) = cli.deploy(&admin, &quick, "production", "v1", &v1, &["--wait"]);
    assert!(ok, "{text}");
    let release_1 = current(&cli, &admin);

    // The fleet: three tiles, each with v1.
    let dashboard = Dashboard::start(&dana);
    let browser = Browser::start().await;
    let page = &browser.client;
    page.goto(&dashboard.url).await.unwrap();
    assert_eq!(
        page.current_url().await.unwrap().as_str(),
        format!("{}/", dashboard.base),
        "the token is traded for a cookie and leaves the address"
    );
    browser
        .wait_until(
            "three tiles",
            Duration::from_secs(10),
            r#"return document.querySelectorAll('.service[data-service="web"] .tile').length === 3;"#,
        )
        .await;
    assert_eq!(
        releases_of(browser.eval(TILE_RELEASES).await),
        vec![release_1.clone(); 3]
    );
    let text = browser.text("main").await;
    assert!(
        text.contains("node-1") && text.contains("v1") && text.contains("healthy"),
        "{text}"
    );
    browser.screenshot("fleet").await;

    // A deploy from the CLI: the same page, never reloaded, shows the
    // nodes switch one by one, and their tiles change color.
    // A mark on the page and on node-1's tile: the page is never loaded
    // again, and the tile is changed in place, not replaced.
    browser
        .eval(r#"window.notReloaded = true; document.querySelector('.tile[data-node="node-1"]').marked = true; return null;"#)
        .await;
    let color = r#"return getComputedStyle(document.querySelector('.tile[data-node="node-1"]')).backgroundColor;"#;
    let v1_color = browser.eval(color).await;
    let (ok, text) = cli.deploy(&dana, &quick, "production", "v2", &v2, &[]);
    assert!(ok, "{text}");
    let mut seen: Vec<Vec<String>> = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let release_2 = loop {
        let tiles = releases_of(browser.eval(TILE_RELEASES).await);
        if seen.last() != Some(&tiles) {
            seen.push(tiles.clone());
        }
        if tiles.iter().all(|r| *r != release_1 && !r.is_empty())
            && tiles.iter().all(|r| *r == tiles[0])
        {
            break tiles[0].clone();
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the tiles reach v2: {seen:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(
        seen.iter()
            .any(|tiles| tiles.contains(&release_1) && tiles.contains(&release_2)),
        "the page showed the nodes switching one at a time: {seen:?}"
    );
    assert_eq!(
        browser.eval("return window.notReloaded === true;").await,
        json!(true)
    );
    assert_eq!(
        browser
            .eval(r#"return document.querySelector('.tile[data-node="node-1"]').marked === true;"#)
            .await,
        json!(true)
    );
    assert_ne!(
        browser.eval(color).await,
        v1_color,
        "node-1's tile changed color"
    );
    let rollout_2 = newest_rollout(&cli, &admin);
    let id_2 = rollout_2["id"].as_str().unwrap().to_string();

    // The rollouts, and one rollout's page.
    page.goto(&format!("{}/rollouts", dashboard.base))
        .await
        .unwrap();
    // The last node's watch ends it: the list says so as it happens.
    browser
        .wait_until(
            "the rollout succeeds on the page",
            Duration::from_secs(30),
            &format!(r#"const row = document.querySelector('tr[data-rollout="{id_2}"]'); return !!row && row.dataset.state === 'succeeded';"#),
        )
        .await;
    browser.screenshot("rollouts").await;
    page.goto(&format!("{}/rollouts/{id_2}", dashboard.base))
        .await
        .unwrap();
    let text = browser.text("main").await;
    assert!(
        text.contains("Timeline") && text.contains("node-3"),
        "{text}"
    );
    browser.screenshot("rollout").await;

    // Abort from the page: a deploy of v3 that watches its first batch for
    // a minute. The button asks first; cancel changes nothing, confirm
    // aborts.
    let slow = dir.path().join("slow.toml");
    std::fs::write(&slow, spec_text(port, "60s")).unwrap();
    let (ok, text) = cli.deploy(
        &dana,
        slow.to_str().unwrap(),
        "production",
        "v3",
        v3.to_str().unwrap(),
        &[],
    );
    assert!(ok, "{text}");
    let id_3 = newest_rollout(&cli, &admin)["id"]
        .as_str()
        .unwrap()
        .to_string();
    assert_ne!(id_3, id_2);
    page.goto(&format!("{}/rollouts/{id_3}", dashboard.base))
        .await
        .unwrap();
    let abort = r#"button[data-action="abort"]"#;
    browser.click(abort).await;
    let question = browser.text("dialog[open] .question").await;
    assert!(
        question.contains(&format!("Abort rollout {id_3}")),
        "{question}"
    );
    browser
        .click(r#"dialog[open] button[value="cancel"]"#)
        .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(newest_rollout(&cli, &admin)["abort_requested"], false);
    browser.click(abort).await;
    browser.screenshot("confirm").await;
    browser.click("#confirm-ok").await;
    browser
        .wait_until(
            "the page shows the rollout ended",
            Duration::from_secs(60),
            r#"const s = document.querySelector('h1 .badge'); return !!s && /aborted|rolled back/.test(s.textContent);"#,
        )
        .await;
    let state = newest_rollout(&cli, &admin)["state"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(state == "aborted" || state == "rolled_back", "{state}");
    assert_eq!(current(&cli, &admin), release_2, "v2 stays current");
    // A rolling abort stops where it is: node-1, switched, keeps v3, and
    // the fleet says so.
    page.goto(&dashboard.base).await.unwrap();
    let tiles = browser
        .eval(r#"return Object.fromEntries([...document.querySelectorAll('.service[data-service="web"] .tile')].map(t => [t.dataset.node, t.dataset.release]));"#)
        .await;
    assert!(
        tiles["node-1"] != release_2.as_str()
            && tiles["node-2"] == release_2.as_str()
            && tiles["node-3"] == release_2.as_str(),
        "{tiles}"
    );

    // A viewer: the same pages, no action; one forced from the page's own
    // origin is refused by the coordinator, and nothing changes.
    let viewer = Dashboard::start(&vic);
    page.goto(&viewer.url).await.unwrap();
    page.goto(&format!("{}/rollouts/{id_3}", viewer.base))
        .await
        .unwrap();
    assert!(browser.text("main").await.contains(&id_3));
    assert!(page
        .find_all(Locator::Css("form[data-confirm]"))
        .await
        .unwrap()
        .is_empty());
    page.goto(&format!(
        "{}/releases?env=production&service=web",
        viewer.base
    ))
    .await
    .unwrap();
    assert!(browser.text("table.releases").await.contains("v1"));
    assert!(page
        .find_all(Locator::Css("form[data-confirm]"))
        .await
        .unwrap()
        .is_empty());
    let forced = browser
        .eval(&format!(
            r#"return fetch('rollouts/{id_2}/action', {{method: 'POST', headers: {{'content-type': 'application/x-www-form-urlencoded'}}, body: 'action=abort'}})
               .then(r => r.text().then(t => [r.status, t]));"#
        ))
        .await;
    assert_eq!(forced[0], 403, "{forced}");
    assert!(
        forced[1]
            .as_str()
            .unwrap()
            .contains("needs the deployer role"),
        "{forced}"
    );
    let forced = browser
        .eval(r#"return fetch('releases/rollback', {method: 'POST', headers: {'content-type': 'application/x-www-form-urlencoded'}, body: 'env=production&service=web&to=x'}).then(r => r.status);"#)
        .await;
    assert_eq!(forced, 403);
    assert_eq!(current(&cli, &admin), release_2);

    // A canary waiting for promotion: its page charts the weight by step
    // and offers promotion; the fleet shows the canary beside the stable
    // release on its nodes; promoting fully from the page ends it.
    let canary = dir.path().join("canary.toml");
    std::fs::write(
        &canary,
        spec_text(port, "1s").replace(
            "batch = 1",
            "kind = \"canary\"\nsteps = [{ set_weight = 50 }, { pause = {} }]\nscale_down_delay = \"1s\"",
        ),
    )
    .unwrap();
    let (ok, text) = cli.deploy(
        &dana,
        canary.to_str().unwrap(),
        "production",
        "v4",
        &v1,
        &["--wait"],
    );
    assert!(!ok && text.contains("promote"), "{text}");
    let id_4 = newest_rollout(&cli, &admin)["id"]
        .as_str()
        .unwrap()
        .to_string();
    page.goto(&dashboard.base).await.unwrap();
    browser
        .wait_until(
            "a tile shows the canary beside v2",
            Duration::from_secs(20),
            r#"return [...document.querySelectorAll('.tile .side')].some(s => /\+v4 50%/.test(s.textContent));"#,
        )
        .await;
    let line = browser.text(r#".service[data-service="web"] h3"#).await;
    assert!(line.contains("awaiting promotion"), "{line}");
    browser.screenshot("fleet-canary").await;
    page.goto(&format!("{}/rollouts/{id_4}", dashboard.base))
        .await
        .unwrap();
    let chart = browser.text("section.canary").await;
    assert!(chart.contains("weight 50%"), "{chart}");
    assert_eq!(
        browser
            .eval("return [document.querySelectorAll('section.canary svg rect').length, document.querySelectorAll('section.canary rect.current').length];")
            .await,
        json!([2, 1])
    );
    browser.screenshot("rollout-canary").await;
    browser.click(r#"button[data-action="promote-full"]"#).await;
    // While the dialog asks, the page changes under it (as a live update
    // may): the form it was opened from now says abort. Confirming posts
    // what the dialog named.
    browser
        .eval(r#"document.querySelector('#action-promote-full input[name="action"]').value = 'abort'; return null;"#)
        .await;
    browser.click("#confirm-ok").await;
    browser
        .wait_until(
            "the canary is promoted and succeeds",
            Duration::from_secs(60),
            r#"const s = document.querySelector('h1 .badge'); return !!s && s.textContent === 'succeeded';"#,
        )
        .await;
    let release_4 = current(&cli, &admin);
    assert_ne!(release_4, release_2);

    // Bad addresses: a clear page with its status, never a trace.
    page.goto(&format!("{}/rollouts/no-such-rollout", dashboard.base))
        .await
        .unwrap();
    let text = browser.text("main").await;
    assert!(
        text.contains("There is no rollout no-such-rollout"),
        "{text}"
    );
    browser.screenshot("unknown-rollout").await;
    let status = browser
        .eval("return fetch('rollouts/no-such-rollout').then(r => r.status);")
        .await;
    assert_eq!(status, 404);
    page.goto(&format!(
        "{}/rollouts/%3Cscript%3Ealert(1)%3C%2Fscript%3E",
        dashboard.base
    ))
    .await
    .unwrap();
    assert!(browser
        .text("main")
        .await
        .contains("letters, digits and dashes"));
    page.goto(&format!("{}/nodes/node-9", dashboard.base))
        .await
        .unwrap();
    assert!(browser
        .text("main")
        .await
        .contains("There is no node node-9"));
    page.goto(&format!("{}/nowhere", dashboard.base))
        .await
        .unwrap();
    let text = browser.text("body").await;
    assert!(
        text.contains("There is no page at /u/") && text.contains("/nowhere"),
        "{text}"
    );

    // The guard, as any client meets it: the pages are under a secret
    // prefix; without the session cookie a request is refused, with it
    // but another Host (DNS rebinding) or a change from another origin
    // too; a page carries its security headers.
    let prefix = dashboard
        .base
        .splitn(4, '/')
        .nth(3)
        .map(|p| format!("/{p}"))
        .unwrap();
    let authority = dashboard
        .base
        .trim_start_matches("http://")
        .split('/')
        .next()
        .unwrap()
        .to_string();
    let host = format!("Host: {authority}");
    let cookie = format!(
        "Cookie: cutover_ui_{}={}",
        authority.rsplit(':').next().unwrap(),
        dashboard.token()
    );
    let origin = format!("Origin: http://{authority}");
    let action = format!("{prefix}/rollouts/{id_2}/action");
    let cases = [
        ("GET", format!("{prefix}/"), vec![host.clone()], 401),
        (
            "GET",
            format!("{prefix}/"),
            vec![host.clone(), cookie.clone()],
            200,
        ),
        (
            "GET",
            format!("{prefix}/"),
            vec!["Host: rebound.example:80".into(), cookie.clone()],
            421,
        ),
        ("GET", "/".into(), vec![host.clone(), cookie.clone()], 404),
        (
            "POST",
            action.clone(),
            vec![host.clone(), cookie.clone()],
            403,
        ),
        (
            "POST",
            action.clone(),
            vec![
                host.clone(),
                cookie.clone(),
                "Origin: http://127.0.0.1:1".into(),
            ],
            403,
        ),
        (
            "POST",
            action.clone(),
            vec![
                host.clone(),
                cookie.clone(),
                origin.clone(),
                "Sec-Fetch-Site: same-site".into(),
            ],
            403,
        ),
        (
            "GET",
            format!("{prefix}/?token=0000"),
            vec![host.clone()],
            401,
        ),
        // A token in the address leads only to this server's own path.
        (
            "GET",
            format!("//evil.example/?token={}", dashboard.token()),
            vec![host.clone()],
            303,
        ),
    ];
    for (method, path, headers, expect) in cases {
        let (status, head) = dashboard.request(method, &path, &headers);
        assert_eq!(status, expect, "{method} {path} {headers:?}: {head}");
        if status == 303 {
            assert!(
                head.to_lowercase().contains("location: /evil.example/\r\n"),
                "{head}"
            );
        }
        if status == 200 {
            assert!(
                head.contains("content-security-policy: default-src 'self'")
                    && head.contains("x-frame-options: DENY"),
                "{head}"
            );
        }
    }

    // An incident lever shows on its node's tile, live.
    let (ok, text) = cli.run(
        &dana,
        &[
            "maintenance",
            "on",
            "web",
            "--env",
            "production",
            "--node",
            "node-2",
        ],
    );
    assert!(ok, "{text}");
    page.goto(&format!("{}/", dashboard.base)).await.unwrap();
    browser
        .wait_until(
            "node-2's tile says maintenance",
            Duration::from_secs(20),
            r#"const t = document.querySelector('.tile[data-node="node-2"] .lever'); return !!t && t.textContent.includes('maintenance') && !document.querySelector('.tile[data-node="node-1"] .lever');"#,
        )
        .await;
    browser.screenshot("fleet-lever").await;
    let (ok, text) = cli.run(&dana, &["maintenance", "off", "web", "--env", "production"]);
    assert!(ok, "{text}");
    browser
        .wait_until(
            "the lever is gone from the tile",
            Duration::from_secs(20),
            "return !document.querySelector('.tile .lever');",
        )
        .await;

    // The other pages.
    for (path, name, says) in [
        ("/nodes/node-2", "node", "Certificate"),
        (
            "/releases?env=production&service=web",
            "releases",
            "Roll back to this",
        ),
        ("/recovery", "recovery", "Queues"),
    ] {
        page.goto(&format!("{}{path}", dashboard.base))
            .await
            .unwrap();
        let text = browser.text("main").await;
        assert!(text.contains(says), "{path}: {text}");
        browser.screenshot(name).await;
    }
    browser.close().await;
    assert!(viewer.stop().success());
    assert!(dashboard.stop().success());
}

/// The queue page charts each queue's depth as the probes read it, live,
/// against the spec's limit: jobs pushed behind a paused worker climb past
/// `max_depth`, and the chart and the row say so without a reload.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_recovery_page_charts_queue_depth_live() {
    let redis = TestRedis::from_env();
    let cluster = cluster_of(&[("worker-1", "test")]).await;
    let dir = tempfile::tempdir().unwrap();
    let (cli, admin) = Cli::as_admin(&cluster, dir.path());
    let pause = dir.path().join("paused");
    std::fs::write(&pause, "").unwrap();
    let artifact = archive(
        dir.path(),
        "worker.tar.gz",
        &[("queue_worker.py", QUEUE_WORKER)],
    );
    let spec = dir.path().join("cutover.toml");
    std::fs::write(
        &spec,
        format!(
            r#"
app = "shop"
[services.horizon]
command = ["python3", "queue_worker.py"]
min_healthy_time = "1s"
env = {{ QUEUE_REDIS = "{address}", QUEUE_KEY = "{key}", QUEUE_PAUSE_FILE = "{pause}", JOB_SECONDS = "0.02" }}
[services.horizon.queues]
redis = "{address}"
prefix = "{prefix}"
interval = "1s"
names = ["default"]
max_depth = 5
[environments.production]
nodes = {{ env = "test" }}
"#,
            address = redis.address,
            key = redis.queue_key("default"),
            pause = pause.display(),
            prefix = redis.prefix,
        ),
    )
    .unwrap();
    let (ok, text) = cli.deploy(
        &admin,
        spec.to_str().unwrap(),
        "production",
        "v1",
        artifact.to_str().unwrap(),
        &["--wait"],
    );
    assert!(ok, "{text}");
    redis.push_jobs("default", 2, None);
    let dashboard = Dashboard::start(&admin);
    let browser = Browser::start().await;
    browser.client.goto(&dashboard.url).await.unwrap();
    browser
        .client
        .goto(&format!("{}/recovery", dashboard.base))
        .await
        .unwrap();
    let row = r#"document.querySelector('tr[data-queue="default"]')"#;
    browser
        .wait_until(
            "the queue shows 2 waiting",
            Duration::from_secs(20),
            &format!("const r = {row}; return !!r && r.cells[2].textContent.startsWith('2');"),
        )
        .await;
    redis.push_jobs("default", 6, None);
    browser
        .wait_until(
            "the chart climbs past the limit",
            Duration::from_secs(20),
            &format!(
                "const r = {row}; const chart = r && r.querySelector('svg.depth');
                 return !!chart && r.cells[2].textContent.startsWith('8')
                     && Number(chart.dataset.samples) >= 2 && !!chart.querySelector('polyline.over')
                     && !!chart.querySelector('line.threshold') && r.cells[2].classList.contains('bad');"
            ),
        )
        .await;
    browser.screenshot("queues").await;
    browser.close().await;
    drop(dashboard);
}

/// Page weight and time to first render of each page, in the same
/// headless chromium, over a fleet of three nodes with a few rollouts:
/// integration-tests/bench/ui.sh runs it and prints a table.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a benchmark: integration-tests/bench/ui.sh"]
async fn dashboard_figures() {
    let loads: usize = std::env::var("UI_LOADS").map_or(20, |n| n.parse().unwrap());
    let cluster = cluster_of(&NODES).await;
    let dir = tempfile::tempdir().unwrap();
    let (cli, admin) = Cli::as_admin(&cluster, dir.path());
    let (v1, v2) = two_builds(dir.path());
    let port =
        cutover_common::net::allocate_port([127, 0, 0, 1].into(), &(45000..=49999), &[]).unwrap();
    let spec = dir.path().join("cutover.toml");
    std::fs::write(&spec, spec_text(port, "0s")).unwrap();
    let spec = spec.display().to_string();
    for (version, artifact) in [("v1", &v1), ("v2", &v2), ("v3", &v1)] {
        let (ok, text) = cli.deploy(&admin, &spec, "production", version, artifact, &["--wait"]);
        assert!(ok, "{text}");
    }
    let id = newest_rollout(&cli, &admin)["id"]
        .as_str()
        .unwrap()
        .to_string();
    let dashboard = Dashboard::start(&admin);
    let browser = Browser::start().await;
    browser.client.goto(&dashboard.url).await.unwrap();
    // What one load took: the page's bytes, its assets' (what a first
    // visit fetches) and what of them crossed the wire (0 once cached),
    // the first byte and the first contentful paint, in ms from the start.
    let measure = r#"
        const nav = performance.getEntriesByType('navigation')[0];
        const assets = performance.getEntriesByType('resource').filter(r => r.name.includes('/assets/'));
        const sum = (f) => assets.reduce((total, r) => total + f(r), 0);
        const paint = performance.getEntriesByName('first-contentful-paint')[0];
        return [nav.encodedBodySize, sum(r => r.decodedBodySize), sum(r => r.transferSize), nav.responseStart, paint ? paint.startTime : -1];"#;
    println!("| page | HTML bytes | + assets bytes (first visit) | assets bytes sent on later loads | first byte ms (median) | first render ms (median) | first render ms (p90) |");
    println!("|---|---|---|---|---|---|---|");
    for (name, path) in [
        ("fleet", "/".to_string()),
        ("rollouts", "/rollouts".to_string()),
        ("rollout", format!("/rollouts/{id}")),
        (
            "releases",
            "/releases?env=production&service=web".to_string(),
        ),
        ("node", "/nodes/node-1".to_string()),
        ("recovery", "/recovery".to_string()),
    ] {
        let mut samples: Vec<Vec<f64>> = Vec::new();
        for _ in 0..loads {
            browser
                .client
                .goto(&format!("{}{path}", dashboard.base))
                .await
                .unwrap();
            browser
                .wait_until(
                    "the first paint",
                    Duration::from_secs(10),
                    "return performance.getEntriesByName('first-contentful-paint').length > 0;",
                )
                .await;
            let row = browser.eval(measure).await;
            samples.push(
                row.as_array()
                    .unwrap()
                    .iter()
                    .map(|v| v.as_f64().unwrap())
                    .collect(),
            );
        }
        let column = |i: usize| {
            let mut values: Vec<f64> = samples.iter().map(|s| s[i]).collect();
            values.sort_by(f64::total_cmp);
            values
        };
        let (ttfb, paint) = (column(3), column(4));
        let at = |values: &[f64], q: f64| values[((values.len() - 1) as f64 * q).round() as usize];
        println!(
            "| {name} | {} | {} | {} | {:.1} | {:.1} | {:.1} |",
            samples[loads - 1][0],
            samples[loads - 1][1],
            samples[loads - 1][2],
            at(&ttfb, 0.5),
            at(&paint, 0.5),
            at(&paint, 0.9),
        );
    }
    browser.close().await;
    drop(dashboard);
}
