//! Who may do what on the operator API, and the audit log of what was done.
//!
//! The mTLS layer already admits only operator certificates signed by the
//! installation's CA (`auth.rs`); here each call is checked against the
//! operator's role and environments, and every mutating call, allowed or
//! refused, is appended to the audit log and logged as a structured line.

use cutover_common::identity::Identity;
use cutover_common::tls::PeerInfo;
use serde_json::Value;
use tonic::{Request, Status};

use crate::refusals::{source_address, RefusalLimiter};
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
    /// May set or change which nodes an environment selects: an admin, or
    /// a deployer not limited to environments (see `environments::pin`).
    pub fn may_pin_environments(&self) -> bool {
        self.role == OperatorRole::Admin || self.envs.is_empty()
    }

    /// May change an environment's policy (see `policy`), or step past it.
    pub fn is_admin(&self) -> bool {
        self.role == OperatorRole::Admin
    }

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
    store: Store,
    refusals: RefusalLimiter,
    /// Held while the operator records are read and one is changed on what
    /// they say together (the last admin is never revoked). A change of one
    /// record alone is a conditional write in the store instead.
    operator_writes: tokio::sync::Mutex<()>,
}

impl Access {
    pub fn new(store: Store) -> Self {
        Self {
            store,
            refusals: RefusalLimiter::default(),
            operator_writes: tokio::sync::Mutex::new(()),
        }
    }

    /// Holds the operator records still for a change that depends on
    /// more than one of them (see `operator_writes`).
    pub async fn operators_alone(&self) -> tokio::sync::MutexGuard<'_, ()> {
        self.operator_writes.lock().await
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Records a refused call, rate-limited per `source` (see
    /// `refusals`); `who` names the caller as far as it is known.
    pub async fn refused(
        &self,
        source: &str,
        who: &str,
        action: &str,
        arguments: &Value,
        reason: &str,
    ) {
        let admitted = self.refusals.admit(source, cutover_common::now_ms());
        for (source, left_out) in admitted.summaries {
            self.append(
                "coordinator",
                "refusals_not_recorded",
                &serde_json::json!({ "source": source }),
                &format!("{left_out} refusals from {source} in the minute before were not recorded (rate limit)"),
            )
            .await;
        }
        if admitted.write {
            tracing::warn!(%who, %source, %action, %reason, "refused");
            self.append(who, action, arguments, &format!("refused: {reason}"))
                .await;
        }
    }

    /// The caller, if `need` is within its role; a refusal of a mutating
    /// call is audited. `arguments` are what the audit log keeps of the call
    /// (never a secret).
    pub async fn check<T>(
        &self,
        request: &Request<T>,
        need: Need<'_>,
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
            .access
            .operator(&identity.name)
            .await
            .map_err(|e| Status::internal(e.to_string()))?;
        let who = who(&identity);
        let peer = request.extensions().get::<PeerInfo>();
        let serial = peer.and_then(|p| p.serial.clone()).unwrap_or_default();
        let source = format!("{who}@{}", source_address(peer.and_then(|p| p.remote_addr)));
        // A read within a valid credential's role changes nothing; every
        // other refusal (a revoked or replaced credential, whatever it
        // tried) is audited.
        let credential_refused = record
            .as_ref()
            .is_some_and(|r| r.revoked_at_ms.is_some() || r.refuses(&serial));
        let audit_refusal = !matches!(need, Need::Read) || credential_refused;
        let refuse = async |message: String| {
            if audit_refusal {
                self.refused(&source, &who, action, arguments, &message)
                    .await;
            }
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
                ))
                .await)
            }
            Some(record) if record.refuses(&serial) => {
                return Err(refuse(format!(
                    "this certificate of operator {} (serial {serial}) was replaced by a renewal; use the renewed one",
                    identity.name
                ))
                .await)
            }
            Some(record) => {
                if record.retires_with(&serial) {
                    self.retire_renewed(&identity.name, &serial).await?;
                }
                Caller {
                    identity,
                    role: record.role,
                    envs: record.envs.clone(),
                }
            }
            // Issued offline with the CA key: see `OperatorRecord`. Recorded
            // at first sight, so the name can be revoked and is never
            // handed out again by `operator create`.
            None => {
                self.store
                    .access
                    .update_operator(&identity.name, |current| {
                        Ok::<_, Status>(match current {
                            Some(_) => None,
                            None => {
                                tracing::info!(operator = %identity.name, "recorded an admin issued offline");
                                Some(OperatorRecord::issued_offline(&identity.name))
                            }
                        })
                    })
                    .await?;
                Caller {
                    identity,
                    role: OperatorRole::Admin,
                    envs: Vec::new(),
                }
            }
        };
        if !caller.allows(need) {
            return Err(refuse(format!(
                "{}; {action} needs {}: ask an admin for it, or for them to do it",
                caller.describe(),
                needed(need)
            ))
            .await);
        }
        Ok(caller)
    }

    /// The renewed certificate `serial` of operator `name` was used: the
    /// one it replaced is refused from now on. Until then the old one still
    /// works, so a renewal whose answer never reached the operator locks
    /// nobody out.
    async fn retire_renewed(&self, name: &str, serial: &str) -> Result<(), Status> {
        self.store
            .access
            .update_operator(name, |current| {
                let Some(mut record) = current else {
                    return Ok::<_, Status>(None);
                };
                for replaced in record.replaced.iter_mut().filter(|c| c.by == serial) {
                    replaced.retired = true;
                }
                Ok(Some(record))
            })
            .await?;
        tracing::info!(operator = %name, %serial, "renewed certificate in use; the one it replaced is retired");
        Ok(())
    }

    /// Records how an allowed mutating call ended.
    pub async fn audit<T>(
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
        self.append(&caller.who(), action, arguments, &outcome)
            .await;
    }

    /// Appends one entry as is (calls outside the operator API, such as an
    /// agent fetching its secrets).
    pub async fn append(&self, who: &str, action: &str, arguments: &Value, outcome: &str) {
        let entry = AuditRecord {
            seq: 0,
            at_ms: cutover_common::now_ms(),
            who: who.to_string(),
            action: action.to_string(),
            arguments: arguments.to_string(),
            outcome: outcome.to_string(),
        };
        tracing::info!(target: "audit", %who, %action, arguments = %entry.arguments, %outcome, "audit");
        if let Err(error) = self.store.access.append_audit(entry).await {
            tracing::error!(%error, %who, %action, "cannot append to the audit log");
        }
    }
}
