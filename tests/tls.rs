//! Outgoing TLS end to end, with real TLS servers on loopback and certificates made here (rcgen): a
//! private CA, a server certificate for 127.0.0.1 signed by it, and one for another name. Webhooks,
//! the openai embedder, https arms through the proxy (h2 and http/1.1), and the budget and the fence on
//! a TLS-only redis-server. Nothing here trusts a certificate without the CA: verification cannot be
//! turned off.

mod common;

use std::convert::Infallible;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Once};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use driftguard::config::{Dur, Hook, HookEvent, HookKind, Trust};
use driftguard::rollback::hooks::{HookContext, HookOutcome, HookRunner};
use driftguard::telemetry::metrics::Metrics;
use http::{HeaderMap, Request, Response, StatusCode, Version};
use http_body::{Body, Frame};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde_json::json;
use tokio::sync::{mpsc, Notify};

// ================================================================================================
// Certificates
// ================================================================================================

/// A private CA, written as PEM to a directory of its own.
struct Pki {
    dir: PathBuf,
    ca: rcgen::Issuer<'static, rcgen::KeyPair>,
    /// The CA certificate's PEM file: what `ca_file` names.
    ca_file: PathBuf,
}

/// A server certificate and its key, as PEM files.
struct Leaf {
    cert: PathBuf,
    key: PathBuf,
}

impl Pki {
    fn new() -> Pki {
        let dir = unique("pki");
        std::fs::create_dir_all(&dir).unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "driftguard test CA");
        params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
        ];
        let cert = params.self_signed(&key).unwrap();
        let ca_file = dir.join("ca.pem");
        std::fs::write(&ca_file, cert.pem()).unwrap();
        Pki {
            dir,
            ca: rcgen::Issuer::new(params, key),
            ca_file,
        }
    }

    fn ca_file(&self) -> String {
        self.ca_file.to_string_lossy().into_owned()
    }

    /// A certificate for `names` (DNS names or IP addresses) signed by the CA.
    fn leaf(&self, file: &str, names: &[&str]) -> Leaf {
        let key = rcgen::KeyPair::generate().unwrap();
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let mut params = rcgen::CertificateParams::new(names).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, file);
        let cert = params.signed_by(&key, &self.ca).unwrap();
        let leaf = Leaf {
            cert: self.dir.join(format!("{file}.pem")),
            key: self.dir.join(format!("{file}.key")),
        };
        std::fs::write(&leaf.cert, cert.pem()).unwrap();
        std::fs::write(&leaf.key, key.serialize_pem()).unwrap();
        leaf
    }
}

// ================================================================================================
// A TLS HTTP server
// ================================================================================================

#[derive(Debug, Clone)]
struct Seen {
    version: Version,
    path: String,
    headers: HeaderMap,
    body: Bytes,
}

#[derive(Default)]
struct ServerState {
    seen: Mutex<Vec<Seen>>,
    gate: Notify,
    handshakes: AtomicU64,
}

/// An https server on 127.0.0.1 offering `alpn`. Routes: `/v1/embeddings` (a 4-dim vector per input),
/// `/sse` (event 1, then the rest once the test opens the gate), anything else 200 `hello over tls`.
/// Every request is recorded with its body.
struct TlsServer {
    addr: std::net::SocketAddr,
    state: Arc<ServerState>,
    rt: Option<tokio::runtime::Runtime>,
}

impl TlsServer {
    fn start(leaf: &Leaf, alpn: &[&[u8]]) -> TlsServer {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&leaf.cert)
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        let key = PrivateKeyDer::from_pem_file(&leaf.key).unwrap();
        let mut config = rustls::ServerConfig::builder()
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .unwrap();
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(ServerState::default());
        let st = state.clone();
        rt.spawn(async move {
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                let (acceptor, st) = (acceptor.clone(), st.clone());
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    st.handshakes.fetch_add(1, Ordering::Relaxed);
                    let service = service_fn(move |req| handle(st.clone(), req));
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(tls), service)
                        .await;
                });
            }
        });
        TlsServer {
            addr,
            state,
            rt: Some(rt),
        }
    }

    fn url(&self) -> String {
        format!("https://{}", self.addr)
    }

    fn seen(&self) -> Vec<Seen> {
        self.state.seen.lock().unwrap().clone()
    }

    fn handshakes(&self) -> u64 {
        self.state.handshakes.load(Ordering::Relaxed)
    }
}

