//! `cutover deploy`, `rollout ...`, `rollback` and `releases`: starting
//! rollouts, following them live and reading the release history.

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use cutover_common::digest::Digest;
use cutover_coordinator::spec::AppSpec;
use cutover_proto::v1::operator_service_client::OperatorServiceClient;
use cutover_proto::v1::{self as pb};
use serde_json::{json, Value};
use tonic::transport::Channel;

use super::client::explain;
use super::deployments;
use super::nodes::{render_table, rfc3339};
use super::rollout_view::{describe, done_state, progress, release_json, summary, to_json};

#[derive(Debug, clap::Args)]
pub struct DeployArgs {
    /// The app spec.
    #[arg(short = 'f', long = "file", default_value = "cutover.toml")]
    pub file: PathBuf,
    #[arg(long)]
    pub env: String,
    /// The release's version label, e.g. a git tag or commit. Default: the
    /// tag of the image deployed.
    #[arg(long, default_value = "")]
    pub version: String,
    /// For process services: a local .tar.gz (pushed to the coordinator's
    /// artifact store first), an https://, http:// or file:// URL agents
    /// fetch, or the sha256: digest of an artifact already in the store.
    #[arg(long)]
    pub artifact: Option<String>,
    /// For docker services: REGISTRY/REPO:TAG, resolved to its digest once
    /// by the coordinator, or REPO@sha256:... as is. Default: the spec's
    /// `image`.
    #[arg(long)]
    pub image: Option<String>,
    /// Pin the artifact to this digest. Without it a URL is downloaded once
    /// and hashed (a private CA for it: CUTOVER_ARTIFACT_CA=ca.pem).
    #[arg(long)]
    pub digest: Option<String>,
    /// Deploy only this service (default: every service of the spec).
    #[arg(long)]
    pub service: Option<String>,
    /// Follow the rollout (or, for several services, each rollout of the
    /// deployment) to its end; exit 0 only if it succeeded.
    #[arg(long)]
    pub wait: bool,
    /// Roll out without the nodes that are unreachable now.
    #[arg(long)]
    pub allow_unreachable: bool,
    /// Leave the spec's `[migrate]` out of this deploy (audited).
    #[arg(long, conflicts_with = "migrate_node")]
    pub skip_migrate: bool,
    /// Run the migration on this node (a target node of its service).
    #[arg(long)]
    pub migrate_node: Option<String>,
    /// Run the backup jobs of the data sets the spec's `require_backup`
    /// names first, and wait for them to succeed.
    #[arg(long, conflicts_with = "skip_backup_gate")]
    pub backup_now: bool,
    /// Deploy without the fresh backups the spec requires (admin, with
    /// --reason; audited).
    #[arg(long, requires = "reason")]
    pub skip_backup_gate: bool,
    /// Deploy past the environment's freeze window and promotion rule,
    /// and a `cutover lock` of the service (admin, with --reason; audited
    /// and notified).
    #[arg(long, requires = "reason")]
    pub break_glass: bool,
    /// Why the backup gate is skipped or the glass broken (kept in the
    /// audit log).
    #[arg(long)]
    pub reason: Option<String>,
}

#[derive(Debug, clap::Subcommand)]
pub enum RolloutCommand {
    /// Rollouts, newest first.
    List {
        #[arg(long)]
        env: Option<String>,
        #[arg(long)]
        service: Option<String>,
        #[arg(long, default_value_t = 20)]
        limit: u32,
    },
    /// A rollout's nodes, error and timeline.
    Status {
        id: String,
    },
    /// What its migration and hooks printed, step and node first.
    Logs {
        id: String,
        /// Keep printing lines until the rollout ends or is held.
        #[arg(long, short)]
        follow: bool,
    },
    /// A deployment's services (a deploy of several), in order, and how
    /// each ended.
    Deployment {
        id: String,
    },
    /// Follow a rollout live until it ends; exit 0 only if it succeeded.
    Watch {
        id: String,
    },
    /// Pause at the next safe point (between nodes' cutovers).
    Pause {
        id: String,
    },
    Resume {
        id: String,
    },
    /// Stop at the next safe point; each node stays on the release it
    /// serves. A rollout awaiting approval ends at once.
    Abort {
        id: String,
    },
    /// A held rollout (a migration's or hook's outcome is not known): run
    /// that command again, once you have checked what it did. A deploy
    /// that ended aborted, rolled_back or failed: its release again, from
    /// the first step, as a new rollout.
    Retry {
        id: String,
    },
    /// A canary waiting at a pause goes on to its next step; refused while
    /// a canary node is not healthy.
    Promote {
        id: String,
        /// Skip every remaining step: all nodes switch to the canary.
        #[arg(long)]
        full: bool,
    },
}

