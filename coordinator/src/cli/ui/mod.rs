//! `cutover ui`: the operator's dashboard, served by the operator's own
//! CLI on loopback (like `kubectl proxy`). Every page is drawn from calls
//! to the coordinator made with the operator's mTLS identity, so the
//! dashboard has exactly the operator's roles and the coordinator needs no
//! browser-facing port.
//!
//! Pages are HTML rendered here; a page's main part is sent again over
//! server-sent events whenever it changes (`live`), from one feed of the
//! fleet shared by every open page (`feed`). The browser never polls.
//! Requests must come with the session cookie the printed address sets,
//! and a Host and Origin of this server (`guard`).

mod actions;
mod assets;
mod charts;
mod colors;
mod depths;
mod dial;
mod feed;
mod guard;
mod live;
mod pages;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use axum::routing::{get, post};
use axum::Router;
use cutover_proto::v1 as pb;
use cutover_proto::v1::operator_service_client::OperatorServiceClient;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

use super::client::{explain, ConnectArgs};

#[derive(Debug, Clone, clap::Args)]
pub struct UiArgs {
    /// Where the dashboard listens. Loopback by default: anyone who can
    /// reach it with its address acts as you.
    #[arg(long, default_value = "127.0.0.1:7480")]
    pub listen: SocketAddr,
    /// How often the fleet is read from the coordinator while a page is
    /// open (pages get what changed at once).
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    pub refresh: Duration,
}

/// What every handler shares.
pub struct Ui {
    dialer: Arc<dial::Dialer>,
    /// The operator the coordinator says we are: which buttons to show.
    me: pb::Operator,
    coordinator: String,
    feed: feed::Feed,
    guard: guard::Guard,
    shutdown: CancellationToken,
}

impl Ui {
    fn client(&self) -> OperatorServiceClient<Channel> {
        self.dialer.client()
    }

    /// Whether the operator may change what runs in `env`: a deployer of
    /// it, or an admin (the coordinator decides; this only hides buttons).
    fn may_deploy(&self, env: &str) -> bool {
        match self.me.role.as_str() {
            "admin" => true,
            "deployer" => self.me.envs.is_empty() || self.me.envs.iter().any(|e| e == env),
            _ => false,
        }
    }
}

pub async fn run(connect: &ConnectArgs, args: UiArgs) -> Result<()> {
    let connection = connect.resolve()?;
    let mut client = connect.operator_client().await?;
    let me = client
        .who_am_i(pb::WhoAmIRequest {})
        .await
        .map_err(explain)?
        .into_inner();
    if args.listen.ip().is_unspecified() {
        anyhow::bail!(
            "--listen {}: name the address browsers use (127.0.0.1:7480, or this machine's own address): the dashboard answers only requests for its own address",
            args.listen
        );
    }
    if args.refresh < Duration::from_millis(100) {
        anyhow::bail!(
            "--refresh {}: read the fleet at most every 100ms (the default is 1s)",
            humantime::format_duration(args.refresh)
        );
    }
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .map_err(|e| {
            anyhow::anyhow!(
                "cannot listen on {}: {}",
                args.listen,
                cutover_common::net::explain_bind(&args.listen, &e, "pass --listen")
            )
        })?;
    let local = listener.local_addr().context("the dashboard's address")?;
    let shutdown = CancellationToken::new();
    let guard = guard::Guard::new(local);
    let url = guard.entry_url();
    let dialer = Arc::new(dial::Dialer::new(connect.clone(), client));
    let ui = Arc::new(Ui {
        feed: feed::Feed::new(dialer.clone(), args.refresh, shutdown.clone()),
        dialer,
        me,
        coordinator: connection.coordinator,
        guard,
        shutdown: shutdown.clone(),
    });
    if !local.ip().is_loopback() {
        eprintln!(
            "warning: the dashboard listens on {local}, beyond this machine: whoever has its address (with the token) acts as operator {}",
            ui.me.name
        );
    }
    println!("cutover ui: open {url}");
    println!(
        "as operator {} ({}), on {}; Ctrl-C stops it",
        ui.me.name,
        role_text(&ui.me),
        ui.coordinator
    );
    tokio::spawn(ui.feed.clone().run());
    let server = axum::serve(listener, router(ui.clone()))
        .with_graceful_shutdown(stop_signal(shutdown.clone()));
    tokio::select! {
        served = server => served.context("the dashboard's server")?,
        // The graceful shutdown waits for open connections; a browser
        // keeps one open per tab. The live streams end on the signal, but
        // do not wait on a browser for long (hyper #4170).
        _ = async { shutdown.cancelled().await; tokio::time::sleep(Duration::from_secs(3)).await } => {}
    }
    Ok(())
}

/// "deployer of production, staging", "admin", "viewer".
fn role_text(me: &pb::Operator) -> String {
    match (me.role.as_str(), me.envs.is_empty()) {
        ("deployer", false) => format!("deployer of {}", me.envs.join(", ")),
        (role, _) => role.to_string(),
    }
}

async fn stop_signal(shutdown: CancellationToken) {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("a SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    shutdown.cancel();
}

/// Every page under the dashboard's secret prefix (see `guard`).
fn router(ui: Arc<Ui>) -> Router {
    let at = |path: &str| format!("{}{path}", ui.guard.base());
    Router::new()
        .route(&at("/"), get(pages::fleet))
        .route(&at("/nodes/{name}"), get(pages::node))
        .route(&at("/rollouts"), get(pages::rollouts))
        .route(&at("/rollouts/{id}"), get(pages::rollout))
        .route(&at("/rollouts/{id}/action"), post(actions::control_rollout))
        .route(&at("/releases"), get(pages::releases))
        .route(&at("/releases/rollback"), post(actions::rollback))
        .route(&at("/recovery"), get(pages::recovery))
        .route(&at("/live"), get(live::stream))
        .route(&at(assets::CSS.path), get(assets::css))
        .route(&at(assets::JS.path), get(assets::js))
        .fallback(pages::not_found)
        .layer(axum::middleware::from_fn_with_state(
            ui.clone(),
            guard::check,
        ))
        .with_state(ui)
}
