//! `driftguard inject`: adds the driftguard sidecar to the Deployments and StatefulSets of a
//! multi-document Kubernetes YAML stream (SPEC §7), the way a user would by hand.
//!
//! Port takeover, the one decision that needs care: the sidecar must receive the traffic the Service
//! used to send to the app, without the Service having to be edited when it is not in the input.
//! - The app's Service-facing port is the container port named `--port-name` (default `http`); when no
//!   port has that name and the pod has exactly one container port, that one.
//! - That port is renamed `app-<name>` (and the app's probes that name it follow) and the sidecar's
//!   proxy port takes the name: a Service that targets the port by name now reaches the sidecar,
//!   wherever the Service lives.
//! - A Service in the same input (same namespace, selector matching the pod labels) that targets the
//!   app's port by number is rewritten to the sidecar's proxy port.
//! - The sidecar's upstream is the app's port on 127.0.0.1; the pod template records it in the
//!   annotation `driftguard.io/app-port` (the ConfigMap's `[[arms]] upstream` must name it).
//!
//! Documents are split on their `---` markers and a document that needs no change is copied byte for
//! byte (comments kept); a changed one is re-serialised (its leading comments kept, inner ones lost).
//! Injecting twice changes nothing: a pod that has a container named `driftguard` is left as it is.

use std::path::Path;
use std::process::ExitCode;

use serde_yaml_ng::{Mapping, Value};

mod stream;

use stream::{leading_lines, mapping_entry, parse, sequence_entry, str_at};

/// Name of the sidecar container; its presence marks a pod as injected.
pub const SIDECAR: &str = "driftguard";
/// Pod-template annotation recording the app port the sidecar forwards to.
pub const APP_PORT_ANNOTATION: &str = "driftguard.io/app-port";
/// Name of the sidecar's admin port (/metrics, /healthz, /readyz, /status).
pub const ADMIN_PORT_NAME: &str = "dg-admin";
/// Where the config volume is mounted, and the file the sidecar runs with.
pub const CONFIG_DIR: &str = "/etc/driftguard";
pub const CONFIG_FILE: &str = "/etc/driftguard/driftguard.toml";
/// Where the state volume (snapshots, receipts, pinned baseline) is mounted.
pub const STATE_DIR: &str = "/var/lib/driftguard";
const CONFIG_VOLUME: &str = "driftguard-config";
const STATE_VOLUME: &str = "driftguard-state";

/// What to inject; the CLI flags of `driftguard inject`.
#[derive(Debug, Clone)]
pub struct Options {
    /// The sidecar image.
    pub image: String,
    /// The ConfigMap holding `driftguard.toml`.
    pub config_map: String,
    /// The name of the app's Service-facing port, taken over by the sidecar.
    pub port_name: String,
    /// The sidecar's proxy port (the config's `listen.proxy`).
    pub proxy_port: u16,
    /// The sidecar's admin port (the config's `listen.admin`).
    pub admin_port: u16,
    /// The Secret whose key `token` becomes `DRIFTGUARD_ADMIN_TOKEN` (optional in the pod).
    pub admin_secret: String,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            image: format!("driftguard:{}", env!("CARGO_PKG_VERSION")),
            config_map: "driftguard-config".into(),
            port_name: "http".into(),
            proxy_port: 9000,
            admin_port: 9901,
            admin_secret: "driftguard-admin".into(),
        }
    }
}

/// Why the input cannot be injected; `doc` is the 1-based index of the document in the stream.
#[derive(Debug, thiserror::Error)]
pub enum InjectError {
    #[error("document {doc}: not YAML: {message}")]
    NotYaml { doc: usize, message: String },
    #[error("document {doc}: not a Kubernetes object: {message}")]
    NotObject { doc: usize, message: String },
    #[error("document {doc} ({kind} {name}): {message}")]
    Workload {
        doc: usize,
        kind: String,
        name: String,
        message: String,
    },
    #[error(
        "not YAML: this is a TOML file (a driftguard config?); inject reads Kubernetes manifests \
         (YAML) and adds the sidecar to them; the config goes into the ConfigMap named by \
         --config-map"
    )]
    Toml,
    #[error("the input holds no Deployment or StatefulSet to inject")]
    NoWorkload,
    #[error("invalid option: {0}")]
    Option(String),
    #[error("cannot serialise document {doc}: {message}")]
    Serialise { doc: usize, message: String },
}

