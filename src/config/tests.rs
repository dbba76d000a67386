//! Unit tests of the config parser: defaults, every validation error with its key path.

use std::time::Duration;

use super::*;

const MINIMAL: &str = "[[arms]]\nname = \"a\"\nupstream = \"http://127.0.0.1:8000\"\n";

fn errors_of(text: &str) -> Vec<ConfigError> {
    Config::parse(text).expect_err("config should be refused").0
}

#[test]
fn spec_example_parses_with_its_values() {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/deploy/driftguard.toml"
    ))
    .unwrap();
    let c = Config::parse(&text).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(c.arms.len(), 2);
    assert_eq!(c.arms[1].weight, 5);
    assert_eq!(c.arms[0].pins["INDEX_HASH"], "a1b2c3");
    assert_eq!(c.upstream.connect_timeout.0, Duration::from_secs(1));
    assert_eq!(c.rules.latency_floor.0, Duration::from_millis(25));
    assert_eq!(c.writes.ttl.0, Duration::from_secs(48 * 3600));
    assert_eq!(c.rollback.levers["pin_mismatch"], Lever::Alias);
    // The example's hooks are commented out: a trip with it must not log failed hooks.
    assert!(c.rollback.hooks.is_empty());
    let baseline = c.arms.iter().find(|a| a.baseline).map(|a| a.name.as_str());
    assert_eq!(baseline, Some("baseline"));
}

#[test]
fn defaults_fill_a_minimal_file() {
    let c = Config::parse(MINIMAL).unwrap();
    assert_eq!(c.listen.proxy, "0.0.0.0:9000");
    assert_eq!(c.listen.admin, "0.0.0.0:9901");
    assert_eq!(c.runtime.workers, 1);
    assert_eq!(c.arms[0].weight, 1);
    assert_eq!(c.rules.window.0, Duration::from_secs(60));
    assert_eq!(c.signals.session_header, "x-session-id");
    assert_eq!(
        c.cache.key_pins,
        ["INDEX_HASH", "PROMPT_VER", "RERANK_CONF", "MODEL_VER"]
    );
    assert!(c.log.access);
}

#[test]
fn every_error_is_reported_with_its_key_path() {
    let text = format!(
        "bogus = 1\n{MINIMAL}[listen]\nproxy = \"nope\"\nadmn = \"x\"\n[upstream]\nconnect_timeout = \"5 parsecs\"\n\
         [[arms]]\nname = \"a\"\nupstream = \"ftp://x\"\nextra = 1\n"
    );
    let errors = errors_of(&text);
    let paths: Vec<&str> = errors.iter().map(|e| e.path.as_str()).collect();
    for expected in [
        "bogus",
        "listen.admn",
        "upstream.connect_timeout",
        "arms[1].extra",
        "listen.proxy",
        "arms[1].upstream",
        "arms[1].name",
    ] {
        assert!(paths.contains(&expected), "missing {expected} in {paths:?}");
    }
    let duration = errors
        .iter()
        .find(|e| e.path == "upstream.connect_timeout")
        .unwrap();
    assert!(
        duration.message.contains("5 parsecs"),
        "{}",
        duration.message
    );
    assert!(!duration.message.contains('\n'));
}

