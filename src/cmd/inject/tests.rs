//! Unit tests of `inject`: port takeover, idempotence, Services, refusals.

use super::*;

const APP: &str = "\
# the app
apiVersion: apps/v1
kind: Deployment
metadata:
  name: rag
  namespace: rag
spec:
  replicas: 2
  selector:
    matchLabels:
      app: rag
  template:
    metadata:
      labels:
        app: rag
    spec:
      containers:
        - name: app
          image: example/rag:1.0
          readinessProbe:
            httpGet:
              path: /health
              port: http
          ports:
            - name: http
              containerPort: 8000
            - name: grpc
              containerPort: 8500
---
# reaches the app by number
apiVersion: v1
kind: Service
metadata:
  name: rag
  namespace: rag
spec:
  selector:
    app: rag
  ports:
    - port: 80
      targetPort: 8000
    - name: grpc
      port: 8500
---
apiVersion: v1
kind: ConfigMap
metadata:
  name: unrelated
data:
  a: \"1\"   # a comment that must survive
";

fn docs(text: &str) -> Vec<Value> {
    serde_yaml_ng::Deserializer::from_str(text)
        .map(|d| Value::deserialize(d).unwrap())
        .collect()
}

use serde::Deserialize;

fn container<'a>(doc: &'a Value, name: &str) -> &'a Value {
    doc["spec"]["template"]["spec"]["containers"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|c| c["name"].as_str() == Some(name))
        .unwrap_or_else(|| panic!("no container {name}"))
}

#[test]
fn takes_over_the_named_port_and_rewrites_the_service() {
    let out = inject(APP, &Options::default()).unwrap();
    let d = docs(&out);
    assert_eq!(d.len(), 3);
    let app = container(&d[0], "app");
    assert_eq!(app["ports"][0]["name"].as_str(), Some("app-http"));
    assert_eq!(app["ports"][0]["containerPort"].as_u64(), Some(8000));
    assert_eq!(app["ports"][1]["name"].as_str(), Some("grpc"));
    assert_eq!(
        app["readinessProbe"]["httpGet"]["port"].as_str(),
        Some("app-http")
    );
    let side = container(&d[0], "driftguard");
    assert_eq!(side["ports"][0]["name"].as_str(), Some("http"));
    assert_eq!(side["ports"][0]["containerPort"].as_u64(), Some(9000));
    assert_eq!(side["ports"][1]["containerPort"].as_u64(), Some(9901));
    assert_eq!(
        side["readinessProbe"]["httpGet"]["path"].as_str(),
        Some("/readyz")
    );
    assert_eq!(
        side["livenessProbe"]["httpGet"]["path"].as_str(),
        Some("/healthz")
    );
    assert_eq!(
        side["env"][0]["valueFrom"]["secretKeyRef"]["name"].as_str(),
        Some("driftguard-admin")
    );
    let annotations = &d[0]["spec"]["template"]["metadata"]["annotations"];
    assert_eq!(annotations[APP_PORT_ANNOTATION].as_str(), Some("8000"));
    assert_eq!(
        annotations["kubectl.kubernetes.io/default-container"].as_str(),
        Some("app")
    );
    let volumes = d[0]["spec"]["template"]["spec"]["volumes"]
        .as_sequence()
        .unwrap();
    assert_eq!(
        volumes[0]["configMap"]["name"].as_str(),
        Some("driftguard-config")
    );
    assert!(volumes[1]["emptyDir"].is_mapping());
    // The Service's number target moves to the sidecar; the grpc port is left alone.
    assert_eq!(d[1]["spec"]["ports"][0]["targetPort"].as_u64(), Some(9000));
    assert!(d[1]["spec"]["ports"][1].get("targetPort").is_none());
    // Leading comments of rewritten documents, and untouched documents byte for byte, survive.
    assert!(out.starts_with("# the app\n"));
    assert!(out.contains("---\n# reaches the app by number\n"));
    assert!(out.ends_with(&APP[APP.find("---\napiVersion: v1\nkind: ConfigMap").unwrap()..]));
}

#[test]
fn injecting_twice_changes_nothing() {
    let once = inject(APP, &Options::default()).unwrap();
    let twice = inject(&once, &Options::default()).unwrap();
    assert_eq!(once, twice);
}

#[test]
fn a_service_added_after_injection_is_still_retargeted() {
    let once = inject(APP, &Options::default()).unwrap();
    let extra = format!(
        "{once}---\napiVersion: v1\nkind: Service\nmetadata:\n  name: late\n  namespace: rag\nspec:\n  \
         selector:\n    app: rag\n  ports:\n    - port: 8000\n"
    );
    let d = docs(&inject(&extra, &Options::default()).unwrap());
    assert_eq!(d[3]["spec"]["ports"][0]["targetPort"].as_u64(), Some(9000));
}