impl Drop for TlsServer {
    fn drop(&mut self) {
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

type Boxed = BoxBody<Bytes, Infallible>;

/// A body fed by a channel, one frame per message.
struct Channel(mpsc::Receiver<Bytes>);

impl Body for Channel {
    type Data = Bytes;
    type Error = Infallible;
    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.get_mut()
            .0
            .poll_recv(cx)
            .map(|m| m.map(|b| Ok(Frame::data(b))))
    }
}

async fn handle(
    st: Arc<ServerState>,
    req: Request<Incoming>,
) -> Result<Response<Boxed>, Infallible> {
    let (parts, body) = req.into_parts();
    let body = body
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let path = parts.uri.path().to_string();
    st.seen.lock().unwrap().push(Seen {
        version: parts.version,
        path: path.clone(),
        headers: parts.headers.clone(),
        body: body.clone(),
    });
    let response = match path.as_str() {
        "/v1/embeddings" => {
            let parsed: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
            let inputs = parsed["input"].as_array().cloned().unwrap_or_default();
            let data: Vec<_> = inputs
                .iter()
                .enumerate()
                .map(|(i, text)| {
                    let n = text.as_str().unwrap_or("").len() as f32;
                    json!({"index": i, "embedding": [1.0, n, 0.5, 0.25]})
                })
                .collect();
            Response::builder()
                .header("content-type", "application/json")
                .body(Full::new(Bytes::from(json!({"data": data}).to_string())).boxed())
        }
        "/sse" => {
            let (tx, rx) = mpsc::channel(4);
            let st = st.clone();
            tokio::spawn(async move {
                let _ = tx.send(Bytes::from(sse_event(1))).await;
                st.gate.notified().await;
                for n in 2..=3 {
                    let _ = tx.send(Bytes::from(sse_event(n))).await;
                }
            });
            Response::builder()
                .header("content-type", "text/event-stream")
                .body(Channel(rx).boxed())
        }
        _ => Response::builder().body(Full::new(Bytes::from_static(b"hello over tls")).boxed()),
    };
    Ok(response.unwrap())
}

// ================================================================================================
// Webhooks
// ================================================================================================

/// Log lines of the library calls made in this test process (the hook's reason is logged).
fn logs() -> &'static Mutex<Vec<u8>> {
    static LOGS: Mutex<Vec<u8>> = Mutex::new(Vec::new());
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        struct Sink;
        impl std::io::Write for Sink {
            fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
                LOGS.lock().unwrap().extend_from_slice(buf);
                Ok(buf.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let _ = tracing_subscriber::fmt()
            .with_env_filter("driftguard=debug")
            .with_writer(|| Sink)
            .with_ansi(false)
            .try_init();
    });
    &LOGS
}

fn webhook(name: &str, url: String, ca_file: &str) -> Hook {
    Hook {
        name: name.into(),
        kind: HookKind::Webhook,
        command: Vec::new(),
        url,
        secret_env: "DRIFTGUARD_TEST_TLS_SECRET".into(),
        timeout: Dur(Duration::from_secs(5)),
        retries: 0,
        on: vec![HookEvent::Tripped],
        ca_file: ca_file.into(),
        trust: Trust::resolve("", ca_file),
    }
}

fn trip() -> Arc<HookContext> {
    Arc::new(HookContext {
        event: HookEvent::Tripped,
        rule: "coverage".into(),
        probe: String::new(),
        lever: "route".into(),
        arm: "canary".into(),
        snapshot_path: None,
        snapshot: json!({"rule": "coverage", "observed": 0.41}),
    })
}

