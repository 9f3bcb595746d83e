//! `deploy/kubernetes/` as a cluster would take it, checked offline: every manifest file and
//! both rendered overlays validate against the Kubernetes 1.30 schemas (kubernetes-validate,
//! strict: an unknown field fails too), and the rendered pods hold what the proxy's own config
//! expects (a hardened native sidecar, whole-directory read-only mounts of its config, price
//! books and secrets, one writable outbox, probes on the admin port, a grace period longer than
//! the proxy's shutdown budget).
//!
//! kubernetes-validate runs from a virtualenv at `target/k8s-venv` (`venv.rs`). The overlays are
//! rendered with `kubectl kustomize`: Debian has no kubectl package, so without it the tests
//! that need a rendering fail when `CI=true` and are skipped, saying why, elsewhere.
//!
//! kubernetes-validate has no schema for a custom resource and only warns about one; the kinds
//! it may skip are listed in [`CRD_KINDS`], every other warning fails, and the ServiceMonitor is
//! checked field by field below.

use std::collections::BTreeSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;

use serde_json::Value;

use super::proxy::repo;
use super::venv;

/// The validator, pinned: it bundles the schemas of every Kubernetes release it knows.
const VALIDATOR: &str = "kubernetes-validate==1.37.0";
/// The release the manifests target (native sidecars need >= 1.29).
const KUBERNETES: &str = "1.30.0";
/// Custom resources (apiVersion, kind) kubernetes-validate has no schema for.
const CRD_KINDS: &[(&str, &str)] = &[("monitoring.coreos.com/v1", "ServiceMonitor")];
const OVERLAYS: [&str; 2] = ["statefulset", "emptydir"];
const SIDECAR: &str = "credyt-proxy";
/// The price books the base's ConfigMap ships (copies of `pricing/*.toml`).
const BOOKS: [&str; 3] = ["assets.toml", "assignments.toml", "standard.toml"];

fn kubernetes_dir() -> PathBuf {
    repo().join("deploy").join("kubernetes")
}

/// Runs `cmd` with `stdin`; panics with its output unless it succeeded.
fn run(cmd: &mut Command, stdin: &str) -> String {
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    let mut input = child.stdin.take().unwrap();
    input.write_all(stdin.as_bytes()).unwrap();
    drop(input);
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

fn python() -> PathBuf {
    venv::python("k8s-venv", VALIDATOR)
}

/// Every document of a YAML stream, as JSON (PyYAML, which kubernetes-validate brings along).
fn yaml_documents(yaml: &str) -> Vec<Value> {
    let json = run(
        Command::new(python()).args([
            "-c",
            "import json, sys, yaml\n\
             json.dump([d for d in yaml.safe_load_all(sys.stdin) if d is not None], sys.stdout)",
        ]),
        yaml,
    );
    serde_json::from_str(&json).unwrap()
}

/// `kubernetes-validate -k 1.30.0 --strict --quiet <args>`: must succeed, and may only warn
/// that a listed custom resource has no schema. Returns how many documents it skipped so.
fn validate(args: &[&Path], stdin: &str) -> usize {
    let validator = python().with_file_name("kubernetes-validate");
    let out = run(
        Command::new(validator)
            .args(["-k", KUBERNETES, "--strict", "--quiet"])
            .args(args),
        stdin,
    );
    let version = KUBERNETES.rsplit_once('.').unwrap().0;
    let mut skipped = 0;
    for line in out.lines().filter(|l| !l.trim().is_empty()) {
        let crd = CRD_KINDS.iter().any(|(api, kind)| {
            line.starts_with("WARN ")
                && line.ends_with(&format!(
                    "Couldn't find schema for kind {kind} with api version {api} \
                     for kubernetes version {version}"
                ))
        });
        assert!(crd, "kubernetes-validate said more than it may:\n{out}");
        skipped += 1;
    }
    skipped
}

fn is_crd(doc: &Value) -> bool {
    CRD_KINDS
        .iter()
        .any(|(api, kind)| doc["apiVersion"] == *api && doc["kind"] == *kind)
}

/// Every `*.yaml` / `*.yml` file under `dir`, sorted.
fn yaml_files(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            files.extend(yaml_files(&path));
        } else if path.extension().is_some_and(|e| e == "yaml" || e == "yml") {
            files.push(path);
        }
    }
    files.sort();
    files
}

