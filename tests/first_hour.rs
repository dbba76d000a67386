//! The first hour of a new user, as the binary answers it: a bare `driftguard` says where to go, a
//! mistyped key gets "did you mean", `--config` is refused where no verb reads it, `inject` given a TOML
//! file says so, a second instance on one `state_dir` is told plainly, the shipped example's trip logs
//! no failed hook, the container image's config runs the local embedder, and after a trip the way back
//! (`driftguard weight ARM N`) is said by `/status`, `status` and `recover`.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn repo(path: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

/// A fresh empty folder to run the CLI in.
fn empty_dir(name: &str) -> std::path::PathBuf {
    let dir = unique(name);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn a_bare_driftguard_without_a_config_says_where_to_go() {
    let dir = empty_dir("bare");
    for args in [&[][..], &["run"][..], &["check"][..]] {
        let out = run_cli(args, &dir, WAIT);
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains("no driftguard.toml"), "{args:?}: {stderr}");
        assert!(stderr.contains("driftguard demo"), "{args:?}: {stderr}");
        assert!(stderr.contains("--config FILE"), "{args:?}: {stderr}");
        assert!(!stderr.contains("os error"), "{args:?}: {stderr}");
    }
    // A file named explicitly that is not there is still a plain error about that file.
    let out = run_cli(&["check", "--config", "nowhere.toml"], &dir, WAIT);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("cannot read nowhere.toml"), "{stderr}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_mistyped_key_gets_did_you_mean() {
    let dir = empty_dir("typo");
    std::fs::write(
        dir.join("driftguard.toml"),
        "[[arms]]\nname = \"a\"\nupstream = \"http://127.0.0.1:8000\"\n[signals]\nsampel = 0.5\n",
    )
    .unwrap();
    let out = run_cli(&["check"], &dir, WAIT);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(r#"signals.sampel: unknown key "sampel" (did you mean "sample"?)"#),
        "{stderr}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn config_is_offered_only_on_the_verbs_that_read_it() {
    let dir = empty_dir("config-flag");
    let manifest = repo("deploy/k8s/examples/app.yaml");
    let manifest = manifest.to_str().unwrap();
    // After the verb: clap refuses the flag the verb does not have.
    let out = run_cli(
        &["inject", "--config", "/nonexistent", "-f", manifest],
        &dir,
        WAIT,
    );
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("--config"), "{stderr}");
    assert!(
        out.stdout.is_empty(),
        "nothing injected: {}",
        text(&out.stdout)
    );
    // Before the verb: refused as well, naming the verbs that read one.
    for verb in [
        &["inject", "-f", manifest][..],
        &["status"][..],
        &["demo"][..],
    ] {
        let mut args = vec!["--config", "/nonexistent"];
        args.extend(verb);
        let out = run_cli(&args, &dir, WAIT);
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(
            stderr.contains("reads no config file") && stderr.contains("run, check and eval"),
            "{args:?}: {stderr}"
        );
    }
    // The verbs that read one take it before or after the verb.
    let example = repo("deploy/driftguard.toml");
    let example = example.to_str().unwrap();
    for args in [
        ["check", "--config", example],
        ["--config", example, "check"],
    ] {
        let out = run_cli(&args, &dir, WAIT);
        assert!(out.status.success(), "{args:?}: {}", text(&out.stderr));
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn inject_of_a_toml_file_says_it_is_not_yaml() {
    let example = repo("deploy/driftguard.toml");
    let out = run_cli(
        &["inject", "-f", example.to_str().unwrap()],
        &std::env::temp_dir(),
        WAIT,
    );
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("not YAML: this is a TOML file"), "{stderr}");
    assert!(!stderr.contains("more than one document"), "{stderr}");
}

#[tokio::test]
async fn a_second_instance_on_the_same_state_dir_is_told_plainly() {
    let upstream = Upstream::start("a");
    let state_dir = unique("shared-state");
    // A write route: the receipt store (redb, with its own file lock) is opened too.
    let config = format!(
        "state_dir = {:?}\n{LISTEN}[[arms]]\nname = \"a\"\nupstream = \"{}\"\n[writes]\nroutes = [\"POST /ingest\"]\n",
        state_dir.display().to_string(),
        upstream.url()
    );
    let first = Proxy::start(&config);
    let path = unique("second").with_extension("toml");
    std::fs::write(&path, &config).unwrap();
    let out = run_cli(
        &["run", "--config", path.to_str().unwrap()],
        &std::env::temp_dir(),
        WAIT,
    );
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "state_dir {} is held by another driftguard (pid {})",
            state_dir.display(),
            first.pid()
        )),
        "{stderr}"
    );
    assert!(!stderr.to_lowercase().contains("database"), "{stderr}");
    // The first one serves on, untouched.
    let reply = get(&client(), &first.admin_url("/healthz"), &[]).await;
    assert_eq!(reply.status, 200);
    drop(first);
    let _ = std::fs::remove_file(&path);
}

