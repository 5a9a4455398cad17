//! The deployment files (`deploy/`, `Dockerfile`, `docs/contracts.md`) against the
//! worker they deploy: the dashboard and the alert rules only query metrics the
//! worker emits and the README documents; the YAML files parse and carry what the
//! worker needs (probes on its endpoints, a state volume, a grace period above its
//! shutdown timeout, ...).
//!
//! YAML is parsed by python3 with PyYAML (`apt-get install python3-yaml`) and
//! handed back as JSON: without them these tests fail, they never skip. When
//! `promtool` (scripts/install-deps.sh installs it) checks the rules, their unit
//! tests, the Prometheus config and every dashboard query; without it they fail.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use serde_json::{json, Value};

use crate::common::repo;

const DASHBOARD: &str = "deploy/grafana/waymark-dashboard.json";
const ALERTS: &str = "deploy/prometheus/alerts.yml";
const ALERT_TESTS: &str = "deploy/prometheus/alerts.test.yml";
const PROMETHEUS_CONFIG: &str = "deploy/prometheus/prometheus.yml";
const COMPOSE: &str = "deploy/compose.yaml";
const K8S: &str = "deploy/k8s";
/// The port `http.listen` uses in every deployment file.
const HTTP_PORT: u64 = 9464;
/// Where the example configurations have `waymark ingest` listen.
const INGEST_PORT: u64 = 8080;
/// `worker.shutdown_timeout`'s default, in seconds.
const DEFAULT_SHUTDOWN_SECONDS: u64 = 30;

// ---------------------------------------------------------------------------------
// Metric names

/// Metric families the dashboard and the alert rules query. Histogram and summary
/// series (`_bucket`, `_sum`, `_count`) count as their family; recording-rule names
/// (`waymark:...`) are not metrics of the worker.
pub(crate) fn metrics_referenced_by_deploy() -> BTreeSet<String> {
    [DASHBOARD, ALERTS].iter().flat_map(|file| metric_names_in(&read(file))).collect()
}

/// Metric families the worker can emit: the catalog in `src/telemetry.rs`, the
/// one place that names them (and no `"waymark_..."` literal under `src/` names
/// a metric outside it: see `metric_literals_in_src_are_in_the_catalog`).
pub(crate) fn metrics_the_worker_emits() -> BTreeSet<String> {
    waymark::telemetry::CATALOG.iter().map(|m| m.name.to_string()).collect()
}

/// Every `"waymark_..."` string literal under `src/`, as a metric family.
fn metric_literals_in_src() -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for file in files_under(&repo().join("src"), &["rs"]) {
        let text = std::fs::read_to_string(&file).unwrap_or_else(|e| panic!("cannot read {}: {e}", file.display()));
        for (at, _) in text.match_indices("\"waymark_") {
            if let Some(name) = metric_name_at(&text[at + 1..]) {
                names.insert(family(&name));
            }
        }
    }
    names
}

/// Metric names in the first column of README.md's `## Metrics` table.
fn metrics_in_readme_table() -> BTreeSet<String> {
    let readme = read("README.md");
    let section = readme
        .split("\n## ")
        .find(|s| s.starts_with("Metrics\n"))
        .unwrap_or_else(|| panic!("README.md has no `## Metrics` section"));
    let mut names = BTreeSet::new();
    for line in section.lines().filter(|l| l.trim_start().starts_with('|')) {
        let first_cell = line.split('|').nth(1).unwrap_or("");
        for (i, token) in first_cell.split('`').enumerate() {
            if i % 2 == 1 {
                if let Some(name) = metric_name_at(token) {
                    names.insert(name);
                }
            }
        }
    }
    assert!(!names.is_empty(), "README.md's Metrics section has no table of `waymark_...` names");
    names
}

/// Every `waymark_...` name in `text` that is not part of a longer identifier.
fn metric_names_in(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for (at, _) in text.match_indices("waymark_") {
        let before = text[..at].chars().next_back();
        if before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':') {
            continue;
        }
        if let Some(name) = metric_name_at(&text[at..]) {
            names.insert(family(&name));
        }
    }
    names
}

/// The `waymark_[a-z0-9_]+` name at the start of `text`, if any.
fn metric_name_at(text: &str) -> Option<String> {
    let name: String = text.chars().take_while(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '_').collect();
    (name.starts_with("waymark_") && name.len() > "waymark_".len() && !name.ends_with('_')).then_some(name)
}

/// `x_bucket`, `x_sum`, `x_count` -> `x`.
fn family(name: &str) -> String {
    for suffix in ["_bucket", "_sum", "_count"] {
        if let Some(base) = name.strip_suffix(suffix) {
            return base.to_string();
        }
    }
    name.to_string()
}

#[test]
fn deploy_queries_only_metrics_the_worker_emits() {
    let emitted = metrics_the_worker_emits();
    assert!(emitted.contains("waymark_events_total"), "the scan of src/ found no metric names: {emitted:?}");
    let referenced = metrics_referenced_by_deploy();
    assert!(referenced.len() >= 10, "the dashboard and alerts reference only {referenced:?}");
    let unknown: Vec<_> = referenced.difference(&emitted).collect();
    assert!(
        unknown.is_empty(),
        "{DASHBOARD} or {ALERTS} query metrics that no \"waymark_...\" literal in src/ names: {unknown:?} \
         (a renamed metric, or one the worker does not emit yet)"
    );
}

#[test]
fn deploy_metrics_are_documented_in_the_readme() {
    let documented = metrics_in_readme_table();
    let missing: Vec<_> = metrics_referenced_by_deploy().into_iter().filter(|m| !documented.contains(m)).collect();
    assert!(missing.is_empty(), "add rows to README.md's Metrics table for the metrics the dashboard or alerts use: {missing:?}");
}

#[test]
fn emitted_metrics_are_documented_in_the_readme() {
    let documented = metrics_in_readme_table();
    let missing: Vec<_> = metrics_the_worker_emits().into_iter().filter(|m| !documented.contains(m)).collect();
    assert!(missing.is_empty(), "add rows to README.md's Metrics table for metrics the worker emits: {missing:?}");
}

