//! The stylesheet and the script, built into the binary. Their addresses
//! carry a hash of their content, so a browser keeps them for good and a
//! new build's are fetched at once.

use axum::http::header;
use axum::response::{IntoResponse, Response};

pub struct Asset {
    pub path: &'static str,
    content_type: &'static str,
    body: &'static str,
}

pub const CSS: Asset = Asset {
    path: "/assets/app.css",
    content_type: "text/css",
    body: include_str!("assets/app.css"),
};

pub const JS: Asset = Asset {
    path: "/assets/app.js",
    content_type: "text/javascript",
    body: include_str!("assets/app.js"),
};

impl Asset {
    /// Its address with its content's hash (FNV-1a).
    pub fn href(&self) -> String {
        let hash = self.body.bytes().fold(0xcbf29ce484222325u64, |h, b| {
            (h ^ b as u64).wrapping_mul(0x100000001b3)
        });
        format!("{}?v={hash:016x}", self.path)
    }

    pub fn response(&self) -> Response {
        (
            [
                (header::CONTENT_TYPE, self.content_type),
                (header::CACHE_CONTROL, "public, max-age=31536000, immutable"),
            ],
            self.body,
        )
            .into_response()
    }
}

pub async fn css() -> Response {
    CSS.response()
}

pub async fn js() -> Response {
    JS.response()
}
