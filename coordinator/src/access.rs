//! Who may do what on the operator API, and the audit log of what was done.
//!
//! The mTLS layer already admits only operator certificates signed by the
//! installation's CA (`auth.rs`); here each call is checked against the
//! operator's role and environments, and every mutating call, allowed or
//! refused, is appended to the audit log and logged as a structured line.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use cutover_common::identity::Identity;
use cutover_common::tls::PeerInfo;
use serde_json::Value;
use tonic::{Request, Status};

use crate::store::{AuditRecord, OperatorRecord, OperatorRole, Store};

/// Refusals written to the audit log per source and window; more are
/// counted and said in the next entry, so a flood of bad calls cannot fill
/// the store.
const REFUSALS_PER_WINDOW: u32 = 20;
const REFUSAL_WINDOW_MS: i64 = 60_000;

/// What a call needs.
#[derive(Debug, Clone, Copy)]
pub enum Need<'a> {
    /// Reading state: every role.
    Read,
    /// Changing what runs in an environment: a deployer of it, or an admin.
    Deploy(&'a str),
    /// Deploy-side calls tied to no environment (pushing an artifact): any
    /// deployer, or an admin.
    DeployAnywhere,
    /// Managing operators: an admin.
    Admin,
    /// An operator acting on its own credentials (renewing them): every
    /// role, audited like a change.
    Own,
}

/// An operator allowed to make the call at hand.
#[derive(Debug, Clone)]
pub struct Caller {
    pub identity: Identity,
    pub role: OperatorRole,
    /// Empty: every environment.
    pub envs: Vec<String>,
}

impl Caller {
    /// "operator/alice", as the audit log names callers.
    pub fn who(&self) -> String {
        who(&self.identity)
    }

    fn allows(&self, need: Need) -> bool {
        match need {
            Need::Read | Need::Own => true,
            Need::Admin => self.role == OperatorRole::Admin,
            Need::DeployAnywhere => self.role >= OperatorRole::Deployer,
            Need::Deploy(env) => {
                self.role == OperatorRole::Admin
                    || (self.role == OperatorRole::Deployer
                        && (self.envs.is_empty() || self.envs.iter().any(|e| e == env)))
            }
        }
    }

    fn describe(&self) -> String {
        let scope = match (self.role, self.envs.is_empty()) {
            (OperatorRole::Deployer, false) => format!(" of {}", self.envs.join(", ")),
            _ => String::new(),
        };
        format!(
            "operator {} is a {}{scope}",
            self.identity.name,
            self.role.as_str()
        )
    }
}

/// "operator/alice", "agent/node-1": how the audit log names a caller.
pub fn who(identity: &Identity) -> String {
    format!("{}/{}", identity.role, identity.name)
}

fn needed(need: Need) -> String {
    match need {
        Need::Read | Need::Own => "any role".into(),
        Need::Deploy(env) => format!("the deployer role for environment {env}, or admin"),
        Need::DeployAnywhere => "the deployer or admin role".into(),
        Need::Admin => "the admin role".into(),
    }
}

pub struct Access {
    store: Arc<dyn Store>,
    /// Refusals written per source in the current window.
    refusals: Mutex<HashMap<String, Window>>,
}

struct Window {
    started_ms: i64,
    written: u32,
    left_out: u32,
}

impl Access {
    pub fn new(store: Arc<dyn Store>) -> Self {
        Self {
            store,
            refusals: Mutex::new(HashMap::new()),
        }
    }

    /// Records a call refused before any operator check (a wrong or missing
    /// certificate, a revoked node), rate-limited per `source`; `who` names
    /// the caller as far as it is known.
    pub fn refused(&self, source: &str, who: &str, action: &str, arguments: &Value, reason: &str) {
        let now = cutover_common::now_ms();
        // Some(n): write this refusal, saying n were left out before it.
        let left_out = {
            let mut windows = self.refusals.lock().expect("refusals lock");
            windows.retain(|_, w| now - w.started_ms < REFUSAL_WINDOW_MS || w.left_out > 0);
            let window = windows.entry(source.to_string()).or_insert(Window {
                started_ms: now,
                written: 0,
                left_out: 0,
            });
            if now - window.started_ms >= REFUSAL_WINDOW_MS {
                let left_out = window.left_out;
                *window = Window {
                    started_ms: now,
                    written: 1,
                    left_out: 0,
                };
                Some(left_out)
            } else if window.written < REFUSALS_PER_WINDOW {
                window.written += 1;
                Some(0)
            } else {
                window.left_out += 1;
                None
            }
        };
        tracing::warn!(%who, %source, %action, %reason, "refused");
        let Some(left_out) = left_out else {
            return;
        };
        let outcome = match left_out {
            0 => format!("refused: {reason}"),
            n => format!("refused: {reason} ({n} more refusals from {source} in the minute before were not recorded)"),
        };
        self.append(who, action, arguments, &outcome);
    }

