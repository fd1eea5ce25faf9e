//! How the CLI reaches the coordinator: flags, then `CUTOVER_*` variables
//! (both through clap), then the CLI config file.

use std::path::{Path, PathBuf};

use anyhow::{bail, Result};
use cutover_common::tls::{self, ChannelOptions, CoordinatorUrl, TlsFiles};
use cutover_proto::v1::operator_service_client::OperatorServiceClient;
use cutover_proto::v1::server_service_client::ServerServiceClient;
use cutover_proto::v1::{ServerRole, ServerStatusRequest};
use serde::Deserialize;
use tonic::transport::Channel;

#[derive(Debug, Clone, clap::Args)]
pub struct ConnectArgs {
    /// Coordinator address, e.g. https://coordinator.example:7443.
    #[arg(long, global = true, env = "CUTOVER_COORDINATOR")]
    pub coordinator: Option<String>,
    /// Name to expect in the coordinator's certificate (default: the host).
    #[arg(long, global = true, env = "CUTOVER_TLS_SERVER_NAME")]
    pub server_name: Option<String>,
    /// CA certificate that signed the coordinator's certificate.
    #[arg(long, global = true, env = "CUTOVER_CA_CERT")]
    pub ca_cert: Option<PathBuf>,
    /// Operator certificate (from `cutover ca issue operator`).
    #[arg(long, global = true, env = "CUTOVER_CERT")]
    pub cert: Option<PathBuf>,
    /// Operator private key.
    #[arg(long, global = true, env = "CUTOVER_KEY")]
    pub key: Option<PathBuf>,
    /// CLI config file with the same settings (keys: coordinator,
    /// server_name, ca_cert, cert, key). Default ~/.config/cutover/cli.toml.
    #[arg(long, global = true, env = "CUTOVER_CLI_CONFIG")]
    pub cli_config: Option<PathBuf>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct CliFile {
    coordinator: Option<String>,
    server_name: Option<String>,
    ca_cert: Option<PathBuf>,
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
}

fn default_cli_config() -> Option<PathBuf> {
    std::env::var_os("HOME").map(|home| Path::new(&home).join(".config/cutover/cli.toml"))
}

/// Where and as whom the CLI connects, resolved from flags, variables and
/// the CLI config file.
pub struct Connection {
    pub coordinator: String,
    pub server_name: Option<String>,
    pub files: TlsFiles,
}

impl ConnectArgs {
    pub fn resolve(&self) -> Result<Connection> {
        let file: CliFile = match self.cli_config.clone().or_else(default_cli_config) {
            Some(path) if path.exists() || self.cli_config.is_some() => {
                cutover_common::config::load_from(Some(&path), "", std::iter::empty())?
            }
            _ => CliFile::default(),
        };
        let missing = |what: &str, flag: &str, var: &str| {
            anyhow::anyhow!(
                "no {what} given: pass --{flag}, set {var}, or add `{}` to the CLI config file (for a local cluster: `source DIR/env` after `cutover dev up`)",
                flag.replace('-', "_")
            )
        };
        let coordinator = self
            .coordinator
            .clone()
            .or(file.coordinator)
            .ok_or_else(|| missing("coordinator address", "coordinator", "CUTOVER_COORDINATOR"))?;
        let files = TlsFiles {
            ca_cert: self
                .ca_cert
                .clone()
                .or(file.ca_cert)
                .ok_or_else(|| missing("CA certificate", "ca-cert", "CUTOVER_CA_CERT"))?,
            cert: self
                .cert
                .clone()
                .or(file.cert)
                .ok_or_else(|| missing("operator certificate", "cert", "CUTOVER_CERT"))?,
            key: self
                .key
                .clone()
                .or(file.key)
                .ok_or_else(|| missing("operator key", "key", "CUTOVER_KEY"))?,
        };
        Ok(Connection {
            coordinator,
            server_name: self.server_name.clone().or(file.server_name),
            files,
        })
    }