#[test]
fn services_of_other_pods_or_namespaces_are_untouched() {
    let input = APP.replace(
        "namespace: rag\nspec:\n  selector",
        "namespace: other\nspec:\n  selector",
    );
    let out = inject(&input, &Options::default()).unwrap();
    assert_eq!(
        docs(&out)[1]["spec"]["ports"][0]["targetPort"].as_u64(),
        Some(8000)
    );
    let input = APP.replace(
        "  selector:\n    app: rag\n  ports",
        "  selector:\n    app: web\n  ports",
    );
    let out = inject(&input, &Options::default()).unwrap();
    assert_eq!(
        docs(&out)[1]["spec"]["ports"][0]["targetPort"].as_u64(),
        Some(8000)
    );
}

#[test]
fn a_single_unnamed_port_is_taken_over() {
    let input = "apiVersion: apps/v1\nkind: StatefulSet\nmetadata:\n  name: s\nspec:\n  serviceName: s\n  \
                 selector:\n    matchLabels:\n      app: s\n  template:\n    metadata:\n      labels:\n        \
                 app: s\n    spec:\n      containers:\n      - name: main\n        image: x\n        ports:\n        \
                 - containerPort: 7000\n";
    let d = docs(&inject(input, &Options::default()).unwrap());
    assert_eq!(
        container(&d[0], "main")["ports"][0]["name"].as_str(),
        Some("app-http")
    );
    assert_eq!(
        container(&d[0], "driftguard")["ports"][0]["name"].as_str(),
        Some("http")
    );
}

#[test]
fn options_are_applied() {
    let opts = Options {
        image: "registry.local/dg:9".into(),
        config_map: "cm".into(),
        port_name: "grpc".into(),
        proxy_port: 9100,
        admin_port: 9902,
        admin_secret: "s".into(),
    };
    let d = docs(&inject(APP, &opts).unwrap());
    let side = container(&d[0], "driftguard");
    assert_eq!(side["image"].as_str(), Some("registry.local/dg:9"));
    assert_eq!(side["ports"][0]["name"].as_str(), Some("grpc"));
    assert_eq!(side["ports"][0]["containerPort"].as_u64(), Some(9100));
    assert_eq!(side["ports"][1]["containerPort"].as_u64(), Some(9902));
    assert_eq!(
        container(&d[0], "app")["ports"][1]["name"].as_str(),
        Some("app-grpc")
    );
    // The Service's grpc port had no targetPort: it meant 8500, the app port, so it moves.
    assert_eq!(d[1]["spec"]["ports"][1]["targetPort"].as_u64(), Some(9100));
    assert_eq!(d[1]["spec"]["ports"][0]["targetPort"].as_u64(), Some(8000));
}

fn err(input: &str) -> String {
    inject(input, &Options::default()).unwrap_err().to_string()
}

#[test]
fn refusals_name_the_document_and_the_problem() {
    assert!(err("a: [unclosed\n").starts_with("document 1: not YAML"));
    assert!(
        err("kind: ConfigMap\n---\njust text\n").starts_with("document 2: not a Kubernetes object")
    );
    assert_eq!(
        err("apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: c\n"),
        "the input holds no Deployment or StatefulSet to inject"
    );
    let no_containers = "kind: ConfigMap\n---\nkind: Deployment\nmetadata:\n  name: d\nspec:\n  template:\n    spec:\n      containers: []\n";
    assert_eq!(
        err(no_containers),
        "document 2 (Deployment d): it has no containers (spec.template.spec.containers)"
    );
    let no_port = APP.replace("name: http\n", "name: web\n");
    assert!(
        err(&no_port).starts_with("document 1 (Deployment rag): no port to take over"),
        "{}",
        err(&no_port)
    );
    let clash = APP.replace("containerPort: 8500", "containerPort: 9901");
    assert!(
        err(&clash).contains("container port 9901 is already used"),
        "{}",
        err(&clash)
    );
    let bad = Options {
        port_name: "HTTP".into(),
        ..Options::default()
    };
    assert!(inject(APP, &bad)
        .unwrap_err()
        .to_string()
        .starts_with("invalid option: --port-name"));
}

#[test]
fn port_names_follow_kubernetes_rules() {
    assert!(is_port_name("http"));
    assert!(is_port_name("app-http"));
    assert!(!is_port_name("9000"));
    assert!(!is_port_name("a--b"));
    assert!(!is_port_name("abcdefghijklmnop"));
    assert_eq!(app_port_name("abcdefghijklmno"), "app-abcdefghijk");
    assert_eq!(app_port_name("abcdefghij-lmno"), "app-abcdefghij");
}