#[test]
fn semantic_checks() {
    let bad = [
        ("[runtime]\nworkers = 0\n", "runtime.workers"),
        ("[pins]\nindex_hash = \"x\"\n", "pins.index_hash"),
        ("[signals]\nsample = 1.5\n", "signals.sample"),
        ("[signals]\nanswer = \"choices\"\n", "signals.answer"),
        ("[writes]\nroutes = [\"/ingest\"]\n", "writes.routes[0]"),
        ("[rules]\nconfidence = 1.0\n", "rules.confidence"),
        ("[rules]\nwindow = \"1h\"\n", "rules.window"),
        (
            "[rules.hard]\nmystery_over = 1\n",
            "rules.hard.mystery_over",
        ),
        (
            "[rollback.levers]\nmystery = \"route\"\n",
            "rollback.levers.mystery",
        ),
        ("[rollback]\nlever = \"flag\"\n", "rollback.flag"),
        ("[rollback]\nlever = \"sideways\"\n", "rollback.lever"),
        ("[cache]\nkey_pins = [\"x\"]\n", "cache.key_pins[0]"),
        (
            "[routing]\nsticky_header = \"bad header\"\n",
            "routing.sticky_header",
        ),
    ];
    for (extra, path) in bad {
        let errors = errors_of(&format!("{MINIMAL}{extra}"));
        assert!(
            errors.iter().any(|e| e.path == path),
            "{extra:?}: expected an error at {path}, got {errors:?}"
        );
    }
}

#[test]
fn arms_are_checked() {
    assert!(errors_of("").iter().any(|e| e.path == "arms"));
    let two_baselines = format!("{MINIMAL}baseline = true\n[[arms]]\nname = \"b\"\nupstream = \"http://h:1\"\nbaseline = true\n");
    assert!(errors_of(&two_baselines)
        .iter()
        .any(|e| e.message.contains("baseline")));
    let all_zero = "[[arms]]\nname = \"a\"\nupstream = \"http://h:1\"\nweight = 0\n";
    assert!(errors_of(all_zero).iter().any(|e| e.path == "arms"));
    let dup = format!("{MINIMAL}[[arms]]\nname = \"a\"\nupstream = \"http://h:2\"\n");
    assert!(errors_of(&dup).iter().any(|e| e.path == "arms[1].name"));
    let with_path = "[[arms]]\nname = \"a\"\nupstream = \"http://h:1/v1\"\n";
    assert!(errors_of(with_path)
        .iter()
        .any(|e| e.path == "arms[0].upstream"));
}

#[test]
fn syntax_errors_are_reported() {
    let errors = errors_of("[listen\nproxy = 1");
    assert_eq!(errors.len(), 1);
    assert!(errors[0].message.starts_with("TOML syntax"));
}

#[test]
fn upstream_authority_defaults_port_80() {
    assert_eq!(
        parse_upstream("http://example.com").unwrap().as_str(),
        "example.com:80"
    );
    assert_eq!(
        parse_upstream("http://127.0.0.1:8000/").unwrap().as_str(),
        "127.0.0.1:8000"
    );
    assert_eq!(
        parse_upstream("https://example.com").unwrap().as_str(),
        "example.com:443"
    );
    assert!(parse_upstream("ftp://example.com").is_err());
}

#[test]
fn rule_names_drop_the_suffix() {
    assert_eq!(rule_name("coverage_under"), "coverage");
    assert_eq!(rule_name("delta_s_p95_drift_over"), "delta_s_p95_drift");
}

#[test]
fn writes_fence_keys_have_defaults() {
    let c = Config::parse(MINIMAL).unwrap();
    assert_eq!(c.writes.idempotency_header, "idempotency-key");
    assert!(!c.writes.require_key);
    assert_eq!(c.writes.store, ReceiptStore::Embedded);
    assert_eq!(c.writes.redis_url, "redis://127.0.0.1:6379");
    assert_eq!(c.writes.max_body_bytes, 1 << 20);
    assert_eq!(c.writes.receipt_body_max, 1 << 20);
    let c = Config::parse(&format!(
        "{MINIMAL}[writes]\nstore = \"redis\"\nredis_url = \"redis://10.0.0.1:6380/2\"\nreceipt_body_max = 0\n"
    ))
    .unwrap();
    assert_eq!(c.writes.store, ReceiptStore::Redis);
    assert_eq!(c.writes.receipt_body_max, 0);
}

