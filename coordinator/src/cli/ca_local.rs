//! `cutover ca init|issue`: the CA commands that work on the PKI dir itself,
//! with the CA key, no coordinator needed (the first steps of an install).

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use cutover_common::identity::{Identity, Role};
use cutover_common::pki::CertificateAuthority;
use cutover_coordinator::secrets::{MasterKeys, MASTER_KEY};

use super::access::{refuse_used_dir, write_credentials, Credentials};
use super::client::ConnectArgs;

/// Whose certificate `cutover ca issue` makes.
#[derive(Clone, Copy, clap::ValueEnum)]
pub enum IssueRole {
    Agent,
    Operator,
}

/// Where an operator's credentials go by default: where the CLI looks.
fn default_operator_dir() -> Option<PathBuf> {
    std::env::var_os("HOME").map(|home| Path::new(&home).join(".config/cutover"))
}

/// The address a new installation's CLI dials unless told otherwise: the
/// coordinator's default `listen` port on this machine.
const LOCAL_COORDINATOR: &str = "https://localhost:7443";

/// A new CA, the coordinator's certificate and the secrets master key in
/// `dir`; prints the CA's fingerprint (what `cutover-agent join` pins) and
/// the next steps.
pub fn init(dir: &Path, sans: &[String]) -> Result<()> {
    CertificateAuthority::init_dir(dir, sans)?;
    MasterKeys::create(&dir.join(MASTER_KEY))?;
    let fingerprint = cutover_common::tls::ca_fingerprint(&dir.join("ca.crt"))?;
    let dir = dir.display();
    println!(
        "created the CA {dir}/ca.crt, the coordinator certificate {dir}/coordinator.crt and the secrets master key {dir}/{MASTER_KEY}\n\
         CA fingerprint: {fingerprint} (nodes pin it when they join)\n\
         keep {dir}/ca.key (it signs every identity) and {dir}/{MASTER_KEY} (it seals every secret) secret\n\
         \n\
         next:\n\
         \x20 1. your admin credentials: cutover ca issue operator --name root --dir {dir}\n\
         \x20 2. the coordinator: chown -R cutover:cutover {dir} && chmod 0700 {dir} (its service user reads and rotates the keys there), point tls, ca_key and master_key_file in /etc/cutover/coordinator.toml at {dir}, then systemctl enable --now cutover\n\
         \x20 3. each node: cutover token create --labels env=production, and run the join command it prints on the node"
    );
    Ok(())
}

/// A client certificate signed with the CA key in `dir`. An agent's goes
/// into `out` (default: `dir`); an operator's comes as a whole credentials
/// dir (key, certificate, CA bundle, `cli.toml`), by default where the CLI
/// looks (`~/.config/cutover`).
pub fn issue(
    role: IssueRole,
    name: &str,
    dir: &Path,
    out: Option<PathBuf>,
    days: Option<i64>,
    connect: &ConnectArgs,
) -> Result<()> {
    let (role, default_days) = match role {
        IssueRole::Agent => (Role::Agent, 7),
        IssueRole::Operator => (Role::Operator, 365),
    };
    let identity = Identity::new(role, name)?;
    let ca = CertificateAuthority::load_dir(dir)?;
    let issued = |days: i64| {
        ca.issue_client(&identity, days)
            .with_context(|| format!("issuing a certificate for {identity}"))
    };
    if role == Role::Agent {
        let out = out.unwrap_or_else(|| dir.to_path_buf());
        let (cert, key) = issued(days.unwrap_or(default_days))?
            .write(&out, &format!("{role}-{name}"))
            .with_context(|| format!("writing the certificate for {identity}"))?;
        println!(
            "issued {identity}: {} and {}",
            cert.display(),
            key.display()
        );
        return Ok(());
    }
    let out = out.or_else(default_operator_dir).context(
        "no --out given and no HOME to put ~/.config/cutover in: pass --out DIR for the credentials",
    )?;
    refuse_used_dir(&out)?;
    let ca_path = dir.join("ca.crt");
    let ca_pem = std::fs::read_to_string(&ca_path)
        .with_context(|| format!("cannot read the CA bundle {}", ca_path.display()))?;
    let pair = issued(days.unwrap_or(default_days))?;
    let coordinator = connect
        .coordinator
        .clone()
        .unwrap_or_else(|| LOCAL_COORDINATOR.to_string());
    let config = write_credentials(
        &out,
        &Credentials {
            name,
            role: "admin",
            coordinator: &coordinator,
            server_name: connect.server_name.as_deref(),
            key_pem: &pair.key_pem,
            cert_pem: &pair.cert_pem,
            ca_pem: &ca_pem,
            written_by: "cutover ca issue operator",
        },
    )?;
    println!(
        "issued {identity}, an admin (issued with the CA key: `operator list` shows it from its first call on)\n\
         its CLI config: {} (dials {coordinator}; the key in {} is 0600)\n\
         the CLI finds it there{}; try `cutover nodes`",
        config.display(),
        out.display(),
        match default_operator_dir() {
            Some(default) if default == out => String::new(),
            _ => format!(" with --cli-config {} (or CUTOVER_CLI_CONFIG)", config.display()),
        },
    );
    Ok(())
}