/// The exit code of `watch` and `deploy --wait` when a canary waits for
/// `cutover rollout promote` (0: succeeded; 1: failed, rolled back,
/// aborted or held).
pub const AWAITING_PROMOTION: u8 = 3;

#[derive(Debug, clap::Args)]
pub struct RollbackArgs {
    pub service: String,
    #[arg(long)]
    pub env: String,
    /// The release id to return to (default: the previous release: the
    /// newest stable one deployed before the current one).
    #[arg(long)]
    pub to: Option<String>,
    /// Allow a `--to` release that failed (or never finished) its own
    /// rollout.
    #[arg(long)]
    pub force: bool,
    /// Roll back past a contract migration (admin), whose schema the
    /// target's code may not work with; needs --reason.
    #[arg(long, requires = "reason")]
    pub ignore_schema: bool,
    /// Roll back without waiting for the environment's approvals, past a
    /// `cutover lock` of the service (admin, with --reason; audited and
    /// notified).
    #[arg(long, requires = "reason")]
    pub break_glass: bool,
    /// Why that is safe: kept in the audit log and the rollout's timeline.
    #[arg(long)]
    pub reason: Option<String>,
    /// Return in the target's batches, each watched for its
    /// min_healthy_time, as a deploy does. Without it a rollback to a
    /// release that was stable here returns every node at once, each still
    /// health-gated (the target's `[strategy] rollback` can say "batched").
    #[arg(long)]
    pub careful: bool,
    #[arg(long)]
    pub wait: bool,
    #[arg(long)]
    pub allow_unreachable: bool,
}

#[derive(Debug, clap::Args)]
pub struct ReleasesArgs {
    pub service: String,
    #[arg(long)]
    pub env: String,
}

/// The sha256 of what `url` serves, streamed (never held whole).
async fn hash_url(url: &str) -> Result<Digest> {
    let extra_ca = std::env::var_os("CUTOVER_ARTIFACT_CA").map(PathBuf::from);
    let fetcher = cutover_common::fetch::HttpFetcher::new(extra_ca.as_deref())?;
    let mut download = fetcher
        .get(url)
        .await
        .with_context(|| format!("cannot fetch {url} to hash it"))?;
    let mut hasher = <cutover_common::digest::Hasher as sha2::Digest>::new();
    while let Some(chunk) = download
        .chunk()
        .await
        .with_context(|| format!("cannot fetch {url} to hash it"))?
    {
        sha2::Digest::update(&mut hasher, &chunk);
    }
    Ok(Digest::from_hasher(hasher))
}

/// Where agents get the artifact, and its digest.
async fn resolve_artifact(
    client: &mut OperatorServiceClient<Channel>,
    source: &str,
    digest: Option<String>,
    json: bool,
) -> Result<pb::Artifact> {
    if let Some(d) = &digest {
        Digest::parse(d).with_context(|| format!("--digest {d:?}"))?;
    }
    if source.starts_with("sha256:") {
        Digest::parse(source).with_context(|| format!("--artifact {source:?}"))?;
        if digest.as_deref().is_some_and(|d| d != source) {
            bail!(
                "--artifact {source} and --digest {} disagree",
                digest.unwrap_or_default()
            );
        }
        return Ok(pb::Artifact {
            url: "coordinator:".into(),
            digest: source.into(),
        });
    }
    if source.starts_with("https://") || source.starts_with("http://") {
        let digest = match digest {
            Some(d) => d,
            None => {
                // Hashed once here; every node then verifies what it fetches
                // against this digest, so a file changed on the server
                // after this point is refused, not deployed.
                if !json {
                    eprintln!(
                        "{source}: downloading once to pin its digest (pass --digest to skip)"
                    );
                }
                hash_url(source).await?.to_string()
            }
        };
        return Ok(pb::Artifact {
            url: source.into(),
            digest,
        });
    }
    if let Some(path) = source.strip_prefix("file://") {
        let computed = match &digest {
            Some(d) => d.clone(),
            None => Digest::of_file(Path::new(path))
                .with_context(|| format!("cannot hash {path} to pin the release; pass --digest if the file exists only on the nodes"))?
                .to_string(),
        };
        return Ok(pb::Artifact {
            url: source.into(),
            digest: computed,
        });
    }
    let path = Path::new(source);
    if !path.is_file() {
        bail!("--artifact {source:?} is neither a file, a URL (https://, http://, file://) nor a sha256: digest");
    }
    let pushed = super::artifacts::push(client, path, digest).await?;
    if !json {
        let how = if pushed.already_present {
            "already in the artifact store"
        } else {
            "pushed to the artifact store"
        };
        eprintln!("{source}: {} ({how})", pushed.digest);
    }
    Ok(pb::Artifact {
        url: "coordinator:".into(),
        digest: pushed.digest,
    })
}

