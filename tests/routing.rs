//! Arms (SPEC §6 "Arms"): weighted split, sticky users, and weight changes through the admin API.

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;

use common::*;
use http::StatusCode;

struct TwoArms {
    baseline: Upstream,
    canary: Upstream,
    proxy: Proxy,
}

fn two_arms(baseline_weight: u32, canary_weight: u32) -> TwoArms {
    let baseline = Upstream::start("baseline");
    let canary = Upstream::start("canary");
    let config = format!(
        "{LISTEN}\n[routing]\nsticky_header = \"x-user-id\"\n\n{}{}",
        arm(
            "baseline",
            &baseline.url(),
            baseline_weight,
            &[("MODEL_VER", "m-1")]
        ),
        arm(
            "canary",
            &canary.url(),
            canary_weight,
            &[("MODEL_VER", "m-2")]
        ),
    );
    let proxy = Proxy::start(&config);
    TwoArms {
        baseline,
        canary,
        proxy,
    }
}

/// Sends `n` requests from `tasks` concurrent tasks; returns how many each arm served. Checks that the
/// arm header, the pins and the upstream that answered agree.
async fn split(client: &HttpClient, url: &str, n: usize, tasks: usize) -> BTreeMap<String, usize> {
    let url = Arc::new(url.to_string());
    let mut joins = Vec::new();
    for t in 0..tasks {
        let client = client.clone();
        let url = url.clone();
        let count = n / tasks + usize::from(t < n % tasks);
        joins.push(tokio::spawn(async move {
            let mut arms = BTreeMap::new();
            for _ in 0..count {
                let reply = get(&client, &url, &[]).await;
                assert_eq!(reply.status, StatusCode::OK);
                let arm = reply.header("x-driftguard-arm").expect("arm header");
                assert_eq!(
                    reply.header("x-upstream").as_deref(),
                    Some(arm.as_str()),
                    "served by the arm it names"
                );
                let model = if arm == "baseline" { "m-1" } else { "m-2" };
                assert_eq!(
                    reply.header("x-pin-model-ver").as_deref(),
                    Some(model),
                    "pins of arm {arm}"
                );
                *arms.entry(arm).or_insert(0usize) += 1;
            }
            arms
        }));
    }
    let mut total = BTreeMap::new();
    for j in joins {
        for (arm, c) in within(WAIT, "split requests", j).await.expect("task") {
            *total.entry(arm).or_insert(0) += c;
        }
    }
    total
}