#[test]
fn writes_fence_keys_are_checked() {
    for (extra, path) in [
        (
            "[writes]\nidempotency_header = \"\"\n",
            "writes.idempotency_header",
        ),
        (
            "[writes]\nidempotency_header = \"a b\"\n",
            "writes.idempotency_header",
        ),
        ("[writes]\nttl = \"0s\"\n", "writes.ttl"),
        ("[writes]\nmax_body_bytes = 0\n", "writes.max_body_bytes"),
        (
            "[writes]\nstore = \"redis\"\nredis_url = \"http://x\"\n",
            "writes.redis_url",
        ),
        ("[writes]\nstore = \"memcached\"\n", "writes.store"),
        (
            "[writes]\nreceipt_body_max = -1\n",
            "writes.receipt_body_max",
        ),
    ] {
        let errors = errors_of(&format!("{MINIMAL}{extra}"));
        assert!(
            errors.iter().any(|e| e.path == path),
            "{extra:?}: expected an error at {path}, got {errors:?}"
        );
    }
}

#[test]
fn budget_redis_keys_have_defaults_and_are_checked() {
    let c = Config::parse(&format!("{MINIMAL}[budget]\nbackend = \"redis\"\n")).unwrap();
    let b = c.budget.unwrap();
    assert_eq!(b.backend, BudgetBackend::Redis);
    assert_eq!(b.redis_url, "redis://127.0.0.1:6379");
    assert_eq!(b.redis_key, "driftguard:budget");
    assert_eq!(b.redis_timeout.0, Duration::from_millis(50));
    assert_eq!(b.on_backend_error, OnBackendError::Open);

    let c = Config::parse(&format!(
        "{MINIMAL}[budget]\nbackend = \"redis\"\nredis_url = \"redis://:pw@10.0.0.7:6380/2\"\n\
         redis_key = \"team-a:budget\"\nredis_timeout = \"200ms\"\non_backend_error = \"closed\"\n"
    ))
    .unwrap();
    let b = c.budget.unwrap();
    assert_eq!(b.redis_key, "team-a:budget");
    assert_eq!(b.redis_timeout.0, Duration::from_millis(200));
    assert_eq!(b.on_backend_error, OnBackendError::Closed);

    for (extra, path) in [
        (
            "redis_url = \"http://127.0.0.1:6379\"\n",
            "budget.redis_url",
        ),
        ("redis_url = \"not a url\"\n", "budget.redis_url"),
        ("redis_key = \"\"\n", "budget.redis_key"),
        ("redis_timeout = \"0s\"\n", "budget.redis_timeout"),
        ("redis_timeout = \"soon\"\n", "budget.redis_timeout"),
        ("on_backend_error = \"maybe\"\n", "budget.on_backend_error"),
        ("backend = \"memcached\"\n", "budget.backend"),
    ] {
        let errors = errors_of(&format!("{MINIMAL}[budget]\n{extra}"));
        assert!(
            errors.iter().any(|e| e.path == path),
            "{extra:?}: expected an error at {path}, got {errors:?}"
        );
    }
}

#[test]
fn breaker_degrade_target_names_an_arm() {
    let c = Config::parse(MINIMAL).unwrap();
    assert_eq!(c.breaker.degrade_target, "");
    let errors = errors_of(&format!("{MINIMAL}[breaker]\ndegrade_target = \"nope\"\n"));
    assert!(
        errors.iter().any(|e| e.path == "breaker.degrade_target"),
        "{errors:?}"
    );
}

