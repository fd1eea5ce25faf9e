//! Incident levers as operators set them: one record per lever, for a
//! service of an environment on all its nodes or on one (see
//! `crate::levers`).

use cutover_common::levers::LeverSettings;
use serde::{Deserialize, Serialize};

use super::backend::{Durability, Table};
use super::kv::Kv;
use super::StoreError;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LeverKind {
    Maintenance,
    Throttle,
    Pause,
}

impl LeverKind {
    pub fn as_str(self) -> &'static str {
        match self {
            LeverKind::Maintenance => "maintenance",
            LeverKind::Throttle => "throttle",
            LeverKind::Pause => "pause",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeverRecord {
    pub env: String,
    pub service: String,
    /// A node's name; empty: every node of the service in the environment.
    pub node: String,
    pub kind: LeverKind,
    /// Sets this lever alone.
    pub settings: LeverSettings,
    pub by: String,
    pub at_ms: i64,
}

#[derive(Clone)]
pub struct LeverRepo {
    kv: Kv,
}

fn key(env: &str, service: &str, kind: LeverKind, node: &str) -> Vec<u8> {
    format!("{env}\0{service}\0{}\0{node}", kind.as_str()).into_bytes()
}

impl LeverRepo {
    pub(super) fn new(kv: Kv) -> Self {
        Self { kv }
    }

    pub async fn put(&self, record: &LeverRecord) -> Result<(), StoreError> {
        let key = key(&record.env, &record.service, record.kind, &record.node);
        self.kv
            .put(Table::Levers, &key, record, Durability::Durable)
            .await
    }

    /// Whether there was one to delete.
    pub async fn delete(
        &self,
        env: &str,
        service: &str,
        kind: LeverKind,
        node: &str,
    ) -> Result<bool, StoreError> {
        self.kv
            .delete(
                Table::Levers,
                &key(env, service, kind, node),
                Durability::Durable,
            )
            .await
    }

    /// The levers of a service in an environment.
    pub async fn of_service(
        &self,
        env: &str,
        service: &str,
    ) -> Result<Vec<LeverRecord>, StoreError> {
        self.kv
            .list(Table::Levers, format!("{env}\0{service}\0").as_bytes())
            .await
    }

    /// Every lever; with `env`, that environment's.
    pub async fn list(&self, env: Option<&str>) -> Result<Vec<LeverRecord>, StoreError> {
        let prefix = env.map(|env| format!("{env}\0")).unwrap_or_default();
        self.kv.list(Table::Levers, prefix.as_bytes()).await
    }
}

#[cfg(test)]
mod tests {
    use cutover_common::levers::{MaintenanceSettings, ThrottleSettings};

    use super::*;
    use crate::store::Store;

    fn record(service: &str, node: &str, kind: LeverKind) -> LeverRecord {
        let settings = match kind {
            LeverKind::Maintenance => LeverSettings {
                maintenance: Some(MaintenanceSettings {
                    message: "back soon".into(),
                    retry_after_s: 120,
                    allow: vec!["10.0.0.0/8".into()],
                    bypass_secret: "b".repeat(32),
                }),
                ..Default::default()
            },
            _ => LeverSettings {
                throttle: Some(ThrottleSettings {
                    rps: 100,
                    burst: 100,
                    per: "all".into(),
                    path_prefix: String::new(),
                }),
                ..Default::default()
            },
        };
        LeverRecord {
            env: "prod".into(),
            service: service.into(),
            node: node.into(),
            kind,
            settings,
            by: "ana".into(),
            at_ms: 5,
        }
    }

    #[tokio::test]
    async fn levers_survive_a_reopen_and_each_service_keeps_its_own() {
        let dir = tempfile::tempdir().unwrap();
        let everywhere = record("web", "", LeverKind::Maintenance);
        let one_node = record("web", "web-2", LeverKind::Maintenance);
        let throttle = record("web", "", LeverKind::Throttle);
        // A service whose name starts with the other's.
        let other = record("web2", "", LeverKind::Maintenance);
        {
            let store = Store::open_sled(dir.path()).unwrap();
            for r in [&everywhere, &one_node, &throttle, &other] {
                store.levers.put(r).await.unwrap();
            }
            store.flush().await.unwrap();
        }
        let store = Store::open_sled(dir.path()).unwrap();
        let of_web = store.levers.of_service("prod", "web").await.unwrap();
        assert_eq!(of_web.len(), 3, "{of_web:?}");
        assert!(of_web.contains(&one_node) && of_web.contains(&throttle));
        assert_eq!(store.levers.list(Some("prod")).await.unwrap().len(), 4);
        assert_eq!(
            store.levers.list(Some("staging")).await.unwrap(),
            Vec::new()
        );
        let lifted = store
            .levers
            .delete("prod", "web", LeverKind::Maintenance, "web-2")
            .await
            .unwrap();
        assert!(lifted);
        let again = store
            .levers
            .delete("prod", "web", LeverKind::Maintenance, "web-2")
            .await
            .unwrap();
        assert!(!again, "nothing left to lift");
        assert_eq!(
            store.levers.of_service("prod", "web").await.unwrap(),
            vec![everywhere, throttle]
        );
    }
}
