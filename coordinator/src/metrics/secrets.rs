//! Secret rotation metrics: each secret's age (its newest version's) and
//! the interval it is to be rotated at (`cutover secret set
//! --rotate-every`). Taken in as secrets change (and from the store at
//! start); ages are worked out at each scrape, so they follow real time.

use std::collections::BTreeMap;
use std::sync::Mutex;

use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;

use super::{FloatGauge, Labels};

/// (env, name) → (newest version's creation, Unix seconds; rotation
/// interval, seconds, 0 for none).
type Known = BTreeMap<(String, String), (f64, f64)>;

#[derive(Default)]
pub struct SecretMetrics {
    age: Family<Labels, FloatGauge>,
    rotate_every: Family<Labels, FloatGauge>,
    known: Mutex<Known>,
}

impl SecretMetrics {
    pub(super) fn register(&self, registry: &mut Registry) {
        registry.register(
            "secret_age_seconds",
            "Age of each secret's newest version",
            self.age.clone(),
        );
        registry.register(
            "secret_rotate_every_seconds",
            "How often each secret is to be rotated (cutover secret set --rotate-every); absent for a secret without one",
            self.rotate_every.clone(),
        );
    }

    /// `env`/`name` now: its newest version's creation and its rotation
    /// interval (milliseconds, 0 for none), or `None` once removed.
    pub fn set(&self, env: &str, name: &str, now: Option<(i64, u64)>) {
        let mut known = self.known.lock().expect("secret metrics lock");
        let key = (env.to_string(), name.to_string());
        match now {
            Some((created_ms, every_ms)) => {
                known.insert(key, (created_ms as f64 / 1000.0, every_ms as f64 / 1000.0));
            }
            None => {
                known.remove(&key);
            }
        }
    }

    pub(super) fn render(&self, now_s: f64) {
        self.age.clear();
        self.rotate_every.clear();
        let known = self.known.lock().expect("secret metrics lock");
        for ((env, name), (created_s, every_s)) in known.iter() {
            let labels: Labels = vec![
                ("env".to_string(), env.clone()),
                ("name".to_string(), name.clone()),
            ];
            self.age
                .get_or_create(&labels)
                .set((now_s - created_s).max(0.0));
            if *every_s > 0.0 {
                self.rotate_every.get_or_create(&labels).set(*every_s);
            }
        }
    }
}
