//! The external load balancer in front of the node proxies. Without one
//! configured, a node leaves it through its readiness path (503 while
//! drained), which any load balancer with a health check follows after its
//! check interval. With `[environments.NAME.load_balancer]` (HAProxy's
//! runtime API) the coordinator also drains a node's server there before a
//! cutover that takes the node out (`max_unavailable > 0`), waits for its
//! sessions to end, and makes it ready again once the node answered,
//! whatever the outcome; at the end of a rollout every node's server is
//! made ready (a command cut short leaves none drained).

pub mod haproxy;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use haproxy::{AdminState, HaproxyError, RuntimeApi};

/// `[environments.NAME.load_balancer]` as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoadBalancerSpec {
    /// "haproxy".
    pub kind: String,
    /// HAProxy's `stats socket` (level admin): "host:port" or a unix
    /// socket's path on the coordinator's host.
    pub runtime_api: String,
    /// The HAProxy backend of each web service, by service name.
    pub backends: BTreeMap<String, String>,
    /// A node label naming the node's server in the backends; without it,
    /// the server is named as the node.
    #[serde(default)]
    pub server_label: Option<String>,
    /// How long a drained server's sessions may take to end before the
    /// cutover goes ahead.
    #[serde(default, with = "humantime_serde")]
    pub drain_timeout: Option<Duration>,
}

/// The load balancer of one service in one environment, stored with each
/// of its rollouts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoadBalancer {
    pub runtime_api: String,
    pub backend: String,
    pub server_label: Option<String>,
    pub drain_timeout_ms: u64,
}

type KeyError = (String, String);

impl LoadBalancerSpec {
    /// Checks every key; an error names it (under `load_balancer.`).
    pub fn check(&self, services: &[&str]) -> Result<(), KeyError> {
        if self.kind != "haproxy" {
            return Err((
                "kind".into(),
                format!(
                    "{:?} is not a load balancer this version drives; use \"haproxy\", or leave the table out and let the load balancer follow the nodes' readiness path",
                    self.kind
                ),
            ));
        }
        haproxy::Address::parse(&self.runtime_api).map_err(|e| ("runtime_api".into(), e))?;
        if self.backends.is_empty() {
            return Err((
                "backends".into(),
                "names no backend; map each web service to its HAProxy backend, e.g. backends = { web = \"shop_web\" }".into(),
            ));
        }
        for (service, backend) in &self.backends {
            let key = || format!("backends.{service}");
            if !services.contains(&service.as_str()) {
                return Err((key(), format!("{service:?} is not a service of this spec")));
            }
            if !haproxy::name_ok(backend) {
                return Err((
                    key(),
                    format!(
                        "{backend:?} is not an HAProxy backend name (letters, digits, - _ . :)"
                    ),
                ));
            }
        }
        if let Some(label) = &self.server_label {
            if label.is_empty() {
                return Err((
                    "server_label".into(),
                    "is empty; name the node label that holds each node's server name".into(),
                ));
            }
        }
        if self
            .drain_timeout
            .is_some_and(|d| d > Duration::from_secs(3_600))
        {
            return Err((
                "drain_timeout".into(),
                "is over an hour; a cutover waits this long at most for sessions to end".into(),
            ));
        }
        Ok(())
    }

    /// The load balancer of `service`, if the spec maps it to a backend.
    pub fn for_service(&self, service: &str) -> Option<LoadBalancer> {
        Some(LoadBalancer {
            runtime_api: self.runtime_api.clone(),
            backend: self.backends.get(service)?.clone(),
            server_label: self.server_label.clone(),
            drain_timeout_ms: self
                .drain_timeout
                .unwrap_or(Duration::from_secs(30))
                .as_millis() as u64,
        })
    }
}

/// How long one runtime API command may take.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(5);
/// How often a drained server's sessions are looked at.
const SESSIONS_EVERY: Duration = Duration::from_millis(100);