/// A trusted https receiver (through the hook's `ca_file`) gets the signed snapshot; one whose
/// certificate is not trusted (no `ca_file`: the platform's roots do not know the test CA) gets no
/// body, and the hook counts `failed` with the reason in the log.
#[tokio::test]
async fn webhooks_reach_trusted_https_receivers_only() {
    std::env::set_var("DRIFTGUARD_TEST_TLS_SECRET", "s3cret");
    let logs = logs();
    let pki = Pki::new();
    let server = TlsServer::start(&pki.leaf("hook", &["127.0.0.1"]), &[b"http/1.1"]);
    let runs = Metrics::new().hook_runs;
    let hooks = vec![
        webhook("trusted", format!("{}/hook", server.url()), &pki.ca_file()),
        webhook("untrusted", format!("{}/hook", server.url()), ""),
    ];
    let runner = HookRunner::new(hooks, runs.clone());
    let mut outcomes = Vec::new();
    for handle in runner.fire(trip()) {
        outcomes.push(within(WAIT, "hook run", handle).await.unwrap());
    }
    assert_eq!(outcomes, [HookOutcome::Ok, HookOutcome::Failed]);
    let seen = server.seen();
    assert_eq!(
        seen.len(),
        1,
        "only the trusted hook's body arrives: {seen:?}"
    );
    assert_eq!(seen[0].path, "/hook");
    let snapshot: serde_json::Value = serde_json::from_slice(&seen[0].body).unwrap();
    assert_eq!(snapshot["rule"], "coverage");
    let signature = seen[0].headers["x-driftguard-signature"].to_str().unwrap();
    assert!(signature.starts_with("sha256="), "{signature}");
    assert_eq!(runs.with_label_values(&["trusted", "ok"]).get(), 1);
    assert_eq!(runs.with_label_values(&["untrusted", "failed"]).get(), 1);
    let text = String::from_utf8_lossy(&logs.lock().unwrap()).into_owned();
    let line = text
        .lines()
        .find(|l| l.contains("untrusted") && l.contains("unknown issuer"))
        .unwrap_or_else(|| panic!("no log line with the reason:\n{text}"));
    assert!(line.contains(&server.addr.to_string()), "{line}");
}

// ================================================================================================
// The openai embedder
// ================================================================================================

/// `embedder = "openai"` on an https `/v1/embeddings` trusted through `signals.openai.ca_file`.
#[test]
fn the_openai_embedder_calls_an_https_endpoint() {
    let pki = Pki::new();
    let server = TlsServer::start(&pki.leaf("embed", &["127.0.0.1"]), &[b"h2", b"http/1.1"]);
    let config = driftguard::config::Config::parse(&format!(
        "{LISTEN}\n{}\n[signals]\nembedder = \"openai\"\n[signals.openai]\nurl = \"{}/v1/embeddings\"\n\
         ca_file = {:?}\n",
        arm("main", "http://127.0.0.1:9", 1, &[]),
        server.url(),
        pki.ca_file()
    ))
    .unwrap();
    let embedder = driftguard::signals::embedder(&config.signals).unwrap();
    let vectors = embedder.embed_batch(&["refund policy", "ok"]).unwrap();
    assert_eq!(
        vectors,
        vec![vec![1.0, 13.0, 0.5, 0.25], vec![1.0, 2.0, 0.5, 0.25]]
    );

    // The same endpoint without the CA: the call fails and says why.
    let mut untrusted = config.signals.clone();
    untrusted.openai.trust = Trust::default();
    let embedder = driftguard::signals::embedder(&untrusted).unwrap();
    let err = embedder.embed("refund policy").unwrap_err().to_string();
    assert!(err.contains("unknown issuer"), "{err}");
}

// ================================================================================================
// https arms
// ================================================================================================

fn arm_config(upstream: &str, ca_file: &str) -> String {
    format!(
        "{LISTEN}\n{}\n[tls]\nca_file = {ca_file:?}\n",
        arm("secure", upstream, 1, &[("INDEX_HASH", "abc123")])
    )
}