/// The app spec at `path`: its name as errors say it, its text, and the
/// spec parsed and checked (a mistake is named with the file and key
/// before anything is sent).
pub(super) fn read_spec(path: &Path) -> Result<(String, String, AppSpec)> {
    let file = path.display().to_string();
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read the app spec {file}"))?;
    let spec = AppSpec::parse(&text, &file)?;
    Ok((file, text, spec))
}

pub async fn deploy(
    client: &mut OperatorServiceClient<Channel>,
    args: DeployArgs,
    json: bool,
) -> Result<ExitCode> {
    // Checked here first so a typo fails before any upload.
    let (file, text, spec) = read_spec(&args.file)?;
    spec.services_for(args.service.as_deref(), &file)?;
    let artifact = match &args.artifact {
        Some(source) => Some(resolve_artifact(client, source, args.digest.clone(), json).await?),
        None => None,
    };
    if let Some(image) = &args.image {
        cutover_common::registry::ImageRef::parse(image).context("--image")?;
    }
    if args.backup_now {
        super::jobs::backup_now(
            client,
            &spec,
            &args.env,
            args.service.as_deref(),
            args.skip_migrate,
            json,
        )
        .await?;
    }
    let response = client
        .deploy(pb::DeployRequest {
            spec: text,
            spec_file: file,
            env: args.env,
            service: args.service.unwrap_or_default(),
            version: args.version,
            artifact,
            image: args.image.unwrap_or_default(),
            allow_unreachable: args.allow_unreachable,
            skip_migrate: args.skip_migrate,
            migrate_node: args.migrate_node.unwrap_or_default(),
            skip_backup_gate: args.skip_backup_gate,
            break_glass: args.break_glass,
            reason: args.reason.unwrap_or_default(),
        })
        .await
        .map_err(explain)?
        .into_inner();
    started(client, response, args.wait, json).await
}

pub async fn rollback(
    client: &mut OperatorServiceClient<Channel>,
    args: RollbackArgs,
    json: bool,
) -> Result<ExitCode> {
    let response = client
        .rollback(pb::RollbackRequest {
            env: args.env,
            service: args.service,
            to_release: args.to.unwrap_or_default(),
            allow_unreachable: args.allow_unreachable,
            force: args.force,
            ignore_schema: args.ignore_schema,
            reason: args.reason.unwrap_or_default(),
            careful: args.careful,
            break_glass: args.break_glass,
        })
        .await
        .map_err(explain)?
        .into_inner();
    started(client, response, args.wait, json).await
}