/// A workload after injection, for rewriting the Services that reach it.
struct Target {
    namespace: Option<String>,
    labels: Mapping,
    app_port: u16,
}

/// Injects the sidecar into every Deployment and StatefulSet of `input`; returns the whole stream.
pub fn inject(input: &str, opts: &Options) -> Result<String, InjectError> {
    check_options(opts)?;
    let mut chunks = match parse(input) {
        Ok(chunks) => chunks,
        // A driftguard.toml given by mistake would otherwise read as a puzzling YAML error.
        Err(InjectError::NotYaml { .. } | InjectError::NotObject { .. })
            if input.parse::<toml::Table>().is_ok_and(|t| !t.is_empty()) =>
        {
            return Err(InjectError::Toml);
        }
        Err(e) => return Err(e),
    };
    let mut targets = Vec::new();
    for chunk in &mut chunks {
        let Some(value) = chunk.value.as_mut() else {
            continue;
        };
        let kind = str_at(value, &["kind"]).unwrap_or_default().to_string();
        match kind.as_str() {
            "Deployment" | "StatefulSet" => {
                let (target, changed) = inject_workload(value, chunk.doc, &kind, opts)?;
                chunk.changed = changed;
                targets.extend(target);
            }
            "List" => {
                let items = value.get("items").and_then(Value::as_sequence);
                let nested = items.into_iter().flatten().any(|item| {
                    matches!(str_at(item, &["kind"]), Some("Deployment" | "StatefulSet"))
                });
                if nested {
                    return Err(InjectError::NotObject {
                        doc: chunk.doc,
                        message: "a List holding Deployments or StatefulSets is not supported; \
                                  give each item as its own document"
                            .into(),
                    });
                }
            }
            _ => {}
        }
    }
    let workloads = chunks.iter().filter(|c| {
        c.value
            .as_ref()
            .is_some_and(|v| matches!(str_at(v, &["kind"]), Some("Deployment" | "StatefulSet")))
    });
    if workloads.count() == 0 {
        return Err(InjectError::NoWorkload);
    }
    for chunk in &mut chunks {
        let Some(value) = chunk.value.as_mut() else {
            continue;
        };
        if str_at(value, &["kind"]) == Some("Service") && retarget_service(value, &targets, opts) {
            chunk.changed = true;
        }
    }
    let mut out = String::with_capacity(input.len() + 2048);
    for chunk in chunks {
        match (&chunk.value, chunk.changed) {
            (Some(value), true) => {
                let yaml = serde_yaml_ng::to_string(value).map_err(|e| InjectError::Serialise {
                    doc: chunk.doc,
                    message: e.to_string(),
                })?;
                out.push_str(&leading_lines(&chunk.text));
                out.push_str(&yaml);
            }
            _ => out.push_str(&chunk.text),
        }
    }
    Ok(out)
}

fn check_options(opts: &Options) -> Result<(), InjectError> {
    if !is_port_name(&opts.port_name) {
        return Err(InjectError::Option(format!(
            "--port-name {:?} is not a Kubernetes port name (1-15 lowercase letters, digits, '-')",
            opts.port_name
        )));
    }
    if opts.proxy_port == 0 || opts.admin_port == 0 || opts.proxy_port == opts.admin_port {
        return Err(InjectError::Option(format!(
            "--proxy-port {} and --admin-port {} must be two different ports above 0",
            opts.proxy_port, opts.admin_port
        )));
    }
    for (flag, value) in [
        ("--image", &opts.image),
        ("--config-map", &opts.config_map),
        ("--admin-secret", &opts.admin_secret),
    ] {
        if value.trim().is_empty() {
            return Err(InjectError::Option(format!("{flag} is empty")));
        }
    }
    Ok(())
}

