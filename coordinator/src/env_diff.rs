//! What differs between two environments' runs of one service: the
//! release (build, command, environment, secrets, checks), the strategy,
//! and the nodes (count, OS, CPUs, memory as their agents report them).
//! `cutover diff` shows it; an environment with `mirror = "production"`
//! warns of it at each deploy, minus what is meant to differ (`mirrored`).
//! Secrets are compared by name and version, never by value.

use std::collections::{BTreeMap, BTreeSet};

use cutover_proto::v1 as pb;

use crate::store::Figures;
use crate::strategy::Strategy;

/// One environment's side of a comparison.
pub struct Side<'a> {
    pub release: &'a pb::Release,
    pub strategy: &'a Strategy,
    /// The figures of the nodes the service's selector matches there
    /// (`None` for a node that has not reported yet).
    pub nodes: Vec<Option<&'a Figures>>,
}

/// One thing compared: `aspect` (release, env, secret, check, strategy,
/// nodes), `key` within it, each side's value ("" for absent).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Row {
    pub aspect: &'static str,
    pub key: String,
    pub a: String,
    pub b: String,
}

impl Row {
    pub fn same(&self) -> bool {
        self.a == self.b
    }
}

/// Every row of the comparison, equal or not, in a stable order.
pub fn compare(a: &Side, b: &Side) -> Vec<Row> {
    let mut rows = Vec::new();
    let mut push = |aspect: &'static str, key: &str, a: String, b: String| {
        rows.push(Row {
            aspect,
            key: key.to_string(),
            a,
            b,
        })
    };
    let (fa, fb) = (release_facts(a.release), release_facts(b.release));
    for (key, value) in &fa {
        push("release", key, value.clone(), fb[key].clone());
    }
    let keys: BTreeSet<&String> = a.release.env.keys().chain(b.release.env.keys()).collect();
    for key in keys {
        let value = |r: &pb::Release| r.env.get(key).cloned().unwrap_or_default();
        push("env", key, value(a.release), value(b.release));
    }
    let secrets = |r: &pb::Release| -> BTreeMap<String, String> {
        r.secrets
            .iter()
            .map(|s| (s.name.clone(), format!("version {}", s.version)))
            .collect()
    };
    let (sa, sb) = (secrets(a.release), secrets(b.release));
    for key in sa.keys().chain(sb.keys()).collect::<BTreeSet<_>>() {
        let value = |s: &BTreeMap<String, String>| s.get(key).cloned().unwrap_or_default();
        push("secret", key, value(&sa), value(&sb));
    }
    let (ca, cb) = (checks(a.release), checks(b.release));
    for key in ca.keys().chain(cb.keys()).collect::<BTreeSet<_>>() {
        let value = |c: &BTreeMap<&str, String>| c.get(*key).cloned().unwrap_or_default();
        push("check", key, value(&ca), value(&cb));
    }
    let (ta, tb) = (strategy(a.strategy), strategy(b.strategy));
    for key in ta.keys().chain(tb.keys()).collect::<BTreeSet<_>>() {
        let value = |t: &BTreeMap<String, String>| t.get(key).cloned().unwrap_or_default();
        push("strategy", key, value(&ta), value(&tb));
    }
    let (na, nb) = (nodes(&a.nodes), nodes(&b.nodes));
    for key in ["count", "os", "cpus", "memory"] {
        push("nodes", key, na[key].clone(), nb[key].clone());
    }
    rows
}

/// The rows a mirror warns of: those that differ, but for what an
/// environment is meant to change: the build (staging runs the new one
/// first), the variables either environment declares in its own `env`
/// table, the secrets' versions (each environment has its own), and the
/// node count.
pub fn mirrored(rows: Vec<Row>, declared: &BTreeSet<String>) -> Vec<Row> {
    rows.into_iter()
        .filter(|row| !row.same())
        .filter(|row| match row.aspect {
            "release" => false,
            "env" => !declared.contains(&row.key),
            "secret" => row.a.is_empty() || row.b.is_empty(),
            "nodes" => row.key != "count",
            _ => true,
        })
        .collect()
}

