//! The addresses a web service's proxy listens on, kept to its release's
//! (`listen` and `also_listen`): an address a new release adds is opened
//! before its cutover (before the proxy could send anything there), one it
//! drops is closed after the cutover, once the old release drained. A
//! service moves to another port with a deploy that serves both, then one
//! that drops the old.

use std::net::SocketAddr;

use cutover_common::release::{Kind, ReleaseSpec};

use super::{bind_error, keep_listeners, NodeServices, ServiceError};
use crate::notify;
use crate::proxy::Proxy;
use crate::service::Service;

impl NodeServices {
    /// The addresses `release`'s proxy listens on here, `listen` first;
    /// none for a worker.
    pub(super) fn listens_of(&self, release: &ReleaseSpec) -> Vec<SocketAddr> {
        match &release.kind {
            Kind::Web(web) => web.listens(self.settings.address),
            Kind::Worker(_) => Vec::new(),
        }
    }

    /// Adds to `service`'s proxy the addresses of `listens` it lacks (all
    /// or none: one that cannot be bound closes those opened before it);
    /// returns them. A web release of a worker, or the other way round, is
    /// refused.
    pub(super) async fn open_listeners(
        &self,
        service: &Service,
        release: &ReleaseSpec,
        listens: &[SocketAddr],
    ) -> Result<Vec<SocketAddr>, ServiceError> {
        let proxy = match (service.proxy(), listens.is_empty()) {
            (Some(proxy), false) => proxy,
            (None, true) => return Ok(Vec::new()),
            (proxy, _) => {
                return Err(ServiceError::KindChanged {
                    service: release.service.clone(),
                    release_id: release.release_id.clone(),
                    web: proxy.is_some(),
                })
            }
        };
        let current = proxy.listens();
        let mut opened = Vec::new();
        for &listen in listens.iter().filter(|l| !current.contains(l)) {
            let inherited = self.settings.inherited.take(listen);
            if let Err(error) = proxy.add_listener(listen, inherited).await {
                close(proxy, &opened).await;
                return Err(bind_error(&release.service, listen, error));
            }
            tracing::info!(service = %release.service, %listen, "the proxy listens on a new address");
            opened.push(listen);
        }
        if !opened.is_empty() {
            keep_listeners(&release.service, proxy);
        }
        Ok(opened)
    }

    /// Opens the extra addresses `also` of a proxy just bound (on sockets a
    /// predecessor left, where it did).
    pub(super) async fn listen_also(
        &self,
        name: &str,
        proxy: &Proxy,
        also: &[SocketAddr],
    ) -> Result<(), ServiceError> {
        for &listen in also {
            let inherited = self.settings.inherited.take(listen);
            proxy
                .add_listener(listen, inherited)
                .await
                .map_err(|e| bind_error(name, listen, e))?;
        }
        Ok(())
    }

    /// Closes the addresses `service`'s proxy listens on beyond `keep`
    /// (its open connections finish what they do), and records what is
    /// left.
    pub(super) async fn close_listeners_but(&self, service: &Service, keep: &[SocketAddr]) {
        let Some(proxy) = service.proxy() else {
            return;
        };
        let dropped: Vec<SocketAddr> = proxy
            .listens()
            .into_iter()
            .filter(|l| !keep.contains(l))
            .collect();
        if dropped.is_empty() {
            return;
        }
        for listen in close(proxy, &dropped).await {
            tracing::info!(service = %service.name(), %listen, "the proxy no longer listens on an address its release dropped");
        }
        service.record_listens();
    }
}

/// Closes `listens` of `proxy` but its last address; returns those closed.
async fn close(proxy: &Proxy, listens: &[SocketAddr]) -> Vec<SocketAddr> {
    let mut closed = Vec::new();
    for &listen in listens {
        if proxy.listens().len() <= 1 {
            tracing::error!(%listen, "not closing the proxy's last address");
            break;
        }
        // systemd's copy first: kept, it would go on taking connections
        // no one accepts.
        notify::forget_listener(listen);
        if proxy.remove_listener(listen).await {
            closed.push(listen);
        }
    }
    closed
}