#[test]
fn local_embedder_keys_have_defaults_and_are_checked() {
    let text = format!(
        "{MINIMAL}[signals]\nembedder = \"local\"\nmax_evals_per_sec = 5\n[signals.local]\nmodel_dir = \"/models/minilm\"\n"
    );
    if !cfg!(feature = "local-embedder") {
        let errors = errors_of(&text);
        assert!(
            errors.iter().any(|e| e.path == "signals.embedder"),
            "{errors:?}"
        );
        return;
    }
    let c = Config::parse(&text).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(c.signals.embedder, EmbedderKind::Local);
    assert_eq!(c.signals.max_evals_per_sec, 5.0);
    assert_eq!(c.signals.local.model_dir, "/models/minilm");
    assert_eq!(c.signals.local.max_tokens, 256);
    assert_eq!(c.signals.local.cache_entries, 10_000);
    assert_eq!(
        Config::parse(MINIMAL).unwrap().signals.max_evals_per_sec,
        0.0
    );

    let bad = [
        (
            "[signals]\nembedder = \"local\"\n",
            "signals.local.model_dir",
        ),
        (
            "[signals]\nmax_evals_per_sec = -1\n",
            "signals.max_evals_per_sec",
        ),
        (
            "[signals.local]\nmax_tokens = 0\n",
            "signals.local.max_tokens",
        ),
        ("[signals.local]\nmodel = \"x\"\n", "signals.local.model"),
        ("[signals]\nembedder = \"onnx\"\n", "signals.embedder"),
    ];
    for (extra, path) in bad {
        let errors = errors_of(&format!("{MINIMAL}{extra}"));
        assert!(
            errors.iter().any(|e| e.path == path),
            "{extra:?}: expected an error at {path}, got {errors:?}"
        );
    }
}

#[test]
fn pointer_syntax_matches_the_extractor() {
    // The same cases signals::extract::Pointer refuses and accepts; config checks the syntax itself
    // because it sits below signals.
    for bad in ["a/b", "*", "/a~", "/a~2", "/~x", "/a~/b"] {
        assert!(pointer_problem(bad).is_some(), "{bad:?} should be refused");
    }
    for good in [
        "",
        "/",
        "/a/b",
        "/*/text",
        "/a~1b/m~0n",
        "/~01",
        "/contexts/*/text",
    ] {
        assert_eq!(pointer_problem(good), None, "{good:?}");
    }
    let errors = errors_of(&format!(
        "{MINIMAL}[signals]\nanswer = \"choices\"\nretrieved = \"/a~2\"\n"
    ));
    let message = |path: &str| {
        errors
            .iter()
            .find(|e| e.path == path)
            .map(|e| e.message.clone())
            .unwrap_or_default()
    };
    assert_eq!(
        message("signals.answer"),
        "\"choices\" is not a JSON pointer: it must be empty or start with '/'"
    );
    assert_eq!(
        message("signals.retrieved"),
        "\"/a~2\" is not a JSON pointer: '~' must be followed by 0 or 1"
    );
}

#[test]
fn rules_window_is_bounded_by_the_ring() {
    assert_eq!(MAX_WINDOW, SLOT * (SLOTS as u32 - 1));
    let errors = errors_of(&format!("{MINIMAL}[rules]\nwindow = \"291s\"\n"));
    assert!(
        errors.iter().any(|e| e.path == "rules.window"
            && e.message == "must be at most 290s, the span of the window ring"),
        "{errors:?}"
    );
    assert!(Config::parse(&format!("{MINIMAL}[rules]\nwindow = \"290s\"\n")).is_ok());
}

#[test]
fn a_mistyped_key_gets_the_close_known_one() {
    let errors =
        errors_of("[signals]\nsampel = 0.5\n[rules]\nwindw = \"60s\"\n[listen]\nzzz = 1\n");
    let message = |path: &str| {
        errors
            .iter()
            .find(|e| e.path == path)
            .map(|e| e.message.clone())
            .unwrap_or_else(|| panic!("no error at {path}: {errors:?}"))
    };
    assert_eq!(
        message("signals.sampel"),
        r#"unknown key "sampel" (did you mean "sample"?)"#
    );
    assert!(message("rules.windw").contains(r#"did you mean "window"?"#));
    // Nothing close: no suggestion.
    assert_eq!(message("listen.zzz"), r#"unknown key "zzz""#);
    assert_eq!(super::edit_distance("sampel", "sample"), 1);
    assert_eq!(super::edit_distance("kitten", "sitting"), 3);
}