    /// The caller, if `need` is within its role; a refusal of a mutating
    /// call is audited. `arguments` are what the audit log keeps of the call
    /// (never a secret).
    pub fn check<T>(
        &self,
        request: &Request<T>,
        need: Need,
        action: &str,
        arguments: &Value,
    ) -> Result<Caller, Status> {
        let identity = request
            .extensions()
            .get::<Identity>()
            .cloned()
            .ok_or_else(|| Status::unauthenticated("no operator identity on the connection"))?;
        let record = self
            .store
            .operator(&identity.name)
            .map_err(|e| Status::internal(e.to_string()))?;
        let who = who(&identity);
        let serial = request
            .extensions()
            .get::<PeerInfo>()
            .and_then(|peer| peer.serial.clone())
            .unwrap_or_default();
        let refuse = |message: String| {
            // A revoked or replaced credential is audited whatever it
            // tried; a read within a valid one's role is not a change.
            if !matches!(need, Need::Read) || record.as_ref().is_some_and(|r| r.refuses(&serial)) {
                self.append(&who, action, arguments, &format!("refused: {message}"));
            }
            tracing::warn!(operator = %who, %action, %message, "refused");
            Status::permission_denied(message)
        };
        let caller = match &record {
            Some(OperatorRecord {
                revoked_at_ms: Some(_),
                ..
            }) => {
                return Err(refuse(format!(
                    "operator {} was revoked; an admin can create a new operator",
                    identity.name
                )))
            }
            Some(record) if record.refuses(&serial) => {
                return Err(refuse(format!(
                    "this certificate of operator {} (serial {serial}) was replaced by a renewal; use the renewed one",
                    identity.name
                )))
            }
            Some(record) => Caller {
                identity,
                role: record.role,
                envs: record.envs.clone(),
            },
            // Issued offline with the CA key: see `OperatorRecord`. Recorded
            // at first sight, so the name can be revoked and is never
            // handed out again by `operator create`.
            None => {
                let record = OperatorRecord::issued_offline(&identity.name);
                self.store
                    .put_operator(&record)
                    .map_err(|e| Status::internal(e.to_string()))?;
                tracing::info!(operator = %identity.name, "recorded an admin issued offline");
                Caller {
                    identity,
                    role: OperatorRole::Admin,
                    envs: Vec::new(),
                }
            }
        };
        if !caller.allows(need) {
            return Err(refuse(format!(
                "{}; {action} needs {}",
                caller.describe(),
                needed(need)
            )));
        }
        Ok(caller)
    }

    /// Records how an allowed mutating call ended.
    pub fn audit<T>(
        &self,
        caller: &Caller,
        action: &str,
        arguments: &Value,
        result: &Result<T, Status>,
    ) {
        let outcome = match result {
            Ok(_) => "ok".to_string(),
            Err(status) => format!("failed: {}", status.message()),
        };
        self.append(&caller.who(), action, arguments, &outcome);
    }

    /// Appends one entry as is (calls outside the operator API, such as an
    /// agent fetching its secrets).
    pub fn append(&self, who: &str, action: &str, arguments: &Value, outcome: &str) {
        let entry = AuditRecord {
            seq: 0,
            at_ms: cutover_common::now_ms(),
            who: who.to_string(),
            action: action.to_string(),
            arguments: arguments.to_string(),
            outcome: outcome.to_string(),
        };
        tracing::info!(target: "audit", %who, %action, arguments = %entry.arguments, %outcome, "audit");
        if let Err(error) = self.store.append_audit(entry) {
            tracing::error!(%error, %who, %action, "cannot append to the audit log");
        }
    }
}