/// Reports what a deploy, promotion or rollback started, following it
/// with `wait`.
pub(super) async fn started(
    client: &mut OperatorServiceClient<Channel>,
    response: pb::DeployResponse,
    wait: bool,
    json: bool,
) -> Result<ExitCode> {
    if let Some(deployment) = response.deployment {
        return started_deployment(client, deployment, wait, json).await;
    }
    for r in &response.rollouts {
        for warning in r.timeline.iter().filter(|t| t.kind == "warning") {
            eprintln!("warning: {}", warning.message);
        }
    }
    if !json {
        for unchanged in &response.unchanged {
            println!("{}", unchanged.message);
        }
    }
    let rollouts = if wait {
        let mut finals = Vec::new();
        for r in &response.rollouts {
            finals.push(follow(client, &r.id, json).await?);
        }
        finals
    } else {
        if !json {
            for r in &response.rollouts {
                println!("{}", r.id);
                let release = r.release.as_ref().map_or("", |x| x.id.as_str());
                match &r.approval {
                    Some(approval) => eprintln!(
                        "rollout {} of {release} to {} nodes awaits {} approval(s): another deployer of {} runs `cutover approve {}`; follow it with `cutover rollout watch {}`",
                        r.id,
                        r.nodes.len(),
                        approval.required,
                        r.env,
                        r.id,
                        r.id
                    ),
                    None if r.kind == "stop" || r.kind == "remove" => eprintln!(
                        "started rollout {} ({} {} on {} nodes); follow it with `cutover rollout watch {}`",
                        r.id,
                        r.kind,
                        r.service,
                        r.nodes.len(),
                        r.id
                    ),
                    None => eprintln!(
                        "started rollout {} of {release} to {} nodes; follow it with `cutover rollout watch {}`",
                        r.id,
                        r.nodes.len(),
                        r.id
                    ),
                }
            }
        }
        response.rollouts
    };
    if json {
        // One service: its rollout object (or its no-op); several: an array.
        let mut items: Vec<Value> = rollouts.iter().map(to_json).collect();
        items.extend(response.unchanged.iter().map(|u| {
            json!({"service": u.service, "release": u.release_id, "unchanged": true, "message": u.message})
        }));
        let value = match items.len() {
            1 => items.pop().expect("one item"),
            _ => Value::Array(items),
        };
        println!("{}", serde_json::to_string_pretty(&value)?);
    }
    Ok(if wait {
        exit_for(&rollouts)
    } else {
        ExitCode::SUCCESS
    })
}

/// A deploy of several services: its deployment, followed rollout by
/// rollout with `wait`.
async fn started_deployment(
    client: &mut OperatorServiceClient<Channel>,
    deployment: pb::Deployment,
    wait: bool,
    json: bool,
) -> Result<ExitCode> {
    let order: Vec<&str> = deployment
        .steps
        .iter()
        .map(|s| s.service.as_str())
        .collect();
    if !wait {
        if json {
            println!(
                "{}",
                serde_json::to_string_pretty(&deployments::to_json(&deployment))?
            );
        } else {
            println!("{}", deployment.id);
            eprintln!(
                "started deployment {} of {} (one after another: {}); follow it with `cutover rollout deployment {}`",
                deployment.id,
                deployment.app,
                order.join(", then "),
                deployment.id
            );
        }
        return Ok(ExitCode::SUCCESS);
    }
    if !json {
        eprintln!("deployment {}: {}", deployment.id, order.join(", then "));
    }
    let last = deployments::follow(client, &deployment.id, json, |mut client, id| async move {
        follow(&mut client, &id, json).await
    })
    .await?;
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&deployments::to_json(&last))?
        );
    }
    Ok(deployments::exit_for(&last))
}

/// Newest first, with the rollouts of one deployment together (in the
/// order they ran) where its newest one stands.
fn grouped(rollouts: Vec<pb::Rollout>) -> Vec<pb::Rollout> {
    let mut out: Vec<pb::Rollout> = Vec::with_capacity(rollouts.len());
    let mut placed = std::collections::HashSet::new();
    for r in &rollouts {
        if r.deployment.is_empty() {
            out.push(r.clone());
        } else if placed.insert(r.deployment.clone()) {
            let mut members: Vec<&pb::Rollout> = rollouts
                .iter()
                .filter(|m| m.deployment == r.deployment)
                .collect();
            members.sort_by_key(|m| m.created_at_ms);
            out.extend(members.into_iter().cloned());
        }
    }
    out
}

fn exit_for(rollouts: &[pb::Rollout]) -> ExitCode {
    if rollouts
        .iter()
        .all(|r| r.state() == pb::RolloutState::Succeeded)
    {
        ExitCode::SUCCESS
    } else if rollouts.iter().any(awaiting_promotion) {
        ExitCode::from(AWAITING_PROMOTION)
    } else {
        ExitCode::FAILURE
    }
}