fn is_kustomization(path: &Path) -> bool {
    path.file_name().is_some_and(|n| {
        ["kustomization.yaml", "kustomization.yml", "Kustomization"].contains(&n.to_str().unwrap())
    })
}

/// `kubectl`, if installed. Missing under CI is a failure, not a skip.
fn kubectl() -> Option<&'static str> {
    let found = Command::new("kubectl")
        .args(["version", "--client"])
        .output()
        .is_ok_and(|o| o.status.success());
    if found {
        return Some("kubectl");
    }
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "kubectl is missing under CI: .ci/run checks for it (Debian has no package: \
         https://kubernetes.io/docs/tasks/tools/)"
    );
    eprintln!(
        "skipped: kubectl is not installed (Debian has no package: \
         https://kubernetes.io/docs/tasks/tools/); CI runs this test"
    );
    None
}

/// An overlay as `kubectl kustomize` renders it.
struct Rendered {
    name: &'static str,
    yaml: String,
    docs: Vec<Value>,
}

/// Both overlays, rendered once for every test; `None` without kubectl (outside CI).
fn rendered() -> Option<&'static [Rendered]> {
    static RENDERED: OnceLock<Option<Vec<Rendered>>> = OnceLock::new();
    RENDERED
        .get_or_init(|| {
            let kubectl = kubectl()?;
            Some(
                OVERLAYS
                    .iter()
                    .map(|&name| {
                        let yaml = run(
                            Command::new(kubectl)
                                .arg("kustomize")
                                .arg(kubernetes_dir().join("overlays").join(name)),
                            "",
                        );
                        let docs = yaml_documents(&yaml);
                        Rendered { name, yaml, docs }
                    })
                    .collect(),
            )
        })
        .as_deref()
}

impl Rendered {
    fn all(&self, kind: &str) -> Vec<&Value> {
        self.docs.iter().filter(|d| d["kind"] == kind).collect()
    }

    fn one(&self, kind: &str, name: &str) -> &Value {
        let found: Vec<_> = self
            .all(kind)
            .into_iter()
            .filter(|d| d["metadata"]["name"] == name)
            .collect();
        assert_eq!(found.len(), 1, "{}: one {kind} {name}", self.name);
        found[0]
    }

    /// The overlay's one workload: a StatefulSet or a Deployment.
    fn workload(&self) -> &Value {
        let found: Vec<_> = self
            .docs
            .iter()
            .filter(|d| d["kind"] == "StatefulSet" || d["kind"] == "Deployment")
            .collect();
        assert_eq!(found.len(), 1, "{}: one workload", self.name);
        found[0]
    }

    fn pod(&self) -> &Value {
        &self.workload()["spec"]["template"]["spec"]
    }

    fn sidecar(&self) -> &Value {
        let pod = self.pod();
        let found: Vec<_> = pod["initContainers"]
            .as_array()
            .unwrap_or_else(|| panic!("{}: no initContainers", self.name))
            .iter()
            .filter(|c| c["name"] == SIDECAR)
            .collect();
        assert_eq!(
            found.len(),
            1,
            "{}: one {SIDECAR} init container",
            self.name
        );
        found[0]
    }

    /// The sidecar's mount at `path`.
    fn mount(&self, path: &str) -> &Value {
        self.sidecar()["volumeMounts"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["mountPath"] == path)
            .unwrap_or_else(|| panic!("{}: the sidecar mounts nothing at {path}", self.name))
    }

    /// The pod's volume `name` (absent for a StatefulSet's claim template).
    fn volume(&self, name: &Value) -> Option<&Value> {
        self.pod()["volumes"]
            .as_array()
            .and_then(|vs| vs.iter().find(|v| v["name"] == *name))
    }

    /// The proxy's config.toml as the ConfigMap ships it.
    fn config(&self) -> toml_edit::DocumentMut {
        let config = self
            .all("ConfigMap")
            .into_iter()
            .find(|c| {
                c["metadata"]["name"]
                    .as_str()
                    .unwrap()
                    .starts_with("credyt-proxy-config")
            })
            .unwrap_or_else(|| panic!("{}: no credyt-proxy-config ConfigMap", self.name));
        config["data"]["config.toml"]
            .as_str()
            .unwrap()
            .parse()
            .unwrap()
    }