/// deploy/driftguard.toml on ephemeral ports, a private state_dir and the given arms' upstreams.
fn example_config(baseline: &str, canary: &str, state_dir: &Path) -> String {
    let mut text = std::fs::read_to_string(repo("deploy/driftguard.toml")).unwrap();
    for (from, to) in [
        (
            "state_dir = \"./driftguard-state\"".to_string(),
            format!("state_dir = {:?}", state_dir.display().to_string()),
        ),
        (
            "proxy = \"0.0.0.0:9000\"".into(),
            "proxy = \"127.0.0.1:0\"".into(),
        ),
        (
            "admin = \"0.0.0.0:9901\"".into(),
            "admin = \"127.0.0.1:0\"".into(),
        ),
        (
            "upstream = \"http://127.0.0.1:8000\"".into(),
            format!("upstream = \"{baseline}\""),
        ),
        (
            "upstream = \"http://127.0.0.1:8001\"".into(),
            format!("upstream = \"{canary}\""),
        ),
    ] {
        assert_eq!(
            text.matches(&from).count(),
            1,
            "deploy/driftguard.toml has {from} once"
        );
        text = text.replace(&from, &to);
    }
    text
}

#[tokio::test]
async fn the_example_configs_trip_logs_no_failed_hook() {
    let (baseline, canary) = (Upstream::start("baseline"), Upstream::start("canary"));
    let state_dir = unique("example-state");
    let proxy = Proxy::start(&example_config(&baseline.url(), &canary.url(), &state_dir));
    let client = client();
    let reply = admin_post(
        &client,
        &proxy.admin_url("/trip"),
        r#"{"reason": "first hour", "arm": "canary"}"#,
        None,
    )
    .await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    proxy
        .wait_log("the trip", |v| {
            v["message"] == "guard tripped: rollback applied"
        })
        .await;
    // Hooks run on their own tasks right after the trip; an absent notifier or a webhook with nothing
    // behind it fails within a second. Watch the log for three.
    let complaints = || -> Vec<Value> {
        proxy
            .log_lines()
            .into_iter()
            .filter(|v| {
                let hook = v["message"].as_str().is_some_and(|m| m.contains("hook"))
                    || v["hook"].is_string();
                hook && (v["level"] == "WARN" || v["level"] == "ERROR" || v["outcome"] != "ok")
            })
            .collect()
    };
    let deadline = Instant::now() + Duration::from_secs(3);
    while complaints().is_empty() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        complaints().is_empty(),
        "hook complaints: {:?}",
        complaints()
    );
    let status = get(&client, &proxy.admin_url("/status"), &[]).await.json();
    assert_eq!(status["guard"]["state"], "tripped", "{status}");
    drop(proxy);
    let _ = std::fs::remove_dir_all(&state_dir);
}