fn awaiting_promotion(r: &pb::Rollout) -> bool {
    r.canary.as_ref().is_some_and(|c| c.awaiting_promotion)
}

pub async fn rollout(
    client: &mut OperatorServiceClient<Channel>,
    command: RolloutCommand,
    json: bool,
) -> Result<ExitCode> {
    let control = |id: String, action: pb::RolloutAction| pb::ControlRolloutRequest {
        id,
        action: action as i32,
        comment: String::new(),
    };
    let single = match command {
        RolloutCommand::List {
            env,
            service,
            limit,
        } => {
            let rollouts = client
                .list_rollouts(pb::ListRolloutsRequest {
                    env: env.unwrap_or_default(),
                    service: service.unwrap_or_default(),
                    limit,
                })
                .await
                .map_err(explain)?
                .into_inner()
                .rollouts;
            let rollouts = grouped(rollouts);
            if json {
                let items: Vec<Value> = rollouts.iter().map(to_json).collect();
                println!("{}", serde_json::to_string_pretty(&items)?);
            } else {
                let mut rows = vec![[
                    "ID",
                    "STATE",
                    "ENV",
                    "RELEASE",
                    "NODES",
                    "DEPLOYMENT",
                    "BY",
                    "CREATED",
                ]
                .map(String::from)
                .to_vec()];
                rows.extend(rollouts.iter().map(|r| {
                    let done = r.nodes.iter().filter(|n| done_state(n.state())).count();
                    vec![
                        r.id.clone(),
                        r.state().as_str().to_string(),
                        r.env.clone(),
                        r.release.as_ref().map(|x| x.id.clone()).unwrap_or_default(),
                        format!("{done}/{}", r.nodes.len()),
                        if r.deployment.is_empty() {
                            "-".into()
                        } else {
                            r.deployment.clone()
                        },
                        r.created_by.clone(),
                        rfc3339(r.created_at_ms),
                    ]
                }));
                print!("{}", render_table(&rows));
            }
            return Ok(ExitCode::SUCCESS);
        }
        RolloutCommand::Logs { id, follow } => {
            return super::rollout_logs::rollout_logs(client, id, follow, json).await;
        }
        RolloutCommand::Watch { id } => {
            let last = follow(client, &id, json).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&to_json(&last))?);
            }
            return Ok(exit_for(&[last]));
        }
        RolloutCommand::Deployment { id } => {
            let deployment = deployments::get(client, &id).await?;
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&deployments::to_json(&deployment))?
                );
            } else {
                print!("{}", deployments::describe(&deployment));
            }
            return Ok(ExitCode::SUCCESS);
        }
        RolloutCommand::Status { id } => client.get_rollout(pb::GetRolloutRequest { id }).await,
        RolloutCommand::Pause { id } => {
            client
                .control_rollout(control(id, pb::RolloutAction::Pause))
                .await
        }
        RolloutCommand::Resume { id } => {
            client
                .control_rollout(control(id, pb::RolloutAction::Resume))
                .await
        }
        RolloutCommand::Abort { id } => {
            client
                .control_rollout(control(id, pb::RolloutAction::Abort))
                .await
        }
        RolloutCommand::Retry { id } => {
            client
                .control_rollout(control(id, pb::RolloutAction::Retry))
                .await
        }
        RolloutCommand::Promote { id, full } => {
            let action = match full {
                true => pb::RolloutAction::PromoteFull,
                false => pb::RolloutAction::Promote,
            };
            client.control_rollout(control(id, action)).await
        }
    }
    .map_err(explain)?
    .into_inner();
    if json {
        println!("{}", serde_json::to_string_pretty(&to_json(&single))?);
    } else {
        print!("{}", describe(&single));
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn releases(
    client: &mut OperatorServiceClient<Channel>,
    args: ReleasesArgs,
    json: bool,
) -> Result<ExitCode> {
    let releases = client
        .list_releases(pb::ListReleasesRequest {
            env: args.env.clone(),
            service: args.service.clone(),
        })
        .await
        .map_err(explain)?
        .into_inner()
        .releases;
    if json {
        let items: Vec<Value> = releases
            .iter()
            .map(|r| {
                json!({
                    "release": r.release.as_ref().map(release_json),
                    "state": r.state().as_str(),
                    "current": r.current,
                    "deployed_by": r.deployed_by,
                    "deployed_at": rfc3339(r.deployed_at_ms),
                    "rollout": r.rollout_id,
                    "note": r.note,
                    "promoted_from": (!r.promoted_from.is_empty()).then_some(&r.promoted_from),
                    "migration": (!r.migration_phase.is_empty()).then(|| json!({
                        "phase": r.migration_phase,
                        "ran_at": rfc3339(r.migrated_at_ms),
                        "duration_ms": r.migration_duration_ms,
                        "output": r.migration_output,
                        "schema": r.schema,
                    })),
                })
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&items)?);
    } else if releases.is_empty() {
        println!("no releases of {} in {}", args.service, args.env);
    } else {
        let mut rows = vec![[
            "",
            "RELEASE",
            "VERSION",
            "STATE",
            "BY",
            "DEPLOYED",
            "ROLLOUT",
            "FROM",
            "MIGRATION",
            "NOTE",
        ]
        .map(String::from)
        .to_vec()];
        rows.extend(releases.iter().map(|r| {
            let info = r.release.clone().unwrap_or_default();
            vec![
                if r.current { "*".into() } else { String::new() },
                info.id,
                match info.instances {
                    0 | 1 => info.version,
                    n => format!("{} x{n}", info.version),
                },
                r.state().as_str().to_string(),
                r.deployed_by.clone(),
                rfc3339(r.deployed_at_ms),
                r.rollout_id.clone(),
                match r.promoted_from.as_str() {
                    "" => "-".to_string(),
                    from => from.to_string(),
                },
                match r.migration_phase.as_str() {
                    "" => "-".to_string(),
                    phase => phase.to_string(),
                },
                r.note.clone(),
            ]
        }));
        print!("{}", render_table(&rows));
    }
    Ok(ExitCode::SUCCESS)
}

/// Follows a rollout to its end, drawing its progress on stderr (redrawn in
/// place on a terminal, one line per event otherwise); returns its last
/// state. A dropped watch stream is reopened.
async fn follow(
    client: &mut OperatorServiceClient<Channel>,
    id: &str,
    quiet: bool,
) -> Result<pb::Rollout> {
    let terminal = std::io::stderr().is_terminal();
    let mut drawn_lines = 0;
    let mut printed = 0;
    let mut failures = 0;
    loop {
        let stream = client
            .watch_rollout(pb::GetRolloutRequest { id: id.to_string() })
            .await;
        let mut stream = match stream {
            Ok(s) => s.into_inner(),
            Err(status) if failures < 20 && status.code() == tonic::Code::Unavailable => {
                failures += 1;
                tokio::time::sleep(std::time::Duration::from_millis(500)).await;
                continue;
            }
            Err(status) => return Err(explain(status)),
        };
        while let Ok(Some(rollout)) = stream.message().await {
            if !quiet {
                let mut err = std::io::stderr().lock();
                if terminal {
                    if drawn_lines > 0 {
                        write!(err, "\x1b[{drawn_lines}A\x1b[J")?;
                    }
                    let text = progress(&rollout);
                    drawn_lines = text.lines().count();
                    write!(err, "{text}")?;
                } else {
                    for entry in rollout.timeline.iter().skip(printed) {
                        writeln!(
                            err,
                            "{} {:<18} {}",
                            rfc3339(entry.at_ms),
                            entry.kind,
                            entry.message
                        )?;
                    }
                    printed = rollout.timeline.len();
                }
            }
            if watch_ends(&rollout) {
                if !quiet {
                    eprintln!("{}", summary(&rollout));
                }
                return Ok(rollout);
            }
        }
        // The stream ended early (a coordinator restart): watch again.
        failures += 1;
        if failures > 600 {
            bail!("lost the rollout's progress stream; see `cutover rollout status {id}`");
        }
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    }
}

/// Where watching a rollout stops: it ended, or waits for the operator
/// (held, or a canary waiting for promotion).
pub(super) fn watch_ends(rollout: &pb::Rollout) -> bool {
    use pb::RolloutState as R;
    matches!(
        rollout.state(),
        R::Succeeded | R::Failed | R::RolledBack | R::Aborted | R::Held
    ) || awaiting_promotion(rollout)
}
