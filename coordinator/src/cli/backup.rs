//! `cutover admin backup` (online, over the API) and `cutover admin
//! restore` (offline, on the coordinator's machine): the coordinator's own
//! state, see `cutover_coordinator::backup`.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use cutover_coordinator::backup::{self, restore, Header};
use cutover_coordinator::config::CoordinatorConfig;
use cutover_proto::v1::BackupStoreRequest;
use serde_json::json;

use super::client::{explain, ConnectArgs};
use super::nodes::rfc3339;

#[derive(clap::Subcommand)]
pub enum AdminCommand {
    /// Write a snapshot of the coordinator's store, taken at one instant
    /// while it runs, to FILE (admin; 0600, written atomically). Secrets
    /// stay sealed; the PKI dir (CA key, master key) and data_dir/artifacts
    /// are not in it: back them up separately.
    Backup {
        /// Where to write the backup file.
        #[arg(long)]
        out: PathBuf,
    },
    /// Restore a backup file into the coordinator's data dir, which must be
    /// empty or absent, with the coordinator stopped (offline: run it on the
    /// coordinator's machine). Checks that the configured master key file
    /// opens every secret in it; then start the coordinator.
    Restore {
        /// The file `cutover admin backup` wrote.
        file: PathBuf,
        /// The coordinator's config: its data_dir is restored into, its
        /// master_key_file checked.
        #[arg(
            long,
            env = "CUTOVER_SERVER_CONFIG",
            default_value = "/etc/cutover/coordinator.toml"
        )]
        config: PathBuf,
    },
}

pub async fn admin(connect: &ConnectArgs, command: AdminCommand, json: bool) -> Result<()> {
    match command {
        AdminCommand::Backup { out } => backup_to(connect, &out, json).await,
        AdminCommand::Restore { file, config } => restore_from(&file, &config, json).await,
    }
}

async fn backup_to(connect: &ConnectArgs, out: &Path, json: bool) -> Result<()> {
    let mut client = connect.operator_client().await?;
    let mut stream = client
        .backup_store(BackupStoreRequest {})
        .await
        .map_err(explain)?
        .into_inner();
    let mut file = Vec::new();
    while let Some(chunk) = stream.message().await.map_err(explain)? {
        file.extend_from_slice(&chunk.data);
    }
    // Checked as a restore would before it lands: a transfer cut short
    // never leaves a file that looks like a backup.
    let (header, _) = backup::decode(&file)
        .context("the coordinator sent a backup that does not check out; take it again")?;
    cutover_common::fsutil::write_atomic(out, &file, 0o600)
        .with_context(|| format!("cannot write the backup to {}", out.display()))?;
    if json {
        let mut summary = summary(&header, out);
        summary["bytes"] = json!(file.len());
        println!("{summary}");
    } else {
        println!(
            "backup of the coordinator's store written to {} ({} bytes, taken {} by cutover {})\n{}\n\
             not in it: the PKI dir (ca.key, master.key: back it up separately, it opens the sealed secrets) and data_dir/artifacts (pushed artifacts)",
            out.display(),
            file.len(),
            rfc3339(header.created_at_ms),
            header.coordinator_version,
            counts(&header),
        );
    }
    Ok(())
}

async fn restore_from(file: &Path, config: &Path, json: bool) -> Result<()> {
    let config = CoordinatorConfig::load(config)?;
    let header =
        restore::restore(file, &config.data_dir, config.master_key_file.as_deref()).await?;
    if json {
        println!("{}", summary(&header, &config.data_dir));
    } else {
        println!(
            "restored the store of {} (taken by cutover {}) into {}\n{}\n\
             next: put back data_dir/artifacts if releases use `coordinator:` artifacts, then start the coordinator; agents reconnect on their own",
            rfc3339(header.created_at_ms),
            header.coordinator_version,
            config.data_dir.display(),
            counts(&header),
        );
    }
    Ok(())
}

/// "tables: nodes 3, releases 4, ...; logs: events 20, audit 9"
fn counts(header: &Header) -> String {
    let list = |counts: &std::collections::BTreeMap<String, u64>| {
        counts
            .iter()
            .map(|(name, n)| format!("{name} {n}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    format!(
        "records per table: {}\nrecords per log: {}",
        list(&header.tables),
        list(&header.logs)
    )
}

/// The JSON both commands print: the file's header and where it went.
fn summary(header: &Header, path: &Path) -> serde_json::Value {
    json!({
        "path": path.display().to_string(),
        "format_version": header.format_version,
        "coordinator_version": header.coordinator_version,
        "created_at": rfc3339(header.created_at_ms),
        "last_seq": header.last_seq,
        "tables": header.tables,
        "logs": header.logs,
        "sha256": header.content_sha256,
    })
}
