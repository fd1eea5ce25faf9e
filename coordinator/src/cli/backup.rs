//! `cutover admin backup` (online, over the API) and `cutover admin
//! restore` (offline, on the coordinator's machine): the coordinator's own
//! state, see `cutover_coordinator::backup`.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use cutover_coordinator::backup::restore::Target;
use cutover_coordinator::backup::{self, restore, Header};
use cutover_coordinator::config::{CoordinatorConfig, StoreKind};
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
    /// Restore a backup file into the coordinator's store, which must be
    /// empty: its data dir (empty or absent), or with `store = "etcd"` its
    /// etcd prefix; with every coordinator stopped (offline: run it on a
    /// coordinator's machine). Checks that the configured master key file
    /// opens every secret in it; then start the coordinator.
    Restore {
        /// The file `cutover admin backup` wrote.
        file: PathBuf,
        /// The coordinator's config: its store is restored into, its
        /// master_key_file checked.
        #[arg(
            long,
            env = "CUTOVER_SERVER_CONFIG",
            default_value = "/etc/cutover/coordinator.toml"
        )]
        config: PathBuf,
    },
    /// Copy a stopped coordinator's embedded store onto etcd: the config
    /// must say `store = "etcd"` and name the cluster, whose prefix must be
    /// empty. Secrets are checked against its master_key_file as a restore
    /// does. Then start the coordinators with that config.
    MigrateStore {
        /// The embedded store: `sled:DIR`, DIR being the `store` dir inside
        /// the old coordinator's data_dir (e.g. sled:/var/lib/cutover/store).
        #[arg(long)]
        from: String,
        /// The coordinator's new config (store = "etcd", [etcd]).
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
        AdminCommand::MigrateStore { from, config } => migrate_store(&from, &config, json).await,
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
        let mut summary = summary(&header, &out.display().to_string());
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
    let target = Target::of(&config);
    let header = restore::restore(file, target, config.master_key_file.as_deref()).await?;
    if json {
        println!("{}", summary(&header, &target.describe()));
    } else {
        println!(
            "restored the store of {} (taken by cutover {}) into {}\n{}\n\
             next: put back data_dir/artifacts if releases use `coordinator:` artifacts, then start the coordinator; agents reconnect on their own",
            rfc3339(header.created_at_ms),
            header.coordinator_version,
            target.describe(),
            counts(&header),
        );
    }
    Ok(())
}

async fn migrate_store(from: &str, config: &Path, json: bool) -> Result<()> {
    let dir = from.strip_prefix("sled:").with_context(|| {
        format!("--from {from:?}: name the embedded store as sled:DIR (e.g. sled:/var/lib/cutover/store)")
    })?;
    let config = CoordinatorConfig::load(config)?;
    let etcd = match (config.store, &config.etcd) {
        (StoreKind::Etcd, Some(etcd)) => etcd,
        _ => return Err(restore::RestoreError::NotEtcd.into()),
    };
    let header = restore::migrate(Path::new(dir), etcd, config.master_key_file.as_deref()).await?;
    let target = Target::Etcd(etcd).describe();
    if json {
        println!("{}", summary(&header, &target));
    } else {
        println!(
            "copied the embedded store in {dir} onto {target}\n{}\n\
             next: start the coordinators with this config (store = \"etcd\"); keep {dir} until they run, then archive it",
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
/// `where_`: the backup file, or the store restored into.
fn summary(header: &Header, where_: &str) -> serde_json::Value {
    json!({
        "path": where_,
        "format_version": header.format_version,
        "coordinator_version": header.coordinator_version,
        "created_at": rfc3339(header.created_at_ms),
        "last_seq": header.last_seq,
        "tables": header.tables,
        "logs": header.logs,
        "sha256": header.content_sha256,
    })
}
