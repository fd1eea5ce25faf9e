//! Config-only releases (`cutover config set`): the current release of a
//! service with its environment changed, rolled out like any deploy (the
//! environment's strategy, freeze windows and approvals; a rollback
//! returns the old values), running no migration and no hook: the code is
//! the same. A flag turned off in an incident is one command.
//!
//! The overrides live on the release record: the current release's are in
//! force, and every deploy from the spec keeps them (`apply`), so the next
//! deploy does not turn that flag back on; each keeps the spec's value of
//! its key, which `--reset` goes back to. A rollback to a kept release
//! brings back the overrides it had.

use std::collections::BTreeMap;
use std::sync::Arc;

use cutover_proto::v1 as pb;

use super::variant::Variant;
use super::{RolloutError, Rollouts, Started};
use crate::store::ConfigOverride;

/// One `cutover config set`.
#[derive(Debug, Clone, Default)]
pub struct ConfigChange {
    pub env: String,
    pub service: String,
    pub set: BTreeMap<String, String>,
    /// Keys removed from the environment (the spec's value too).
    pub unset: Vec<String>,
    /// Keys whose override goes: the spec's value again.
    pub reset: Vec<String>,
    pub by: String,
    pub allow_unreachable: bool,
    /// An admin's reason to change past a freeze window and the approvals.
    pub break_glass: Option<String>,
}

impl ConfigChange {
    /// Names are environment variable names, each key says one thing, and
    /// there is something to do.
    fn check(&self) -> Result<(), RolloutError> {
        let bad = |m: String| Err(RolloutError::BadConfig(m));
        if self.set.is_empty() && self.unset.is_empty() && self.reset.is_empty() {
            return bad("nothing to change: give KEY=VALUE, --unset KEY or --reset KEY".into());
        }
        let named: BTreeMap<String, String> = self
            .unset
            .iter()
            .chain(&self.reset)
            .map(|k| (k.clone(), String::new()))
            .chain(self.set.clone())
            .collect();
        if let Err((key, message)) = crate::spec_checks::env_vars(&named) {
            return bad(format!("{key}: {message}"));
        }
        let mut seen = std::collections::BTreeSet::new();
        for key in self.set.keys().chain(&self.unset).chain(&self.reset) {
            if !seen.insert(key) {
                return bad(format!(
                    "{key} is named twice: set it, unset it or reset it, once"
                ));
            }
        }
        Ok(())
    }
}

/// Applies the overrides in force to `release`, made from the spec:
/// returns them with each key's spec value refreshed, and gives the
/// release its id again when they changed anything.
pub(super) fn apply(
    release: &mut pb::Release,
    overrides: &BTreeMap<String, ConfigOverride>,
) -> BTreeMap<String, ConfigOverride> {
    let mut kept = BTreeMap::new();
    for (key, o) in overrides {
        let spec_value = release.env.get(key).cloned();
        match &o.value {
            Some(value) => release.env.insert(key.clone(), value.clone()),
            None => release.env.remove(key),
        };
        kept.insert(
            key.clone(),
            ConfigOverride {
                spec_value,
                ..o.clone()
            },
        );
    }
    if !overrides.is_empty() {
        release.release_id = crate::spec::release_id(release);
    }
    kept
}

impl Rollouts {
    /// The overrides `config` go on the current release `release_id` of
    /// the service where nothing rolls out because that release runs
    /// already: an override set to the value in force, a reset to a spec
    /// value that is the override's, a deploy whose spec changed only an
    /// overridden key (its new spec value). Returns whether they changed.
    pub(super) async fn keep_config(
        &self,
        env: &str,
        service: &str,
        release_id: &str,
        config: &BTreeMap<String, ConfigOverride>,
    ) -> Result<bool, RolloutError> {
        let Some(mut current) = self.store.releases.current(env, service).await? else {
            return Ok(false);
        };
        if current.release.id() != release_id || current.config == *config {
            return Ok(false);
        }
        current.config = config.clone();
        self.store.releases.put(&current).await?;
        Ok(true)
    }

