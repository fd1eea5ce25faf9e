//! A page's live stream: its main part rendered again whenever the fleet's
//! view changes, sent as a server-sent event only when it differs from
//! what the page shows. The page's own address (`?page=/rollouts/ID`)
//! says what to render, exactly as loading it would.

use std::convert::Infallible;
use std::sync::Arc;

use axum::extract::{Query, State};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures_util::stream::Stream;
use serde::Deserialize;

use super::pages::{self, Page};
use super::Ui;

#[derive(Deserialize)]
pub struct LiveQuery {
    page: String,
}

pub async fn stream(State(ui): State<Arc<Ui>>, Query(q): Query<LiveQuery>) -> Response {
    let Some(page) = Page::parse(&q.page) else {
        return pages::not_found_page(&q.page).into_response();
    };
    let mut changes = ui.feed.subscribe();
    let events = async_stream(move |tx| async move {
        let mut shown = String::new();
        loop {
            let snapshot = ui.feed.current().await;
            let main = pages::render_main(&ui, &page, &snapshot)
                .await
                .into_string();
            if main != shown {
                let event = Event::default().event("page").data(&main);
                if tx.send(Ok(event)).await.is_err() {
                    return;
                }
                shown = main;
            }
            tokio::select! {
                _ = ui.shutdown.cancelled() => return,
                _ = tx.closed() => return,
                changed = changes.changed() => if changed.is_err() { return },
            }
        }
    });
    Sse::new(events)
        .keep_alive(KeepAlive::default())
        .into_response()
}

/// A stream fed by a task, which ends when the page goes away.
fn async_stream<F, Fut>(run: F) -> impl Stream<Item = Result<Event, Infallible>>
where
    F: FnOnce(tokio::sync::mpsc::Sender<Result<Event, Infallible>>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tokio::spawn(run(tx));
    tokio_stream::wrappers::ReceiverStream::new(rx)
}
