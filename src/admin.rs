//! Admin listener (SPEC §7): `/metrics`, `/healthz`, `/readyz`, `/status` for anyone; mutating endpoints
//! behind the bearer-token rule — a configured token is required from every peer, and with no token only
//! loopback peers may mutate. The routes and the auth rule live here; the documents in [`status`] and
//! [`metrics`]. Served by `cmd::run` on the admin listener.

pub mod alerts;
pub mod metrics;
pub mod status;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;

use crate::app::{App, ReloadError};
use crate::rollback::engine::{Engine, EngineError, TripRequest, MANUAL};
use crate::rollback::snapshot;
use crate::serve::router::RouterError;

/// Largest request body an admin endpoint reads.
const MAX_BODY: usize = 64 * 1024;

pub async fn handle(
    app: Arc<App>,
    peer: SocketAddr,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let path = req.uri().path().to_string();
    let response = match (req.method(), path.as_str()) {
        (&Method::GET, "/metrics") => text(
            StatusCode::OK,
            "text/plain; version=0.0.4; charset=utf-8",
            metrics::render(&app),
        ),
        (&Method::GET, "/healthz") => text(StatusCode::OK, "text/plain", "ok\n".into()),
        (&Method::GET, "/readyz") => {
            if app.is_draining() {
                text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "text/plain",
                    "draining\n".into(),
                )
            } else if app.table().total_weight() == 0 {
                text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "text/plain",
                    "no arm has a weight above 0\n".into(),
                )
            } else {
                text(StatusCode::OK, "text/plain", "ready\n".into())
            }
        }
        (&Method::GET, "/status") => json(StatusCode::OK, status::document(&app)),
        (&Method::GET, "/snapshots") => {
            let ids = snapshot::list_snapshots(&app.config().state_dir);
            json(StatusCode::OK, serde_json::json!({ "snapshots": ids }))
        }
        (&Method::GET, p) if p.starts_with("/snapshots/") => {
            let id = &p["/snapshots/".len()..];
            match snapshot::read_snapshot(&app.config().state_dir, id) {
                Some(doc) => text(StatusCode::OK, "application/json", doc),
                None => error(
                    StatusCode::NOT_FOUND,
                    "not_found",
                    &format!("no snapshot {id:?}"),
                ),
            }
        }
        (&Method::POST, _) => match refusal(&app, peer, &req) {
            Some(denied) => denied,
            None => {
                // Mutations read files, rebuild tables and fsync the runtime state: off the runtime
                // thread, so traffic does not wait on them.
                let body = match read_body(req).await {
                    Ok(body) => body,
                    Err(resp) => return Ok(resp),
                };
                let path = path.clone();
                tokio::task::spawn_blocking(move || mutate(&app, &path, &body))
                    .await
                    .unwrap_or_else(|e| {
                        error(
                            StatusCode::INTERNAL_SERVER_ERROR,
                            "internal",
                            &format!("the admin call failed: {e}"),
                        )
                    })
            }
        },
        (_, "/metrics" | "/healthz" | "/readyz" | "/status") => error(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            "use GET",
        ),
        _ => error(
            StatusCode::NOT_FOUND,
            "not_found",
            &format!("no admin endpoint {path}"),
        ),
    };
    Ok(response)
}

/// A mutating endpoint. A change whose runtime state could not be saved (a full or read-only
/// `state_dir`) holds in this process but not across a restart: it answers 500 `state_not_saved`, not 200.
fn mutate(app: &App, path: &str, body: &Bytes) -> Response<Full<Bytes>> {
    let response = apply(app, path, body);
    if !response.status().is_success() {
        return response;
    }
    match app.engine().control().unsaved() {
        None => response,
        Some(e) => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "state_not_saved",
            &format!(
                "the change holds in this process, but the runtime state could not be saved ({e}); \
                 it will not survive a restart: free space in state_dir, then repeat the call"
            ),
        ),
    }
}