    pub async fn operator_client(&self) -> Result<OperatorServiceClient<Channel>> {
        // The coordinator bounds its answers (`limits.max_message_bytes`);
        // the CLI takes whatever it sends, so a size error is always the
        // coordinator's limit and `explain` can name it.
        Ok(OperatorServiceClient::new(self.leader_channel().await?)
            .max_decoding_message_size(usize::MAX))
    }

    /// Where the CLI dials: the listed coordinators, the name to expect in
    /// their certificate and the operator's TLS settings.
    fn dial_plan(&self) -> Result<DialPlan> {
        let Connection {
            coordinator,
            server_name,
            files,
        } = self.resolve()?;
        let urls = CoordinatorUrl::parse_list(&coordinator)?;
        // A renewal (`operator renew`) a crash cut short is completed first.
        cutover_common::pki::finish_pair_swap(&files.cert, &files.key);
        if let Some(warning) = exposed_key(&files.key) {
            eprintln!("warning: {warning}");
        }
        Ok(DialPlan {
            urls,
            server_name,
            config: tls::client_config(&files)?,
        })
    }

    /// A connection to the coordinator that leads. Several coordinators
    /// (on etcd) all answer, but a follower answers only its status (which
    /// names the leader: that one is tried next, listed or not, its
    /// certificate checked like any other) and the reads it keeps. While no
    /// coordinator leads (an election, etcd without a quorum), a follower's
    /// connection is the answer: reads go on, a write is refused with the
    /// follower's word on why.
    pub async fn leader_channel(&self) -> Result<Channel> {
        let plan = self.dial_plan()?;
        let mut candidates: std::collections::VecDeque<CoordinatorUrl> =
            plan.urls.iter().cloned().collect();
        let mut tried: Vec<String> = Vec::new();
        let mut failures = Vec::new();
        let mut leaderless = None;
        while let Some(url) = candidates.pop_front() {
            if tried.contains(&url.url) {
                continue;
            }
            tried.push(url.url.clone());
            let channel = match plan.dial(&url).await {
                Ok(channel) => channel,
                Err(error) => {
                    failures.push(error.to_string());
                    continue;
                }
            };
            let asked = tokio::time::timeout(
                PROBE_TIMEOUT,
                ServerServiceClient::new(channel.clone()).status(ServerStatusRequest {
                    store_health: false,
                }),
            )
            .await;
            let status = match asked {
                Ok(Ok(status)) => status.into_inner(),
                // A coordinator from before `ServerService` leads alone; a
                // refused certificate is explained by the call itself.
                Ok(Err(refused))
                    if matches!(
                        refused.code(),
                        tonic::Code::Unimplemented
                            | tonic::Code::PermissionDenied
                            | tonic::Code::Unauthenticated
                    ) =>
                {
                    return Ok(channel)
                }
                // The last hope: the call that follows says what is wrong.
                Ok(Err(_)) | Err(_) if candidates.is_empty() => return Ok(channel),
                Ok(Err(refused)) => {
                    failures.push(format!("{}: {}", url.url, explain(refused)));
                    continue;
                }
                Err(_) => {
                    failures.push(format!(
                        "{}: no answer within {}",
                        url.url,
                        humantime::format_duration(PROBE_TIMEOUT)
                    ));
                    continue;
                }
            };
            if status.role() != ServerRole::Following {
                return Ok(channel);
            }
            if status.leader.is_empty() {
                failures.push(format!(
                    "{} follows, and no coordinator leads yet (an election is under way, or etcd has no quorum)",
                    url.url
                ));
                leaderless.get_or_insert(channel);
                continue;
            }
            failures.push(format!(
                "{} follows the leader at {}",
                url.url, status.leader
            ));
            match CoordinatorUrl::parse(&status.leader) {
                Ok(leader) => candidates.push_front(leader),
                Err(error) => failures.push(format!(
                    "the leader's address {:?} is not a URL ({error}); set etcd.advertise on the coordinators",
                    status.leader
                )),
            }
        }
        if let Some(follower) = leaderless {
            return Ok(follower);
        }
        bail!(
            "{}; check that the coordinator runs there and that --coordinator and --ca-cert are this installation's",
            failures.join("; ")
        )
    }

