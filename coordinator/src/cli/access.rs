//! `cutover operator create|list|revoke` and `cutover audit`.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use cutover_common::fsutil::write_atomic;
use cutover_common::identity::{Identity, Role};
use cutover_proto::v1::operator_service_client::OperatorServiceClient;
use cutover_proto::v1::{self as pb};
use serde_json::{json, Value};
use tonic::transport::Channel;

use super::client::{explain, ConnectArgs};
use super::nodes::{render_table, rfc3339};

#[derive(Debug, clap::Subcommand)]
pub enum OperatorCommand {
    /// Create an operator and write its CLI credentials (admin only).
    Create {
        name: String,
        /// viewer (reads), deployer (also deploys, rolls back, pauses,
        /// resumes and aborts, in --env environments), or admin (also
        /// manages operators).
        #[arg(long)]
        role: String,
        /// Limit a deployer to these environments (repeat; default: all).
        #[arg(long = "env")]
        envs: Vec<String>,
        /// Where the credentials go: cli.toml (use it with --cli-config or
        /// CUTOVER_CLI_CONFIG), the CA, the certificate and its key (0600).
        #[arg(long)]
        out: PathBuf,
        /// Certificate lifetime in days.
        #[arg(long, default_value_t = 365)]
        days: u32,
    },
    /// Operators and their roles.
    List,
    /// Refuse an operator from now on, whatever certificate it holds.
    Revoke {
        name: String,
        /// The name has no record: a certificate issued offline
        /// (`cutover ca issue operator`) that never connected.
        #[arg(long)]
        never_seen: bool,
    },
    /// Renew your own certificate (same lifetime, a new key made here) and
    /// take the current CA bundle: before your certificate expires, and
    /// during a CA rotation (`cutover ca status`) before it finishes.
    Renew,
}

fn operator_json(o: &pb::Operator) -> Value {
    json!({
        "name": o.name,
        "role": o.role,
        "envs": o.envs,
        "created_by": o.created_by,
        "created_at": rfc3339(o.created_at_ms),
        "revoked_at": (o.revoked_at_ms != 0).then(|| rfc3339(o.revoked_at_ms)),
    })
}

/// An operator's CLI credentials, as `write_credentials` lays them out.
pub(crate) struct Credentials<'a> {
    pub name: &'a str,
    pub role: &'a str,
    /// The coordinator(s) the CLI dials, as `cli.toml` lists them.
    pub coordinator: &'a str,
    /// The name to expect in the coordinator's certificate, if not the
    /// address's host.
    pub server_name: Option<&'a str>,
    pub key_pem: &'a str,
    pub cert_pem: &'a str,
    /// The installation's CA bundle.
    pub ca_pem: &'a str,
    /// The command that wrote them, named in `cli.toml`.
    pub written_by: &'a str,
}

/// Refuses a credentials dir that holds some already: nothing is issued or
/// recorded that could not be written out.
pub(crate) fn refuse_used_dir(out: &Path) -> Result<()> {
    if out.join("cli.toml").exists() {
        bail!(
            "{} already holds credentials (cli.toml); choose another --out, or move those away first",
            out.display()
        );
    }
    Ok(())
}

/// Writes an operator's credentials into `out` (created if missing): the
/// key (0600, made on this machine and written only here), the
/// certificate, the CA bundle and `cli.toml` naming them by absolute path.
/// Returns the CLI config's path.
pub(crate) fn write_credentials(out: &Path, credentials: &Credentials) -> Result<PathBuf> {
    let Credentials {
        name,
        role,
        coordinator,
        server_name,
        key_pem,
        cert_pem,
        ca_pem,
        written_by,
    } = credentials;
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    let out = out.canonicalize()?;
    let ca = out.join("ca.crt");
    let cert = out.join(format!("operator-{name}.crt"));
    let key = out.join(format!("operator-{name}.key"));
    let config = out.join("cli.toml");
    let write = |path: &Path, text: &str, mode: u32| {
        write_atomic(path, text.as_bytes(), mode)
            .with_context(|| format!("cannot write {}", path.display()))
    };
    write(&key, key_pem, 0o600)?;
    write(&cert, cert_pem, 0o644)?;
    write(&ca, ca_pem, 0o644)?;
    let server_name = server_name
        .map(|name| format!("server_name = {name:?}\n"))
        .unwrap_or_default();
    write(
        &config,
        &format!(
            "# cutover CLI credentials of operator {name} ({role}), written by `{written_by}`\n\
             coordinator = {coordinator:?}\n\
             {server_name}\
             ca_cert = {:?}\n\
             cert = {:?}\n\
             key = {:?}\n",
            ca.display().to_string(),
            cert.display().to_string(),
            key.display().to_string(),
        ),
        0o600,
    )?;
    Ok(config)
}