/// The arm each user lands on, checked to stay the same over `repeats` requests.
async fn sticky_arms(
    client: &HttpClient,
    proxy: &Proxy,
    users: usize,
    repeats: usize,
) -> BTreeMap<String, String> {
    let mut placed = BTreeMap::new();
    for u in 0..users {
        let user = format!("user-{u}");
        for r in 0..repeats {
            let reply = get(
                client,
                &proxy.url("/sticky"),
                &[("x-user-id", user.as_str())],
            )
            .await;
            assert_eq!(reply.status, StatusCode::OK);
            let arm = reply.header("x-driftguard-arm").expect("arm header");
            match placed.get(&user) {
                None => {
                    placed.insert(user.clone(), arm);
                }
                Some(first) => assert_eq!(first, &arm, "{user} moved arms on request {r}"),
            }
        }
    }
    placed
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weights_split_traffic_and_sticky_users_stay() {
    let t = two_arms(80, 20);
    let client = client();

    let n = 2000;
    let counts = split(&client, &t.proxy.url("/split"), n, 4).await;
    let canary = counts.get("canary").copied().unwrap_or(0);
    let share = canary as f64 / n as f64;
    // 20 % ± 5 points is more than 5 standard deviations of a binomial over 2000 draws.
    assert!(
        (0.15..=0.25).contains(&share),
        "canary share {share:.3} over {n} requests: {counts:?}"
    );
    assert_eq!(counts.values().sum::<usize>(), n);
    assert_eq!(t.baseline.request_count() + t.canary.request_count(), n);
    // Keep-alive pool to each upstream: a handful of connections, not one per request.
    let conns = t.baseline.connection_count() + t.canary.connection_count();
    assert!(
        conns <= 32,
        "{conns} upstream connections for {n} requests: the upstream pool is not reused"
    );

    let placed = sticky_arms(&client, &t.proxy, 100, 5).await;
    let on_canary = placed.values().filter(|a| *a == "canary").count();
    // 100 users at 80/20: both arms get users (all on one arm has odds of 2e-10).
    assert!(
        (1..100).contains(&on_canary),
        "{on_canary} of 100 sticky users on the canary"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_weight_change_takes_effect() {
    let t = two_arms(50, 50);
    let client = client();

    let before = split(&client, &t.proxy.url("/before"), 200, 2).await;
    assert!(
        before.get("canary").copied().unwrap_or(0) > 0,
        "the canary serves at 50/50: {before:?}"
    );
    let placed = sticky_arms(&client, &t.proxy, 40, 1).await;
    assert!(
        placed.values().any(|a| a == "canary"),
        "some sticky users start on the canary: {placed:?}"
    );

    let reply = admin_post(
        &client,
        &t.proxy.admin_url("/arms/canary/weight"),
        r#"{"weight":0}"#,
        None,
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    assert_eq!(reply.json()["weight"], 0);

    let canary_before = t.canary.request_count();
    let after = split(&client, &t.proxy.url("/after"), 300, 2).await;
    assert_eq!(
        after.get("baseline").copied(),
        Some(300),
        "every request goes to the baseline: {after:?}"
    );
    let moved = sticky_arms(&client, &t.proxy, 40, 2).await;
    assert!(
        moved.values().all(|a| a == "baseline"),
        "sticky users follow the weight change: {moved:?}"
    );
    assert_eq!(
        t.canary.request_count(),
        canary_before,
        "the canary upstream gets nothing more"
    );

    let (_, samples) = scrape(&client, &t.proxy).await;
    assert_eq!(
        metric(&samples, "driftguard_arm_weight", &[("arm", "canary")]),
        Some(0.0)
    );
    assert_eq!(
        metric(&samples, "driftguard_arm_weight", &[("arm", "baseline")]),
        Some(50.0)
    );
    let status = get(&client, &t.proxy.admin_url("/status"), &[])
        .await
        .json();
    let weights: BTreeMap<String, u64> = status["arms"]
        .as_array()
        .expect("arms[]")
        .iter()
        .map(|a| {
            (
                a["name"].as_str().unwrap().to_string(),
                a["weight"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        weights,
        BTreeMap::from([("baseline".into(), 50), ("canary".into(), 0)])
    );

    // Bad requests are refused and change nothing.
    let reply = admin_post(
        &client,
        &t.proxy.admin_url("/arms/nope/weight"),
        r#"{"weight":1}"#,
        None,
    )
    .await;
    assert_eq!(reply.status, StatusCode::NOT_FOUND, "{}", reply.text());
    let reply = admin_post(
        &client,
        &t.proxy.admin_url("/arms/canary/weight"),
        r#"{"weight":-1}"#,
        None,
    )
    .await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{}", reply.text());
    let reply = admin_post(
        &client,
        &t.proxy.admin_url("/arms/canary/weight"),
        "not json",
        None,
    )
    .await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{}", reply.text());

    // And back: the canary serves again.
    let reply = admin_post(
        &client,
        &t.proxy.admin_url("/arms/canary/weight"),
        r#"{"weight":50}"#,
        None,
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    let again = sticky_arms(&client, &t.proxy, 40, 1).await;
    assert_eq!(
        again, placed,
        "with the old weights back every sticky user is on its old arm"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_reports_arms_with_window_stats() {
    let t = two_arms(1, 0);
    let client = client();
    // The slowest exchange as the client saw it, end to end: no latency quantile can be above it.
    let mut slowest_ms: f64 = 0.0;
    for _ in 0..20 {
        let started = std::time::Instant::now();
        assert_eq!(
            get(&client, &t.proxy.url("/s"), &[]).await.status,
            StatusCode::OK
        );
        slowest_ms = slowest_ms.max(started.elapsed().as_secs_f64() * 1e3);
    }
    let status = get(&client, &t.proxy.admin_url("/status"), &[])
        .await
        .json();
    let arms = status["arms"].as_array().expect("arms[]");
    assert_eq!(arms.len(), 2, "{status}");
    let baseline = &arms[0];
    assert_eq!(baseline["name"], "baseline");
    assert_eq!(baseline["weight"], 1);
    assert_eq!(baseline["pins"]["MODEL_VER"], "m-1");
    assert_eq!(baseline["window"]["requests"], 20, "{status}");
    assert_eq!(baseline["window"]["error_rate"], 0.0, "{status}");
    // Ordered, above zero, and at most the slowest exchange the client saw (HDR histogram: ≤ 1 %
    // relative error, plus 0.5 ms for rounding).
    let mut previous = 0.0;
    for q in ["p50", "p95", "p99"] {
        let ms = baseline["window"]["latency_ms"][q]
            .as_f64()
            .unwrap_or_else(|| panic!("latency_ms.{q}: {status}"));
        assert!(
            ms > 0.0 && ms >= previous && ms <= slowest_ms * 1.01 + 0.5,
            "latency_ms.{q} = {ms} (previous quantile {previous}, slowest seen by the client \
             {slowest_ms:.3} ms)"
        );
        previous = ms;
    }
    assert_eq!(arms[1]["name"], "canary");
    assert_eq!(arms[1]["weight"], 0);
    assert_eq!(arms[1]["window"]["requests"], 0);
    assert_eq!(
        get(&client, &t.proxy.admin_url("/healthz"), &[])
            .await
            .status,
        StatusCode::OK
    );
    assert_eq!(
        get(&client, &t.proxy.admin_url("/readyz"), &[])
            .await
            .status,
        StatusCode::OK
    );
}