/// Through the proxy to an https arm that speaks `alpn`: the answer, pins stamped both ways, SSE
/// streamed event by event, and the connection kept for the next requests.
async fn serves_through_an_https_arm(alpn: &[&[u8]], version: Version) {
    let pki = Pki::new();
    let server = TlsServer::start(&pki.leaf("arm", &["127.0.0.1"]), alpn);
    let proxy = Proxy::start(&arm_config(&server.url(), &pki.ca_file()));
    let client = client();
    for _ in 0..3 {
        let reply = get(&client, &proxy.url("/hello"), &[]).await;
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
        assert_eq!(reply.text(), "hello over tls");
        assert_eq!(reply.header("x-pin-index-hash").as_deref(), Some("abc123"));
    }
    let seen = server.seen();
    assert!(seen.iter().all(|s| s.version == version), "{seen:?}");
    assert!(
        seen.iter().all(|s| s
            .headers
            .get("x-pin-index-hash")
            .is_some_and(|v| v == "abc123")),
        "{seen:?}"
    );
    assert_eq!(
        server.handshakes(),
        1,
        "pooled: one handshake for three requests"
    );

    let req = Request::get(proxy.url("/sse")).body(empty()).unwrap();
    let response = within(WAIT, "sse head", client.request(req)).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let mut body = response.into_body();
    let mut text = String::new();
    read_until(&mut body, &mut text, WAIT, |t| t.contains("\"n\":1")).await;
    assert!(
        !text.contains("\"n\":2"),
        "event 2 came before the gate opened: {text}"
    );
    server.state.gate.notify_one();
    read_to_end(&mut body, &mut text, WAIT).await;
    assert_eq!(
        text,
        format!("{}{}{}", sse_event(1), sse_event(2), sse_event(3))
    );
}

#[tokio::test]
async fn an_https_arm_on_h2() {
    serves_through_an_https_arm(&[b"h2", b"http/1.1"], Version::HTTP_2).await;
}

#[tokio::test]
async fn an_https_arm_on_http1() {
    serves_through_an_https_arm(&[b"http/1.1"], Version::HTTP_11).await;
}

/// A server whose certificate is for another name: `502 upstream_tls` naming the reason, counted as
/// an upstream error of the arm.
#[tokio::test]
async fn a_certificate_for_another_name_is_502_upstream_tls() {
    let pki = Pki::new();
    let server = TlsServer::start(&pki.leaf("other", &["other.example"]), &[b"http/1.1"]);
    let proxy = Proxy::start(&arm_config(&server.url(), &pki.ca_file()));
    let client = client();
    let reply = get(&client, &proxy.url("/hello"), &[]).await;
    assert_eq!(reply.status, StatusCode::BAD_GATEWAY, "{}", reply.text());
    let body = reply.json();
    assert_eq!(body["error"], "upstream_tls", "{body}");
    let message = body["message"].as_str().unwrap();
    assert!(message.contains("name mismatch"), "{message}");
    assert!(message.contains(&server.addr.to_string()), "{message}");
    assert!(server.seen().is_empty());
    let (_, samples) = scrape(&client, &proxy).await;
    assert_eq!(
        metric(
            &samples,
            "driftguard_proxy_errors_total",
            &[("kind", "upstream_tls")]
        ),
        Some(1.0)
    );
}

// ================================================================================================
// Redis over TLS
// ================================================================================================

/// A redis-server listening on TLS only (`--port 0`).
struct TlsRedis {
    child: std::process::Child,
    port: u16,
}