    /// The admin port's containerPort (`name: admin`).
    fn admin_port(&self) -> i64 {
        let ports = self.sidecar()["ports"].as_array().unwrap();
        let admin: Vec<_> = ports.iter().filter(|p| p["name"] == "admin").collect();
        assert_eq!(admin.len(), 1, "{}: one port named admin", self.name);
        admin[0]["containerPort"].as_i64().unwrap()
    }
}

/// Whether every label of `selector` is on `labels`.
fn selects(selector: &Value, labels: &Value) -> bool {
    let selector = selector.as_object().unwrap();
    !selector.is_empty() && selector.iter().all(|(k, v)| labels[k] == *v)
}

/// A memory quantity (`128Mi`, `2Gi`) in bytes.
fn bytes(quantity: &Value) -> u64 {
    let q = quantity.as_str().unwrap();
    let (number, unit) = q.split_at(q.find(|c: char| !c.is_ascii_digit()).unwrap_or(q.len()));
    let unit = match unit {
        "Ki" => 1 << 10,
        "Mi" => 1 << 20,
        "Gi" => 1 << 30,
        other => panic!("unexpected unit {other:?} in {q}"),
    };
    number.parse::<u64>().unwrap() * unit
}

fn port_of(listen: &str) -> i64 {
    listen.rsplit_once(':').unwrap().1.parse().unwrap()
}

#[test]
fn every_manifest_file_validates_against_kubernetes_1_30() {
    let files = yaml_files(&kubernetes_dir());
    // Patches are partial objects by design: they are validated inside the rendered overlays.
    let mut patches = BTreeSet::new();
    for kustomization in files.iter().filter(|f| is_kustomization(f)) {
        let dir = kustomization.parent().unwrap();
        let docs = yaml_documents(&std::fs::read_to_string(kustomization).unwrap());
        for patch in docs[0]["patches"].as_array().into_iter().flatten() {
            if let Some(path) = patch["path"].as_str() {
                patches.insert(dir.join(path).canonicalize().unwrap());
            }
        }
    }
    let manifests: Vec<&Path> = files
        .iter()
        .filter(|f| !is_kustomization(f) && !patches.contains(&f.canonicalize().unwrap()))
        .map(PathBuf::as_path)
        .collect();
    let names: BTreeSet<String> = manifests
        .iter()
        .map(|f| {
            f.strip_prefix(kubernetes_dir())
                .unwrap()
                .display()
                .to_string()
        })
        .collect();
    for expected in [
        "base/service.yaml",
        "base/pdb.yaml",
        "base/servicemonitor.yaml",
        "base/secret.example.yaml",
        "overlays/statefulset/statefulset.yaml",
        "overlays/statefulset/service-headless.yaml",
        "overlays/emptydir/deployment.yaml",
    ] {
        assert!(names.contains(expected), "{expected} not among {names:?}");
    }
    let mut documents = 0;
    let mut crds = 0;
    for file in &manifests {
        let docs = yaml_documents(&std::fs::read_to_string(file).unwrap());
        for doc in &docs {
            assert!(
                doc["apiVersion"].is_string() && doc["kind"].is_string(),
                "{} holds something that is not a Kubernetes object",
                file.display()
            );
        }
        documents += docs.len();
        crds += docs.iter().filter(|d| is_crd(d)).count();
    }
    assert_eq!(documents, manifests.len(), "one object per file");
    assert_eq!(
        validate(&manifests, ""),
        crds,
        "only the custom resources skipped"
    );
}

