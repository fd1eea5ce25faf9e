//! Operators' locks on services (`cutover lock`): how long each has been
//! held, so one forgotten after the work it was for fires an alert
//! (`CutoverServiceLockedLong`). Taken in as locks change (and from the
//! store when the coordinator starts leading); ages are worked out at each
//! scrape.

use std::collections::BTreeMap;
use std::sync::Mutex;

use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;

use super::{FloatGauge, Labels};

/// (env, service) → when it was locked, Unix seconds.
type Known = BTreeMap<(String, String), f64>;

#[derive(Default)]
pub struct LockMetrics {
    age: Family<Labels, FloatGauge>,
    known: Mutex<Known>,
}

impl LockMetrics {
    pub(super) fn register(&self, registry: &mut Registry) {
        registry.register(
            "service_lock_age_seconds",
            "How long each locked service has been locked (cutover lock); absent for a service without a lock",
            self.age.clone(),
        );
    }

    /// `env`/`service` locked at `at_ms`, or, with `None`, unlocked.
    pub fn set(&self, env: &str, service: &str, at_ms: Option<i64>) {
        let mut known = self.known.lock().expect("lock metrics lock");
        let key = (env.to_string(), service.to_string());
        match at_ms {
            Some(at_ms) => {
                known.insert(key, at_ms as f64 / 1000.0);
            }
            None => {
                known.remove(&key);
            }
        }
    }

    pub(super) fn render(&self, now_s: f64) {
        self.age.clear();
        for ((env, service), at_s) in self.known.lock().expect("lock metrics lock").iter() {
            let labels: Labels = vec![
                ("env".to_string(), env.clone()),
                ("service".to_string(), service.clone()),
            ];
            self.age.get_or_create(&labels).set((now_s - at_s).max(0.0));
        }
    }
}