/// A metric named in a literal but missing from the catalog would have no
/// help text and no README row, and would escape the checks above.
#[test]
fn metric_literals_in_src_are_in_the_catalog() {
    let catalog = metrics_the_worker_emits();
    let stray: Vec<_> = metric_literals_in_src().into_iter().filter(|n| !catalog.contains(n)).collect();
    assert!(stray.is_empty(), "metric names under src/ that are not in telemetry::CATALOG: {stray:?}");
}

/// The README's Metrics table is the catalog: the same names, and each row's
/// labels column names the metric's labels (and none for a metric without).
#[test]
fn the_readme_metrics_table_is_the_catalog() {
    let readme = read("README.md");
    let section = readme.split("\n## ").find(|s| s.starts_with("Metrics\n")).expect("a Metrics section");
    let mut rows: BTreeMap<String, String> = BTreeMap::new();
    for line in section.lines().filter(|l| l.trim_start().starts_with("| `waymark_")) {
        let cells: Vec<&str> = line.split('|').collect();
        for (i, token) in cells[1].split('`').enumerate() {
            if i % 2 == 1 {
                if let Some(name) = metric_name_at(token) {
                    rows.insert(name, cells[2].trim().to_string());
                }
            }
        }
    }
    let documented: BTreeSet<String> = rows.keys().cloned().collect();
    assert_eq!(documented, metrics_the_worker_emits(), "README.md's Metrics table and telemetry::CATALOG differ");
    for metric in waymark::telemetry::CATALOG {
        let labels = &rows[metric.name];
        if metric.labels.is_empty() {
            assert!(labels.is_empty(), "README.md gives {} labels ({labels}) the catalog does not", metric.name);
        }
        for label in metric.labels {
            assert!(labels.contains(label), "README.md's row of {} does not name its label `{label}`: {labels}", metric.name);
        }
    }
}

#[test]
fn metric_names_are_found_as_families() {
    let text = r#"histogram_quantile(0.99, rate(waymark_process_seconds_bucket[5m])) / my_waymark_x
        waymark:dedupe_hit_ratio:rate5m "waymark_events_total{carrier=\"ups\"}" waymark_ alone"#;
    let found: Vec<_> = metric_names_in(text).into_iter().collect();
    assert_eq!(found, ["waymark_events_total", "waymark_process_seconds"]);
}

// ---------------------------------------------------------------------------------
// Grafana dashboard

fn dashboard() -> Value {
    serde_json::from_str(&read(DASHBOARD)).unwrap_or_else(|e| panic!("{DASHBOARD} is not valid JSON: {e}"))
}

/// Panels, including those nested in collapsed rows.
fn panels(dashboard: &Value) -> Vec<Value> {
    fn walk(list: &Value, out: &mut Vec<Value>) {
        for panel in list.as_array().into_iter().flatten() {
            out.push(panel.clone());
            walk(&panel["panels"], out);
        }
    }
    let mut out = Vec::new();
    walk(&dashboard["panels"], &mut out);
    out
}

/// A data source reference that goes through the dashboard's data source variable.
fn uses_datasource_variable(datasource: &Value) -> bool {
    let uid = datasource.get("uid").and_then(Value::as_str).or(datasource.as_str()).unwrap_or("");
    matches!(uid, "${datasource}" | "$datasource" | "${DS_PROMETHEUS}")
}

#[test]
fn dashboard_panels_each_have_a_title_and_a_prometheus_query() {
    let dashboard = dashboard();
    let schema_version = dashboard["schemaVersion"].as_u64().expect("schemaVersion");
    assert!((36..=41).contains(&schema_version), "schemaVersion {schema_version}: expected about 39");
    assert!(dashboard["uid"].as_str().is_some_and(|u| !u.is_empty()), "the dashboard needs a fixed uid");
    let variables = dashboard["templating"]["list"].as_array().cloned().unwrap_or_default();
    let has_datasource_variable = variables.iter().any(|v| v["type"] == "datasource" && v["query"] == "prometheus")
        || dashboard["__inputs"].as_array().into_iter().flatten().any(|i| i["name"] == "DS_PROMETHEUS");
    assert!(has_datasource_variable, "the data source must be a variable (type datasource, query prometheus) or ${{DS_PROMETHEUS}}");
    for variable in variables.iter().filter(|v| v["type"] == "query") {
        assert!(uses_datasource_variable(&variable["datasource"]), "variable {} does not use the data source variable", variable["name"]);
    }

    let panels = panels(&dashboard);
    assert!(panels.len() >= 10, "only {} panels", panels.len());
    let mut ids = BTreeSet::new();
    let mut cells = BTreeMap::new();
    for panel in &panels {
        let title = panel["title"].as_str().unwrap_or("");
        assert!(!title.trim().is_empty(), "a panel has no title: {panel}");
        assert!(ids.insert(panel["id"].as_u64().unwrap_or_else(|| panic!("panel {title:?} has no id"))), "panel id of {title:?} repeats");
        if panel["type"] == "row" {
            continue;
        }
        let targets = panel["targets"].as_array().cloned().unwrap_or_default();
        let exprs: Vec<&str> = targets.iter().filter_map(|t| t["expr"].as_str()).filter(|e| !e.trim().is_empty()).collect();
        assert!(!exprs.is_empty(), "panel {title:?} has no target with an expr");
        assert!(uses_datasource_variable(&panel["datasource"]), "panel {title:?} does not use the data source variable");
        for target in &targets {
            assert!(target["datasource"].is_null() || uses_datasource_variable(&target["datasource"]), "a target of {title:?} names a fixed data source");
        }
        // Laid out on Grafana's 24-column grid, without overlaps.
        let pos = &panel["gridPos"];
        let (x, y, w, h) = (pos["x"].as_u64(), pos["y"].as_u64(), pos["w"].as_u64(), pos["h"].as_u64());
        let (Some(x), Some(y), Some(w), Some(h)) = (x, y, w, h) else { panic!("panel {title:?} has no complete gridPos") };
        assert!(w > 0 && h > 0 && x + w <= 24, "panel {title:?} does not fit the grid: {pos}");
        for cx in x..x + w {
            for cy in y..y + h {
                if let Some(other) = cells.insert((cx, cy), title.to_string()) {
                    panic!("panels {other:?} and {title:?} overlap at ({cx}, {cy})");
                }
            }
        }
    }
}