    /// Every listed coordinator, each with its connection or why none.
    pub async fn each_coordinator(&self) -> Result<Vec<(String, Result<Channel, String>)>> {
        let plan = self.dial_plan()?;
        let mut each = Vec::new();
        for url in &plan.urls {
            let dialled = plan.dial(url).await.map_err(|error| error.to_string());
            each.push((url.url.clone(), dialled));
        }
        Ok(each)
    }
}

/// How long a coordinator may take to say whether it leads.
const PROBE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

struct DialPlan {
    urls: Vec<CoordinatorUrl>,
    server_name: Option<String>,
    config: std::sync::Arc<rustls::ClientConfig>,
}

impl DialPlan {
    async fn dial(&self, url: &CoordinatorUrl) -> Result<Channel, tls::TlsError> {
        tls::connect(
            url,
            self.server_name.as_deref(),
            self.config.clone(),
            &ChannelOptions::default(),
        )
        .await
    }
}

/// Turns a gRPC status into an error that says what to do.
pub fn explain(status: tonic::Status) -> anyhow::Error {
    use tonic::Code;
    let message = status.message().to_string();
    match status.code() {
        Code::PermissionDenied | Code::Unauthenticated => anyhow::anyhow!("refused: {message}"),
        // A connection-level failure: the useful part is the innermost cause,
        // e.g. the TLS alert the coordinator sent when it refused our
        // certificate.
        Code::Unavailable | Code::Unknown | Code::Internal
            if message.contains("transport error") =>
        {
            let cause = tls::root_cause(&status);
            // In TLS 1.3 the server judges the client certificate after the
            // client considers the handshake done, so a refused certificate
            // shows up here as a closed or reset connection.
            let hint = "; if it persists, check --cert and --key: the coordinator closes connections whose certificate this installation's CA did not issue";
            anyhow::anyhow!("connection to the coordinator failed: {cause}{hint}")
        }
        // tonic's words for a message over the limit, on each side.
        Code::OutOfRange if message.contains("decoded message length too large") => {
            anyhow::anyhow!(
                "the coordinator refused the request as too large ({message}): it takes messages up to `limits.max_message_bytes` of its coordinator.toml (default 4MiB); send less (keep large data out of the spec: files, an artifact), or raise that limit and restart the coordinator"
            )
        }
        Code::OutOfRange if message.contains("encoded message length too large") => {
            anyhow::anyhow!(
                "the coordinator's answer is over its `limits.max_message_bytes` ({message}); ask for less (--limit, one --env), or raise that limit in its coordinator.toml and restart it"
            )
        }
        // The coordinator's own word on what is unavailable (a node, the
        // store, the leader), which it words for the operator.
        Code::Unavailable if !message.is_empty() => anyhow::anyhow!("{message}"),
        Code::Unavailable => anyhow::anyhow!("the coordinator is unavailable; try again"),
        _ => anyhow::anyhow!("{message}"),
    }
}

pub fn ensure_output(output: &str) -> Result<()> {
    if output != "table" && output != "json" {
        bail!("unknown output format {output:?}: use table or json");
    }
    Ok(())
}

/// A warning when others can read the operator key at `path`: whoever
/// reads it acts as this operator.
fn exposed_key(path: &std::path::Path) -> Option<String> {
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(path).ok()?.permissions().mode() & 0o777;
    (mode & 0o077 != 0).then(|| {
        format!(
            "the operator key {} is readable by others (mode {mode:o}); anyone who reads it can act as you: `chmod 600 {}`",
            path.display(),
            path.display()
        )
    })
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn a_key_others_can_read_is_warned_about() {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("operator.key");
        std::fs::write(&key, "key").unwrap();
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(super::exposed_key(&key), None);
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
        let warning = super::exposed_key(&key).unwrap();
        assert!(
            warning.contains("mode 644") && warning.contains("chmod 600"),
            "{warning}"
        );
    }
}