fn apply(app: &App, path: &str, body: &Bytes) -> Response<Full<Bytes>> {
    let engine = app.engine();
    match path {
        "/trip" | "/recover" | "/baseline" => return guard(engine, path, body),
        "/alerts" => {
            return match alerts::handle(engine, body) {
                Ok(done) => json(StatusCode::OK, done),
                Err(e) => error(StatusCode::BAD_REQUEST, "bad_request", &e.to_string()),
            }
        }
        _ => {}
    }
    if path == "/reload" {
        return match app.reload() {
            Ok(hash) => json(
                StatusCode::OK,
                serde_json::json!({"reloaded": true, "config_hash": hash}),
            ),
            Err(ReloadError::Invalid(errors)) => json(
                StatusCode::BAD_REQUEST,
                serde_json::json!({
                    "error": "invalid_config",
                    "message": "the config file was refused; the running config stays",
                    "errors": errors.0.iter().map(|e| e.to_string()).collect::<Vec<_>>(),
                }),
            ),
            Err(e) => error(StatusCode::BAD_REQUEST, "reload_failed", &e.to_string()),
        };
    }
    match path {
        "/freeze" | "/unfreeze" => {
            let frozen = path == "/freeze";
            engine.control().set_frozen(frozen);
            return json(StatusCode::OK, serde_json::json!({ "frozen": frozen }));
        }
        "/flags" => {
            let body = match parse_json(body) {
                Ok(body) => body,
                Err(resp) => return *resp,
            };
            return match engine.control().set_flags(&body) {
                Ok(()) => {
                    let table = app.table();
                    let degrade = table
                        .controls
                        .degrade
                        .as_ref()
                        .and_then(|v| v.to_str().ok());
                    json(
                        StatusCode::OK,
                        serde_json::json!({"degrade": degrade, "flags": &table.controls.flags}),
                    )
                }
                Err(e) => error(StatusCode::BAD_REQUEST, "bad_request", &e.to_string()),
            };
        }
        _ => {}
    }
    if let Some(arm) = path
        .strip_prefix("/arms/")
        .and_then(|rest| rest.strip_suffix("/weight"))
    {
        let body = match parse_json(body) {
            Ok(body) => body,
            Err(resp) => return *resp,
        };
        let Some(weight) = body
            .get("weight")
            .and_then(serde_json::Value::as_u64)
            .and_then(|w| u32::try_from(w).ok())
        else {
            return error(
                StatusCode::BAD_REQUEST,
                "bad_request",
                "expected {\"weight\": <non-negative integer>}",
            );
        };
        return match engine.control().set_weight(arm, weight) {
            Ok(()) => json(
                StatusCode::OK,
                serde_json::json!({"arm": arm, "weight": weight}),
            ),
            Err(e @ RouterError::UnknownArm(_)) => {
                error(StatusCode::NOT_FOUND, "unknown_arm", &e.to_string())
            }
            Err(e) => error(StatusCode::BAD_REQUEST, "bad_request", &e.to_string()),
        };
    }
    error(
        StatusCode::NOT_FOUND,
        "not_found",
        &format!("no admin endpoint POST {path}"),
    )
}

/// `POST /trip`, `/recover`, `/baseline`: the rollback engine's manual controls.
fn guard(engine: &Engine, path: &str, body: &Bytes) -> Response<Full<Bytes>> {
    // An empty body is fine for all three.
    let body = if body.is_empty() {
        serde_json::json!({})
    } else {
        match parse_json(body) {
            Ok(body) => body,
            Err(resp) => return *resp,
        }
    };
    let field = |name: &str| body.get(name).and_then(|v| v.as_str()).map(String::from);
    let engine_error = |e: EngineError| match e {
        EngineError::NotHealthy(_) | EngineError::Baseline(_) => {
            error(StatusCode::CONFLICT, "conflict", &e.to_string())
        }
        EngineError::UnknownArm(_) => error(StatusCode::NOT_FOUND, "unknown_arm", &e.to_string()),
        EngineError::Router(_) => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            &e.to_string(),
        ),
    };
    match path {
        "/trip" => {
            if let Some(scope) = field("scope") {
                let here = engine.fleet().map(|f| f.scope());
                if here != Some(scope.as_str()) {
                    return error(
                        StatusCode::CONFLICT,
                        "wrong_scope",
                        &match here {
                            Some(here) => format!("this replica judges fleet scope {here:?}, not {scope:?}: send the trip to a replica of scope {scope:?}"),
                            None => format!("this replica has no [fleet]; it cannot trip scope {scope:?}"),
                        },
                    );
                }
            }
            let request = TripRequest {
                rule: MANUAL.into(),
                arm: field("arm"),
                finding: None,
                reason: Some(field("reason").unwrap_or_else(|| "manual trip".into())),
                window_seconds: engine.control().config().rules.window.0.as_secs(),
            };
            match engine.trip(request) {
                Ok(events) => {
                    for ctx in events {
                        engine.fire(ctx);
                    }
                    json(StatusCode::OK, status::guard(engine))
                }
                Err(e) => engine_error(e),
            }
        }
        "/recover" => {
            for ctx in engine.recover("POST /recover") {
                engine.fire(ctx);
            }
            json(StatusCode::OK, status::guard(engine))
        }
        _ => match engine.capture_baseline(field("arm").as_deref()) {
            Ok(b) => json(
                StatusCode::OK,
                serde_json::json!({"baseline": {"arm": b.arm, "captured_ms": b.captured_ms,
                    "pins": b.pins, "window": b.summary.to_json()}}),
            ),
            Err(e) => engine_error(e),
        },
    }
}

