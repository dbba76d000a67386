//! What an https arm costs the proxy, against an http arm: CPU per request through a real driftguard
//! process (the binary cargo builds for this bench), measured as the process's utime + stime from
//! /proc over a run of sequential requests on one keep-alive client connection.
//!
//! Scenarios, each a fresh proxy with one arm on a loopback upstream answering 2 bytes:
//! 1. http arm, pooled (keep-alive to the upstream);
//! 2. https arm, HTTP/1.1 (ALPN), pooled: handshakes amortised;
//! 3. https arm, h2 (ALPN), one multiplexed connection;
//! 4. http arm, `pool_max_idle = 0`: a new TCP connection per request;
//! 5. https arm, HTTP/1.1, `pool_max_idle = 0`: a new TCP connection and TLS handshake per request.
//!
//! The cost of one handshake is (5) − (4): both open a connection per request, only (5) handshakes.
//! Certificates: a private CA and an ECDSA P-256 server certificate made here (rcgen).
//!
//! `cargo bench --bench tls` (loopback only; under a minute once built).

#[path = "../tests/common/mod.rs"]
mod common;

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use common::*;
use http::Response;
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};

const REQUESTS: usize = 4000;

/// utime + stime of `pid`, in seconds.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("proc stat");
    // Fields after the command name (which is in parentheses and may hold spaces).
    let rest = &stat[stat.rfind(')').expect("stat format") + 2..];
    let fields: Vec<&str> = rest.split(' ').collect();
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    ticks as f64 / hz
}

/// A TLS server on 127.0.0.1 answering "ok", offering `alpn`; the CA file that trusts it.
fn tls_server(rt: &tokio::runtime::Runtime, alpn: &[&[u8]]) -> (String, String) {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let dir = unique("bench-pki");
    std::fs::create_dir_all(&dir).unwrap();
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let ca_file = dir.join("ca.pem");
    std::fs::write(&ca_file, ca_cert.pem()).unwrap();
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["127.0.0.1".to_string()])
        .unwrap()
        .signed_by(&key, &issuer)
        .unwrap();
    let mut config = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(
            vec![cert.der().clone()],
            rustls::pki_types::PrivateKeyDer::try_from(key.serialize_der()).unwrap(),
        )
        .unwrap();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let addr = listener.local_addr().unwrap();
    rt.spawn(async move {
        let listener = tokio::net::TcpListener::from_std(listener).unwrap();
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                continue;
            };
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let service = service_fn(|_req| async {
                    Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"ok"))))
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tls), service)
                    .await;
            });
        }
    });
    (
        format!("https://{addr}"),
        ca_file.to_string_lossy().into_owned(),
    )
}

/// CPU seconds of the proxy per request over [`REQUESTS`] sequential keep-alive requests.
async fn cpu_per_request(upstream: &str, ca_file: &str, pooled: bool) -> f64 {
    let pool = if pooled {
        ""
    } else {
        "[upstream]\npool_max_idle = 0\n"
    };
    let config = format!(
        "{LISTEN}\n{pool}[log]\naccess = false\n{}\n[tls]\nca_file = {ca_file:?}\n",
        arm("main", upstream, 1, &[])
    );
    let proxy = Proxy::start(&config);
    let client = client();
    let url = proxy.url("/bench");
    for _ in 0..200 {
        assert_eq!(get(&client, &url, &[]).await.status, 200);
    }
    let before = cpu_seconds(proxy.pid());
    let start = Instant::now();
    for _ in 0..REQUESTS {
        let reply = get(&client, &url, &[]).await;
        assert_eq!(reply.status, 200, "{}", reply.text());
    }
    let wall = start.elapsed();
    let cpu = cpu_seconds(proxy.pid()) - before;
    eprintln!(
        "  {REQUESTS} requests in {wall:.2?}: proxy CPU {:.1} ms",
        cpu * 1e3
    );
    cpu / REQUESTS as f64
}

fn main() {
    let servers = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let (h1_url, ca) = tls_server(&servers, &[b"http/1.1"]);
    let (h2_url, ca2) = tls_server(&servers, &[b"h2", b"http/1.1"]);
    let plain = Upstream::start("plain");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let us = |s: f64| s * 1e6;
    rt.block_on(async {
        println!(
            "CPU per request of the driftguard process, {REQUESTS} sequential keep-alive requests:"
        );
        let http = cpu_per_request(&plain.url(), &ca, true).await;
        println!("1. http arm, pooled:                {:6.1} µs", us(http));
        let https = cpu_per_request(&h1_url, &ca, true).await;
        println!("2. https arm (HTTP/1.1), pooled:    {:6.1} µs", us(https));
        let h2 = cpu_per_request(&h2_url, &ca2, true).await;
        println!("3. https arm (h2):                  {:6.1} µs", us(h2));
        let http_new = cpu_per_request(&plain.url(), &ca, false).await;
        println!(
            "4. http arm, a connection each:     {:6.1} µs",
            us(http_new)
        );
        let https_new = cpu_per_request(&h1_url, &ca, false).await;
        println!(
            "5. https arm, a handshake each:     {:6.1} µs",
            us(https_new)
        );
        println!(
            "https over http, pooled: +{:.1} µs per request ({:+.0} %); h2: +{:.1} µs ({:+.0} %)",
            us(https - http),
            (https / http - 1.0) * 100.0,
            us(h2 - http),
            (h2 / http - 1.0) * 100.0
        );
        println!(
            "one TLS handshake (ECDSA P-256, TLS 1.3), proxy side: {:.1} µs of CPU",
            us(https_new - http_new)
        );
    });
}
