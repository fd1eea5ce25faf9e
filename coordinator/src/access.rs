//! Who may do what on the operator API, and the audit log of what was done.
//!
//! The mTLS layer already admits only operator certificates signed by the
//! installation's CA (`auth.rs`); here each call is checked against the
//! operator's role and environments, and every mutating call, allowed or
//! refused, is appended to the audit log and logged as a structured line.

use std::sync::Arc;

use cutover_common::identity::Identity;
use serde_json::Value;
use tonic::{Request, Status};

use crate::store::{AuditRecord, OperatorRecord, OperatorRole, Store};

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
            Need::Read => true,
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

fn who(identity: &Identity) -> String {
    format!("{}/{}", identity.role, identity.name)
}

fn needed(need: Need) -> String {
    match need {
        Need::Read => "any role".into(),
        Need::Deploy(env) => format!("the deployer role for environment {env}, or admin"),
        Need::DeployAnywhere => "the deployer or admin role".into(),
        Need::Admin => "the admin role".into(),
    }
}

pub struct Access {
    store: Arc<dyn Store>,
}

impl Access {
    pub fn new(store: Arc<dyn Store>) -> Self {
        Self { store }
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
        let refuse = |message: String| {
            if !matches!(need, Need::Read) {
                self.append(&who, action, arguments, &format!("refused: {message}"));
            }
            tracing::warn!(operator = %who, %action, %message, "refused");
            Status::permission_denied(message)
        };
        let caller = match record {
            Some(OperatorRecord {
                revoked_at_ms: Some(_),
                ..
            }) => {
                return Err(refuse(format!(
                    "operator {} was revoked; an admin can create a new operator",
                    identity.name
                )))
            }
            Some(record) => Caller {
                identity,
                role: record.role,
                envs: record.envs,
            },
            // Issued offline with the CA key: see `OperatorRecord`.
            None => Caller {
                identity,
                role: OperatorRole::Admin,
                envs: Vec::new(),
            },
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