/// The bearer-token rule for mutating endpoints: the refusal to send, if any.
fn refusal(app: &App, peer: SocketAddr, req: &Request<Incoming>) -> Option<Response<Full<Bytes>>> {
    let token = app.admin_token();
    let presented = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    match decide(token.as_deref(), peer, presented) {
        Decision::Allow => None,
        Decision::Unauthorized(message) => {
            Some(error(StatusCode::UNAUTHORIZED, "unauthorized", message))
        }
        Decision::Forbidden(message) => Some(error(StatusCode::FORBIDDEN, "forbidden", message)),
    }
}

#[derive(Debug, PartialEq, Eq)]
enum Decision {
    Allow,
    Unauthorized(&'static str),
    Forbidden(&'static str),
}

fn decide(token: Option<&str>, peer: SocketAddr, authorization: Option<&str>) -> Decision {
    match token {
        Some(expected) => match authorization.and_then(|v| v.strip_prefix("Bearer ")) {
            Some(given) if constant_time_eq(given.trim().as_bytes(), expected.as_bytes()) => Decision::Allow,
            Some(_) => Decision::Unauthorized("wrong bearer token"),
            None => Decision::Unauthorized("this endpoint needs Authorization: Bearer <token>"),
        },
        // A listener on `[::]` sees IPv4 peers as `::ffff:a.b.c.d`: canonical, 127.0.0.1 is loopback.
        None if peer.ip().to_canonical().is_loopback() => Decision::Allow,
        None => Decision::Forbidden(
            "no admin token is configured (DRIFTGUARD_ADMIN_TOKEN or admin.token_file), so only loopback peers may call this",
        ),
    }
}

/// Compares the SHA-256 digests of both in constant time: fixed-size inputs, so neither the token's
/// length nor the position of the first difference shows in the timing.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    use sha2::{Digest, Sha256};
    let (a, b) = (Sha256::digest(a), Sha256::digest(b));
    a.iter()
        .zip(b.iter())
        .fold(0u8, |acc, (x, y)| acc | (x ^ y))
        == 0
}

async fn read_body(req: Request<Incoming>) -> Result<Bytes, Response<Full<Bytes>>> {
    Ok(Limited::new(req.into_body(), MAX_BODY)
        .collect()
        .await
        .map_err(|e| {
            error(
                StatusCode::BAD_REQUEST,
                "bad_request",
                &format!("cannot read the body: {e}"),
            )
        })?
        .to_bytes())
}

fn parse_json(bytes: &Bytes) -> Result<serde_json::Value, Box<Response<Full<Bytes>>>> {
    serde_json::from_slice(bytes).map_err(|e| {
        Box::new(error(
            StatusCode::BAD_REQUEST,
            "bad_request",
            &format!("body is not JSON: {e}"),
        ))
    })
}

fn text(status: StatusCode, content_type: &'static str, body: String) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    resp
}

fn json(status: StatusCode, value: serde_json::Value) -> Response<Full<Bytes>> {
    let mut body = value.to_string();
    body.push('\n');
    text(status, "application/json", body)
}

fn error(status: StatusCode, kind: &str, message: &str) -> Response<Full<Bytes>> {
    json(
        status,
        serde_json::json!({"error": kind, "message": message}),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn token_rule() {
        let remote = peer("10.1.2.3:4000");
        let local = peer("127.0.0.1:4000");
        let local6 = peer("[::1]:4000");
        let mapped = peer("[::ffff:127.0.0.1]:4000");
        let mapped_remote = peer("[::ffff:10.1.2.3]:4000");
        assert_eq!(decide(None, local, None), Decision::Allow);
        assert_eq!(decide(None, local6, None), Decision::Allow);
        assert_eq!(decide(None, mapped, None), Decision::Allow);
        assert!(matches!(
            decide(None, mapped_remote, None),
            Decision::Forbidden(_)
        ));
        assert!(!constant_time_eq(b"s3cret", b"s3cre"));
        assert!(!constant_time_eq(b"s3cret", b"s3cret-longer"));
        assert!(constant_time_eq(b"s3cret", b"s3cret"));
        assert!(matches!(decide(None, remote, None), Decision::Forbidden(_)));
        assert!(matches!(
            decide(None, remote, Some("Bearer x")),
            Decision::Forbidden(_)
        ));
        assert_eq!(
            decide(Some("s3cret"), remote, Some("Bearer s3cret")),
            Decision::Allow
        );
        assert!(matches!(
            decide(Some("s3cret"), remote, Some("Bearer nope")),
            Decision::Unauthorized(_)
        ));
        assert!(matches!(
            decide(Some("s3cret"), local, None),
            Decision::Unauthorized(_)
        ));
        assert!(matches!(
            decide(Some("s3cret"), local, Some("Basic s3cret")),
            Decision::Unauthorized(_)
        ));
    }
}
