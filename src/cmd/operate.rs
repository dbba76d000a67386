//! Client side of the admin API for the `status`, `trip` and `recover` verbs.

use std::time::Duration;

use bytes::Bytes;
use http::{header, Method, Request};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

use crate::app::ADMIN_TOKEN_ENV;

/// Default admin listener address (SPEC §7), as seen from the same pod.
pub const DEFAULT_ADMIN: &str = "http://127.0.0.1:9901";

/// Largest admin response read.
const MAX_RESPONSE: usize = 4 * 1024 * 1024;

/// Calls `method path` on the admin listener at `admin` with an optional JSON body and the token from
/// `DRIFTGUARD_ADMIN_TOKEN` (if set). Returns the status and the body text.
pub fn call(
    admin: &str,
    method: Method,
    path: &str,
    body: Option<serde_json::Value>,
    timeout: Duration,
) -> Result<(u16, String), String> {
    let uri: http::Uri = format!("{}{path}", admin.trim_end_matches('/'))
        .parse()
        .map_err(|e| format!("--admin {admin:?} is not a URL: {e}"))?;
    let mut req = Request::builder().method(method).uri(uri);
    if let Ok(token) = std::env::var(ADMIN_TOKEN_ENV) {
        let token = token.trim();
        if !token.is_empty() {
            req = req.header(header::AUTHORIZATION, format!("Bearer {token}"));
        }
    }
    let bytes = body.map(|b| Bytes::from(b.to_string())).unwrap_or_default();
    if !bytes.is_empty() {
        req = req.header(header::CONTENT_TYPE, "application/json");
    }
    let req = req.body(Full::new(bytes)).map_err(|e| e.to_string())?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start a runtime: {e}"))?;
    let client: Client<HttpConnector, Full<Bytes>> =
        Client::builder(TokioExecutor::new()).build(HttpConnector::new());
    runtime.block_on(async {
        let exchange = async {
            let resp = client
                .request(req)
                .await
                .map_err(|e| format!("cannot reach the admin listener at {admin}: {e}"))?;
            let status = resp.status().as_u16();
            let body = Limited::new(resp.into_body(), MAX_RESPONSE)
                .collect()
                .await
                .map_err(|e| format!("reading the response: {e}"))?
                .to_bytes();
            Ok((status, String::from_utf8_lossy(&body).into_owned()))
        };
        tokio::time::timeout(timeout, exchange)
            .await
            .map_err(|_| format!("no answer from {admin} within {timeout:?}"))?
    })
}