impl TlsRedis {
    fn start(pki: &Pki, leaf: &Leaf) -> Option<TlsRedis> {
        // Fails, naming the package, when redis-server is missing (the callers are ignored without it).
        require(
            "redis-server",
            runs("redis-server", "--version"),
            "apt-get install redis-server",
        );
        let port = free_port();
        let child = std::process::Command::new("redis-server")
            .args(["--port", "0", "--tls-port", &port.to_string()])
            .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .arg("--tls-cert-file")
            .arg(&leaf.cert)
            .arg("--tls-key-file")
            .arg(&leaf.key)
            .arg("--tls-ca-cert-file")
            .arg(&pki.ca_file)
            .args(["--tls-auth-clients", "no", "--loglevel", "warning"])
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("spawn redis-server");
        let server = TlsRedis { child, port };
        let deadline = Instant::now() + WAIT;
        while server.cli(pki, &["PING"]).as_deref() != Some("PONG") {
            assert!(Instant::now() < deadline, "TLS redis-server did not answer");
            std::thread::sleep(Duration::from_millis(20));
        }
        Some(server)
    }

    fn url(&self) -> String {
        format!("rediss://127.0.0.1:{}", self.port)
    }

    fn cli(&self, pki: &Pki, args: &[&str]) -> Option<String> {
        let out = std::process::Command::new("redis-cli")
            .args(["-p", &self.port.to_string(), "--tls", "--cacert"])
            .arg(&pki.ca_file)
            .args(args)
            .output()
            .ok()?;
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
    }
}

impl Drop for TlsRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `{"question":"hi..","max_tokens":1}` priced at exactly `tokens` (bytes ÷ 4 rounded up, plus 1).
fn body_costing(tokens: u64) -> String {
    let mut question = String::from("hi");
    loop {
        let body = json!({"question": question, "max_tokens": 1}).to_string();
        let cost = body.len().div_ceil(4) as u64 + 1;
        if cost == tokens {
            return body;
        }
        question.push('x');
    }
}

/// The two-replica budget test over `rediss://`: two processes on one key admit no more than one
/// budget allows, and Redis has no backend error.
#[ignore = "needs redis-server (apt-get install redis-server)"]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_share_one_budget_over_tls() {
    const PRICE: u64 = 10;
    const TPM: u64 = 1200;
    const BURST: u64 = 40;
    let pki = Pki::new();
    let Some(redis) = TlsRedis::start(&pki, &pki.leaf("redis", &["127.0.0.1"])) else {
        return;
    };
    let up = Upstream::start("budget");
    let key = format!("driftguard-test:tls:{}", std::process::id());
    let cfg = format!(
        "{LISTEN}\n[budget]\ntokens_per_minute = {TPM}\nburst = {BURST}\nbackend = \"redis\"\n\
         redis_url = \"{}\"\nredis_key = \"{key}\"\nredis_timeout = \"1s\"\non_backend_error = \"closed\"\n\
         [tls]\nca_file = {:?}\n{}",
        redis.url(),
        pki.ca_file(),
        arm("main", &up.url(), 1, &[])
    );
    let proxies = [Arc::new(Proxy::start(&cfg)), Arc::new(Proxy::start(&cfg))];
    let body = Arc::new(body_costing(PRICE));
    let admitted = Arc::new(AtomicU64::new(0));
    let refused = Arc::new(AtomicU64::new(0));
    let run_for = Duration::from_secs(3);
    let start = Instant::now();
    let mut tasks = Vec::new();
    for proxy in &proxies {
        let (proxy, body, admitted, refused) = (
            proxy.clone(),
            body.clone(),
            admitted.clone(),
            refused.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let client = client();
            while start.elapsed() < run_for {
                let req = Request::post(proxy.url("/v1/chat"))
                    .header("content-type", "application/json")
                    .body(full(body.to_string()))
                    .unwrap();
                let reply = exchange(&client, req).await;
                match reply.status {
                    StatusCode::OK => admitted.fetch_add(PRICE, Ordering::Relaxed),
                    StatusCode::TOO_MANY_REQUESTS => refused.fetch_add(1, Ordering::Relaxed),
                    other => panic!("unexpected {other}: {}", reply.text()),
                };
            }
        }));
    }
    for t in tasks {
        within(WAIT, "hammering task", t).await.unwrap();
    }
    let elapsed = start.elapsed();
    let total = admitted.load(Ordering::Relaxed);
    let one_budget = BURST as f64 + TPM as f64 / 60.0 * elapsed.as_secs_f64() + PRICE as f64;
    assert!(
        total as f64 <= one_budget,
        "admitted {total} tokens in {elapsed:?}, more than one budget ({one_budget:.1})"
    );
    assert!(
        total as f64 >= one_budget / 2.0,
        "only {total} of {one_budget:.1}"
    );
    assert!(refused.load(Ordering::Relaxed) > 0);
    let client = client();
    for proxy in &proxies {
        let (_, s) = scrape(&client, proxy).await;
        assert_eq!(
            metric(&s, "driftguard_budget_backend_errors_total", &[]),
            Some(0.0)
        );
    }
    assert!(redis.cli(&pki, &["EXISTS", &key]).is_some());
}

