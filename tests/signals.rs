//! The quality-signals stage end to end (SPEC §1 and §3): real upstreams answering RAG JSON, OpenAI chat
//! completions and SSE streams through the driftguard binary; ΔS, coverage, λ, tool loops and tokens on
//! `/metrics`, `/status` and the access log; the `openai` embedder against a test `/v1/embeddings`; the
//! bounded queue under a flood; skips and the tee cap; `driftguard eval --gold`.
//!
//! Expected signal values are computed with the library's own embedder and measures from the texts the
//! test upstream sent, so a wrong extraction (the system prompt taken as the question, a lost SSE delta)
//! shows up as a different number, not just as "some evaluation happened".

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::rag::*;
use common::*;
use driftguard::signals::embed::{Embedder, Hashed};
use driftguard::signals::measure;
use http::StatusCode;
use serde_json::{json, Value};

/// The signals the hashed embedder gives these texts, on its calibrated scale as the workers record
/// them: (qr, ra, max, coverage).
fn hashed_signals(question: &str, chunks: &[&str], answer: &str) -> (f64, f64, f64, Option<f64>) {
    let mut texts = vec![question];
    texts.extend_from_slice(chunks);
    texts.push(answer);
    let vectors = Hashed.embed_batch(&texts).expect("hashed embedder");
    let (q, rest) = vectors.split_first().unwrap();
    let (a, c) = rest.split_last().unwrap();
    let ds = measure::delta_s_probes(q, c, a).calibrated(|probe, raw| Hashed.calibrate(probe, raw));
    (ds.qr, ds.ra, ds.max, measure::coverage(answer, chunks))
}

// ================================================================================================
// Config and scraping helpers
// ================================================================================================

/// A config with `signals` (the `[signals]` tables' text) and one `[[arms]]` per (name, upstream).
/// `rules.dry_run` keeps a rule engine from rolling back the bad arm in the middle of a test.
fn config(signals: &str, arms: &[(&str, String)]) -> String {
    let mut text =
        format!("{LISTEN}\n[pins]\nBUILD_ID = \"b-1\"\n\n[rules]\ndry_run = true\n\n{signals}\n");
    for (name, upstream) in arms {
        text.push_str(&arm(name, upstream, 1, &[("MODEL_VER", "m-1")]));
        text.push('\n');
    }
    text
}