#[test]
fn the_images_config_runs_the_local_embedder() {
    // The sed edits of deploy/Dockerfile's model stage, applied the same way: each `s|^KEY = .*|LINE|`
    // replaces the one line that starts with `KEY = `.
    let dockerfile = std::fs::read_to_string(repo("deploy/Dockerfile")).unwrap();
    let mut config = std::fs::read_to_string(repo("deploy/driftguard.toml")).unwrap();
    let edits: Vec<(&str, &str)> = dockerfile
        .lines()
        .filter_map(|l| l.trim().strip_prefix("-e 's|^"))
        .map(|e| {
            let (pattern, rest) = e.split_once('|').expect("s|pattern|replacement|");
            let replacement = rest.rsplit_once('|').expect("closing |").0;
            (pattern.strip_suffix(".*").expect("KEY = .*"), replacement)
        })
        .collect();
    assert_eq!(edits.len(), 2, "{edits:?}");
    for (prefix, replacement) in &edits {
        let lines: Vec<&str> = config.lines().filter(|l| l.starts_with(prefix)).collect();
        assert_eq!(
            lines.len(),
            1,
            "{prefix:?} in deploy/driftguard.toml: {lines:?}"
        );
        config = config.replace(lines[0], replacement);
    }
    let parsed = driftguard::config::Config::parse(&config).expect("the image's config parses");
    assert_eq!(
        parsed.signals.embedder,
        driftguard::config::EmbedderKind::Local
    );
    assert_eq!(parsed.signals.max_evals_per_sec, 3.5);
    // The model is where the config says, copied from the model stage.
    let model_dir = parsed.signals.local.model_dir.clone();
    assert!(
        dockerfile
            .lines()
            .any(|l| l.starts_with("COPY --from=model")
                && l.trim_end().ends_with(&format!(" {model_dir}"))),
        "no COPY of the model to {model_dir}"
    );
    assert!(dockerfile
        .contains("COPY --from=model /model/driftguard.toml /etc/driftguard/driftguard.toml"));

    // With the model at hand, the image's config passes `check` (which loads and runs the model).
    let Some(fixture) = std::env::var_os("DRIFTGUARD_TEST_MODEL")
        .map(std::path::PathBuf::from)
        .or_else(|| Some(repo("target/fixtures/all-MiniLM-L6-v2")))
        .filter(|d| d.join("model.safetensors").exists())
    else {
        eprintln!("the model is not here: the image's config was parsed, not checked");
        return;
    };
    let path = unique("image").with_extension("toml");
    std::fs::write(&path, config.replace(&model_dir, fixture.to_str().unwrap())).unwrap();
    let out = run_cli(
        &["check", "--config", path.to_str().unwrap()],
        &std::env::temp_dir(),
        Duration::from_secs(60),
    );
    let _ = std::fs::remove_file(&path);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("signals: embedder local"),
        "{}",
        text(&out.stdout)
    );
}

#[tokio::test]
async fn after_a_trip_the_way_back_is_said_and_weight_takes_it() {
    let (baseline, canary) = (Upstream::start("baseline"), Upstream::start("canary"));
    let proxy = Proxy::start(&format!(
        "{LISTEN}[[arms]]\nname = \"baseline\"\nupstream = \"{}\"\nweight = 80\nbaseline = true\n\
         [[arms]]\nname = \"canary\"\nupstream = \"{}\"\nweight = 20\n",
        baseline.url(),
        canary.url()
    ));
    let admin = format!("http://{}", proxy.admin);
    let cli = |args: &[&str]| {
        let mut all = args.to_vec();
        all.extend(["--admin", &admin]);
        run_cli(&all, &std::env::temp_dir(), WAIT)
    };
    let client = client();
    let status = || async { get(&client, &proxy.admin_url("/status"), &[]).await.json() };
    let weight_of = |doc: &Value, arm: &str| {
        doc["arms"]
            .as_array()
            .and_then(|a| a.iter().find(|x| x["name"] == arm))
            .map(|x| x["weight"].clone())
            .unwrap_or(Value::Null)
    };
    assert!(status().await["guard"]["hint"].is_null());

    let out = cli(&["trip", "--reason", "first hour", "--arm", "canary"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let doc = status().await;
    assert_eq!(weight_of(&doc, "canary"), 0, "{doc}");
    let hint = doc["guard"]["hint"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(hint.contains("`driftguard weight canary 20`"), "{doc}");

    let out = cli(&["status"]);
    assert!(text(&out.stdout).contains(&hint), "{}", text(&out.stdout));
    // Recovering leaves the traffic rolled back, and says how to send the canary traffic again.
    let out = cli(&["recover"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("driftguard weight canary 20"),
        "{}",
        text(&out.stdout)
    );

    let out = cli(&["weight", "canary", "5"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout).trim(), "arm canary weight 5");
    let doc = status().await;
    assert_eq!(weight_of(&doc, "canary"), 5, "{doc}");
    assert!(doc["guard"]["hint"].is_null(), "{doc}");

    // Refusals: an arm that does not exist (404 → exit 1), a name that cannot be one.
    let out = cli(&["weight", "nosuch", "5"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("nosuch"),
        "{}",
        text(&out.stderr)
    );
    let out = cli(&["weight", "../trip", "5"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("is not an arm name"),
        "{}",
        text(&out.stderr)
    );
}