/// Dashboard queries with Grafana's variables replaced, for promtool.
fn dashboard_queries_as_promql() -> Vec<(String, String)> {
    let mut queries = Vec::new();
    for panel in panels(&dashboard()) {
        for target in panel["targets"].as_array().into_iter().flatten() {
            if let Some(expr) = target["expr"].as_str() {
                let name = format!("{} / {}", panel["title"].as_str().unwrap_or(""), target["refId"].as_str().unwrap_or(""));
                queries.push((name, substitute_variables(expr)));
            }
        }
    }
    queries
}

/// `$__rate_interval` and friends become `5m`; any other `$var` / `${var}` a
/// match-all regex (the dashboard only uses variables in label matchers).
fn substitute_variables(expr: &str) -> String {
    let mut out = String::new();
    let mut rest = expr;
    while let Some(at) = rest.find('$') {
        out.push_str(&rest[..at]);
        let after = &rest[at + 1..];
        let (name, len) = if let Some(braced) = after.strip_prefix('{') {
            let end = braced.find('}').unwrap_or(braced.len());
            (&braced[..end], end + 2)
        } else {
            let end = after.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(after.len());
            (&after[..end], end)
        };
        out.push_str(if name.starts_with("__") { "5m" } else { ".*" });
        rest = &after[len.min(after.len())..];
    }
    out.push_str(rest);
    out
}

#[test]
fn dashboard_variables_are_substituted_for_promtool() {
    assert_eq!(
        substitute_variables(r#"rate(x{instance=~"$instance", c=~"${carrier}"}[$__rate_interval])"#),
        r#"rate(x{instance=~".*", c=~".*"}[5m])"#
    );
}

// ---------------------------------------------------------------------------------
// YAML, through python3 + PyYAML

const PARSE_YAML: &str = r#"
import json, sys
try:
    import yaml
except ImportError:
    sys.stderr.write("python3 has no yaml module\n")
    sys.exit(3)
out = {}
for path in sys.argv[1:]:
    with open(path) as f:
        out[path] = list(yaml.safe_load_all(f))
json.dump(out, sys.stdout, default=str)
"#;

/// Every `*.yml` / `*.yaml` under deploy/, parsed: relative path -> documents.
fn yaml() -> &'static BTreeMap<String, Vec<Value>> {
    static PARSED: OnceLock<BTreeMap<String, Vec<Value>>> = OnceLock::new();
    PARSED.get_or_init(|| {
        let root = repo();
        let files: Vec<String> = files_under(&root.join("deploy"), &["yml", "yaml"])
            .iter()
            .map(|p| p.strip_prefix(&root).unwrap().to_string_lossy().into_owned())
            .collect();
        assert!(files.len() >= 9, "expected the compose, Prometheus, Grafana and Kubernetes YAML files, found {files:?}");
        // Debian's interpreter first: python3-yaml installs its module there, while
        // a python3 earlier on PATH (pyenv, a venv) may not have it.
        let python = if std::path::Path::new("/usr/bin/python3").exists() { "/usr/bin/python3" } else { "python3" };
        let output = match Command::new(python).arg("-c").arg(PARSE_YAML).args(&files).current_dir(&root).output() {
            Ok(output) => output,
            Err(e) => panic!("cannot run python3 ({e}): the deploy tests parse YAML with python3 and PyYAML: apt-get install python3-yaml"),
        };
        let stderr = String::from_utf8_lossy(&output.stderr);
        match output.status.code() {
            Some(0) => {}
            Some(3) => panic!("{stderr}the deploy tests parse YAML with PyYAML: apt-get install python3-yaml"),
            _ => panic!("a YAML file under deploy/ does not parse:\n{stderr}"),
        }
        serde_json::from_slice(&output.stdout).expect("python3 printed JSON")
    })
}

fn yaml_file(path: &str) -> &'static [Value] {
    yaml().get(path).unwrap_or_else(|| panic!("{path} is missing (or not a .yml/.yaml file under deploy/)"))
}

fn single_document(path: &str) -> &'static Value {
    match yaml_file(path) {
        [doc] => doc,
        docs => panic!("{path}: expected one YAML document, found {}", docs.len()),
    }
}

#[test]
fn every_yaml_file_under_deploy_parses() {
    for (path, docs) in yaml() {
        assert!(docs.iter().any(|d| !d.is_null()), "{path} is empty");
    }
}

// ---------------------------------------------------------------------------------
// Kubernetes

fn k8s_objects() -> Vec<(String, Value)> {
    yaml()
        .iter()
        .filter(|(path, _)| path.starts_with(&format!("{K8S}/")) && !path.ends_with("kustomization.yaml"))
        .flat_map(|(path, docs)| docs.iter().filter(|d| !d.is_null()).map(move |d| (path.clone(), d.clone())))
        .collect()
}

/// The one object of `kind` of the worker (component `worker`, or none).
fn k8s_object(kind: &str) -> Value {
    k8s_object_of(kind, "worker")
}

/// The one object of `kind` whose `app.kubernetes.io/component` label is
/// `component` (objects without the label count as the worker's).
fn k8s_object_of(kind: &str, component: &str) -> Value {
    let found: Vec<Value> = k8s_objects()
        .into_iter()
        .filter(|(_, o)| o["kind"] == kind && o["metadata"]["labels"]["app.kubernetes.io/component"].as_str().unwrap_or("worker") == component)
        .map(|(_, o)| o)
        .collect();
    match found.as_slice() {
        [one] => one.clone(),
        _ => panic!("expected one {kind} of component {component} in {K8S}, found {}", found.len()),
    }
}

fn str_at<'a>(value: &'a Value, pointer: &str) -> &'a str {
    value.pointer(pointer).and_then(Value::as_str).unwrap_or_else(|| panic!("missing string at {pointer}"))
}