fn release_facts(r: &pb::Release) -> BTreeMap<&'static str, String> {
    let digest = match (&r.artifact, &r.container) {
        (Some(artifact), _) => artifact.digest.clone(),
        (None, Some(container)) => container.image.clone(),
        (None, None) => String::new(),
    };
    BTreeMap::from([
        ("id", r.release_id.clone()),
        ("version", r.version.clone()),
        ("digest", digest),
        ("command", r.command.join(" ")),
        ("stop_signal", r.stop_signal.clone()),
        ("stop_grace", ms(r.stop_grace_ms)),
    ])
}

/// A web service's listener, health check and smoke tests; a worker's
/// kind.
fn checks(r: &pb::Release) -> BTreeMap<&'static str, String> {
    match &r.kind {
        Some(pb::release::Kind::Web(web)) => BTreeMap::from([
            ("kind", "web".to_string()),
            ("listen", web.listen.clone()),
            (
                "health",
                web.health.as_ref().map(check_text).unwrap_or_default(),
            ),
            ("health_interval", ms(web.health_interval_ms)),
            ("healthy_threshold", web.healthy_threshold.to_string()),
            ("healthy_deadline", ms(web.healthy_deadline_ms)),
            (
                "smoke",
                web.smoke
                    .iter()
                    .map(check_text)
                    .collect::<Vec<_>>()
                    .join("; "),
            ),
            ("drain_timeout", ms(web.drain_timeout_ms)),
        ]),
        Some(pb::release::Kind::Worker(_)) => BTreeMap::from([("kind", "worker".to_string())]),
        None => BTreeMap::new(),
    }
}

fn check_text(check: &pb::Check) -> String {
    let probe = match &check.probe {
        Some(pb::check::Probe::Http(http)) => {
            let body = match http.body_contains.as_str() {
                "" => String::new(),
                body => format!(" containing {body:?}"),
            };
            let status = match (http.status_min, http.status_max) {
                (0, 0) => String::new(),
                (min, max) => format!(" {min}-{max}"),
            };
            format!("GET {}{status}{body}", http.path)
        }
        Some(pb::check::Probe::Tcp(_)) => "tcp".to_string(),
        Some(pb::check::Probe::Exec(exec)) => format!("exec {}", exec.command.join(" ")),
        None => String::new(),
    };
    format!("{probe} (timeout {})", ms(check.timeout_ms))
}

/// The strategy's keys as stored, each value as JSON.
fn strategy(strategy: &Strategy) -> BTreeMap<String, String> {
    match serde_json::to_value(strategy) {
        Ok(serde_json::Value::Object(map)) => map
            .into_iter()
            .map(|(k, v)| {
                let text = match v {
                    serde_json::Value::String(s) => s,
                    other => other.to_string(),
                };
                (k, text)
            })
            .collect(),
        _ => BTreeMap::new(),
    }
}

/// How many nodes, and which OS, CPU counts and memory sizes they have,
/// each with how many nodes have it ("2 x 4 CPUs").
fn nodes(nodes: &[Option<&Figures>]) -> BTreeMap<&'static str, String> {
    let tally = |value: &dyn Fn(&Figures) -> String| {
        let mut counts: BTreeMap<String, usize> = BTreeMap::new();
        for figures in nodes {
            let key = figures.map_or("(not reported)".to_string(), value);
            *counts.entry(key).or_default() += 1;
        }
        counts
            .into_iter()
            .map(|(value, n)| format!("{n} x {value}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    BTreeMap::from([
        ("count", nodes.len().to_string()),
        (
            "os",
            tally(&|f| match f.os.as_str() {
                "" => "(unknown)".to_string(),
                os => os.to_string(),
            }),
        ),
        ("cpus", tally(&|f| format!("{} CPUs", f.cpus))),
        (
            "memory",
            tally(&|f| {
                format!(
                    "{:.1} GiB",
                    f.memory_total_bytes as f64 / (1u64 << 30) as f64
                )
            }),
        ),
    ])
}

