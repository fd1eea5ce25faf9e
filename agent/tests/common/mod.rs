//! Helpers shared by this crate's integration tests.

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;

/// GETs `url` and returns its status and body.
pub async fn get(
    client: &Client<HttpConnector, Empty<Bytes>>,
    url: &str,
) -> Result<(u16, String), String> {
    let response = client
        .get(url.parse().unwrap())
        .await
        .map_err(|e| e.to_string())?;
    let status = response.status().as_u16();
    let body = response
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}