/// The container port a probe targets (a number or a port name).
fn probe_port(container: &Value, probe: &str) -> u64 {
    let port = &container[probe]["httpGet"]["port"];
    if let Some(n) = port.as_u64() {
        return n;
    }
    let name = port.as_str().unwrap_or_else(|| panic!("{probe} has no httpGet.port"));
    container["ports"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|p| p["name"] == name)
        .and_then(|p| p["containerPort"].as_u64())
        .unwrap_or_else(|| panic!("{probe} names port {name:?}, which the container does not declare"))
}

/// Seconds in a humantime duration like `30s`, `2m`, `1h` (what the config uses).
fn seconds(duration: &str) -> Option<u64> {
    let split = duration.find(|c: char| !c.is_ascii_digit())?;
    let n: u64 = duration[..split].parse().ok()?;
    match &duration[split..] {
        "s" => Some(n),
        "m" => Some(n * 60),
        "h" => Some(n * 3600),
        _ => None,
    }
}

#[test]
fn statefulset_probes_state_volume_grace_and_identity() {
    let sts = k8s_object("StatefulSet");
    let service_name = str_at(&sts, "/spec/serviceName");
    let headless = k8s_objects()
        .into_iter()
        .any(|(_, o)| o["kind"] == "Service" && o["metadata"]["name"] == service_name && o["spec"]["clusterIP"] == "None");
    assert!(headless, "spec.serviceName {service_name:?} must name a headless Service (clusterIP: None) in {K8S}");

    let pod = &sts["spec"]["template"]["spec"];
    let container = &pod["containers"][0];
    assert_eq!(str_at(container, "/livenessProbe/httpGet/path"), "/healthz");
    assert_eq!(str_at(container, "/readinessProbe/httpGet/path"), "/readyz");
    assert_eq!(probe_port(container, "livenessProbe"), HTTP_PORT);
    assert_eq!(probe_port(container, "readinessProbe"), HTTP_PORT);
    for side in ["requests", "limits"] {
        for resource in ["cpu", "memory"] {
            assert!(!container["resources"][side][resource].is_null(), "container resources.{side}.{resource} is not set");
        }
    }

    // State: a claim template, mounted where the worker keeps its state.
    let claims: Vec<&str> = sts["spec"]["volumeClaimTemplates"]
        .as_array()
        .expect("volumeClaimTemplates")
        .iter()
        .map(|c| str_at(c, "/metadata/name"))
        .collect();
    assert!(!claims.is_empty(), "no volumeClaimTemplates");
    let env: BTreeMap<String, Value> = container["env"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|e| (e["name"].as_str().unwrap_or("").to_string(), e.clone()))
        .collect();
    let state_dir = env.get("WAYMARK_STATE_DIR").map(|e| str_at(e, "/value").to_string()).unwrap_or_else(|| "/var/lib/waymark/state".into());
    let state_mounted = container["volumeMounts"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|m| claims.contains(&m["name"].as_str().unwrap_or("")) && Path::new(&state_dir).starts_with(str_at(m, "/mountPath")));
    assert!(state_mounted, "no volume claim template is mounted at or above the state directory {state_dir}");

    // exactly-once: a transactional id per pod, stable across restarts.
    let txn = env.get("WAYMARK_TRANSACTIONAL_ID").expect("WAYMARK_TRANSACTIONAL_ID is not set");
    assert_eq!(str_at(txn, "/valueFrom/fieldRef/fieldPath"), "metadata.name");

    // Listening on all interfaces, or the probes cannot reach it.
    let configmaps = k8s_objects().into_iter().filter(|(_, o)| o["kind"] == "ConfigMap").map(|(_, o)| o).collect::<Vec<_>>();
    let listen_env = env.get("WAYMARK_HTTP_LISTEN").and_then(|e| e["value"].as_str()).map(str::to_string);
    let toml = configmaps.iter().find_map(|c| c["data"]["waymark.toml"].as_str()).expect("a ConfigMap with waymark.toml");
    let listen = listen_env.unwrap_or_else(|| toml_value(toml, "listen").expect("http.listen"));
    assert_eq!(listen, format!("0.0.0.0:{HTTP_PORT}"));

    // The grace period outlasts the worker's own shutdown deadline.
    let shutdown = toml_value(toml, "shutdown_timeout").map(|d| seconds(&d).expect("shutdown_timeout in s/m/h")).unwrap_or(DEFAULT_SHUTDOWN_SECONDS);
    let grace = pod["terminationGracePeriodSeconds"].as_u64().expect("terminationGracePeriodSeconds");
    assert!(grace > shutdown, "terminationGracePeriodSeconds {grace} must exceed worker.shutdown_timeout ({shutdown}s)");

    // Non-root, read-only root file system.
    let non_root = pod["securityContext"]["runAsNonRoot"] == true || container["securityContext"]["runAsNonRoot"] == true;
    assert!(non_root, "runAsNonRoot is not set");
    assert_eq!(container["securityContext"]["readOnlyRootFilesystem"], true);

    // Every ConfigMap the pod uses exists.
    let names: BTreeSet<&str> = configmaps.iter().map(|c| str_at(c, "/metadata/name")).collect();
    let used = container["envFrom"].as_array().into_iter().flatten().filter_map(|e| e["configMapRef"]["name"].as_str())
        .chain(pod["volumes"].as_array().into_iter().flatten().filter_map(|v| v["configMap"]["name"].as_str()));
    for name in used {
        assert!(names.contains(name), "the StatefulSet uses ConfigMap {name:?}, which {K8S} does not define");
    }
}

/// `key = "value"` from a flat reading of a TOML text (enough for our config).
fn toml_value(toml: &str, key: &str) -> Option<String> {
    toml.lines().find_map(|line| {
        let (k, v) = line.split_once('=')?;
        (k.trim() == key).then(|| v.split('#').next().unwrap_or("").trim().trim_matches('"').to_string())
    })
}