#[test]
fn the_base_price_books_are_copies_of_the_repositorys() {
    let shipped: BTreeSet<String> = std::fs::read_dir(repo().join("pricing"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.ends_with(".toml") && !n.starts_with('.'))
        .collect();
    let copies: BTreeSet<String> = std::fs::read_dir(kubernetes_dir().join("base/pricing"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(shipped, BTreeSet::from(BOOKS.map(String::from)));
    assert_eq!(
        copies, shipped,
        "deploy/kubernetes/base/pricing/ holds exactly pricing/*.toml \
         (and base/kustomization.yaml lists them)"
    );
    for book in BOOKS {
        let original = std::fs::read(repo().join("pricing").join(book)).unwrap();
        let copy = std::fs::read(kubernetes_dir().join("base/pricing").join(book)).unwrap();
        assert!(
            original == copy,
            "deploy/kubernetes/base/pricing/{book} differs from pricing/{book}: \
             cp pricing/*.toml deploy/kubernetes/base/pricing/"
        );
    }
}

#[test]
fn both_overlays_render_and_validate_against_kubernetes_1_30() {
    let Some(overlays) = rendered() else { return };
    for o in overlays {
        let crds = o.docs.iter().filter(|d| is_crd(d)).count();
        assert_eq!(crds, 1, "{}: the ServiceMonitor", o.name);
        assert_eq!(
            validate(&[Path::new("-")], &o.yaml),
            crds,
            "{}: only the custom resources skipped",
            o.name
        );
        // What a cluster gets: the workload, the two ConfigMaps, the Services, the budget and
        // the ServiceMonitor; never a Secret (applying must not overwrite the platform's).
        let mut kinds: Vec<&str> = o.docs.iter().map(|d| d["kind"].as_str().unwrap()).collect();
        kinds.sort_unstable();
        let expected: &[&str] = match o.name {
            "statefulset" => &[
                "ConfigMap",
                "ConfigMap",
                "PodDisruptionBudget",
                "Service",
                "Service",
                "ServiceMonitor",
                "StatefulSet",
            ],
            _ => &[
                "ConfigMap",
                "ConfigMap",
                "Deployment",
                "PodDisruptionBudget",
                "Service",
                "ServiceMonitor",
            ],
        };
        assert_eq!(kinds, expected, "{}", o.name);
    }
}

#[test]
fn the_proxy_is_a_hardened_native_sidecar() {
    let Some(overlays) = rendered() else { return };
    for o in overlays {
        let (pod, sidecar) = (o.pod(), o.sidecar());
        let n = o.name;
        // An init container that keeps running starts before the app and stops after it.
        assert_eq!(sidecar["restartPolicy"], "Always", "{n}");
        assert_eq!(sidecar["image"], "credyt-proxy:latest", "{n}");
        let apps = pod["containers"].as_array().unwrap();
        assert!(
            apps.iter().all(|c| c["name"] != SIDECAR) && !apps.is_empty(),
            "{n}: the app runs beside the sidecar"
        );
        let sc = &sidecar["securityContext"];
        assert_eq!(sc["runAsNonRoot"], true, "{n}");
        assert_eq!(sc["runAsUser"], 10001, "{n}");
        assert_eq!(sc["runAsGroup"], 10001, "{n}");
        assert_eq!(sc["readOnlyRootFilesystem"], true, "{n}");
        assert_eq!(sc["allowPrivilegeEscalation"], false, "{n}");
        assert_eq!(
            sc["capabilities"]["drop"],
            serde_json::json!(["ALL"]),
            "{n}"
        );
        assert!(sc["capabilities"]["add"].is_null(), "{n}");
        assert_eq!(sc["seccompProfile"]["type"], "RuntimeDefault", "{n}");
        assert_eq!(
            pod["securityContext"]["fsGroup"], sc["runAsGroup"],
            "{n}: the volumes belong to the proxy's group"
        );
        // Sized from the measured peak (92 MiB at ~16k events/s, 120k records pending).
        let resources = &sidecar["resources"];
        let (request, limit) = (
            bytes(&resources["requests"]["memory"]),
            bytes(&resources["limits"]["memory"]),
        );
        assert!(request >= 92 << 20 && limit >= request, "{n}: {resources}");
        assert!(resources["requests"]["cpu"].is_string(), "{n}: {resources}");
        assert!(
            resources["limits"]["cpu"].is_null(),
            "{n}: no CPU limit (throttling would slow the app's requests)"
        );
    }
}

#[test]
fn only_the_outbox_is_writable_and_mounts_are_whole_directories() {
    let Some(overlays) = rendered() else { return };
    for o in overlays {
        let n = o.name;
        let config = o.config();
        let outbox_dir = config["outbox"]["dir"].as_str().unwrap();
        let mounts = o.sidecar()["volumeMounts"].as_array().unwrap();
        let writable: Vec<_> = mounts.iter().filter(|m| m["readOnly"] != true).collect();
        assert_eq!(writable.len(), 1, "{n}: one writable mount: {mounts:?}");
        let outbox = writable[0];
        assert!(
            outbox_dir.starts_with(&format!("{}/", outbox["mountPath"].as_str().unwrap())),
            "{n}: outbox.dir {outbox_dir} is on the writable mount {outbox}"
        );
        assert_eq!(outbox["name"], "credyt-proxy-outbox", "{n}");
        for m in mounts {
            // A subPath mount never sees an update: hot reload follows the `..data` swap.
            assert!(
                m["subPath"].is_null() && m["subPathExpr"].is_null(),
                "{n}: {m}"
            );
        }
        let sources = [
            ("/etc/credyt-proxy/config", "configMap"),
            ("/etc/credyt-proxy/pricing", "configMap"),
            ("/etc/credyt-proxy/secrets", "secret"),
        ];
        for (path, source) in sources {
            let mount = o.mount(path);
            assert_eq!(mount["readOnly"], true, "{n}: {mount}");
            let volume = o
                .volume(&mount["name"])
                .unwrap_or_else(|| panic!("{n}: no volume for {mount}"));
            assert!(volume[source].is_object(), "{n}: {volume}");
        }
        assert_eq!(mounts.len(), sources.len() + 1, "{n}: {mounts:?}");
    }
}

#[test]
fn config_changes_roll_the_pods_and_price_books_reload_in_place() {
    let Some(overlays) = rendered() else { return };
    let base_config = std::fs::read_to_string(kubernetes_dir().join("base/config.toml")).unwrap();
    for o in overlays {
        let n = o.name;
        let config_volume = o
            .volume(&o.mount("/etc/credyt-proxy/config")["name"])
            .unwrap();
        let name = config_volume["configMap"]["name"].as_str().unwrap();
        let hash = name.strip_prefix("credyt-proxy-config-").unwrap_or("");
        assert!(
            !hash.is_empty() && hash.chars().all(|c| c.is_ascii_alphanumeric()),
            "{n}: config.toml is not hot reloaded, so its ConfigMap's name carries the \
             content hash and a change rolls the pods: {name}"
        );
        let config = o.one("ConfigMap", name);
        assert_eq!(config["data"]["config.toml"], base_config.as_str(), "{n}");
        let keys: Vec<&String> = config["data"].as_object().unwrap().keys().collect();
        assert_eq!(keys, ["config.toml"], "{n}");

        let pricing_volume = o
            .volume(&o.mount("/etc/credyt-proxy/pricing")["name"])
            .unwrap();
        assert_eq!(
            pricing_volume["configMap"]["name"], "credyt-proxy-pricing",
            "{n}: the price books are hot reloaded in place: a stable name"
        );
        let pricing = o.one("ConfigMap", "credyt-proxy-pricing");
        let data = pricing["data"].as_object().unwrap();
        let keys: Vec<&str> = data.keys().map(String::as_str).collect();
        assert_eq!(keys, BOOKS, "{n}: the pricing directory holds only books");
        for book in BOOKS {
            let shipped = std::fs::read_to_string(repo().join("pricing").join(book)).unwrap();
            assert_eq!(data[book], shipped.as_str(), "{n}: {book}");
        }
    }
}

#[test]
fn probes_service_and_servicemonitor_use_the_admin_port() {
    let Some(overlays) = rendered() else { return };
    for o in overlays {
        let n = o.name;
        let sidecar = o.sidecar();
        let admin = o.admin_port();
        let config = o.config();
        assert_eq!(
            port_of(config["server"]["admin_listen"].as_str().unwrap()),
            admin,
            "{n}"
        );
        for (probe, path) in [
            ("startupProbe", "/readyz"),
            ("readinessProbe", "/readyz"),
            ("livenessProbe", "/livez"),
        ] {
            let get = &sidecar[probe]["httpGet"];
            assert_eq!(get["path"], path, "{n}: {probe}");
            assert!(
                get["port"] == "admin" || get["port"] == admin,
                "{n}: {probe} on the admin port: {get}"
            );
        }
        // A draining proxy (readiness off) leaves the endpoints before its drain delay ends:
        // `shutdown.drain_delay_ms`, or the 5 s the deployment is planned around where
        // config.toml does not set it.
        let readiness = &sidecar["readinessProbe"];
        let detect_ms = readiness["periodSeconds"].as_i64().unwrap()
            * readiness["failureThreshold"].as_i64().unwrap_or(3)
            * 1000;
        let drain_ms = config
            .get("shutdown")
            .and_then(|s| s.get("drain_delay_ms"))
            .and_then(|d| d.as_integer())
            .unwrap_or(5000);
        assert!(detect_ms < drain_ms, "{n}: {readiness}");

        let service = o.one("Service", "credyt-proxy-admin");
        assert_eq!(service["spec"]["type"], "ClusterIP", "{n}");
        let ports = service["spec"]["ports"].as_array().unwrap();
        assert_eq!(ports.len(), 1, "{n}: only the admin port: {ports:?}");
        assert_eq!(ports[0]["name"], "admin", "{n}");
        assert_eq!(ports[0]["port"], admin, "{n}");
        assert!(
            ports[0]["targetPort"] == "admin" || ports[0]["targetPort"] == admin,
            "{n}"
        );

        let monitor = o.one("ServiceMonitor", "credyt-proxy");
        assert_eq!(monitor["apiVersion"], "monitoring.coreos.com/v1", "{n}");
        let endpoints = monitor["spec"]["endpoints"].as_array().unwrap();
        assert_eq!(endpoints.len(), 1, "{n}");
        assert_eq!(endpoints[0]["port"], "admin", "{n}");
        assert_eq!(endpoints[0]["path"], "/metrics", "{n}");
        // Scrapes the admin Service, and no other Service (each pod once).
        let selector = &monitor["spec"]["selector"]["matchLabels"];
        for s in o.all("Service") {
            assert_eq!(
                selects(selector, &s["metadata"]["labels"]),
                s["metadata"]["name"] == "credyt-proxy-admin",
                "{n}: {s}"
            );
        }
    }
}

#[test]
fn the_grace_period_outlasts_the_proxys_shutdown_budget() {
    let Some(overlays) = rendered() else { return };
    for o in overlays {
        let grace_ms = o.pod()["terminationGracePeriodSeconds"].as_i64().unwrap() * 1000;
        let shutdown_grace_ms = o.config()["server"]["shutdown_grace_ms"]
            .as_integer()
            .unwrap();
        // The kubelet stops the app first, the sidecar after it: the pod's one grace period
        // holds both, so it must be longer than the proxy's budget alone.
        assert!(
            grace_ms > shutdown_grace_ms,
            "{}: a grace period of {grace_ms} ms, shutdown_grace_ms = {shutdown_grace_ms}",
            o.name
        );
    }
}

#[test]
fn the_mounts_and_ports_match_the_config() {
    let Some(overlays) = rendered() else { return };
    let example =
        std::fs::read_to_string(kubernetes_dir().join("base/secret.example.yaml")).unwrap();
    let secret = &yaml_documents(&example)[0];
    let secret_keys: BTreeSet<&str> = secret["stringData"]
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    assert_eq!(
        secret_keys,
        BTreeSet::from(["platform-key", "tenants.toml"])
    );
    for value in secret["stringData"].as_object().unwrap().values() {
        assert!(value.as_str().unwrap().contains("REPLACE_ME"), "{value}");
    }
    for o in overlays {
        let n = o.name;
        let config = o.config();
        let sidecar = o.sidecar();

        let args: Vec<&str> = sidecar["args"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a.as_str().unwrap())
            .collect();
        let at = args.iter().position(|a| *a == "--config").unwrap();
        assert_eq!(args[0], "serve", "{n}");
        let config_mount = o.mount("/etc/credyt-proxy/config");
        assert_eq!(
            args[at + 1],
            format!(
                "{}/config.toml",
                config_mount["mountPath"].as_str().unwrap()
            ),
            "{n}"
        );

        assert_eq!(
            config["pricing"]["dir"].as_str(),
            Some("/etc/credyt-proxy/pricing")
        );
        o.mount("/etc/credyt-proxy/pricing");

        let secrets_mount = o.mount("/etc/credyt-proxy/secrets");
        let volume = o.volume(&secrets_mount["name"]).unwrap();
        assert_eq!(
            volume["secret"]["secretName"], secret["metadata"]["name"],
            "{n}"
        );
        assert!(
            volume["secret"]["items"].is_null(),
            "{n}: every key, as files"
        );
        for file in [
            config["credyt"]["api_key_file"].as_str().unwrap(),
            config["tenants"]["file"].as_str().unwrap(),
        ] {
            let (dir, key) = file.rsplit_once('/').unwrap();
            assert_eq!(dir, secrets_mount["mountPath"], "{n}: {file}");
            assert!(secret_keys.contains(key), "{n}: {file}");
        }

        // The tenant port: loopback only, where the app's SDK is pointed.
        let listen = config["server"]["listen"].as_str().unwrap();
        assert!(listen.starts_with("127.0.0.1:"), "{n}: {listen}");
        let ports = sidecar["ports"].as_array().unwrap();
        assert!(
            ports.iter().all(|p| p["containerPort"] != port_of(listen)),
            "{n}: the loopback port is not a container port"
        );
        let app = &o.pod()["containers"][0];
        let base_url = app["env"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["name"] == "CREDYT_BASE_URL")
            .unwrap();
        assert_eq!(base_url["value"], format!("http://{listen}"), "{n}");
    }
}

#[test]
fn the_statefulset_keeps_its_outbox_on_a_claim_and_the_deployment_in_an_emptydir() {
    let Some(overlays) = rendered() else { return };
    for o in overlays {
        let n = o.name;
        let workload = o.workload();
        let outbox = &o.mount("/var/lib/credyt-proxy")["name"];
        match n {
            "statefulset" => {
                assert_eq!(workload["kind"], "StatefulSet");
                assert!(
                    o.volume(outbox).is_none(),
                    "{n}: the claim, not a pod volume"
                );
                let claims = workload["spec"]["volumeClaimTemplates"].as_array().unwrap();
                let claim = claims
                    .iter()
                    .find(|c| c["metadata"]["name"] == *outbox)
                    .unwrap_or_else(|| panic!("{n}: no claim template for {outbox}"));
                assert_eq!(
                    claim["spec"]["accessModes"],
                    serde_json::json!(["ReadWriteOnce"])
                );
                assert!(bytes(&claim["spec"]["resources"]["requests"]["storage"]) >= 1 << 30);
                // Scaling down keeps a volume that may still hold undelivered debits.
                let retention = &workload["spec"]["persistentVolumeClaimRetentionPolicy"];
                assert_eq!(retention["whenScaled"], "Retain", "{n}");
                assert_eq!(retention["whenDeleted"], "Retain", "{n}");
                let governing = o.one("Service", workload["spec"]["serviceName"].as_str().unwrap());
                assert_eq!(governing["spec"]["clusterIP"], "None", "{n}: headless");
            }
            _ => {
                assert_eq!(workload["kind"], "Deployment");
                let volume = o.volume(outbox).unwrap();
                assert!(volume["emptyDir"].is_object(), "{n}: {volume}");
                assert!(
                    volume["emptyDir"]["sizeLimit"].is_null(),
                    "{n}: going over a sizeLimit evicts the pod and loses the outbox"
                );
            }
        }
    }
}

#[test]
fn every_selector_matches_the_pods() {
    let Some(overlays) = rendered() else { return };
    for o in overlays {
        let n = o.name;
        let workload = o.workload();
        let labels = &workload["spec"]["template"]["metadata"]["labels"];
        assert!(
            selects(&workload["spec"]["selector"]["matchLabels"], labels),
            "{n}"
        );
        for pdb in o.all("PodDisruptionBudget") {
            assert!(
                selects(&pdb["spec"]["selector"]["matchLabels"], labels),
                "{n}"
            );
        }
        for service in o.all("Service") {
            assert!(
                selects(&service["spec"]["selector"], labels),
                "{n}: {service}"
            );
        }
    }
}