/// A Kubernetes IANA_SVC_NAME: at most 15 of `[a-z0-9-]`, a letter somewhere, no leading, trailing or
/// double hyphen.
fn is_port_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 15
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && name.bytes().any(|b| b.is_ascii_lowercase())
        && !name.starts_with('-')
        && !name.ends_with('-')
        && !name.contains("--")
}

/// The name the app's port gets once the sidecar has taken its name over.
fn app_port_name(name: &str) -> String {
    let mut renamed = format!("app-{name}");
    renamed.truncate(15);
    renamed.trim_end_matches('-').to_string()
}

/// Injects one workload. Returns the Service target (`None` for a pod injected by hand, whose app port
/// is unknown) and whether the document changed.
fn inject_workload(
    value: &mut Value,
    doc: usize,
    kind: &str,
    opts: &Options,
) -> Result<(Option<Target>, bool), InjectError> {
    let name = str_at(value, &["metadata", "name"])
        .unwrap_or("<unnamed>")
        .to_string();
    let fail = |message: String| InjectError::Workload {
        doc,
        kind: kind.to_string(),
        name: name.clone(),
        message,
    };
    let namespace = str_at(value, &["metadata", "namespace"]).map(str::to_string);
    let template = value
        .get_mut("spec")
        .and_then(|s| s.get_mut("template"))
        .filter(|t| t.is_mapping())
        .ok_or_else(|| fail("it has no spec.template".into()))?;
    let labels = template
        .get("metadata")
        .and_then(|m| m.get("labels"))
        .and_then(Value::as_mapping)
        .cloned()
        .unwrap_or_default();
    let containers = template
        .get("spec")
        .and_then(|s| s.get("containers"))
        .and_then(Value::as_sequence)
        .filter(|c| !c.is_empty())
        .ok_or_else(|| fail("it has no containers (spec.template.spec.containers)".into()))?;
    if containers.iter().any(|c| !c.is_mapping()) {
        return Err(fail("a container is not a mapping".into()));
    }

    if containers
        .iter()
        .any(|c| str_at(c, &["name"]) == Some(SIDECAR))
    {
        // Already injected: only the recorded app port is needed, for Services added since.
        let app_port = template
            .get("metadata")
            .and_then(|m| m.get("annotations"))
            .and_then(|a| a.get(APP_PORT_ANNOTATION))
            .and_then(|p| p.as_str().and_then(|s| s.parse().ok()).or(p.as_u64()))
            .and_then(|p| u16::try_from(p).ok());
        let target = app_port.map(|app_port| Target {
            namespace,
            labels,
            app_port,
        });
        return Ok((target, false));
    }

    // Every (container, port) of the pod, to find the app port and to refuse clashes.
    let ports: Vec<(usize, usize, Option<String>, Option<u64>)> = containers
        .iter()
        .enumerate()
        .flat_map(|(ci, c)| {
            c.get("ports")
                .and_then(Value::as_sequence)
                .into_iter()
                .flatten()
                .enumerate()
                .map(move |(pi, p)| {
                    (
                        ci,
                        pi,
                        str_at(p, &["name"]).map(str::to_string),
                        p.get("containerPort").and_then(Value::as_u64),
                    )
                })
        })
        .collect();
    let chosen = ports
        .iter()
        .find(|p| p.2.as_deref() == Some(opts.port_name.as_str()))
        .or(match ports.as_slice() {
            [only] if only.2.is_none() => Some(only),
            _ => None,
        })
        .ok_or_else(|| {
            fail(format!(
                "no port to take over: no container port is named {:?} (pass --port-name with the \
                 name of the port the Service targets, or name that port)",
                opts.port_name
            ))
        })?;
    let (app_container, app_port_index) = (chosen.0, chosen.1);
    let app_port = chosen
        .3
        .and_then(|p| u16::try_from(p).ok())
        .filter(|p| *p > 0)
        .ok_or_else(|| fail("the app port has no valid containerPort".into()))?;
    let renamed = app_port_name(&opts.port_name);
    for (ci, pi, port_name, number) in &ports {
        let own = (*ci, *pi) == (app_container, app_port_index);
        for taken in [opts.proxy_port, opts.admin_port] {
            if *number == Some(u64::from(taken)) {
                return Err(fail(format!(
                    "container port {taken} is already used in the pod, and the sidecar listens \
                     on it (choose another with --proxy-port / --admin-port and the same \
                     [listen] in the config)"
                )));
            }
        }
        if !own && matches!(port_name.as_deref(), Some(n) if n == renamed || n == ADMIN_PORT_NAME) {
            return Err(fail(format!(
                "a port is already named {:?}; the injected pod needs that name",
                port_name.as_deref().unwrap_or_default()
            )));
        }
    }

    // Everything checked; now change the pod.
    let pod = template
        .get_mut("spec")
        .and_then(Value::as_mapping_mut)
        .ok_or_else(|| fail("spec.template.spec is not a mapping".into()))?;
    let containers =
        sequence_entry(pod, "containers").ok_or_else(|| fail("containers is not a list".into()))?;
    let app_name = str_at(&containers[app_container], &["name"]).map(str::to_string);
    if let Some(port) = containers[app_container]
        .get_mut("ports")
        .and_then(|p| p.get_mut(app_port_index))
        .and_then(Value::as_mapping_mut)
    {
        port.insert("name".into(), Value::from(renamed.as_str()));
    }
    // The app's own probes that name the port follow it (a probe resolves names in its container).
    for probe in ["livenessProbe", "readinessProbe", "startupProbe"] {
        for action in ["httpGet", "tcpSocket"] {
            if let Some(port) = containers[app_container]
                .get_mut(probe)
                .and_then(|p| p.get_mut(action))
                .and_then(|a| a.get_mut("port"))
                .filter(|p| p.as_str() == Some(opts.port_name.as_str()))
            {
                *port = Value::from(renamed.as_str());
            }
        }
    }
    containers.push(sidecar(opts));
    let volumes =
        sequence_entry(pod, "volumes").ok_or_else(|| fail("volumes is not a list".into()))?;
    let has_volume = |volumes: &Vec<Value>, name: &str| {
        volumes.iter().any(|v| str_at(v, &["name"]) == Some(name))
    };
    if !has_volume(volumes, CONFIG_VOLUME) {
        let mut config = Mapping::new();
        config.insert("name".into(), CONFIG_VOLUME.into());
        let mut source = Mapping::new();
        source.insert("name".into(), Value::from(opts.config_map.as_str()));
        config.insert("configMap".into(), Value::Mapping(source));
        volumes.push(Value::Mapping(config));
    }
    if !has_volume(volumes, STATE_VOLUME) {
        let mut state = Mapping::new();
        state.insert("name".into(), STATE_VOLUME.into());
        state.insert("emptyDir".into(), Value::Mapping(Mapping::new()));
        volumes.push(Value::Mapping(state));
    }
    let annotations = mapping_entry(template, "metadata")
        .and_then(|m| {
            let entry = m
                .entry("annotations".into())
                .or_insert_with(|| Value::Mapping(Mapping::new()));
            if entry.is_null() {
                *entry = Value::Mapping(Mapping::new());
            }
            entry.as_mapping_mut()
        })
        .ok_or_else(|| fail("spec.template.metadata.annotations is not a mapping".into()))?;
    annotations.insert(
        APP_PORT_ANNOTATION.into(),
        Value::from(app_port.to_string()),
    );
    // `kubectl logs` and `kubectl exec` keep going to the app, not the sidecar.
    if let Some(app_name) = app_name {
        let key = Value::from("kubectl.kubernetes.io/default-container");
        if !annotations.contains_key(&key) {
            annotations.insert(key, Value::from(app_name));
        }
    }
    let target = Target {
        namespace,
        labels,
        app_port,
    };
    Ok((Some(target), true))
}

