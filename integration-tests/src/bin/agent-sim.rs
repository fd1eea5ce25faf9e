//! Thousands of simulated agents in one process, for the control-plane scale
//! benchmark (`integration-tests/bench/control-plane.sh`). Each speaks the
//! real protocol over its own mTLS connection with a certificate of its own:
//! hello, heartbeats at the coordinator's interval, and answers to every
//! command (prepare, activate, ping, report state) at once, as a node whose
//! cutovers take no time would. What is measured is the coordinator.
//! `--cutover-ms N` makes each activation take N ms (a release's start,
//! health gate and smoke checks), for the rollback benchmark
//! (`integration-tests/bench/rollback.sh`).
//!
//! `--coordinator` takes a comma-separated list, as an agent does: a
//! session goes to the next coordinator after one ends or is refused (a
//! follower refuses, naming the leader, which is tried next).
//!
//! `agent-sim --coordinator https://127.0.0.1:7443 --pki DIR --agents N
//! [--first I] [--connect-rate PER_SECOND] [--labels env=sim]
//! [--cutover-ms N]`
//!
//! Prints `connected N` on stdout once every agent has its welcome, then
//! runs until SIGTERM/SIGINT and prints a JSON line of totals.
#![forbid(unsafe_code)]

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cutover_common::identity::{Identity, Role};
use cutover_common::pki::CertificateAuthority;
use cutover_common::tls::{self, ChannelOptions, CoordinatorUrl};
use cutover_proto::v1::agent_service_client::AgentServiceClient;
use cutover_proto::v1::{
    self as pb, agent_message, command, command_result, coordinator_message, AgentMessage,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

#[derive(Default)]
struct Totals {
    connected: AtomicU64,
    heartbeats: AtomicU64,
    commands: AtomicU64,
    reconnects: AtomicU64,
}

struct Options {
    urls: Vec<CoordinatorUrl>,
    labels: HashMap<String, String>,
    /// How long an activation takes before its node switches and answers.
    cutover: Duration,
}

fn usage() -> ! {
    eprintln!("usage: agent-sim --coordinator URL --pki DIR --agents N [--first I] [--connect-rate N] [--labels k=v,...] [--cutover-ms N]");
    std::process::exit(2);
}

#[tokio::main]
async fn main() {
    let mut coordinator = None;
    let mut pki = None;
    let mut agents: usize = 0;
    let mut first: usize = 1;
    let mut rate: u64 = 500;
    let mut cutover_ms: u64 = 0;
    let mut labels: HashMap<String, String> = [("env".to_string(), "sim".to_string())].into();
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let value = args.next().unwrap_or_else(|| usage());
        match flag.as_str() {
            "--coordinator" => coordinator = Some(value),
            "--pki" => pki = Some(std::path::PathBuf::from(value)),
            "--agents" => agents = value.parse().unwrap_or_else(|_| usage()),
            "--first" => first = value.parse().unwrap_or_else(|_| usage()),
            "--connect-rate" => rate = value.parse().unwrap_or_else(|_| usage()),
            "--cutover-ms" => cutover_ms = value.parse().unwrap_or_else(|_| usage()),
            "--labels" => {
                labels = value
                    .split(',')
                    .filter_map(|kv| kv.split_once('='))
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect()
            }
            _ => usage(),
        }
    }
    let (Some(coordinator), Some(pki)) = (coordinator, pki) else {
        usage()
    };
    if agents == 0 || rate == 0 {
        usage();
    }
    tls::install_crypto_provider();
    let ca = CertificateAuthority::load_dir(&pki).unwrap_or_else(|e| {
        eprintln!("error: {e}");
        std::process::exit(1)
    });
    let options = Arc::new(Options {
        urls: CoordinatorUrl::parse_list(&coordinator).unwrap_or_else(|e| {
            eprintln!("error: {e}");
            std::process::exit(2)
        }),
        labels,
        cutover: Duration::from_millis(cutover_ms),
    });
    // Each agent's key and certificate go through files, as on a node.
    let files = tempfile::tempdir().expect("temp dir");
    std::fs::copy(
        pki.join(cutover_common::pki::CA_CERT),
        files.path().join(cutover_common::pki::CA_CERT),
    )
    .expect("copy the CA");
    let totals = Arc::new(Totals::default());
    let mut pace = tokio::time::interval(Duration::from_secs_f64(1.0 / rate as f64));
    for i in first..first + agents {
        pace.tick().await;
        let name = format!("sim-{i:05}");
        let identity = Identity::new(Role::Agent, &name).expect("valid name");
        let stem = format!("agent-{name}");
        ca.issue_client(&identity, 7)
            .expect("issue")
            .write(files.path(), &stem)
            .expect("write the pair");
        let config =
            tls::client_config(&tls::TlsFiles::in_dir(files.path(), &stem)).expect("client config");
        tokio::spawn(agent(i, name, config, options.clone(), totals.clone()));
    }
    while totals.connected.load(Ordering::Relaxed) < agents as u64 {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    println!("connected {agents}");
    let shutdown = cutover_common::shutdown::on_signals();
    shutdown.cancelled().await;
    println!(
        "{{\"agents\":{agents},\"heartbeats\":{},\"commands\":{},\"reconnects\":{}}}",
        totals.heartbeats.load(Ordering::Relaxed),
        totals.commands.load(Ordering::Relaxed),
        totals.reconnects.load(Ordering::Relaxed)
    );
}

/// One simulated node, reconnecting forever.
async fn agent(
    index: usize,
    name: String,
    config: Arc<rustls::ClientConfig>,
    options: Arc<Options>,
    totals: Arc<Totals>,
) {
    let node_id = format!("00000000-0000-4000-8000-{index:012}");
    let address = format!(
        "10.{}.{}.{}",
        (index >> 16) & 255,
        (index >> 8) & 255,
        index & 255
    );
    let services: Arc<Mutex<Vec<pb::ServiceState>>> = Arc::default();
    // Until the first welcome (a follower's refusal is no welcome).
    let mut welcomed = false;
    let mut next = index % options.urls.len();
    loop {
        let url = &options.urls[next];
        let was_welcomed = welcomed;
        let result = session(
            url,
            &name,
            &node_id,
            &address,
            &config,
            &options,
            &services,
            &totals,
            &mut welcomed,
        )
        .await;
        next = match &result {
            Err(Ended {
                leader: Some(leader),
                ..
            }) => options
                .urls
                .iter()
                .position(|u| u.host == leader.host && u.port == leader.port)
                .unwrap_or((next + 1) % options.urls.len()),
            _ => (next + 1) % options.urls.len(),
        };
        if was_welcomed || result.is_err() {
            totals.reconnects.fetch_add(1, Ordering::Relaxed);
        }
        if let Err(ended) = result {
            if !welcomed && ended.leader.is_none() {
                eprintln!("{name}: {}", ended.message);
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Why a session ended, and the leader a follower named.
struct Ended {
    message: String,
    leader: Option<CoordinatorUrl>,
}

impl From<String> for Ended {
    fn from(message: String) -> Self {
        Self {
            message,
            leader: None,
        }
    }
}

impl From<tonic::Status> for Ended {
    fn from(status: tonic::Status) -> Self {
        let leader = status
            .metadata()
            .get(cutover_common::LEADER_METADATA)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| CoordinatorUrl::parse(v).ok());
        Self {
            message: status.message().to_string(),
            leader,
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn session(
    url: &CoordinatorUrl,
    name: &str,
    node_id: &str,
    address: &str,
    config: &Arc<rustls::ClientConfig>,
    options: &Options,
    services: &Arc<Mutex<Vec<pb::ServiceState>>>,
    totals: &Totals,
    welcomed: &mut bool,
) -> Result<(), Ended> {
    let channel = tls::connect(
        url,
        Some("localhost"),
        config.clone(),
        &ChannelOptions {
            connect_timeout: Duration::from_secs(30),
            ..ChannelOptions::default()
        },
    )
    .await
    .map_err(|e| e.to_string())?;
    let (outbound, outbound_rx) = mpsc::channel::<AgentMessage>(16);
    let send = |kind| AgentMessage { kind: Some(kind) };
    outbound
        .send(send(agent_message::Kind::Hello(pb::Hello {
            node_id: node_id.to_string(),
            name: name.to_string(),
            address: address.to_string(),
            labels: options.labels.clone(),
            agent_version: "sim".into(),
            capabilities: [
                "command.ping",
                "command.prepare",
                "command.activate",
                "command.report_state",
                "runtime.process",
                "proxy.http",
            ]
            .map(String::from)
            .to_vec(),
            recent_command_ids: Vec::new(),
            protocol_version: cutover_common::AGENT_PROTOCOL,
            agent_build: String::new(),
            trust_bundle_sha256: String::new(),
        })))
        .await
        .map_err(|e| e.to_string())?;
    let mut inbound = AgentServiceClient::new(channel)
        .session(ReceiverStream::new(outbound_rx))
        .await?
        .into_inner();
    let welcome = match inbound
        .message()
        .await
        .map_err(|e| e.message().to_string())?
    {
        Some(pb::CoordinatorMessage {
            kind: Some(coordinator_message::Kind::Welcome(w)),
            ..
        }) => w,
        _ => return Err(String::from("no welcome").into()),
    };
    if !*welcomed {
        *welcomed = true;
        totals.connected.fetch_add(1, Ordering::Relaxed);
    }
    let mut heartbeat = tokio::time::interval(Duration::from_millis(
        welcome.heartbeat_interval_ms.max(100),
    ));
    loop {
        tokio::select! {
            _ = heartbeat.tick() => {
                let beat = pb::Heartbeat {
                    sent_at_ms: cutover_common::now_ms(),
                    figures: None,
                    services: services.lock().expect("services lock").clone(),
                };
                outbound.send(send(agent_message::Kind::Heartbeat(beat))).await.map_err(|e| e.to_string())?;
                totals.heartbeats.fetch_add(1, Ordering::Relaxed);
            }
            message = inbound.message() => {
                let Some(message) = message.map_err(|e| e.message().to_string())? else {
                    return Ok(());
                };
                let Some(coordinator_message::Kind::Command(command)) = message.kind else {
                    continue;
                };
                totals.commands.fetch_add(1, Ordering::Relaxed);
                // An activation takes its time apart, as the real agent
                // runs commands beside its heartbeats.
                let takes = match command.kind {
                    Some(command::Kind::Activate(_)) => options.cutover,
                    _ => Duration::ZERO,
                };
                let (outbound, services) = (outbound.clone(), services.clone());
                tokio::spawn(async move {
                    tokio::time::sleep(takes).await;
                    let output = answer(command.kind, &services);
                    let result = pb::CommandResult {
                        command_id: command.command_id,
                        status: pb::CommandStatus::Succeeded as i32,
                        message: String::new(),
                        replayed: false,
                        output,
                    };
                    // A session gone meanwhile: the coordinator resends.
                    let _ = outbound.send(send(agent_message::Kind::CommandResult(result))).await;
                });
            }
        }
    }
}

/// What a node whose every step succeeds at once answers.
fn answer(
    kind: Option<command::Kind>,
    services: &Mutex<Vec<pb::ServiceState>>,
) -> Option<command_result::Output> {
    match kind {
        Some(command::Kind::Ping(ping)) => Some(command_result::Output::Pong(pb::Pong {
            payload: ping.payload,
            agent_time_ms: cutover_common::now_ms(),
        })),
        Some(command::Kind::Activate(activate)) => {
            let release = activate.release.unwrap_or_default();
            let mut services = services.lock().expect("services lock");
            let previous = services
                .iter()
                .find(|s| s.service == release.service)
                .map(|s| s.release_id.clone())
                .unwrap_or_default();
            services.retain(|s| s.service != release.service);
            services.push(pb::ServiceState {
                service: release.service.clone(),
                release_id: release.release_id.clone(),
                admitted: true,
                running: true,
                healthy: true,
                ..Default::default()
            });
            Some(command_result::Output::Activated(pb::Activated {
                release_id: release.release_id,
                upstream: String::new(),
                previous_release_id: previous,
                drain_completed: true,
                drain_cut: 0,
                took_ms: 0,
            }))
        }
        Some(command::Kind::ReportState(_)) => {
            Some(command_result::Output::NodeState(pb::NodeState {
                services: services.lock().expect("services lock").clone(),
            }))
        }
        _ => None,
    }
}