#[test]
fn pdb_service_and_kustomization_match_the_statefulset() {
    let sts = k8s_object("StatefulSet");
    let pod_labels = sts["spec"]["template"]["metadata"]["labels"].as_object().expect("pod labels").clone();
    let selects_pods = |selector: &Value| {
        selector.as_object().is_some_and(|s| !s.is_empty() && s.iter().all(|(k, v)| pod_labels.get(k) == Some(v)))
    };

    let pdb = k8s_object("PodDisruptionBudget");
    assert_eq!(pdb["spec"]["maxUnavailable"], 1);
    assert!(selects_pods(&pdb["spec"]["selector"]["matchLabels"]), "the PDB does not select the StatefulSet's pods");

    let service = k8s_object("Service");
    assert!(selects_pods(&service["spec"]["selector"]), "the Service does not select the StatefulSet's pods");
    let ports: Vec<u64> = service["spec"]["ports"].as_array().into_iter().flatten().filter_map(|p| p["port"].as_u64()).collect();
    assert!(ports.contains(&HTTP_PORT), "the Service does not expose the metrics port {HTTP_PORT}: {ports:?}");

    let kustomization = single_document(&format!("{K8S}/kustomization.yaml"));
    let listed: BTreeSet<String> = kustomization["resources"].as_array().expect("resources").iter().map(|r| r.as_str().unwrap().to_string()).collect();
    let present: BTreeSet<String> = yaml()
        .keys()
        .filter_map(|p| p.strip_prefix(&format!("{K8S}/")))
        .filter(|p| *p != "kustomization.yaml")
        .map(str::to_string)
        .collect();
    assert_eq!(listed, present, "kustomization.yaml must list exactly the manifests in {K8S}");
}

/// `waymark ingest` as a Deployment: probes on its port, a Service in front, a
/// grace period above its shutdown time, its own configuration (sources that
/// parse as `[ingest]`), and the webhook secrets from a Secret.
#[test]
fn ingest_deployment_service_and_config() {
    let deployment = k8s_object_of("Deployment", "ingest");
    let pod = &deployment["spec"]["template"]["spec"];
    let container = &pod["containers"][0];
    assert_eq!(as_words(&container["args"])[0], "ingest");
    assert_eq!(str_at(container, "/livenessProbe/httpGet/path"), "/healthz");
    assert_eq!(str_at(container, "/readinessProbe/httpGet/path"), "/readyz");
    assert_eq!(probe_port(container, "readinessProbe"), INGEST_PORT);
    assert_eq!(container["securityContext"]["readOnlyRootFilesystem"], true);
    let secret = container["envFrom"].as_array().into_iter().flatten().any(|e| e["secretRef"]["name"].is_string());
    assert!(secret, "the webhook secrets must come from a Secret (envFrom secretRef)");

    let config_map = k8s_object_of("ConfigMap", "ingest");
    let toml = config_map["data"]["ingest.toml"].as_str().expect("ingest.toml in the ingest ConfigMap");
    let raw = waymark::config::RawConfig::from_toml(toml).unwrap_or_else(|e| panic!("the ingest ConfigMap's ingest.toml: {e}"));
    assert_eq!(raw.ingest.listen, format!("0.0.0.0:{INGEST_PORT}"));
    assert!(!raw.ingest.sources.is_empty(), "the example has sources");
    let mounted = pod["volumes"].as_array().into_iter().flatten().any(|v| v["configMap"]["name"] == config_map["metadata"]["name"]);
    assert!(mounted, "the Deployment does not mount its ConfigMap");

    let shutdown = seconds(&raw.ingest.shutdown_timeout).expect("ingest.shutdown_timeout in s/m/h");
    let grace = pod["terminationGracePeriodSeconds"].as_u64().expect("terminationGracePeriodSeconds");
    assert!(grace > shutdown, "terminationGracePeriodSeconds {grace} must exceed ingest.shutdown_timeout ({shutdown}s)");

    let service = k8s_object_of("Service", "ingest");
    let labels = deployment["spec"]["template"]["metadata"]["labels"].as_object().expect("pod labels").clone();
    let selects = service["spec"]["selector"].as_object().is_some_and(|s| !s.is_empty() && s.iter().all(|(k, v)| labels.get(k) == Some(v)));
    assert!(selects, "the ingest Service does not select the ingest pods");

    // The compose stack runs it too, with a configuration that parses.
    let compose = single_document(COMPOSE);
    let ingest = &compose["services"]["ingest"];
    assert_eq!(as_words(&ingest["command"])[0], "ingest", "compose has no ingest service");
    let compose_toml = read("deploy/ingest.toml");
    let raw = waymark::config::RawConfig::from_toml(&compose_toml).unwrap_or_else(|e| panic!("deploy/ingest.toml: {e}"));
    assert_eq!(raw.ingest.listen, format!("0.0.0.0:{INGEST_PORT}"));
    let config = single_document(PROMETHEUS_CONFIG);
    let scraped = config["scrape_configs"].as_array().into_iter().flatten().any(|j| {
        j["static_configs"][0]["targets"].as_array().into_iter().flatten().any(|t| t.as_str() == Some(&format!("ingest:{INGEST_PORT}")))
    });
    assert!(scraped, "Prometheus does not scrape the compose stack's receiver");
}

// ---------------------------------------------------------------------------------
// Compose, Prometheus config, Grafana provisioning

/// Compose `environment` as a map (it may be a map or a list of `K=V`).
fn compose_env(service: &Value) -> BTreeMap<String, String> {
    match &service["environment"] {
        Value::Object(map) => map.iter().map(|(k, v)| (k.clone(), v.as_str().map(str::to_string).unwrap_or_else(|| v.to_string()))).collect(),
        Value::Array(list) => list.iter().filter_map(|e| e.as_str()?.split_once('=')).map(|(k, v)| (k.into(), v.into())).collect(),
        _ => BTreeMap::new(),
    }
}