pub async fn operator(connect: &ConnectArgs, command: OperatorCommand, json: bool) -> Result<()> {
    let mut client = connect.operator_client().await?;
    match command {
        OperatorCommand::Renew => super::ca::renew(connect, &mut client, json).await?,
        OperatorCommand::Create {
            name,
            role,
            envs,
            out,
            days,
        } => {
            let identity = Identity::new(Role::Operator, &name)
                .with_context(|| format!("operator name {name:?}"))?;
            if !["viewer", "deployer", "admin"].contains(&role.as_str()) {
                bail!("--role {role:?}: use viewer, deployer or admin");
            }
            // Refuse before the coordinator records anything we could not
            // write out.
            refuse_used_dir(&out)?;
            let (csr_pem, key_pem) = cutover_common::pki::certificate_request(&identity)?;
            let response = client
                .create_operator(pb::CreateOperatorRequest {
                    name: name.clone(),
                    role,
                    envs,
                    csr_pem,
                    validity_days: days,
                })
                .await
                .map_err(explain)?
                .into_inner();
            let coordinator = connect.resolve()?.coordinator;
            let operator = response.operator.clone().unwrap_or_default();
            let config = write_credentials(
                &out,
                &Credentials {
                    name: &name,
                    role: &operator.role,
                    coordinator: &coordinator,
                    server_name: connect.resolve()?.server_name.as_deref(),
                    key_pem: &key_pem,
                    cert_pem: &response.cert_pem,
                    ca_pem: &response.ca_cert_pem,
                    written_by: "cutover operator create",
                },
            )?;
            if json {
                let mut value = operator_json(&operator);
                value["cli_config"] = json!(config.display().to_string());
                println!("{value}");
            } else {
                println!(
                    "created operator {name} ({}{}); its CLI config: {}\n\
                     hand over the directory {} (the key in it is 0600); use it with --cli-config {}",
                    operator.role,
                    if operator.envs.is_empty() {
                        String::new()
                    } else {
                        format!(" of {}", operator.envs.join(", "))
                    },
                    config.display(),
                    out.display(),
                    config.display()
                );
            }
        }
        OperatorCommand::List => {
            let operators = client
                .list_operators(pb::ListOperatorsRequest {})
                .await
                .map_err(explain)?
                .into_inner()
                .operators;
            if json {
                let all: Vec<Value> = operators.iter().map(operator_json).collect();
                println!("{}", Value::Array(all));
            } else {
                let mut rows = vec![[
                    "NAME",
                    "ROLE",
                    "ENVIRONMENTS",
                    "CREATED BY",
                    "CREATED",
                    "REVOKED",
                ]
                .map(String::from)
                .to_vec()];
                rows.extend(operators.iter().map(|o| {
                    vec![
                        o.name.clone(),
                        o.role.clone(),
                        if o.envs.is_empty() {
                            "all".into()
                        } else {
                            o.envs.join(",")
                        },
                        o.created_by.clone(),
                        rfc3339(o.created_at_ms),
                        if o.revoked_at_ms == 0 {
                            String::new()
                        } else {
                            rfc3339(o.revoked_at_ms)
                        },
                    ]
                }));
                print!("{}", render_table(&rows));
            }
        }
        OperatorCommand::Revoke { name, never_seen } => {
            let operator = client
                .revoke_operator(pb::RevokeOperatorRequest {
                    name: name.clone(),
                    never_seen,
                })
                .await
                .map_err(explain)?
                .into_inner();
            if json {
                println!("{}", operator_json(&operator));
            } else {
                println!("operator {name} is revoked: its calls are refused from now on");
            }
        }
    }
    Ok(())
}