impl LoadBalancer {
    fn api(&self) -> Result<RuntimeApi, HaproxyError> {
        let address =
            haproxy::Address::parse(&self.runtime_api).map_err(|cause| HaproxyError::Connect {
                address: self.runtime_api.clone(),
                cause,
            })?;
        Ok(RuntimeApi::new(address, COMMAND_TIMEOUT))
    }

    /// The server of a node named `node` with `labels`.
    pub fn server<'a>(&'a self, node: &'a str, labels: &'a BTreeMap<String, String>) -> &'a str {
        self.server_label
            .as_ref()
            .and_then(|label| labels.get(label))
            .map_or(node, String::as_str)
    }

    /// Drains `server` and waits until it has no session left, or for
    /// `drain_timeout`: how many sessions it still had then.
    pub async fn drain(&self, server: &str) -> Result<u64, HaproxyError> {
        let api = self.api()?;
        api.set_state(&self.backend, server, AdminState::Drain)
            .await?;
        let deadline = Instant::now() + Duration::from_millis(self.drain_timeout_ms);
        loop {
            let sessions = api.sessions(&self.backend, server).await?;
            if sessions == 0 || Instant::now() >= deadline {
                return Ok(sessions);
            }
            tokio::time::sleep(SESSIONS_EVERY).await;
        }
    }

    /// Sets `server`'s weight (`None`: as configured).
    pub async fn weight(&self, server: &str, weight: Option<u32>) -> Result<(), HaproxyError> {
        self.api()?.set_weight(&self.backend, server, weight).await
    }

    /// Makes `server` take new requests again.
    pub async fn ready(&self, server: &str) -> Result<(), HaproxyError> {
        self.api()?
            .set_state(&self.backend, server, AdminState::Ready)
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(text: &str) -> LoadBalancerSpec {
        toml::from_str(text).expect("valid toml")
    }

    const GOOD: &str = r#"kind = "haproxy"
runtime_api = "10.0.0.2:9999"
backends = { web = "shop_web" }"#;

    #[test]
    fn a_service_maps_to_its_backend_and_a_node_to_its_server() {
        let lb = spec(&format!("{GOOD}\nserver_label = \"haproxy_server\""));
        lb.check(&["web", "worker"]).unwrap();
        assert!(lb.for_service("worker").is_none(), "not in the backends");
        let web = lb.for_service("web").unwrap();
        assert_eq!(
            (web.backend.as_str(), web.drain_timeout_ms),
            ("shop_web", 30_000)
        );
        let labels = BTreeMap::from([("haproxy_server".to_string(), "web3".to_string())]);
        assert_eq!(web.server("node-3", &labels), "web3");
        assert_eq!(web.server("node-4", &BTreeMap::new()), "node-4");
    }

    #[test]
    fn bad_keys_name_the_key_and_the_value() {
        let cases = [
            (
                "kind = \"nginx\"\nruntime_api = \"h:1\"\nbackends = { web = \"b\" }",
                "kind",
                "\"nginx\"",
            ),
            (
                "kind = \"haproxy\"\nruntime_api = \"haproxy\"\nbackends = { web = \"b\" }",
                "runtime_api",
                "host:port",
            ),
            (
                "kind = \"haproxy\"\nruntime_api = \"h:1\"\nbackends = {}",
                "backends",
                "names no backend",
            ),
            (
                "kind = \"haproxy\"\nruntime_api = \"h:1\"\nbackends = { api = \"b\" }",
                "backends.api",
                "not a service",
            ),
            (
                "kind = \"haproxy\"\nruntime_api = \"h:1\"\nbackends = { web = \"a b\" }",
                "backends.web",
                "\"a b\"",
            ),
            (
                &format!("{GOOD}\nserver_label = \"\""),
                "server_label",
                "is empty",
            ),
            (
                &format!("{GOOD}\ndrain_timeout = \"2h\""),
                "drain_timeout",
                "over an hour",
            ),
        ];
        for (text, key, says) in cases {
            let (k, m) = spec(text).check(&["web"]).unwrap_err();
            assert_eq!(k, key, "{text}");
            assert!(m.contains(says), "{text}: {m}");
        }
    }
}