/// Compose short-syntax volumes as (source, target).
fn compose_volumes(service: &Value) -> Vec<(String, String)> {
    service["volumes"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .map(|v| {
            let mut parts = v.split(':');
            (parts.next().unwrap_or("").to_string(), parts.next().unwrap_or("").to_string())
        })
        .collect()
}

fn as_words(value: &Value) -> Vec<String> {
    match value {
        Value::String(s) => s.split_whitespace().map(str::to_string).collect(),
        Value::Array(items) => items.iter().filter_map(Value::as_str).map(str::to_string).collect(),
        _ => Vec::new(),
    }
}

#[test]
fn compose_runs_kafka_the_worker_prometheus_and_grafana() {
    let compose = single_document(COMPOSE);
    let services = compose["services"].as_object().expect("services");
    for name in ["kafka", "waymark", "prometheus", "grafana"] {
        assert!(services.contains_key(name), "{COMPOSE} has no {name} service");
    }

    let kafka = &services["kafka"];
    assert!(str_at(kafka, "/image").starts_with("apache/kafka:4."), "kafka must be the official apache/kafka 4.x image");
    let kafka_env = compose_env(kafka);
    assert!(kafka_env.get("KAFKA_PROCESS_ROLES").is_some_and(|r| r.contains("broker") && r.contains("controller")), "single-node KRaft: broker,controller");
    let advertised = kafka_env.get("KAFKA_ADVERTISED_LISTENERS").expect("KAFKA_ADVERTISED_LISTENERS");
    assert!(advertised.split(',').count() >= 2, "an internal and a host listener: {advertised}");
    assert!(!kafka["healthcheck"]["test"].is_null(), "kafka needs a healthcheck for depends_on: service_healthy");

    let waymark = &services["waymark"];
    let context = repo().join("deploy").join(str_at(waymark, "/build/context"));
    assert!(context.join("Dockerfile").is_file(), "the waymark build context {} has no Dockerfile", context.display());
    assert_eq!(as_words(&waymark["command"]), ["run", "--config", "/etc/waymark/waymark.toml"]);
    let env = compose_env(waymark);
    assert_eq!(env.get("WAYMARK_HTTP_LISTEN").map(String::as_str), Some("0.0.0.0:9464"));
    let brokers = env.get("WAYMARK_BROKERS").expect("WAYMARK_BROKERS");
    assert!(brokers.starts_with("kafka:") && advertised.contains(brokers.as_str()), "WAYMARK_BROKERS {brokers} must be kafka's internal advertised listener");
    assert_eq!(waymark["depends_on"]["kafka"]["condition"], "service_healthy");
    let health = as_words(&waymark["healthcheck"]["test"]);
    assert!(health.windows(2).any(|w| w == ["waymark", "health"]), "the worker's healthcheck must run `waymark health`: {health:?}");
    let state_dir = env.get("WAYMARK_STATE_DIR").cloned().unwrap_or_else(|| "/var/lib/waymark/state".into());
    let named_volumes = compose["volumes"].as_object().cloned().unwrap_or_default();
    let state_volume = compose_volumes(waymark).into_iter().any(|(source, target)| named_volumes.contains_key(&source) && Path::new(&state_dir).starts_with(&target));
    assert!(state_volume, "the worker's state directory {state_dir} must be on a named volume");

    // Every file the stack mounts exists in the repository.
    for (name, service) in services {
        for (source, target) in compose_volumes(service) {
            if source.starts_with('.') {
                let path = repo().join("deploy").join(&source);
                assert!(path.exists(), "service {name} mounts {source} (at {target}), which does not exist");
            }
        }
    }
    let mounts = |service: &str| compose_volumes(&services[service]).into_iter().map(|(s, t)| (s.trim_start_matches("./").to_string(), t)).collect::<BTreeMap<_, _>>();
    let prometheus = mounts("prometheus");
    assert_eq!(prometheus.get("prometheus/prometheus.yml").map(String::as_str), Some("/etc/prometheus/prometheus.yml"));
    assert_eq!(prometheus.get("prometheus/alerts.yml").map(String::as_str), Some("/etc/prometheus/alerts.yml"));

    // Grafana loads the dashboard from where the provider looks.
    let grafana = mounts("grafana");
    let dashboard_at = grafana.get("grafana/waymark-dashboard.json").expect("grafana mounts the dashboard JSON");
    let providers = single_document("deploy/grafana/provisioning/dashboards/waymark.yml");
    let provider_path = str_at(&providers["providers"][0], "/options/path");
    assert_eq!(Path::new(dashboard_at).parent(), Some(Path::new(provider_path)), "the dashboard is mounted outside the provider's path");
    for dir in ["grafana/provisioning/datasources", "grafana/provisioning/dashboards"] {
        assert!(grafana.contains_key(dir), "grafana does not mount {dir}");
    }
    let datasources = single_document("deploy/grafana/provisioning/datasources/prometheus.yml");
    let prometheus_ds = datasources["datasources"].as_array().into_iter().flatten().find(|d| d["type"] == "prometheus").expect("a prometheus data source");
    assert!(str_at(prometheus_ds, "/url").contains("prometheus:9090"), "the data source must point at the prometheus service");
}

#[test]
fn prometheus_scrapes_the_worker_and_loads_the_rules() {
    let config = single_document(PROMETHEUS_CONFIG);
    let rule_files: Vec<&str> = config["rule_files"].as_array().expect("rule_files").iter().filter_map(Value::as_str).collect();
    assert!(rule_files.contains(&"alerts.yml"), "rule_files must load alerts.yml (relative to the config): {rule_files:?}");
    let job = config["scrape_configs"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|j| j["job_name"] == "waymark")
        .expect("a scrape job named waymark (the alerts on `up` select job=\"waymark\")");
    let targets: Vec<&str> = job["static_configs"][0]["targets"].as_array().into_iter().flatten().filter_map(Value::as_str).collect();
    assert_eq!(targets, [format!("waymark:{HTTP_PORT}")]);
}

// ---------------------------------------------------------------------------------
// Alert rules

/// A runbook quotes the worker's log lines so an operator can search for them:
/// every quoted line (text in double quotes that starts lower-case, up to its
/// first `<placeholder>` or `...`) is written by the worker, so a reworded log
/// line cannot leave a runbook pointing at nothing.
#[test]
fn runbooks_quote_log_lines_the_worker_writes() {
    let sources: String = files_under(&repo().join("src"), &["rs"]).iter().map(|f| std::fs::read_to_string(f).unwrap()).collect();
    let rules_file = single_document(ALERTS);
    let mut quoted = 0;
    for rule in rules_file["groups"].as_array().into_iter().flatten().flat_map(|g| g["rules"].as_array().into_iter().flatten()) {
        let Some(description) = rule["annotations"]["description"].as_str() else { continue };
        let description = description.split_whitespace().collect::<Vec<_>>().join(" ");
        for (i, part) in description.split('"').enumerate() {
            if i % 2 == 0 || !part.starts_with(|c: char| c.is_ascii_lowercase()) || part.contains('*') {
                continue;
            }
            let fixed = part.split(['<', '.']).next().unwrap_or("").trim_end();
            if fixed.len() < 8 {
                continue;
            }
            quoted += 1;
            let written = sources.contains(fixed) || format_literals(&sources).iter().any(|literal| starts_an_expansion(literal, fixed));
            assert!(written, "alert {}: its runbook quotes \"{part}\", which no log line under src/ writes", rule["alert"]);
        }
    }
    assert!(quoted >= 3, "the runbooks quote {quoted} log lines; expected the ones they name");
}

/// String literals under `src/` with `{...}` format placeholders (read line by
/// line, so a quote character in a char literal or an escape spoils one line,
/// not the rest of the file).
fn format_literals(sources: &str) -> Vec<&str> {
    sources.lines().flat_map(|line| line.split('"').skip(1).step_by(2)).filter(|l| l.contains('{') && l.contains('}')).collect()
}

/// Whether `text` begins some expansion of the format string `literal`, each
/// `{...}` standing for one word, with most of `text` (two thirds) matched by
/// the literal's own words: `"{} {} {}"` expands to any three words, and quotes
/// nothing.
fn starts_an_expansion(literal: &str, text: &str) -> bool {
    fixed_chars_matched(literal, text).is_some_and(|fixed| fixed * 3 >= text.len() * 2)
}

/// The most characters of `text` that `literal`'s fixed parts match when
/// `text` begins an expansion of it; `None` when it does not.
fn fixed_chars_matched(literal: &str, text: &str) -> Option<usize> {
    let Some(open) = literal.find('{') else {
        return literal.starts_with(text).then_some(text.len());
    };
    let (fixed, rest) = literal.split_at(open);
    let rest = &rest[rest.find('}')? + 1..];
    if text.len() <= fixed.len() {
        return fixed.starts_with(text).then_some(text.len());
    }
    let after = text.strip_prefix(fixed)?;
    let word = after.find(char::is_whitespace).unwrap_or(after.len());
    (1..=word)
        .filter_map(|n| if after[n..].is_empty() { Some(0) } else { fixed_chars_matched(rest, &after[n..]) })
        .max()
        .map(|matched| fixed.len() + matched)
}

#[test]
fn alert_rules_have_for_severity_and_a_runbook() {
    let rules_file = single_document(ALERTS);
    let groups = rules_file["groups"].as_array().expect("groups");
    assert!(!groups.is_empty(), "no rule groups");
    let tests = read(ALERT_TESTS);
    let mut alerts = BTreeSet::new();
    let mut records = BTreeSet::new();
    for group in groups {
        let rules = group["rules"].as_array().unwrap_or_else(|| panic!("group {} has no rules", group["name"]));
        assert!(!rules.is_empty(), "group {} is empty", group["name"]);
        for rule in rules {
            assert!(rule["expr"].as_str().is_some_and(|e| !e.trim().is_empty()), "a rule has no expr: {rule}");
            if let Some(record) = rule["record"].as_str() {
                records.insert(record.to_string());
                continue;
            }
            let name = rule["alert"].as_str().unwrap_or_else(|| panic!("a rule is neither a record nor an alert: {rule}"));
            assert!(alerts.insert(name.to_string()), "alert {name} is defined twice");
            assert!(rule["for"].as_str().is_some_and(|f| seconds(f).is_some()), "alert {name} has no `for` duration");
            let severity = rule["labels"]["severity"].as_str().unwrap_or("");
            assert!(["critical", "warning", "info"].contains(&severity), "alert {name}: labels.severity {severity:?}");
            for annotation in ["summary", "description"] {
                assert!(rule["annotations"][annotation].as_str().is_some_and(|a| !a.trim().is_empty()), "alert {name} has no {annotation}");
            }
            let description = rule["annotations"]["description"].as_str().unwrap();
            assert!(description.contains("What to do"), "alert {name}: the description must say what to do");
            assert!(tests.contains(&format!("alertname=\"{name}\"")) || tests.contains(&format!("alertname: {name}")), "alert {name} has no test in {ALERT_TESTS}");
        }
    }
    assert!(records.contains("waymark:dedupe_hit_ratio:rate5m"), "the dedupe hit ratio recording rule is missing: {records:?}");
    for required in [
        "WaymarkDedupeHitRatioSpike",
        "WaymarkDeadLetterRateHigh",
        "WaymarkConsumerLagGrowing",
        "WaymarkNotProgressing",
        "WaymarkChangelogRestoreSlow",
        "WaymarkWorkerRestarting",
        "WaymarkTargetDown",
    ] {
        assert!(alerts.contains(required), "alert {required} is missing: {alerts:?}");
    }
}

// ---------------------------------------------------------------------------------
// promtool, when installed

fn on_path(program: &str) -> Option<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?).map(|dir| dir.join(program)).find(|p| p.is_file())
}