#[derive(Debug, clap::Subcommand)]
pub enum SecretCommand {
    /// Store a new version of a secret, read from stdin (never from the
    /// command line, where it would land in shell history and `ps`).
    Set {
        #[arg(long)]
        env: String,
        name: String,
        /// How often it is to be rotated from now on, e.g. `90d` (`0s`:
        /// no schedule); `cutover secret list` and an alert say when it is
        /// due. Default: as it was.
        #[arg(long, value_parser = humantime::parse_duration)]
        rotate_every: Option<Duration>,
    },
    /// Names, versions, dates and rotation schedules; never values.
    List {
        #[arg(long)]
        env: String,
    },
    /// Store a new version of a secret, read from stdin, and roll out
    /// every service of the environment whose current release names it
    /// (each like a deploy: strategy, freeze windows, approvals). Exits 1
    /// when a service's rollout was refused (it keeps the old version).
    Rotate {
        #[arg(long)]
        env: String,
        name: String,
        /// Follow the rollouts to their end; exit 0 only if they succeeded.
        #[arg(long)]
        wait: bool,
        #[arg(long)]
        allow_unreachable: bool,
        /// Past the freeze windows and approvals (with --reason).
        #[arg(long, requires = "reason")]
        break_glass: bool,
        #[arg(long)]
        reason: Option<String>,
    },
    /// Remove every version of a secret.
    Rm {
        #[arg(long)]
        env: String,
        name: String,
    },
    /// A new master key; every stored value is re-encrypted with it.
    RotateMasterKey,
}

fn secret_json(s: &pb::SecretEntry) -> Value {
    json!({
        "env": s.env,
        "name": s.name,
        "versions": s.versions.iter().map(|v| json!({
            "version": v.version,
            "created_at": rfc3339(v.created_at_ms),
            "created_by": v.created_by,
        })).collect::<Vec<_>>(),
        "rotate_every_ms": (s.rotate_every_ms > 0).then_some(s.rotate_every_ms),
        "rotation_due_at": rotation_due_ms(s).map(rfc3339),
    })
}

/// When the newest version is due for rotation; `None` without a
/// schedule.
fn rotation_due_ms(s: &pb::SecretEntry) -> Option<i64> {
    let newest = s.versions.last()?;
    (s.rotate_every_ms > 0).then(|| newest.created_at_ms + s.rotate_every_ms as i64)
}

/// A secret's value from stdin (never the command line, where it would
/// land in shell history and `ps`).
fn read_value(name: &str) -> Result<Vec<u8>> {
    use std::io::{IsTerminal, Read};
    if std::io::stdin().is_terminal() {
        eprintln!("reading the value of {name} from stdin; end it with Ctrl-D");
    }
    let mut value = Vec::new();
    std::io::stdin()
        .take(cutover_coordinator::secrets::MAX_VALUE_BYTES as u64 + 2)
        .read_to_end(&mut value)
        .context("cannot read the value from stdin")?;
    // `echo value |` and a terminal both end with a newline that is not
    // part of the value.
    if value.ends_with(b"\n") {
        value.pop();
        if value.ends_with(b"\r") {
            value.pop();
        }
    }
    Ok(value)
}