/// The fence's receipt store on `rediss://`: two replicas execute one key once.
#[ignore = "needs redis-server (apt-get install redis-server)"]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fence_shares_receipts_over_tls() {
    let pki = Pki::new();
    let Some(redis) = TlsRedis::start(&pki, &pki.leaf("redis", &["127.0.0.1"])) else {
        return;
    };
    let up = Upstream::start("writes");
    let cfg = format!(
        "{LISTEN}\n[writes]\nroutes = [\"POST /ingest\"]\nstore = \"redis\"\nredis_url = \"{}\"\n\
         [tls]\nca_file = {:?}\n{}",
        redis.url(),
        pki.ca_file(),
        arm("main", &up.url(), 1, &[])
    );
    let proxies = [Proxy::start(&cfg), Proxy::start(&cfg)];
    let client = client();
    let key = format!("tls-{}", std::process::id());
    let mut statuses = Vec::new();
    for proxy in &proxies {
        let req = Request::post(proxy.url("/ingest"))
            .header("idempotency-key", key.as_str())
            .body(full("{\"doc\":1}"))
            .unwrap();
        statuses.push(exchange(&client, req).await.status);
    }
    assert_eq!(statuses, [StatusCode::OK, StatusCode::OK]);
    assert_eq!(
        up.request_count(),
        1,
        "the second replica replays the receipt"
    );
    let receipt = redis.cli(&pki, &["EXISTS", &format!("driftguard:receipt:{key}")]);
    assert_eq!(receipt.as_deref(), Some("1"));
}

/// A `rediss://` server whose certificate does not verify (no `ca_file`) is a clear error in `check`
/// and at start, naming the host and the reason, at once rather than a hang.
#[ignore = "needs redis-server (apt-get install redis-server)"]
#[test]
fn an_untrusted_redis_certificate_stops_check_and_start() {
    let pki = Pki::new();
    let Some(redis) = TlsRedis::start(&pki, &pki.leaf("redis", &["127.0.0.1"])) else {
        return;
    };
    let config = unique("untrusted").with_extension("toml");
    std::fs::write(
        &config,
        format!(
            "state_dir = {:?}\n{LISTEN}\n[budget]\nbackend = \"redis\"\nredis_url = \"{}\"\n{}",
            unique("state"),
            redis.url(),
            arm("main", "http://127.0.0.1:9", 1, &[])
        ),
    )
    .unwrap();
    for verb in ["check", "run"] {
        let started = Instant::now();
        let out = std::process::Command::new(bin())
            .arg(verb)
            .arg("--config")
            .arg(&config)
            .env_remove("RUST_LOG")
            .output()
            .unwrap();
        assert!(!out.status.success(), "{verb} accepted an untrusted Redis");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(text.contains("budget.redis_url"), "{verb}: {text}");
        assert!(text.contains("unknown issuer"), "{verb}: {text}");
        assert!(
            text.contains(&format!("127.0.0.1:{}", redis.port)),
            "{verb}: {text}"
        );
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "{verb} took {:?}",
            started.elapsed()
        );
    }
}