fn promtool(args: &[&str]) {
    let promtool = on_path("promtool").unwrap_or_else(|| {
        panic!("promtool is not on PATH, so `promtool {}` cannot run: run scripts/install-deps.sh (it installs promtool from Debian's prometheus package)", args.join(" "))
    });
    let output = Command::new(&promtool).args(args).current_dir(repo()).output().expect("run promtool");
    assert!(
        output.status.success(),
        "promtool {} failed:\n{}{}",
        args.join(" "),
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

#[test]
fn promtool_checks_the_rules_their_tests_and_the_config() {
    promtool(&["check", "rules", ALERTS]);
    promtool(&["test", "rules", ALERT_TESTS]);
    promtool(&["check", "config", PROMETHEUS_CONFIG]);
}

#[test]
fn promtool_parses_every_dashboard_query() {
    let promtool = on_path("promtool")
        .unwrap_or_else(|| panic!("promtool is not on PATH, so dashboard queries cannot be parsed: run scripts/install-deps.sh"));
    let rules: Vec<Value> = dashboard_queries_as_promql()
        .into_iter()
        .enumerate()
        .map(|(i, (_, expr))| json!({"record": format!("dashboard:query:{i}"), "expr": expr}))
        .collect();
    let names: Vec<String> = dashboard_queries_as_promql().into_iter().map(|(name, _)| name).collect();
    let file = std::env::temp_dir().join(format!("waymark-dashboard-queries-{}.yml", std::process::id()));
    std::fs::write(&file, json!({"groups": [{"name": "dashboard", "rules": rules}]}).to_string()).unwrap();
    let output = Command::new(&promtool).args(["check", "rules"]).arg(&file).output().expect("run promtool");
    let _ = std::fs::remove_file(&file);
    assert!(
        output.status.success(),
        "a dashboard query does not parse (dashboard:query:<n> is the n-th of {names:?}):\n{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

// ---------------------------------------------------------------------------------
// Dockerfile and the contracts page

#[test]
fn dockerfile_health_check_works_without_bash_and_the_binary_is_stripped() {
    let dockerfile = read("Dockerfile");
    let healthcheck = dockerfile.lines().find(|l| l.starts_with("HEALTHCHECK")).expect("a HEALTHCHECK");
    assert!(healthcheck.contains(r#"CMD ["waymark", "health"]"#), "HEALTHCHECK must run `waymark health` in exec form: {healthcheck}");
    assert!(!dockerfile.contains("/dev/tcp"), "/dev/tcp is a bash feature; the image's /bin/sh is dash");
    assert!(dockerfile.lines().filter(|l| l.starts_with("FROM ")).count() >= 2, "multi-stage build expected");
    let user = dockerfile.lines().rev().find_map(|l| l.strip_prefix("USER ")).expect("a USER");
    assert!(!["root", "0", "0:0"].contains(&user.trim()), "the runtime stage must not run as root");
    assert!(dockerfile.contains("CARGO_PROFILE_RELEASE_STRIP=symbols") || dockerfile.contains("strip "), "the binary must be stripped");
    // compose and Kubernetes pass `run --config ...` as arguments to the entrypoint.
    assert!(dockerfile.contains(r#"ENTRYPOINT ["waymark"]"#), "the entrypoint must be the bare binary");
}

/// The build stage copies a context of its own: every file the build reads
/// must be in it (no container engine runs here, so this checks the context,
/// not a `docker build`). `build.rs` was once left out, and `src/main.rs`
/// needs the variable it sets.
#[test]
fn dockerfile_build_stage_copies_everything_the_build_reads() {
    let dockerfile = read("Dockerfile");
    let build_stage: Vec<&str> = dockerfile.lines().skip_while(|l| !l.starts_with("FROM ")).skip(1).take_while(|l| !l.starts_with("FROM ")).collect();
    let copied: Vec<&str> = build_stage
        .iter()
        .filter_map(|l| l.strip_prefix("COPY "))
        .filter(|l| !l.starts_with("--from"))
        .flat_map(|l| {
            let parts: Vec<&str> = l.split_whitespace().collect();
            parts[..parts.len().saturating_sub(1)].to_vec()
        })
        .collect();
    let mut needed = vec!["Cargo.toml", "Cargo.lock", "src"];
    if repo().join("build.rs").exists() {
        needed.push("build.rs");
    }
    for path in needed {
        assert!(copied.contains(&path), "the Dockerfile's build stage does not COPY {path} (it copies {copied:?})");
    }
    let manifest = read("Cargo.toml");
    for line in manifest.lines().filter(|l| l.trim_start().starts_with("path = ") || l.trim_start().starts_with("build = ")) {
        let path = line.split('"').nth(1).unwrap_or_default();
        assert!(copied.iter().any(|c| path == *c || path.starts_with(&format!("{c}/"))), "Cargo.toml names {path}, which the build stage does not copy");
    }
    let ignored = read(".dockerignore");
    for path in &copied {
        assert!(!ignored.lines().any(|l| l.trim() == *path), ".dockerignore leaves {path} out of the context the Dockerfile copies");
    }
}

#[test]
fn contracts_page_is_self_contained_and_names_every_dead_letter_kind() {
    let contracts = read("docs/contracts.md");
    for outside in ["../shared", "DESIGN", "issue #", "Issue "] {
        assert!(!contracts.contains(outside), "docs/contracts.md refers to {outside:?}, which users do not have");
    }
    for schema in ["envelope", "tracking-event", "milestone-upsert", "dead-letter"] {
        assert!(contracts.contains(&format!("schemas/{schema}.schema.json")), "docs/contracts.md does not point to the {schema} schema");
    }
    let schema: Value = serde_json::from_str(&read("schemas/dead-letter.schema.json")).unwrap();
    for kind in schema["properties"]["error_kind"]["enum"].as_array().expect("error_kind enum") {
        let kind = kind.as_str().unwrap();
        assert!(contracts.contains(&format!("`{kind}`")), "docs/contracts.md does not list the dead-letter kind {kind}");
    }
}

// ---------------------------------------------------------------------------------

fn read(relative: &str) -> String {
    let path = repo().join(relative);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

/// Files under `dir` with one of `extensions`, recursively, in path order.
fn files_under(dir: &Path, extensions: &[&str]) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(dir) = pending.pop() {
        for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("cannot list {}: {e}", dir.display())) {
            let path = entry.unwrap().path();
            if path.is_dir() {
                pending.push(path);
            } else if path.extension().and_then(|e| e.to_str()).is_some_and(|e| extensions.contains(&e)) {
                out.push(path);
            }
        }
    }
    out.sort();
    out
}