    /// Rolls out the current release of the service with `change` made to
    /// its environment.
    pub async fn set_config(
        self: &Arc<Self>,
        change: ConfigChange,
    ) -> Result<Started, RolloutError> {
        change.check()?;
        let ConfigChange {
            env, service, by, ..
        } = &change;
        let _creating = self.create.lock().await;
        let Some(current) = self.store.releases.current(env, service).await? else {
            return Err(RolloutError::NoCurrent(format!(
                "{service} has no current release in {env}: config set changes a running release's environment; deploy it first with `cutover deploy`"
            )));
        };
        let secrets = &current.release.0.secrets;
        for key in change.set.keys().chain(&change.unset).chain(&change.reset) {
            if secrets.iter().any(|s| &s.name == key) {
                return Err(RolloutError::BadConfig(format!(
                    "{key} is a secret of {service} in {env}: change it with `cutover secret set --env {env} {key}` and deploy"
                )));
            }
        }
        let now_ms = self.registry.now_ms();
        let mut release = current.release.0.clone();
        let mut config = current.config.clone();
        let overridden = |value: Option<String>, spec_value: Option<String>| ConfigOverride {
            value,
            spec_value,
            by: by.clone(),
            at_ms: now_ms,
        };
        for (key, value) in &change.set {
            let spec_value = spec_value(&release, &config, key);
            config.insert(key.clone(), overridden(Some(value.clone()), spec_value));
            release.env.insert(key.clone(), value.clone());
        }
        for key in &change.unset {
            let spec_value = spec_value(&release, &config, key);
            config.insert(key.clone(), overridden(None, spec_value));
            release.env.remove(key);
        }
        for key in &change.reset {
            let Some(o) = config.remove(key) else {
                return Err(RolloutError::BadConfig(format!(
                    "{key} has no override in {env} to reset: `cutover config show {service} --env {env}` lists them"
                )));
            };
            match o.spec_value {
                Some(value) => release.env.insert(key.clone(), value),
                None => release.env.remove(key),
            };
        }
        release.release_id = crate::spec::release_id(&release);
        if release.release_id == current.release.id() {
            let kept = self
                .keep_config(env, service, &release.release_id, &config)
                .await?;
            let kept = match kept {
                true => "; the overrides are recorded (`cutover config show`)",
                false => "",
            };
            return Ok(Started::NoOp {
                service: service.clone(),
                release_id: release.release_id,
                message: format!(
                    "{service} in {env} runs {} with that environment already: nothing to roll out{kept}",
                    current.release.id()
                ),
            });
        }

        let mut said = Vec::new();
        if !change.set.is_empty() {
            said.push(format!("set {}", keys(change.set.keys())));
        }
        if !change.unset.is_empty() {
            said.push(format!("removed {}", keys(&change.unset)));
        }
        if !change.reset.is_empty() {
            said.push(format!("reset {} to the spec", keys(&change.reset)));
        }
        let note = format!(
            "{by} changed the environment of {}: {}",
            current.release.id(),
            said.join("; ")
        );
        let variant = Variant {
            topic: "config",
            current,
            release,
            config,
            note,
        };
        let break_glass = change.break_glass.as_deref();
        self.roll_out_variant(variant, by, change.allow_unreachable, break_glass)
            .await
    }
}

/// The spec's value of `key`: kept from the key's first override, or what
/// the release has (from the spec) until then.
fn spec_value(
    release: &pb::Release,
    config: &BTreeMap<String, ConfigOverride>,
    key: &str,
) -> Option<String> {
    match config.get(key) {
        Some(o) => o.spec_value.clone(),
        None => release.env.get(key).cloned(),
    }
}

/// "A, B, C".
fn keys<'a>(keys: impl IntoIterator<Item = &'a String>) -> String {
    keys.into_iter()
        .map(String::as_str)
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn overridden(value: Option<&str>) -> ConfigOverride {
        ConfigOverride {
            value: value.map(str::to_string),
            spec_value: Some("stale".into()),
            by: "ana".into(),
            at_ms: 5,
        }
    }

    #[test]
    fn a_deploy_keeps_the_overrides_and_learns_the_specs_new_values() {
        let mut release = pb::Release {
            service: "web".into(),
            version: "v2".into(),
            env: [("FLAG", "on"), ("GREETING", "hi"), ("KEEP", "1")]
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .into(),
            ..Default::default()
        };
        let plain_id = crate::spec::release_id(&release);
        release.release_id = plain_id.clone();
        let overrides = BTreeMap::from([
            ("FLAG".to_string(), overridden(Some("off"))),
            ("GREETING".to_string(), overridden(None)),
            ("NEW".to_string(), overridden(Some("x"))),
        ]);
        let kept = apply(&mut release, &overrides);
        assert_eq!(release.env["FLAG"], "off");
        assert!(!release.env.contains_key("GREETING"));
        assert_eq!(release.env["NEW"], "x");
        assert_eq!(release.env["KEEP"], "1");
        assert_ne!(
            release.release_id, plain_id,
            "another environment, another id"
        );
        assert_eq!(release.release_id, crate::spec::release_id(&release));
        assert_eq!(kept["FLAG"].spec_value.as_deref(), Some("on"));
        assert_eq!(kept["GREETING"].spec_value.as_deref(), Some("hi"));
        assert_eq!(kept["NEW"].spec_value, None);
        assert_eq!((kept["FLAG"].by.as_str(), kept["FLAG"].at_ms), ("ana", 5));

        let mut untouched = pb::Release::default();
        assert!(apply(&mut untouched, &BTreeMap::new()).is_empty());
        assert!(untouched.release_id.is_empty(), "no override, no new id");
    }

    #[test]
    fn a_change_that_says_nothing_or_twice_is_refused() {
        let change = |set: &[(&str, &str)], unset: &[&str]| ConfigChange {
            set: set
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            unset: unset.iter().map(|k| k.to_string()).collect(),
            ..Default::default()
        };
        let refused = |c: ConfigChange| match c.check() {
            Err(RolloutError::BadConfig(m)) => m,
            other => panic!("{other:?}"),
        };
        assert!(refused(change(&[], &[])).contains("nothing to change"));
        assert!(refused(change(&[("A", "1")], &["A"])).contains("A is named twice"));
        assert!(refused(change(&[("1A", "1")], &[])).contains("1A"));
        assert!(refused(change(&[("A", "x\0y")], &[])).contains("NUL"));
        assert!(change(&[("A", "1")], &["B"]).check().is_ok());
    }
}