fn m(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> f64 {
    metric(samples, name, labels).unwrap_or(0.0)
}

fn lambda_counts(samples: &[Sample], arm: &str) -> BTreeMap<String, f64> {
    ["convergent", "recursive", "divergent", "chaotic"]
        .iter()
        .map(|s| {
            (
                s.to_string(),
                m(
                    samples,
                    "driftguard_lambda_total",
                    &[("arm", arm), ("state", s)],
                ),
            )
        })
        .collect()
}

/// The `"event":"signals"` access-log line of a request, once it is there.
async fn signals_line(proxy: &Proxy, request_id: &str) -> Value {
    proxy
        .wait_log(&format!("signals line of {request_id}"), |v| {
            v["target"] == "driftguard::access"
                && v["event"] == "signals"
                && v["request_id"] == request_id
        })
        .await
}

fn f(v: &Value, key: &str) -> f64 {
    v[key]
        .as_f64()
        .unwrap_or_else(|| panic!("no number {key} in {v}"))
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() < 1e-6
}

// ================================================================================================
// 1. Grounded vs off-topic arms
// ================================================================================================

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grounded_and_off_topic_arms_are_told_apart() {
    let grounded = rag_service("grounded", false);
    let off = rag_service("off-topic", true);
    let proxy = Proxy::start(&config(
        "[signals]\nsample = 1.0\nworkers = 1\n",
        &[("grounded", grounded.url()), ("drifted", off.url())],
    ));
    let client = client();

    const N: usize = 80;
    let mut served: BTreeMap<String, usize> = BTreeMap::new();
    for i in 0..N {
        let t = &TOPICS[i % TOPICS.len()];
        let reply = post_json(
            &client,
            &proxy.url("/v1/ask"),
            &json!({"question": t.question, "top_k": 2}),
            &[],
        )
        .await;
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
        let body = reply.json();
        assert!(body["answer"].is_string(), "answer intact: {body}");
        *served
            .entry(reply.header("x-driftguard-arm").expect("arm header"))
            .or_default() += 1;
    }
    let n_grounded = served.get("grounded").copied().unwrap_or(0);
    let n_drifted = served.get("drifted").copied().unwrap_or(0);
    assert_eq!(n_grounded + n_drifted, N, "{served:?}");
    assert!(
        n_grounded >= 10 && n_drifted >= 10,
        "both arms served: {served:?}"
    );

    wait_metric(
        &client,
        &proxy,
        "driftguard_evaluations_total",
        &[("arm", "grounded")],
        WAIT,
        |v| v >= n_grounded as f64,
    )
    .await;
    let samples = wait_metric(
        &client,
        &proxy,
        "driftguard_evaluations_total",
        &[("arm", "drifted")],
        WAIT,
        |v| v >= n_drifted as f64,
    )
    .await;
    let (text, _) = scrape(&client, &proxy).await;
    let ev = |arm| m(&samples, "driftguard_evaluations_total", &[("arm", arm)]);
    assert_eq!(
        ev("grounded"),
        n_grounded as f64,
        "exactly one evaluation per response"
    );
    assert_eq!(
        ev("drifted"),
        n_drifted as f64,
        "exactly one evaluation per response"
    );
    assert_eq!(m(&samples, "driftguard_eval_dropped_total", &[]), 0.0);

    let q = |arm: &str, probe: &str, quantile: &str| {
        metric(
            &samples,
            "driftguard_semantic_drift_quantile",
            &[("arm", arm), ("probe", probe), ("quantile", quantile)],
        )
        .unwrap_or_else(|| panic!("no ΔS {probe} {quantile} for {arm} in\n{text}"))
    };
    let cov = |arm: &str| {
        metric(&samples, "driftguard_coverage_mean", &[("arm", arm)])
            .unwrap_or_else(|| panic!("no coverage_mean for {arm} in\n{text}"))
    };
    let (g_ra, d_ra) = (q("grounded", "ra", "0.5"), q("drifted", "ra", "0.5"));
    let (g_max, d_max) = (q("grounded", "max", "0.5"), q("drifted", "max", "0.5"));
    let (g_cov, d_cov) = (cov("grounded"), cov("drifted"));
    eprintln!(
        "grounded: ra p50 {g_ra:.3} max p50 {g_max:.3} coverage {g_cov:.3}; \
         drifted: ra p50 {d_ra:.3} max p50 {d_max:.3} coverage {d_cov:.3}"
    );
    assert!(g_cov >= 0.8, "grounded coverage_mean {g_cov}");
    assert!(d_cov <= 0.2, "off-topic coverage_mean {d_cov}");
    assert!(g_ra <= 0.5, "grounded ΔS ra p50 {g_ra}");
    assert!(d_max >= 0.8, "off-topic ΔS max p50 {d_max}");
    assert!(
        d_ra >= g_ra + 0.3,
        "off-topic ra p50 {d_ra} vs grounded {g_ra}"
    );
    assert!(
        d_max > g_max,
        "off-topic max p50 {d_max} vs grounded {g_max}"
    );
    for arm in ["grounded", "drifted"] {
        for probe in ["qr", "ra", "max"] {
            for quantile in ["0.5", "0.95", "0.99"] {
                let v = q(arm, probe, quantile);
                assert!(
                    (0.0..=1.0).contains(&v),
                    "ΔS {arm} {probe} {quantile} = {v} outside [0, 1]"
                );
            }
        }
    }

    // The histograms count every evaluation, per probe; λ states add up to the evaluations.
    for (arm, n) in [("grounded", n_grounded), ("drifted", n_drifted)] {
        for probe in ["qr", "ra", "max"] {
            assert_eq!(
                m(
                    &samples,
                    "driftguard_semantic_drift_count",
                    &[("arm", arm), ("probe", probe)]
                ),
                n as f64,
                "semantic_drift_count {arm} {probe}"
            );
        }
        assert_eq!(
            m(&samples, "driftguard_coverage_count", &[("arm", arm)]),
            n as f64
        );
        let lambda: f64 = lambda_counts(&samples, arm).values().sum();
        assert_eq!(lambda, n as f64, "λ states of {arm}");
        assert_eq!(
            m(
                &samples,
                "driftguard_tokens_total",
                &[("arm", arm), ("kind", "prompt")]
            ),
            (n as u64 * PROMPT_TOKENS) as f64
        );
        assert_eq!(
            m(
                &samples,
                "driftguard_tokens_total",
                &[("arm", arm), ("kind", "completion")]
            ),
            (n as u64 * COMPLETION_TOKENS) as f64
        );
        assert!(metric(&samples, "driftguard_lambda_flip_rate", &[("arm", arm)]).is_some());
    }

    // /status shows the same per arm.
    let status = get(&client, &proxy.admin_url("/status"), &[]).await.json();
    let arms = status["arms"].as_array().expect("arms");
    for (arm, n, cov_ok) in [
        ("grounded", n_grounded, (0.8..=1.0)),
        ("drifted", n_drifted, (0.0..=0.2)),
    ] {
        let a = arms
            .iter()
            .find(|a| a["name"] == arm)
            .expect("arm in /status");
        let s = &a["window"]["signals"];
        assert_eq!(s["evaluated"], n as u64, "{s}");
        let c = s["coverage_mean"].as_f64().expect("coverage_mean");
        assert!(cov_ok.contains(&c), "{arm} coverage_mean {c}");
        assert!(s["delta_s"]["p50"].as_f64().is_some(), "{s}");
        assert!(s["delta_s"]["p95"].as_f64().is_some(), "{s}");
        assert!(s["lambda_flip_rate"].as_f64().is_some(), "{s}");
    }
    let s = |arm: &str| {
        arms.iter().find(|a| a["name"] == arm).unwrap()["window"]["signals"]["delta_s"]["p50"]
            .as_f64()
            .unwrap()
    };
    assert!(
        s("drifted") > s("grounded"),
        "/status ΔS p50 drifted > grounded"
    );
}

// ================================================================================================
// 2. SSE streams
// ================================================================================================

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sse_streamed_answers_are_evaluated_with_their_usage() {
    let up = rag_service("stream", false);
    let proxy = Proxy::start(&config("[signals]\nsample = 1.0\n", &[("main", up.url())]));
    let client = client();

    const N: usize = 8;
    for i in 0..N {
        let t = &TOPICS[i % TOPICS.len()];
        let id = format!("sse-{i}");
        let reply = post_json(
            &client,
            &proxy.url("/v1/chat/completions"),
            &json!({"model": "m-1", "stream": true, "messages": [
                {"role": "system", "content": "Answer from the provided context only."},
                {"role": "user", "content": t.question}]}),
            &[("x-request-id", &id), ("accept", "text/event-stream")],
        )
        .await;
        assert_eq!(reply.status, StatusCode::OK);
        assert_eq!(
            reply.header("content-type").as_deref(),
            Some("text/event-stream")
        );
        let expected = Canned::sse(&sse_payloads(t, t.grounded)).concatenated();
        assert_eq!(
            reply.body, expected,
            "the stream reaches the client unchanged"
        );
    }
    // Prompt and completion tokens come from the final usage event.
    let samples = wait_metrics(
        &client,
        &proxy,
        WAIT,
        &[
            ("driftguard_evaluations_total", &[("arm", "main")], N as f64),
            (
                "driftguard_tokens_total",
                &[("arm", "main"), ("kind", "prompt")],
                (N as u64 * SSE_PROMPT_TOKENS) as f64,
            ),
            (
                "driftguard_tokens_total",
                &[("arm", "main"), ("kind", "completion")],
                (N as u64 * SSE_COMPLETION_TOKENS) as f64,
            ),
            ("driftguard_coverage_count", &[("arm", "main")], N as f64),
        ],
    )
    .await;
    let coverage = m(&samples, "driftguard_coverage_mean", &[("arm", "main")]);
    assert!(coverage >= 0.8, "coverage of grounded streams {coverage}");

    // The answer is the concatenated deltas, the chunks come from the last event: the numbers match
    // what the same embedder gives the texts the upstream streamed.
    let t = &TOPICS[0];
    let line = signals_line(&proxy, "sse-0").await;
    let (qr, ra, max, cov) = hashed_signals(t.question, &t.chunks, t.grounded);
    assert!(close(f(&line, "delta_s_qr"), qr), "qr {line} vs {qr}");
    assert!(close(f(&line, "delta_s_ra"), ra), "ra {line} vs {ra}");
    assert!(close(f(&line, "delta_s"), max), "max {line} vs {max}");
    assert!(
        close(f(&line, "coverage"), cov.unwrap()),
        "coverage {line} vs {cov:?}"
    );
    assert_eq!(line["prompt_tokens"], SSE_PROMPT_TOKENS, "{line}");
    assert_eq!(line["completion_tokens"], SSE_COMPLETION_TOKENS, "{line}");
}

// ================================================================================================
// 3. OpenAI chat request and completion
// ================================================================================================

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openai_chat_question_is_the_last_user_message() {
    let up = rag_service("chat", false);
    let proxy = Proxy::start(&config("[signals]\nsample = 1.0\n", &[("main", up.url())]));
    let client = client();

    let t = &TOPICS[1];
    let system = "You are a helpful support assistant for an online billing product.";
    let earlier = "Hi, I have a question about billing.";
    let reply = post_json(
        &client,
        &proxy.url("/v1/chat/completions"),
        &json!({"model": "m-1", "temperature": 0, "messages": [
            {"role": "system", "content": system},
            {"role": "user", "content": earlier},
            {"role": "assistant", "content": "Sure, what would you like to know?"},
            {"role": "user", "content": t.question}]}),
        &[("x-request-id", "chat-1")],
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.json()["choices"][0]["message"]["content"], t.grounded);

    let line = signals_line(&proxy, "chat-1").await;
    let (qr, ra, max, cov) = hashed_signals(t.question, &t.chunks, t.grounded);
    let (qr_system, ..) = hashed_signals(system, &t.chunks, t.grounded);
    let (qr_earlier, ..) = hashed_signals(earlier, &t.chunks, t.grounded);
    assert!(
        !close(qr, qr_system) && !close(qr, qr_earlier),
        "the fixture tells the messages apart"
    );
    assert!(
        close(f(&line, "delta_s_qr"), qr),
        "question = last user message: {line}, want qr {qr}"
    );
    assert!(
        close(f(&line, "delta_s_ra"), ra),
        "answer = choices[0].message.content: {line}, want {ra}"
    );
    assert!(close(f(&line, "delta_s"), max), "{line}");
    assert!(close(f(&line, "coverage"), cov.unwrap()), "{line}");
    assert!(f(&line, "coverage") >= 0.8, "{line}");

    let samples = wait_metric(
        &client,
        &proxy,
        "driftguard_evaluations_total",
        &[("arm", "main")],
        WAIT,
        |v| v >= 1.0,
    )
    .await;
    assert_eq!(
        m(&samples, "driftguard_evaluations_total", &[("arm", "main")]),
        1.0
    );
    assert_eq!(
        m(
            &samples,
            "driftguard_tokens_total",
            &[("arm", "main"), ("kind", "prompt")]
        ),
        PROMPT_TOKENS as f64
    );
}

// ================================================================================================
// 4. The openai embedder
// ================================================================================================

/// 8-dim embeddings: e1 for a text with an off-topic marker word, e0 for every other text. Grounded
/// exchanges then have ΔS exactly 0 and off-topic ones ΔS ra exactly 1 — values the hashed embedder
/// never gives, so they prove whose vectors were used.
fn embedding_of(text: &str) -> Vec<f32> {
    let lower = text.to_lowercase();
    let mut v = vec![0.0f32; 8];
    if OFF_TOPIC_MARKERS.iter().any(|w| lower.contains(w)) {
        v[1] = 1.0;
    } else {
        v[0] = 1.0;
    }
    v
}

fn embeddings_service(name: &str, delay: Duration) -> Scripted {
    Scripted::start(name, move |req, body| {
        if req.method != http::Method::POST || req.path != "/v1/embeddings" {
            return Canned::json(&json!({"error": "not found"})).status(StatusCode::NOT_FOUND);
        }
        let parsed: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
        let inputs: Vec<String> = match &parsed["input"] {
            Value::Array(items) => items
                .iter()
                .filter_map(|i| i.as_str().map(String::from))
                .collect(),
            Value::String(s) => vec![s.clone()],
            _ => Vec::new(),
        };
        let data: Vec<Value> = inputs
            .iter()
            .enumerate()
            .map(|(i, text)| json!({"object": "embedding", "index": i, "embedding": embedding_of(text)}))
            .collect();
        Canned::json(
            &json!({"object": "list", "model": parsed["model"], "data": data,
            "usage": {"prompt_tokens": 1, "total_tokens": 1}}),
        )
        .delay(delay)
    })
}

fn openai_signals(url: &str, extra: &str) -> String {
    format!(
        "[signals]\nsample = 1.0\nworkers = 1\nembedder = \"openai\"\n{extra}\n\
         [signals.openai]\nurl = \"{url}/v1/embeddings\"\nmodel = \"test-embed-v1\"\ntimeout = \"5s\"\n\
         cache_entries = 1000\napi_key_env = \"DRIFTGUARD_TEST_EMBED_KEY\"\n"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openai_embedder_is_batched_cached_and_its_outage_spares_traffic() {
    let up = rag_service("rag", false);
    let embed = embeddings_service("embed", Duration::ZERO);
    let proxy = Proxy::start_with_env(
        &config(&openai_signals(&embed.url(), ""), &[("main", up.url())]),
        &[("DRIFTGUARD_TEST_EMBED_KEY", "sk-test-123")],
    );
    let client = client();

    // Two topics asked four times each, and one off-topic answer.
    let mut ids = Vec::new();
    for i in 0..8 {
        let t = &TOPICS[i % 2];
        let id = format!("emb-{i}");
        let reply = post_json(
            &client,
            &proxy.url("/v1/ask"),
            &json!({"question": t.question}),
            &[("x-request-id", &id)],
        )
        .await;
        assert_eq!(reply.status, StatusCode::OK);
        ids.push(id);
    }
    let reply = post_json(
        &client,
        &proxy.url("/v1/ask?style=off"),
        &json!({"question": TOPICS[0].question}),
        &[("x-request-id", "emb-off")],
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK);
    wait_metric(
        &client,
        &proxy,
        "driftguard_evaluations_total",
        &[("arm", "main")],
        WAIT,
        |v| v >= 9.0,
    )
    .await;

    // Batches with the model, each distinct text sent once across all requests (the rest from the cache).
    let calls = embed.exchanges();
    assert!(!calls.is_empty(), "the embeddings endpoint was called");
    let mut seen: Vec<String> = Vec::new();
    for call in &calls {
        let body = call.json();
        assert_eq!(body["model"], "test-embed-v1", "{body}");
        let input = body["input"]
            .as_array()
            .unwrap_or_else(|| panic!("input is a batch: {body}"));
        assert!(!input.is_empty());
        seen.extend(
            input
                .iter()
                .map(|t| t.as_str().expect("text input").to_string()),
        );
        assert_eq!(
            call.request.header("authorization").as_deref(),
            Some("Bearer sk-test-123"),
            "api_key_env is sent as a bearer token"
        );
    }
    let distinct: BTreeSet<&String> = seen.iter().collect();
    assert_eq!(
        distinct.len(),
        seen.len(),
        "a text was embedded twice (cache miss): {seen:#?}"
    );
    let mut expected: BTreeSet<String> = BTreeSet::new();
    for t in &TOPICS[..2] {
        expected.insert(t.question.to_string());
        expected.extend(t.chunks.iter().map(|c| c.to_string()));
        expected.insert(t.grounded.to_string());
    }
    expected.insert(TOPICS[0].off_topic.to_string());
    let seen_set: BTreeSet<String> = seen.iter().cloned().collect();
    assert_eq!(
        seen_set, expected,
        "exactly the question, chunks and answers were embedded"
    );
    assert!(
        calls.len() < 9,
        "texts of one evaluation go in one batch: {} calls for 9 evaluations",
        calls.len()
    );

    // The endpoint's vectors are the ones measured.
    for id in &ids {
        let line = signals_line(&proxy, id).await;
        assert_eq!(
            f(&line, "delta_s"),
            0.0,
            "grounded with the test vectors: {line}"
        );
    }
    let line = signals_line(&proxy, "emb-off").await;
    assert_eq!(f(&line, "delta_s_qr"), 0.0, "{line}");
    assert_eq!(f(&line, "delta_s_ra"), 1.0, "{line}");
    let status = get(&client, &proxy.admin_url("/status"), &[]).await.json();
    assert_eq!(status["signals"]["embedder"], "openai", "{status}");

    // The endpoint goes away: new texts cannot be embedded, every request still succeeds.
    drop(embed);
    let (_, before) = scrape(&client, &proxy).await;
    let errors_before = m(
        &before,
        "driftguard_eval_errors_total",
        &[("stage", "embedder")],
    );
    for i in 0..5 {
        let t = &TOPICS[2 + i % 2];
        let reply = post_json(
            &client,
            &proxy.url("/v1/ask"),
            &json!({"question": format!("{} (ticket {i})", t.question)}),
            &[],
        )
        .await;
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
        assert_eq!(reply.json()["answer"], t.grounded);
    }
    wait_metrics(
        &client,
        &proxy,
        WAIT,
        &[
            (
                "driftguard_eval_errors_total",
                &[("stage", "embedder")],
                errors_before + 5.0,
            ),
            ("driftguard_evaluations_total", &[("arm", "main")], 9.0),
            (
                "driftguard_requests_total",
                &[("arm", "main"), ("class", "2xx")],
                14.0,
            ),
        ],
    )
    .await;
}

/// ΔS is clamped to [0, 1] (SPEC §3), so its quantiles are too — on `/status` and on `/metrics` alike.
/// With the test vectors every off-topic exchange has ΔS ra exactly 1.0, the top of the range.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delta_s_quantiles_stay_within_0_and_1() {
    let up = rag_service("rag", true);
    let embed = embeddings_service("embed", Duration::ZERO);
    let proxy = Proxy::start(&config(
        &openai_signals(&embed.url(), ""),
        &[("main", up.url())],
    ));
    let client = client();
    for t in &TOPICS {
        let r = post_json(
            &client,
            &proxy.url("/v1/ask"),
            &json!({"question": t.question}),
            &[],
        )
        .await;
        assert_eq!(r.status, StatusCode::OK);
    }
    // Every evaluation measured ΔS ra = 1.0 exactly.
    let samples = wait_metrics(
        &client,
        &proxy,
        WAIT,
        &[
            ("driftguard_evaluations_total", &[("arm", "main")], 4.0),
            (
                "driftguard_semantic_drift_count",
                &[("arm", "main"), ("probe", "ra")],
                4.0,
            ),
            (
                "driftguard_semantic_drift_sum",
                &[("arm", "main"), ("probe", "ra")],
                4.0,
            ),
        ],
    )
    .await;
    let status = get(&client, &proxy.admin_url("/status"), &[]).await.json();
    let ra = &status["arms"][0]["window"]["signals"]["delta_s_ra"];
    for p in ["p50", "p95"] {
        let v = ra[p].as_f64().expect("ΔS ra quantile on /status");
        assert!((0.99..=1.0).contains(&v), "/status ΔS ra {p} = {v}");
    }
    let mut over = Vec::new();
    for probe in ["ra", "max"] {
        for quantile in ["0.5", "0.95", "0.99"] {
            let v = metric(
                &samples,
                "driftguard_semantic_drift_quantile",
                &[("arm", "main"), ("probe", probe), ("quantile", quantile)],
            )
            .expect("ΔS quantile on /metrics");
            assert!(v >= 0.99, "{probe} {quantile} = {v}");
            if v > 1.0 {
                over.push(format!("driftguard_semantic_drift_quantile{{probe=\"{probe}\",quantile=\"{quantile}\"}} = {v}"));
            }
        }
    }
    assert!(
        over.is_empty(),
        "ΔS quantiles above 1 on /metrics (/status clamps them):\n{}",
        over.join("\n")
    );
}

// ================================================================================================
// 5. A full queue drops samples, never requests
// ================================================================================================

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_queue_drops_samples_without_slowing_requests() {
    const EMBED_DELAY: Duration = Duration::from_millis(200);
    const N: usize = 200;
    const CONCURRENCY: usize = 20;
    let up = rag_service("rag", false);
    let embed = embeddings_service("slow-embed", EMBED_DELAY);
    let proxy = Proxy::start(&config(
        &openai_signals(&embed.url(), "queue = 1"),
        &[("main", up.url())],
    ));
    let client = client();

    let started = Instant::now();
    let mut tasks = Vec::new();
    for worker in 0..CONCURRENCY {
        let client = client.clone();
        let url = proxy.url("/v1/ask");
        tasks.push(tokio::spawn(async move {
            let mut slowest = Duration::ZERO;
            for k in 0..N / CONCURRENCY {
                let i = worker * (N / CONCURRENCY) + k;
                let t = &TOPICS[i % TOPICS.len()];
                // A new question every time: each evaluation needs one slow embedding call.
                let body = json!({"question": format!("{} (ticket {i})", t.question)});
                let one = Instant::now();
                let reply = post_json(&client, &url, &body, &[]).await;
                slowest = slowest.max(one.elapsed());
                assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
                assert_eq!(reply.json()["answer"], t.grounded);
            }
            slowest
        }));
    }
    let mut slowest = Duration::ZERO;
    for task in tasks {
        slowest = slowest.max(
            within(WAIT * 2, "flood client", task)
                .await
                .expect("client task"),
        );
    }
    let elapsed = started.elapsed();
    eprintln!("{N} requests in {elapsed:?}, slowest {slowest:?}");
    let serial = EMBED_DELAY * N as u32;
    assert!(
        elapsed < serial / 4,
        "{N} requests took {elapsed:?}: evaluation ({serial:?} if serial) must not hold requests"
    );
    assert!(
        slowest < Duration::from_secs(5),
        "slowest request {slowest:?}"
    );

    // Everything submitted is accounted for: evaluated or dropped; the queue drains.
    wait_metric(
        &client,
        &proxy,
        "driftguard_eval_queue_depth",
        &[],
        WAIT,
        |v| v == 0.0,
    )
    .await;
    let deadline = Instant::now() + WAIT;
    let samples = loop {
        let (_, samples) = scrape(&client, &proxy).await;
        let done = m(&samples, "driftguard_evaluations_total", &[("arm", "main")])
            + m(&samples, "driftguard_eval_dropped_total", &[])
            + m(
                &samples,
                "driftguard_eval_errors_total",
                &[("stage", "embedder")],
            );
        if done >= N as f64 {
            break samples;
        }
        assert!(
            Instant::now() < deadline,
            "only {done} of {N} samples accounted for"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let evaluated = m(&samples, "driftguard_evaluations_total", &[("arm", "main")]);
    let dropped = m(&samples, "driftguard_eval_dropped_total", &[]);
    let errors = m(
        &samples,
        "driftguard_eval_errors_total",
        &[("stage", "embedder")],
    );
    eprintln!("evaluated {evaluated}, dropped {dropped}, errors {errors}");
    assert!(
        dropped > 0.0,
        "a queue of 1 behind a 200 ms embedder must drop under a flood"
    );
    assert_eq!(evaluated + dropped + errors, N as f64);
    assert_eq!(errors, 0.0);
    assert_eq!(m(&samples, "driftguard_eval_queue_depth", &[]), 0.0);
    assert_eq!(
        m(
            &samples,
            "driftguard_requests_total",
            &[("arm", "main"), ("class", "2xx")]
        ),
        N as f64
    );
    // Each evaluation made one (batched) call to the slow endpoint; dropped samples made none.
    assert_eq!(embed.request_count(), evaluated as usize);
    let status = get(&client, &proxy.admin_url("/status"), &[]).await.json();
    assert_eq!(status["signals"]["dropped"], dropped as u64, "{status}");
}

// ================================================================================================
// 6. Sessions, λ and tool loops
// ================================================================================================

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lambda_follows_the_session_series() {
    let up = rag_service("rag", false);
    let proxy = Proxy::start(&config(
        "[signals]\nsample = 1.0\nworkers = 1\nsession_header = \"x-session-id\"\n",
        &[("main", up.url())],
    ));
    let client = client();
    let t = &TOPICS[1];

    let ask = |id: String, style: &'static str, session: Option<&'static str>| {
        let client = client.clone();
        let url = proxy.url(&format!("/v1/ask?style={style}"));
        async move {
            let mut headers = vec![("x-request-id", id.as_str())];
            if let Some(s) = session {
                headers.push(("x-session-id", s));
            }
            let reply = post_json(&client, &url, &json!({"question": t.question}), &headers).await;
            assert_eq!(reply.status, StatusCode::OK);
        }
    };
    // A steady session (the same exchange four times), a swinging one (grounded, off, grounded, off)
    // and one request without a session.
    for i in 0..4 {
        ask(format!("steady-{i}"), "grounded", Some("s-steady")).await;
    }
    for (i, style) in ["grounded", "off", "grounded", "off"]
        .into_iter()
        .enumerate()
    {
        ask(format!("swing-{i}"), style, Some("s-swing")).await;
    }
    ask("alone".into(), "grounded", None).await;

    let (g_qr, g_ra, g_max, _) = hashed_signals(t.question, &t.chunks, t.grounded);
    let (_, _, o_max, _) = hashed_signals(t.question, &t.chunks, t.off_topic);
    assert!(
        o_max - g_max > 0.04,
        "fixture: off-topic ΔS {o_max} well above grounded {g_max}"
    );
    let first = driftguard::windows::LAMBDA_STATES[measure::lambda(g_qr, g_ra).index()];

    let mut states: BTreeMap<String, f64> = BTreeMap::new();
    let mut expect = |id: &str, want: &str, line: &Value| {
        assert_eq!(line["lambda"], want, "{id}: {line}");
        *states.entry(want.to_string()).or_default() += 1.0;
    };
    let expected = [
        ("steady-0", first),
        ("steady-1", "recursive"),
        ("steady-2", "recursive"),
        ("steady-3", "recursive"),
        ("swing-0", first),
        ("swing-1", "chaotic"),
        ("swing-2", "convergent"),
        ("swing-3", "chaotic"),
        ("alone", first),
    ];
    for (id, want) in expected {
        let line = signals_line(&proxy, id).await;
        expect(id, want, &line);
    }

    let samples = wait_metric(
        &client,
        &proxy,
        "driftguard_evaluations_total",
        &[("arm", "main")],
        WAIT,
        |v| v >= 9.0,
    )
    .await;
    let counts = lambda_counts(&samples, "main");
    for (state, n) in &counts {
        assert_eq!(
            *n,
            states.get(state).copied().unwrap_or(0.0),
            "lambda_total{{state={state}}}: {counts:?}"
        );
    }
    let flips = counts["divergent"] + counts["chaotic"];
    let rate = m(&samples, "driftguard_lambda_flip_rate", &[("arm", "main")]);
    assert!(
        close(rate, flips / 9.0),
        "lambda_flip_rate {rate} vs {flips}/9"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeated_tool_calls_count_as_tool_loops() {
    let up = rag_service("agent", false);
    let proxy = Proxy::start(&config(
        "[signals]\nsample = 1.0\nworkers = 1\n",
        &[("main", up.url())],
    ));
    let client = client();
    let body = json!({"model": "m-1", "messages": [{"role": "user", "content": "What is the refund policy?"}]});

    // The same call three times in one response: a loop.
    let r = post_json(&client, &proxy.url("/tools?kind=loop"), &body, &[]).await;
    assert_eq!(r.status, StatusCode::OK);
    let samples = wait_metric(
        &client,
        &proxy,
        "driftguard_tool_loops_total",
        &[("arm", "main")],
        WAIT,
        |v| v >= 1.0,
    )
    .await;
    assert_eq!(
        m(&samples, "driftguard_tool_loops_total", &[("arm", "main")]),
        1.0
    );

    // Three different calls: not a loop. One call in each of two responses of a session: not yet.
    let r = post_json(&client, &proxy.url("/tools?kind=distinct"), &body, &[]).await;
    assert_eq!(r.status, StatusCode::OK);
    for _ in 0..2 {
        let r = post_json(
            &client,
            &proxy.url("/tools?kind=once"),
            &body,
            &[("x-session-id", "agent-7")],
        )
        .await;
        assert_eq!(r.status, StatusCode::OK);
    }
    // A tool-calling turn has no answer: each is skipped for ΔS, yet its usage and calls count.
    wait_metrics(
        &client,
        &proxy,
        WAIT,
        &[
            (
                "driftguard_eval_skipped_total",
                &[("reason", "no_answer")],
                4.0,
            ),
            ("driftguard_tool_loops_total", &[("arm", "main")], 1.0),
            (
                "driftguard_tokens_total",
                &[("arm", "main"), ("kind", "prompt")],
                (4 * PROMPT_TOKENS) as f64,
            ),
        ],
    )
    .await;

    // The third consecutive response of the session with the same call: a loop.
    let r = post_json(
        &client,
        &proxy.url("/tools?kind=once"),
        &body,
        &[("x-session-id", "agent-7")],
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
    wait_metrics(
        &client,
        &proxy,
        WAIT,
        &[
            (
                "driftguard_eval_skipped_total",
                &[("reason", "no_answer")],
                5.0,
            ),
            ("driftguard_tool_loops_total", &[("arm", "main")], 2.0),
            ("driftguard_evaluations_total", &[("arm", "main")], 0.0),
        ],
    )
    .await;
    let status = get(&client, &proxy.admin_url("/status"), &[]).await.json();
    assert_eq!(
        status["arms"][0]["window"]["signals"]["tool_loops"], 2,
        "{status}"
    );
}

// ================================================================================================
// 7. Skips and the tee cap
// ================================================================================================

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unusable_samples_are_skipped_and_big_bodies_pass_whole() {
    const CAP: usize = 1024;
    let up = rag_service("rag", false);
    let proxy = Proxy::start(&config(
        &format!("[signals]\nsample = 1.0\nmax_body_bytes = {CAP}\n"),
        &[("main", up.url())],
    ));
    let client = client();
    let question = json!({"question": TOPICS[2].question});
    let skipped =
        |s: &[Sample], reason: &str| m(s, "driftguard_eval_skipped_total", &[("reason", reason)]);

    // A text response to a JSON question.
    let r = post_json(&client, &proxy.url("/plain"), &question, &[]).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.text(), "plain text, not JSON");
    let samples = wait_metric(
        &client,
        &proxy,
        "driftguard_eval_skipped_total",
        &[("reason", "response_not_json")],
        WAIT,
        |v| v >= 1.0,
    )
    .await;
    assert_eq!(skipped(&samples, "response_not_json"), 1.0);

    // A response past the cap: the copy stops (counted), the client gets every byte.
    let r = post_json(&client, &proxy.url("/big?n=65536"), &question, &[]).await;
    assert_eq!(r.status, StatusCode::OK);
    let want = big_body(65536);
    assert!(want.len() > 16 * CAP);
    assert_eq!(r.body.len(), want.len(), "whole body delivered");
    assert!(r.body == want, "body delivered intact");
    let samples = wait_metric(
        &client,
        &proxy,
        "driftguard_tee_truncated_total",
        &[("direction", "response")],
        WAIT,
        |v| v >= 1.0,
    )
    .await;
    assert_eq!(
        m(
            &samples,
            "driftguard_tee_truncated_total",
            &[("direction", "response")]
        ),
        1.0
    );
    assert_eq!(
        m(
            &samples,
            "driftguard_tee_truncated_total",
            &[("direction", "request")]
        ),
        0.0
    );

    // A request past the cap: counted for the request direction; the upstream got all of it.
    let long = format!(
        "{} {}",
        TOPICS[2].question,
        "Please explain in detail. ".repeat(100)
    );
    let r = post_json(
        &client,
        &proxy.url("/v1/ask"),
        &json!({"question": long}),
        &[],
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    let got = up.exchanges().last().expect("upstream saw it").json();
    assert_eq!(
        got["question"],
        long.as_str(),
        "request body forwarded whole"
    );

    // Error responses are not sampled at all.
    let r = post_json(
        &client,
        &proxy.url("/v1/ask"),
        &json!({"topic": "billing"}),
        &[],
    )
    .await;
    assert_eq!(
        r.status,
        StatusCode::BAD_REQUEST,
        "the test upstream refuses it; 4xx is not evaluated"
    );
    let r = post_json(&client, &proxy.url("/fail"), &question, &[]).await;
    assert_eq!(r.status, StatusCode::INTERNAL_SERVER_ERROR);

    let samples = wait_metric(
        &client,
        &proxy,
        "driftguard_tee_truncated_total",
        &[("direction", "request")],
        WAIT,
        |v| v >= 1.0,
    )
    .await;
    let samples = if skipped(&samples, "truncated") >= 2.0 {
        samples
    } else {
        wait_metric(
            &client,
            &proxy,
            "driftguard_eval_skipped_total",
            &[("reason", "truncated")],
            WAIT,
            |v| v >= 2.0,
        )
        .await
    };
    assert_eq!(
        skipped(&samples, "truncated"),
        2.0,
        "the cut response and the cut request"
    );
    assert_eq!(
        m(
            &samples,
            "driftguard_tee_truncated_total",
            &[("direction", "request")]
        ),
        1.0
    );
    assert_eq!(
        m(&samples, "driftguard_evaluations_total", &[("arm", "main")]),
        0.0
    );
    let all_skips: f64 = samples
        .iter()
        .filter(|s| s.name == "driftguard_eval_skipped_total")
        .map(|s| s.value)
        .sum();
    assert_eq!(
        all_skips, 3.0,
        "non-2xx responses are not sampled: {samples:?}"
    );

    // A 2xx JSON answer to a request without a question; then `query` as the question field.
    let r = post_json(
        &client,
        &proxy.url("/v1/ask?topic=0"),
        &json!({"input": "billing"}),
        &[],
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
    wait_metric(
        &client,
        &proxy,
        "driftguard_eval_skipped_total",
        &[("reason", "no_question")],
        WAIT,
        |v| v >= 1.0,
    )
    .await;
    let r = post_json(
        &client,
        &proxy.url("/v1/ask"),
        &json!({"query": TOPICS[0].question}),
        &[],
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
    let samples = wait_metric(
        &client,
        &proxy,
        "driftguard_evaluations_total",
        &[("arm", "main")],
        WAIT,
        |v| v >= 1.0,
    )
    .await;
    assert_eq!(skipped(&samples, "no_question"), 1.0);
    assert_eq!(
        m(&samples, "driftguard_evaluations_total", &[("arm", "main")]),
        1.0
    );
}

// ================================================================================================
// 8. Access log
// ================================================================================================

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signals_log_line_follows_the_access_line_with_the_same_request_id() {
    let up = rag_service("rag", false);
    let proxy = Proxy::start(&config("[signals]\nsample = 1.0\n", &[("main", up.url())]));
    let client = client();

    // One request with the client's id, one with a generated id.
    let t = &TOPICS[3];
    let r = post_json(
        &client,
        &proxy.url("/v1/ask"),
        &json!({"question": t.question}),
        &[("x-request-id", "log-me-1")],
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
    let r2 = post_json(
        &client,
        &proxy.url("/v1/ask"),
        &json!({"question": t.question}),
        &[],
    )
    .await;
    let generated = r2.header("x-request-id").expect("generated request id");

    for id in ["log-me-1", generated.as_str()] {
        let line = signals_line(&proxy, id).await;
        let lines = proxy.access_log();
        let access: Vec<(usize, &Value)> = lines
            .iter()
            .enumerate()
            .filter(|(_, v)| v["request_id"] == id && v["event"] != "signals")
            .collect();
        let signals: Vec<(usize, &Value)> = lines
            .iter()
            .enumerate()
            .filter(|(_, v)| v["request_id"] == id && v["event"] == "signals")
            .collect();
        assert_eq!(access.len(), 1, "one access line for {id}: {lines:#?}");
        assert_eq!(signals.len(), 1, "one signals line for {id}: {lines:#?}");
        assert!(access[0].0 < signals[0].0, "the access line comes first");
        let a = access[0].1;
        assert_eq!(a["status"], 200);
        assert_eq!(a["arm"], "main");
        assert_eq!(line["arm"], "main", "{line}");
        for key in ["delta_s", "delta_s_qr", "delta_s_ra", "coverage"] {
            let v = f(&line, key);
            assert!((0.0..=1.0).contains(&v), "{key} = {v}: {line}");
        }
        assert!(
            ["convergent", "recursive", "divergent", "chaotic"]
                .contains(&line["lambda"].as_str().unwrap_or("")),
            "{line}"
        );
        let (qr, ra, _, cov) = hashed_signals(t.question, &t.chunks, t.grounded);
        assert!(
            close(f(&line, "delta_s_qr"), qr) && close(f(&line, "delta_s_ra"), ra),
            "{line}"
        );
        assert!(close(f(&line, "coverage"), cov.unwrap()), "{line}");
    }
}

// ================================================================================================
// 9. driftguard eval --gold
// ================================================================================================

struct Gold {
    dir: PathBuf,
    file: PathBuf,
}

impl Gold {
    /// Four items: plain questions (two with an anchor) and one with an explicit chat body.
    fn write() -> Gold {
        let dir = unique("gold-dir");
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("gold.jsonl");
        let lines = [
            json!({"question": TOPICS[0].question, "anchor": TOPICS[0].grounded}),
            json!({"question": TOPICS[1].question}),
            json!({"question": TOPICS[2].question, "anchor": TOPICS[2].chunks[0]}),
            json!({"question": TOPICS[3].question, "body": {"model": "m-1", "messages": [
                {"role": "system", "content": "Answer from the context."},
                {"role": "user", "content": TOPICS[3].question}]}}),
        ];
        let text: String = lines.iter().map(|l| format!("{l}\n")).collect();
        std::fs::write(&file, text).unwrap();
        Gold { dir, file }
    }

    fn eval(&self, url: &str, extra: &[&str]) -> (Option<i32>, String, String) {
        let mut args = vec![
            "eval",
            "--gold",
            self.file.to_str().unwrap(),
            "--url",
            url,
            "--timeout",
            "5s",
        ];
        args.extend_from_slice(extra);
        let out = run_cli(&args, &self.dir, Duration::from_secs(60));
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }
}

impl Drop for Gold {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn report(stdout: &str) -> Value {
    serde_json::from_str(stdout)
        .unwrap_or_else(|e| panic!("--json output is not JSON ({e}):\n{stdout}"))
}

#[test]
fn eval_gold_passes_a_grounded_service() {
    let up = rag_service("grounded", false);
    let gold = Gold::write();
    let url = format!("{}/v1/ask", up.url());

    let (code, stdout, stderr) = gold.eval(&url, &[]);
    assert_eq!(code, Some(0), "stdout:\n{stdout}\nstderr:\n{stderr}");
    assert!(stdout.contains("PASS"), "{stdout}");
    assert!(!stdout.contains("BREACH"), "{stdout}");
    assert!(stdout.contains("coverage"), "table header: {stdout}");
    for t in &TOPICS {
        let head: String = t.question.chars().take(30).collect();
        assert!(stdout.contains(&head), "a row per item ({head}): {stdout}");
    }
    assert!(stdout.contains("items 4"), "{stdout}");
    // The explicit body went out as written; the others as {"question": ..}.
    let bodies: Vec<Value> = up.exchanges().iter().map(Exchanged::json).collect();
    assert_eq!(bodies.len(), 4);
    assert_eq!(bodies[0], json!({"question": TOPICS[0].question}));
    assert_eq!(
        bodies[3]["messages"][1]["content"], TOPICS[3].question,
        "{}",
        bodies[3]
    );

    let (code, stdout, stderr) = gold.eval(
        &url,
        &["--json", "--max-delta-s", "0.99", "--min-coverage", "0.8"],
    );
    assert_eq!(code, Some(0), "stdout:\n{stdout}\nstderr:\n{stderr}");
    let r = report(&stdout);
    let totals = &r["totals"];
    assert_eq!(totals["items"], 4, "{r}");
    assert_eq!(totals["evaluated"], 4, "{r}");
    assert_eq!(totals["failed"], 0, "{r}");
    assert!(totals["coverage_mean"].as_f64().unwrap() >= 0.8, "{r}");
    assert!(
        totals["delta_s_mean"].as_f64().is_some() && totals["delta_s_p95"].as_f64().is_some(),
        "{r}"
    );
    let lambda_sum: u64 = totals["lambda"]
        .as_object()
        .expect("lambda")
        .values()
        .filter_map(Value::as_u64)
        .sum();
    assert_eq!(lambda_sum, 4, "{r}");
    assert_eq!(r["breaches"], json!([]), "{r}");
    // The anchor of item 1 is the answer itself: ra equals the live answer's ra.
    let t = &TOPICS[0];
    let (_, ra, _, _) = hashed_signals(t.question, &t.chunks, t.grounded);
    assert!(
        close(r["items"][0]["delta_s_ra"].as_f64().unwrap(), ra),
        "{r}"
    );
}

#[test]
fn eval_gold_breaches_on_an_off_topic_service() {
    let up = rag_service("off-topic", true);
    let gold = Gold::write();
    let url = format!("{}/v1/ask", up.url());

    // Anchors make ΔS ra independent of the answer; coverage still reads the (off-topic) answer.
    let (code, stdout, stderr) = gold.eval(&url, &["--min-coverage", "0.9"]);
    assert_eq!(code, Some(1), "stdout:\n{stdout}\nstderr:\n{stderr}");
    assert!(stdout.contains("BREACH"), "{stdout}");
    assert!(stdout.contains("coverage"), "{stdout}");

    let (code, stdout, stderr) = gold.eval(&url, &["--max-delta-s", "0.5"]);
    assert_eq!(code, Some(1), "stdout:\n{stdout}\nstderr:\n{stderr}");
    assert!(stdout.contains("BREACH"), "{stdout}");
    assert!(stdout.contains("ΔS"), "{stdout}");

    let (code, stdout, _) = gold.eval(
        &url,
        &["--json", "--max-delta-s", "0.5", "--min-coverage", "0.9"],
    );
    assert_eq!(code, Some(1));
    let r = report(&stdout);
    assert_eq!(r["totals"]["evaluated"], 4, "{r}");
    assert!(r["totals"]["coverage_mean"].as_f64().unwrap() <= 0.2, "{r}");
    assert!(r["totals"]["delta_s_p95"].as_f64().unwrap() > 0.5, "{r}");
    assert_eq!(r["breaches"].as_array().map(Vec::len), Some(2), "{r}");
}

#[test]
fn eval_gold_reports_failed_items_and_setup_errors() {
    let gold = Gold::write();
    let dead = format!("{}/v1/ask", closed_port_url());

    let (code, stdout, stderr) = gold.eval(&dead, &[]);
    assert_eq!(code, Some(1), "stdout:\n{stdout}\nstderr:\n{stderr}");
    assert!(stdout.contains("BREACH"), "{stdout}");
    let (code, stdout, _) = gold.eval(&dead, &["--json"]);
    assert_eq!(code, Some(1));
    let r = report(&stdout);
    assert_eq!(r["totals"]["items"], 4, "{r}");
    assert_eq!(r["totals"]["failed"], 4, "{r}");
    assert_eq!(r["totals"]["evaluated"], 0, "{r}");
    for item in r["items"].as_array().unwrap() {
        assert!(item["error"].is_string(), "{item}");
    }

    // A missing gold file is a setup error: exit 2.
    let missing = gold.dir.join("missing.jsonl");
    let out = run_cli(
        &["eval", "--gold", missing.to_str().unwrap(), "--url", &dead],
        &gold.dir,
        Duration::from_secs(30),
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "stderr:\n{stderr}");
    assert!(stderr.contains("missing.jsonl"), "{stderr}");
}

/// The audit through the sidecar: the sidecar evaluates the replayed answers too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eval_gold_through_the_sidecar() {
    let up = rag_service("rag", false);
    let proxy = Proxy::start(&config("[signals]\nsample = 1.0\n", &[("main", up.url())]));
    let client = client();
    let gold = Gold::write();
    let url = proxy.url("/v1/ask");
    let (code, stdout, stderr) = tokio::task::spawn_blocking(move || gold.eval(&url, &["--json"]))
        .await
        .unwrap();
    assert_eq!(code, Some(0), "stdout:\n{stdout}\nstderr:\n{stderr}");
    assert_eq!(report(&stdout)["totals"]["evaluated"], 4);
    let samples = wait_metric(
        &client,
        &proxy,
        "driftguard_evaluations_total",
        &[("arm", "main")],
        WAIT,
        |v| v >= 4.0,
    )
    .await;
    assert_eq!(
        m(&samples, "driftguard_evaluations_total", &[("arm", "main")]),
        4.0
    );
}

/// `signals.sample = 0` evaluates nothing and skips nothing; h2c requests are evaluated like HTTP/1.1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sampling_off_evaluates_nothing() {
    let up = rag_service("rag", false);
    let proxy = Proxy::start(&config("[signals]\nsample = 0.0\n", &[("main", up.url())]));
    let client = client();
    for t in &TOPICS {
        let r = post_json(
            &client,
            &proxy.url("/v1/ask"),
            &json!({"question": t.question}),
            &[],
        )
        .await;
        assert_eq!(r.status, StatusCode::OK);
    }
    let samples = wait_metric(
        &client,
        &proxy,
        "driftguard_requests_total",
        &[("arm", "main"), ("class", "2xx")],
        WAIT,
        |v| v >= 4.0,
    )
    .await;
    assert_eq!(
        m(&samples, "driftguard_evaluations_total", &[("arm", "main")]),
        0.0
    );
    let skips: f64 = samples
        .iter()
        .filter(|s| s.name == "driftguard_eval_skipped_total")
        .map(|s| s.value)
        .sum();
    assert_eq!(skips, 0.0);
    assert_eq!(proxy.count_log(|v| v["event"] == "signals"), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2c_requests_are_evaluated() {
    let up = rag_service("rag", false);
    let proxy = Proxy::start(&config("[signals]\nsample = 1.0\n", &[("main", up.url())]));
    let client = client();
    let h2: hyper_util::client::legacy::Client<_, http_body_util::Full<Bytes>> =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .http2_only(true)
            .build_http();
    let t = &TOPICS[1];
    for i in 0..3 {
        let req = http::Request::post(proxy.url("/v1/ask"))
            .header("content-type", "application/json")
            .header("x-request-id", format!("h2-{i}"))
            .body(http_body_util::Full::new(Bytes::from(
                json!({"question": t.question}).to_string(),
            )))
            .unwrap();
        let resp = within(WAIT, "h2c request", h2.request(req))
            .await
            .expect("h2c response");
        assert_eq!(resp.version(), http::Version::HTTP_2);
        assert_eq!(resp.status(), StatusCode::OK);
        let body = within(
            WAIT,
            "h2c body",
            http_body_util::BodyExt::collect(resp.into_body()),
        )
        .await
        .expect("h2c body")
        .to_bytes();
        let v: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["answer"], t.grounded);
    }
    let deadline = Instant::now() + WAIT;
    let samples = loop {
        let (_, samples) = scrape(&client, &proxy).await;
        let done = m(&samples, "driftguard_evaluations_total", &[("arm", "main")])
            + samples
                .iter()
                .filter(|s| s.name == "driftguard_eval_skipped_total")
                .map(|s| s.value)
                .sum::<f64>();
        if done >= 3.0 || Instant::now() > deadline {
            break samples;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    };
    let skips: Vec<(String, f64)> = samples
        .iter()
        .filter(|s| s.name == "driftguard_eval_skipped_total" && s.value > 0.0)
        .map(|s| (s.labels["reason"].clone(), s.value))
        .collect();
    assert_eq!(
        m(&samples, "driftguard_evaluations_total", &[("arm", "main")]),
        3.0,
        "h2c exchanges evaluated; skipped instead: {skips:?}"
    );
    let line = signals_line(&proxy, "h2-0").await;
    let (qr, ..) = hashed_signals(t.question, &t.chunks, t.grounded);
    assert!(close(f(&line, "delta_s_qr"), qr), "{line}");
}

/// A client that leaves in the middle of a stream: the sample is skipped as incomplete, not evaluated.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abandoned_stream_is_skipped_as_incomplete() {
    let up = Scripted::start("slow-stream", |_, _| {
        let t = &TOPICS[0];
        let mut payloads = sse_payloads(t, t.grounded);
        // A long tail of empty keep-alive deltas keeps the stream open for a while.
        let filler = json!({"choices": [{"index": 0, "delta": {"content": ""}}]}).to_string();
        payloads.splice(1..1, std::iter::repeat_n(filler, 40));
        Canned::sse(&payloads).gap(Duration::from_millis(50))
    });
    let proxy = Proxy::start(&config("[signals]\nsample = 1.0\n", &[("main", up.url())]));
    let client = client();
    let req = http::Request::post(proxy.url("/v1/chat/completions"))
        .header("content-type", "application/json")
        .body(full(
            json!({"stream": true, "messages": [{"role": "user", "content": TOPICS[0].question}]})
                .to_string(),
        ))
        .unwrap();
    let resp = within(WAIT, "stream head", client.request(req))
        .await
        .expect("stream");
    assert_eq!(resp.status(), StatusCode::OK);
    let mut body = resp.into_body();
    let mut got = String::new();
    read_until(&mut body, &mut got, WAIT, |s| s.contains("\n\n")).await;
    drop(body);

    let samples = wait_metric(
        &client,
        &proxy,
        "driftguard_eval_skipped_total",
        &[("reason", "incomplete")],
        WAIT,
        |v| v >= 1.0,
    )
    .await;
    assert_eq!(
        m(
            &samples,
            "driftguard_eval_skipped_total",
            &[("reason", "incomplete")]
        ),
        1.0
    );
    assert_eq!(
        m(&samples, "driftguard_evaluations_total", &[("arm", "main")]),
        0.0
    );
}

/// `POST /reload` swaps the embedder: the next evaluations use the new one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_swaps_the_embedder() {
    let up = rag_service("rag", false);
    let embed = embeddings_service("embed", Duration::ZERO);
    let proxy = Proxy::start(&config(
        "[signals]\nsample = 1.0\nworkers = 1\n",
        &[("main", up.url())],
    ));
    let client = client();
    let t = &TOPICS[2];
    let ask = |id: &'static str| {
        let client = client.clone();
        let url = proxy.url("/v1/ask");
        async move {
            let r = post_json(
                &client,
                &url,
                &json!({"question": t.question}),
                &[("x-request-id", id)],
            )
            .await;
            assert_eq!(r.status, StatusCode::OK);
        }
    };
    ask("before-reload").await;
    let line = signals_line(&proxy, "before-reload").await;
    let (qr, ..) = hashed_signals(t.question, &t.chunks, t.grounded);
    assert!(
        close(f(&line, "delta_s_qr"), qr),
        "hashed before the reload: {line}"
    );

    proxy.rewrite_config(&config(
        &openai_signals(&embed.url(), ""),
        &[("main", up.url())],
    ));
    let r = admin_post(&client, &proxy.admin_url("/reload"), "", None).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    let status = get(&client, &proxy.admin_url("/status"), &[]).await.json();
    assert_eq!(status["signals"]["embedder"], "openai", "{status}");

    ask("after-reload").await;
    let line = signals_line(&proxy, "after-reload").await;
    assert_eq!(
        f(&line, "delta_s"),
        0.0,
        "the test vectors after the reload: {line}"
    );
    assert!(embed.request_count() >= 1);
}

#[test]
fn eval_gold_uses_the_configured_embedder_and_rejects_bad_files() {
    let up = rag_service("grounded", false);
    let embed = embeddings_service("embed", Duration::ZERO);
    let gold = Gold::write();
    let url = format!("{}/v1/ask", up.url());

    // --config: the audit scores with the config's extractor and embedder.
    let config_path = gold.dir.join("signals-openai.toml");
    std::fs::write(
        &config_path,
        config(&openai_signals(&embed.url(), ""), &[("main", up.url())]),
    )
    .unwrap();
    let (code, stdout, stderr) =
        gold.eval(&url, &["--json", "--config", config_path.to_str().unwrap()]);
    assert_eq!(code, Some(0), "stdout:\n{stdout}\nstderr:\n{stderr}");
    let r = report(&stdout);
    assert_eq!(r["embedder"], "openai", "{r}");
    assert_eq!(r["totals"]["evaluated"], 4, "{r}");
    assert_eq!(
        r["totals"]["delta_s_p95"].as_f64(),
        Some(0.0),
        "the test vectors were used: {r}"
    );
    assert!(embed.request_count() >= 1);

    // A gold line that is not an item: setup error, exit 2, with the line number.
    let bad = gold.dir.join("bad.jsonl");
    std::fs::write(
        &bad,
        format!(
            "{}\n{{\"questio\": \"typo\"}}\n",
            json!({"question": TOPICS[0].question})
        ),
    )
    .unwrap();
    let out = run_cli(
        &["eval", "--gold", bad.to_str().unwrap(), "--url", &url],
        &gold.dir,
        Duration::from_secs(30),
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "stderr:\n{stderr}");
    assert!(stderr.contains("bad.jsonl:2"), "{stderr}");

    // A config that does not load: exit 2.
    let broken = gold.dir.join("broken.toml");
    std::fs::write(&broken, "[signals]\nembedder = \"nope\"\n").unwrap();
    let (code, _, stderr) = gold.eval(&url, &["--config", broken.to_str().unwrap()]);
    assert_eq!(code, Some(2), "stderr:\n{stderr}");
}

/// The fixtures do what the tests assume of them.
#[test]
fn fixtures_grounded_answers_are_covered_and_off_topic_ones_are_not() {
    for t in &TOPICS {
        let (_, g_ra, _, g_cov) = hashed_signals(t.question, &t.chunks, t.grounded);
        let (_, o_ra, o_max, o_cov) = hashed_signals(t.question, &t.chunks, t.off_topic);
        eprintln!("{}: grounded ra {g_ra:.3} cov {g_cov:?}; off ra {o_ra:.3} max {o_max:.3} cov {o_cov:?}", t.question);
        assert!(
            g_cov.unwrap() >= 0.9,
            "{}: grounded coverage {g_cov:?}",
            t.question
        );
        assert!(
            o_cov.unwrap() <= 0.1,
            "{}: off-topic coverage {o_cov:?}",
            t.question
        );
        assert!(OFF_TOPIC_MARKERS
            .iter()
            .any(|w| t.off_topic.to_lowercase().contains(w)));
        let texts = [t.question, t.chunks[0], t.chunks[1], t.grounded];
        assert!(texts.iter().all(|x| !OFF_TOPIC_MARKERS
            .iter()
            .any(|w| x.to_lowercase().contains(w))));
    }
}

/// A shutdown evaluates what is already queued (up to a short deadline) instead of dropping the signals
/// of requests it has served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_evaluates_queued_samples() {
    const N: usize = 5;
    let up = rag_service("rag", false);
    let embed = embeddings_service("slowish-embed", Duration::from_millis(100));
    let mut proxy = Proxy::start(&config(
        &openai_signals(&embed.url(), "queue = 64"),
        &[("main", up.url())],
    ));
    let client = client();
    for i in 0..N {
        let t = &TOPICS[i % TOPICS.len()];
        let body = json!({"question": format!("{} (shutdown {i})", t.question)});
        let reply = post_json(&client, &proxy.url("/v1/ask"), &body, &[]).await;
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    }
    // At 100 ms an embedding call, most samples are still queued when the signal lands.
    proxy.signal(libc::SIGTERM);
    let status = proxy
        .wait_exit(WAIT)
        .await
        .expect("driftguard exits after SIGTERM");
    assert!(status.success(), "exit status {status:?}");
    let signals = proxy
        .log_lines()
        .into_iter()
        .filter(|l| l["event"] == "signals")
        .count();
    assert_eq!(signals, N, "every served sample evaluated before exit");
    let stopped = proxy
        .log_lines()
        .into_iter()
        .find(|l| l["message"] == "stopped");
    assert_eq!(stopped.map(|l| l["evaluated"].clone()), Some(json!(true)));
}