fn ms(ms: u64) -> String {
    humantime::format_duration(std::time::Duration::from_millis(ms)).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::BatchSize;

    fn release(id: &str, env: &[(&str, &str)], secret_version: u32) -> pb::Release {
        pb::Release {
            release_id: id.into(),
            version: "v1".into(),
            artifact: Some(pb::Artifact {
                url: "coordinator:".into(),
                digest: "sha256:aa".into(),
            }),
            command: vec!["php".into(), "artisan".into(), "octane:start".into()],
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            secrets: vec![pb::SecretRef {
                name: "APP_KEY".into(),
                version: secret_version,
            }],
            kind: Some(pb::release::Kind::Web(pb::WebService {
                listen: ":8080".into(),
                health: Some(pb::Check {
                    probe: Some(pb::check::Probe::Http(pb::HttpProbe {
                        path: "/up".into(),
                        ..Default::default()
                    })),
                    timeout_ms: 2000,
                }),
                ..Default::default()
            })),
            ..Default::default()
        }
    }

    fn figures(os: &str, cpus: u32, gib: u64) -> Figures {
        Figures {
            os: os.into(),
            cpus,
            memory_total_bytes: gib << 30,
            ..Default::default()
        }
    }

    #[test]
    fn staging_and_production_differ_where_they_differ_and_secrets_by_version() {
        let staging = release("web-v1-aaaa", &[("APP_ENV", "staging"), ("DEBUG", "1")], 2);
        let mut production = release("web-v1-bbbb", &[("APP_ENV", "production")], 5);
        if let Some(pb::release::Kind::Web(web)) = &mut production.kind {
            web.health_interval_ms = 1000;
        }
        let rolling = Strategy::rolling(BatchSize::Count(1), 0, 0);
        let canary_free = Strategy::rolling(BatchSize::Count(2), 0, 10_000);
        let (small, big) = (
            figures("Debian GNU/Linux 12 (bookworm)", 2, 4),
            figures("Debian GNU/Linux 12 (bookworm)", 8, 16),
        );
        let a = Side {
            release: &staging,
            strategy: &rolling,
            nodes: vec![Some(&small)],
        };
        let b = Side {
            release: &production,
            strategy: &canary_free,
            nodes: vec![Some(&big), Some(&big), None],
        };
        let rows = compare(&a, &b);
        let row = |aspect: &str, key: &str| {
            rows.iter()
                .find(|r| r.aspect == aspect && r.key == key)
                .unwrap_or_else(|| panic!("no {aspect} {key}: {rows:#?}"))
        };
        assert!(row("release", "digest").same());
        assert!(row("release", "command").same());
        assert!(!row("release", "id").same());
        assert_eq!(
            (
                row("env", "DEBUG").a.as_str(),
                row("env", "DEBUG").b.as_str()
            ),
            ("1", "")
        );
        let secret = row("secret", "APP_KEY");
        assert_eq!(
            (secret.a.as_str(), secret.b.as_str()),
            ("version 2", "version 5")
        );
        assert!(!row("check", "health_interval").same());
        assert_eq!(row("check", "health").a, "GET /up (timeout 2s)");
        assert!(!row("strategy", "batch").same(), "{rows:#?}");
        assert_eq!(row("nodes", "count").b, "3");
        assert_eq!(row("nodes", "cpus").a, "1 x 2 CPUs");
        assert_eq!(row("nodes", "cpus").b, "1 x (not reported), 2 x 8 CPUs");
        assert!(row("nodes", "os")
            .b
            .contains("2 x Debian GNU/Linux 12 (bookworm)"));

        // A mirror names what is not meant to differ: not the build, the
        // declared variables, the secrets' versions or the node count.
        let declared = BTreeSet::from(["APP_ENV".to_string()]);
        let warned: Vec<(&str, String)> = mirrored(rows.clone(), &declared)
            .into_iter()
            .map(|r| (r.aspect, r.key))
            .collect();
        assert!(warned.contains(&("env", "DEBUG".to_string())), "{warned:?}");
        assert!(warned.contains(&("check", "health_interval".to_string())));
        assert!(warned.contains(&("strategy", "batch".to_string())));
        assert!(warned.contains(&("nodes", "cpus".to_string())));
        for quiet in [
            ("env", "APP_ENV"),
            ("secret", "APP_KEY"),
            ("release", "id"),
            ("nodes", "count"),
        ] {
            assert!(
                !warned.contains(&(quiet.0, quiet.1.to_string())),
                "{quiet:?} in {warned:?}"
            );
        }
    }
}