pub async fn secret(
    client: &mut OperatorServiceClient<Channel>,
    command: SecretCommand,
    json: bool,
) -> Result<ExitCode> {
    match command {
        SecretCommand::Set {
            env,
            name,
            rotate_every,
        } => {
            let value = read_value(&name)?;
            let entry = client
                .set_secret(pb::SetSecretRequest {
                    env: env.clone(),
                    name: name.clone(),
                    value,
                    rotate_every_ms: rotate_every.map(|d| d.as_millis() as u64),
                })
                .await
                .map_err(explain)?
                .into_inner();
            let version = entry.versions.last().map_or(0, |v| v.version);
            if json {
                println!("{}", secret_json(&entry));
            } else {
                println!(
                    "secret {name} in {env} is now at version {version}; it takes effect with the next deploy of the services that name it"
                );
            }
        }
        SecretCommand::List { env } => {
            let secrets = client
                .list_secrets(pb::ListSecretsRequest { env })
                .await
                .map_err(explain)?
                .into_inner()
                .secrets;
            if json {
                println!(
                    "{}",
                    Value::Array(secrets.iter().map(secret_json).collect())
                );
            } else {
                let mut rows = vec![[
                    "NAME",
                    "VERSION",
                    "VERSIONS KEPT",
                    "SET",
                    "BY",
                    "ROTATE EVERY",
                    "DUE",
                ]
                .map(String::from)
                .to_vec()];
                let now = cutover_common::now_ms();
                rows.extend(secrets.iter().map(|s| {
                    let last = s.versions.last().cloned().unwrap_or_default();
                    let every = match s.rotate_every_ms {
                        0 => "-".to_string(),
                        ms if ms % 86_400_000 == 0 => format!("{}d", ms / 86_400_000),
                        ms => {
                            humantime::format_duration(Duration::from_secs(ms / 1000)).to_string()
                        }
                    };
                    let due = match rotation_due_ms(s) {
                        None => "-".to_string(),
                        Some(due) if due <= now => format!("{} (OVERDUE)", rfc3339(due)),
                        Some(due) => rfc3339(due),
                    };
                    vec![
                        s.name.clone(),
                        last.version.to_string(),
                        s.versions.len().to_string(),
                        rfc3339(last.created_at_ms),
                        last.created_by,
                        every,
                        due,
                    ]
                }));
                print!("{}", render_table(&rows));
            }
        }
        SecretCommand::Rotate {
            env,
            name,
            wait,
            allow_unreachable,
            break_glass,
            reason,
        } => {
            let value = read_value(&name)?;
            let rotated = client
                .rotate_secret(pb::RotateSecretRequest {
                    env: env.clone(),
                    name: name.clone(),
                    value,
                    allow_unreachable,
                    break_glass,
                    reason: reason.unwrap_or_default(),
                })
                .await
                .map_err(explain)?
                .into_inner();
            let version = rotated
                .secret
                .as_ref()
                .and_then(|s| s.versions.last())
                .map_or(0, |v| v.version);
            eprintln!("secret {name} in {env} is now at version {version}");
            for refused in &rotated.refused {
                eprintln!(
                    "error: {} keeps the old version: {}; deploy it once that is resolved",
                    refused.service, refused.message
                );
            }
            let deploy = rotated.deploy.unwrap_or_default();
            if deploy.rollouts.is_empty()
                && deploy.unchanged.is_empty()
                && rotated.refused.is_empty()
            {
                eprintln!(
                    "no service in {env} runs a release that names {name}: nothing to roll out"
                );
            }
            let code = super::rollouts::started(client, deploy, wait, json).await?;
            return Ok(match rotated.refused.is_empty() {
                true => code,
                false => ExitCode::FAILURE,
            });
        }
        SecretCommand::Rm { env, name } => {
            let removed = client
                .remove_secret(pb::RemoveSecretRequest {
                    env: env.clone(),
                    name: name.clone(),
                })
                .await
                .map_err(explain)?
                .into_inner()
                .removed;
            if json {
                println!("{}", json!({"env": env, "name": name, "removed": removed}));
            } else if removed {
                println!("removed secret {name} from {env}");
            } else {
                println!("no secret {name} in {env}: nothing removed");
            }
        }
        SecretCommand::RotateMasterKey => {
            let rotated = client
                .rotate_master_key(pb::RotateMasterKeyRequest {})
                .await
                .map_err(explain)?
                .into_inner();
            if json {
                println!(
                    "{}",
                    json!({"key_id": rotated.key_id, "reencrypted": rotated.reencrypted})
                );
            } else {
                println!(
                    "master key {} is current; {} stored values re-encrypted with it",
                    rotated.key_id, rotated.reencrypted
                );
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

#[derive(Debug, clap::Subcommand)]
pub enum TokenCommand {
    /// A join token for `cutover-agent join` (admin); printed once.
    Create {
        /// Labels the joining node gets, e.g. env=production,role=web.
        #[arg(long, default_value = "")]
        labels: String,
        /// How long it can be used, e.g. "1h" (at most 30 days).
        #[arg(long, default_value = "1h")]
        ttl: humantime::Duration,
        /// How many nodes may join with it (0: any number until it expires).
        #[arg(long, default_value_t = 1)]
        uses: u32,
    },
    /// Tokens, their labels, uses and the nodes that joined with them.
    List,
    /// Refuse a token from now on (admin).
    Revoke { id: String },
}

fn token_json(t: &pb::JoinToken) -> Value {
    json!({
        "id": t.id,
        "labels": t.labels,
        "created_by": t.created_by,
        "created_at": rfc3339(t.created_at_ms),
        "expires_at": rfc3339(t.expires_at_ms),
        "uses": t.uses,
        "used": t.used,
        "nodes": t.nodes,
        "revoked_at": (t.revoked_at_ms != 0).then(|| rfc3339(t.revoked_at_ms)),
    })
}

pub async fn token(connect: &ConnectArgs, command: TokenCommand, json: bool) -> Result<()> {
    let mut client = connect.operator_client().await?;
    match command {
        TokenCommand::Create { labels, ttl, uses } => {
            let labels = labels
                .split(',')
                .filter(|p| !p.trim().is_empty())
                .map(|pair| {
                    pair.split_once('=')
                        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
                        .with_context(|| format!("label {pair:?} is not key=value"))
                })
                .collect::<Result<std::collections::HashMap<_, _>>>()?;
            let ttl: Duration = ttl.into();
            let created = client
                .create_token(pb::CreateTokenRequest {
                    labels,
                    ttl_ms: ttl.as_millis() as u64,
                    uses,
                })
                .await
                .map_err(explain)?
                .into_inner();
            let coordinator = connect.resolve()?.coordinator;
            if json {
                let mut value = token_json(&created.info.unwrap_or_default());
                value["token"] = json!(created.token);
                value["ca_fingerprint"] = json!(created.ca_fingerprint);
                println!("{value}");
            } else {
                // The secret never goes on a command line, where `ps` and the
                // shell history would keep it: the agent reads it from its
                // environment.
                println!(
                    "join token (shown once; it expires in {}):\n  {}\non the node, paste the token at the prompt (it is not echoed), then join:\n  read -rs -p 'token: ' CUTOVER_JOIN_TOKEN && export CUTOVER_JOIN_TOKEN\n  cutover-agent join --coordinator {coordinator} --ca-fingerprint {} --out /etc/cutover",
                    humantime::format_duration(ttl),
                    created.token,
                    created.ca_fingerprint
                );
            }
        }
        TokenCommand::List => {
            let tokens = client
                .list_tokens(pb::ListTokensRequest {})
                .await
                .map_err(explain)?
                .into_inner()
                .tokens;
            if json {
                println!("{}", Value::Array(tokens.iter().map(token_json).collect()));
            } else {
                let mut rows = vec![["ID", "LABELS", "USED", "EXPIRES", "REVOKED", "NODES"]
                    .map(String::from)
                    .to_vec()];
                rows.extend(tokens.iter().map(|t| {
                    let mut labels: Vec<String> =
                        t.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
                    labels.sort();
                    vec![
                        t.id.clone(),
                        labels.join(","),
                        if t.uses == 0 {
                            format!("{}", t.used)
                        } else {
                            format!("{}/{}", t.used, t.uses)
                        },
                        rfc3339(t.expires_at_ms),
                        if t.revoked_at_ms == 0 {
                            String::new()
                        } else {
                            rfc3339(t.revoked_at_ms)
                        },
                        t.nodes.join(","),
                    ]
                }));
                print!("{}", render_table(&rows));
            }
        }
        TokenCommand::Revoke { id } => {
            let token = client
                .revoke_token(pb::RevokeTokenRequest { id: id.clone() })
                .await
                .map_err(explain)?
                .into_inner();
            if json {
                println!("{}", token_json(&token));
            } else {
                println!("join token {id} is revoked");
            }
        }
    }
    Ok(())
}