/// The sidecar container: proxy port with the app's port name, admin port, probes on the admin port,
/// resources, the admin token from a Secret, config read-only and state on its own volume.
fn sidecar(opts: &Options) -> Value {
    let template = format!(
        r#"
name: {SIDECAR}
image: ""
imagePullPolicy: IfNotPresent
args: ["run", "--config", "{CONFIG_FILE}"]
ports:
  - name: ""
    containerPort: {proxy}
    protocol: TCP
  - name: {ADMIN_PORT_NAME}
    containerPort: {admin}
    protocol: TCP
env:
  - name: DRIFTGUARD_ADMIN_TOKEN
    valueFrom:
      secretKeyRef:
        name: ""
        key: token
        optional: true
readinessProbe:
  httpGet:
    path: /readyz
    port: {ADMIN_PORT_NAME}
  periodSeconds: 5
  failureThreshold: 2
livenessProbe:
  httpGet:
    path: /healthz
    port: {ADMIN_PORT_NAME}
  initialDelaySeconds: 5
  periodSeconds: 10
  failureThreshold: 3
resources:
  requests:
    cpu: 100m
    memory: 64Mi
  limits:
    cpu: "1"
    memory: 256Mi
securityContext:
  runAsNonRoot: true
  runAsUser: 65532
  allowPrivilegeEscalation: false
  readOnlyRootFilesystem: true
  capabilities:
    drop: ["ALL"]
volumeMounts:
  - name: {CONFIG_VOLUME}
    mountPath: {CONFIG_DIR}
    readOnly: true
  - name: {STATE_VOLUME}
    mountPath: {STATE_DIR}
"#,
        proxy = opts.proxy_port,
        admin = opts.admin_port,
    );
    // The template is a constant apart from two integers: it always parses.
    let mut c: Value = serde_yaml_ng::from_str(&template).unwrap_or_default();
    c["image"] = Value::from(opts.image.as_str());
    c["ports"][0]["name"] = Value::from(opts.port_name.as_str());
    c["env"][0]["valueFrom"]["secretKeyRef"]["name"] = Value::from(opts.admin_secret.as_str());
    c
}

/// Points the Service's ports that target an injected app port by number at the sidecar's proxy
/// port. Returns whether it changed.
fn retarget_service(service: &mut Value, targets: &[Target], opts: &Options) -> bool {
    let namespace = str_at(service, &["metadata", "namespace"]).map(str::to_string);
    let Some(selector) = service
        .get("spec")
        .and_then(|s| s.get("selector"))
        .and_then(Value::as_mapping)
        .filter(|s| !s.is_empty())
        .cloned()
    else {
        return false;
    };
    let app_ports: Vec<u16> = targets
        .iter()
        .filter(|t| t.namespace == namespace)
        .filter(|t| selector.iter().all(|(k, v)| t.labels.get(k) == Some(v)))
        .map(|t| t.app_port)
        .collect();
    if app_ports.is_empty() {
        return false;
    }
    let Some(ports) = service
        .get_mut("spec")
        .and_then(|s| s.get_mut("ports"))
        .and_then(Value::as_sequence_mut)
    else {
        return false;
    };
    let mut changed = false;
    for port in ports.iter_mut().filter_map(Value::as_mapping_mut) {
        // An absent targetPort means "the same as port".
        let target = port
            .get("targetPort")
            .or_else(|| port.get("port"))
            .and_then(Value::as_u64);
        if target.is_some_and(|t| app_ports.iter().any(|a| u64::from(*a) == t)) {
            port.insert("targetPort".into(), Value::from(opts.proxy_port));
            changed = true;
        }
    }
    changed
}

/// `driftguard inject`: the injected stream on stdout; exit 2 with the reason on anything it refuses.
pub fn main(file: &Path, opts: &Options) -> ExitCode {
    use std::io::{Read as _, Write as _};
    let mut input = String::new();
    let read = if file == Path::new("-") {
        std::io::stdin().read_to_string(&mut input)
    } else {
        std::fs::File::open(file).and_then(|mut f| f.read_to_string(&mut input))
    };
    if let Err(e) = read {
        eprintln!("driftguard inject: cannot read {}: {e}", file.display());
        return ExitCode::from(2);
    }
    match inject(&input, opts) {
        Ok(out) => match std::io::stdout().lock().write_all(out.as_bytes()) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("driftguard inject: cannot write the output: {e}");
                ExitCode::FAILURE
            }
        },
        Err(e) => {
            eprintln!("driftguard inject: {}: {e}", file.display());
            ExitCode::from(2)
        }
    }
}

#[cfg(test)]
mod tests;
