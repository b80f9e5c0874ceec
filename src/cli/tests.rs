//! Unit tests of `kab status` (trees built from facts, printed as a person reads them), the
//! command line helpers and the error messages.

use std::sync::Arc;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::jiff::Timestamp;

use super::fetch::{self, Target};
use super::show;
use super::status::{StatusArgs, target};
use super::tree::{
    EntityCount, EntityCrd, Fetched, Node, ObjectRef, Registration, StackFacts, State, Workload,
    build,
};
use crate::api::KabStack;
use crate::render::Step;
use crate::status::{CertFacts, Input, Observed, Outcome, compute};

fn stack(yaml: &str) -> KabStack {
    let mut s: KabStack = serde_saphyr::from_str(yaml).unwrap();
    s.metadata.generation = Some(1);
    s
}

fn todo() -> KabStack {
    stack(include_str!("../../examples/todo.yaml"))
}

/// The operator's transition time: the tree shows durations from it.
fn reconciled_at() -> Timestamp {
    "2026-11-27T12:00:00Z".parse().unwrap()
}

/// `kab status` runs 5 minutes after the last transition.
fn now() -> Timestamp {
    "2026-11-27T12:05:00Z".parse().unwrap()
}

fn row(step: Step, kind: &str, name: &str, ready: bool, failing: bool, message: &str) -> Observed {
    Observed {
        step,
        kind: kind.into(),
        name: name.into(),
        ready,
        failing,
        message: message.into(),
    }
}

fn ready_rows() -> Vec<Observed> {
    vec![
        row(
            Step::EntityApi,
            "CustomResourceDefinition",
            "todos.todo.example.com",
            true,
            false,
            "Established, serving v1",
        ),
        row(
            Step::Webhook,
            "Deployment",
            "shop/todo-webhook",
            true,
            false,
            "2/2 available",
        ),
        row(
            Step::Registration,
            "ValidatingWebhookConfiguration",
            "todo.shop.kab.dev",
            true,
            false,
            "registered",
        ),
        row(
            Step::Controller,
            "Deployment",
            "shop/todo-controller",
            true,
            false,
            "1/1 available",
        ),
        row(
            Step::Broker,
            "StatefulSet",
            "shop/todo-broker",
            true,
            false,
            "1/1 ready",
        ),
    ]
    .into_iter()
    .chain(config_rbac().into_iter().map(|o| {
        let step = if o.kind == "ConfigMap" || o.kind == "Secret" {
            Step::Config
        } else {
            Step::Rbac
        };
        row(step, &o.kind, &o.name, true, false, "present")
    }))
    .collect()
}

/// The config and RBAC objects of the todo stack.
fn config_rbac() -> Vec<ObjectRef> {
    let objects = [
        ("ConfigMap", "todo-config"),
        ("ConfigMap", "todo-broker-config"),
        ("Secret", "todo-webhook-tls"),
        ("Secret", "todo-webhook-ca"),
        ("ServiceAccount", "todo-webhook"),
        ("ServiceAccount", "todo-controller"),
    ];
    let roles = [
        "todo-webhook",
        "todo-controller",
        "todo-reader",
        "todo-writer",
    ];
    objects
        .into_iter()
        .chain(
            roles
                .iter()
                .flat_map(|r| [("Role", *r), ("RoleBinding", *r)]),
        )
        .map(|(kind, name)| ObjectRef {
            kind: kind.into(),
            name: format!("shop/{name}"),
        })
        .collect()
}

fn cert() -> CertFacts {
    CertFacts {
        not_after: "2027-02-25T12:00:00Z".parse().unwrap(),
        renew_at: "2027-01-26T12:00:00Z".parse().unwrap(),
    }
}

/// The stack with the status the operator computes for this outcome and these rows.
fn with_status(
    mut s: KabStack,
    outcome: Outcome,
    rows: &[Observed],
    cert: Option<&CertFacts>,
) -> KabStack {
    let st = compute(&Input {
        stack: &s,
        outcome: &outcome,
        children: rows,
        cert,
        entity: Some(s.spec.entity.crd_name()),
        now: reconciled_at(),
    });
    s.status = Some(st);
    s
}

fn workload(
    kind: &str,
    name: &str,
    ready: i32,
    of: i32,
    message: &str,
    failing: bool,
) -> Fetched<Workload> {
    Fetched::Found(Workload {
        kind: kind.into(),
        name: name.into(),
        ready: ready == of && !failing,
        failing,
        message: message.into(),
        ready_replicas: ready,
        replicas: of,
        since: Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
            reconciled_at(),
        )),
    })
}

/// What `kab status` fetches for a healthy todo stack.
fn ready_facts() -> StackFacts {
    let s = with_status(todo(), Outcome::Applied, &ready_rows(), Some(&cert()));
    StackFacts {
        objects: Fetched::Found(config_rbac()),
        stack: s,
        crd: Fetched::Found(EntityCrd {
            established: true,
            names_rejected: None,
            served: vec!["v1".into()],
            storage: Some("v1".into()),
            since: Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                reconciled_at(),
            )),
        }),
        entities: Fetched::Found(EntityCount {
            count: 3,
            exact: true,
        }),
        webhook: workload(
            "Deployment",
            "shop/todo-webhook",
            2,
            2,
            "2/2 available",
            false,
        ),
        registration: Fetched::Found(Registration {
            ca_bundle: true,
            failure_policy: Some("Fail".into()),
        }),
        controller: workload(
            "Deployment",
            "shop/todo-controller",
            1,
            1,
            "1/1 available",
            false,
        ),
        broker: workload("StatefulSet", "shop/todo-broker", 1, 1, "1/1 ready", false),
    }
}

fn text(f: &StackFacts) -> String {
    show::text(&[build(f, now())], now(), false)
}

#[test]
fn a_ready_stack_reads_ready_on_every_line() {
    assert_eq!(
        text(&ready_facts()),
        "\
NAME                                                    STATE   FOR  DETAIL
KabStack shop/todo                                      Ready  5m0s  every part of the stack is ready
├─ Entity API                                           Ready  5m0s
│  └─ CustomResourceDefinition todos.todo.example.com   Ready  5m0s  Established, serves v1, storage v1, 3 todos in shop
├─ Webhook                                              Ready  5m0s
│  ├─ Deployment shop/todo-webhook                      Ready  5m0s  2/2 available
│  ├─ Certificate shop/todo-webhook-tls                 Ready  5m0s  expires 2027-02-25T12:00:00Z (in 89d), kab renews it at 2027-01-26T12:00:00Z
│  └─ ValidatingWebhookConfiguration todo.shop.kab.dev  Ready        registered, caBundle set, failurePolicy Fail
├─ Entity controller                                    Ready  5m0s
│  └─ Deployment shop/todo-controller                   Ready  5m0s  1/1 available
├─ Broker (Managed)                                     Ready  5m0s
│  └─ StatefulSet shop/todo-broker                      Ready  5m0s  1/1 ready
└─ Config and RBAC                                      Ready        2 ConfigMaps, 2 Secrets, 2 ServiceAccounts, 4 Roles, 4 RoleBindings
"
    );
}

#[test]
fn a_crash_looping_webhook_is_degraded_and_named_on_its_lines() {
    let blocker = "1/2 available: pod todo-webhook-7c9f-x2 CrashLoopBackOff (3 restarts)";
    let mut rows = ready_rows();
    rows[1] = row(
        Step::Webhook,
        "Deployment",
        "shop/todo-webhook",
        false,
        true,
        blocker,
    );
    let mut f = ready_facts();
    f.stack = with_status(todo(), Outcome::Applied, &rows, Some(&cert()));
    f.webhook = workload("Deployment", "shop/todo-webhook", 1, 2, blocker, true);
    let tree = build(&f, now());
    let out = show::text(std::slice::from_ref(&tree), now(), false);
    let line = |label: &str| {
        out.lines()
            .find(|l| l.contains(label))
            .unwrap_or_else(|| panic!("no {label} line in\n{out}"))
            .to_string()
    };
    assert!(line("KabStack shop/todo").contains("Degraded"), "{out}");
    assert!(line("KabStack shop/todo").contains("WebhookNotReady: Deployment shop/todo-webhook: 1/2 available: pod todo-webhook-7c9f-x2 CrashLoopBackOff"), "{out}");
    assert!(line("├─ Webhook").contains("Degraded"), "{out}");
    assert!(
        line("─ Deployment shop/todo-webhook").contains("Degraded"),
        "{out}"
    );
    assert!(
        line("─ Deployment shop/todo-webhook").contains(
            "Failing: 1/2 available: pod todo-webhook-7c9f-x2 CrashLoopBackOff (3 restarts)"
        ),
        "{out}"
    );
    for other in [
        "Entity API",
        "Entity controller",
        "Broker (Managed)",
        "Config and RBAC",
        "Certificate",
    ] {
        assert!(
            line(other).contains("Ready"),
            "{other} should stay Ready:\n{out}"
        );
    }
    assert_eq!(tree.state, State::Degraded);
    assert_eq!(tree.reason, "WebhookNotReady");
}

#[test]
fn an_invalid_spec_fails_every_part_and_names_the_blocker() {
    let msg = "spec.rules[0].unique.fields[0]: spec.nope is not in the schema";
    let s = with_status(todo(), Outcome::InvalidSpec(msg.into()), &[], None);
    let f = StackFacts {
        stack: s,
        crd: Fetched::Missing,
        entities: Fetched::Missing,
        webhook: Fetched::Missing,
        registration: Fetched::Missing,
        controller: Fetched::Missing,
        broker: Fetched::Missing,
        objects: Fetched::Found(vec![]),
    };
    let tree = build(&f, now());
    assert_eq!(
        (tree.state, tree.reason.as_str(), tree.message.as_str()),
        (State::Failed, "InvalidSpec", msg)
    );
    for (depth, n) in tree.lines() {
        assert_eq!(
            n.state,
            State::Failed,
            "line {} {} at depth {depth}",
            n.kind,
            n.name
        );
        assert_eq!(n.reason, "InvalidSpec", "line {} {}", n.kind, n.name);
    }
    let out = show::text(&[tree], now(), false);
    assert!(
        out.contains("│  └─ Deployment shop/todo-controller                   Failed        InvalidSpec: not created: KabStack shop/todo is Failed (InvalidSpec)"),
        "{out}"
    );
}

#[test]
fn a_stack_the_operator_has_not_seen_is_progressing() {
    let mut f = ready_facts();
    f.stack.status = None;
    let tree = build(&f, now());
    assert_eq!(
        (tree.state, tree.reason.as_str()),
        (State::Progressing, "NotObserved")
    );
    assert!(tree.message.contains("is kab operator running?"));
    let webhook = tree.find("Webhook", None).unwrap();
    assert_eq!(
        (webhook.state, webhook.reason.as_str()),
        (State::Progressing, "NotObserved")
    );
}

#[test]
fn a_status_behind_the_spec_says_so() {
    let mut f = ready_facts();
    f.stack.metadata.generation = Some(2);
    let tree = build(&f, now());
    assert!(
        tree.message
            .contains("status is for generation 1, the spec is at 2"),
        "{}",
        tree.message
    );
}

#[test]
fn broker_modes_none_and_external_are_shown_as_such() {
    let mut none = todo();
    none.spec.broker = serde_json::from_value(serde_json::json!({"mode": "None"})).unwrap();
    let rows: Vec<Observed> = ready_rows()
        .into_iter()
        .filter(|r| r.step != Step::Broker)
        .collect();
    let mut f = ready_facts();
    f.stack = with_status(none, Outcome::Applied, &rows, Some(&cert()));
    f.broker = Fetched::Missing;
    let tree = build(&f, now());
    let b = tree.find("Broker", None).unwrap();
    assert_eq!(b.state, State::Disabled);
    assert!(b.children.is_empty());
    let out = show::text(std::slice::from_ref(&tree), now(), false);
    let line = out.lines().find(|l| l.contains("Broker (None)")).unwrap();
    assert!(
        line.contains("Disabled")
            && line.ends_with("  broker.mode is None: entity changes are not published"),
        "{out}"
    );
    assert_eq!(tree.state, State::Ready);

    let mut ext = todo();
    ext.spec.broker = serde_json::from_value(
        serde_json::json!({"mode": "External", "url": "nats://nats.messaging.svc:4222"}),
    )
    .unwrap();
    f.stack = with_status(ext, Outcome::Applied, &rows, Some(&cert()));
    let tree = build(&f, now());
    let b = tree.find("Broker", None).unwrap();
    assert_eq!(b.state, State::Ready);
    assert_eq!(b.facts["mode"], "External");
    assert_eq!(
        b.message,
        "external broker nats://nats.messaging.svc:4222 (kab does not run or check it)"
    );
}

#[test]
fn missing_config_and_rbac_objects_are_named() {
    let mut f = ready_facts();
    let mut objects = config_rbac();
    objects.retain(|o| o.name != "shop/todo-reader");
    f.objects = Fetched::Found(objects);
    let tree = build(&f, now());
    let c = tree.find("ConfigAndRBAC", None).unwrap();
    assert_eq!(c.state, State::Progressing);
    assert_eq!(
        c.message,
        "missing Role shop/todo-reader, RoleBinding shop/todo-reader"
    );
}

#[test]
fn what_could_not_be_read_is_unknown_not_missing() {
    let mut f = ready_facts();
    f.registration = Fetched::Unknown("forbidden".into());
    f.entities = Fetched::Unknown("forbidden".into());
    let tree = build(&f, now());
    let r = tree.find("ValidatingWebhookConfiguration", None).unwrap();
    assert_eq!(
        (r.state, r.message.as_str()),
        (State::Unknown, "could not read it: forbidden")
    );
    let crd = tree.find("CustomResourceDefinition", None).unwrap();
    assert!(
        crd.message.ends_with("entities not counted: forbidden"),
        "{}",
        crd.message
    );
}

#[test]
fn a_lower_bound_count_says_at_least() {
    let mut f = ready_facts();
    f.entities = Fetched::Found(EntityCount {
        count: 1,
        exact: false,
    });
    let tree = build(&f, now());
    let crd = tree.find("CustomResourceDefinition", None).unwrap();
    assert!(
        crd.message.ends_with("at least 1 todo in shop"),
        "{}",
        crd.message
    );
}

#[test]
fn json_carries_the_same_facts_and_reads_back() {
    let tree = build(&ready_facts(), now());
    let json = show::json(std::slice::from_ref(&tree), true, false).unwrap();
    let back: Node = serde_json::from_str(&json).unwrap();
    assert_eq!(back, tree);
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(v["kind"], "KabStack");
    assert_eq!(v["state"], "Ready");
    assert_eq!(v["since"], "2026-11-27T12:00:00Z");
    let webhook = &v["children"][1];
    assert_eq!(webhook["kind"], "Webhook");
    assert_eq!(webhook["children"][0]["facts"]["readyReplicas"], 2);
    assert_eq!(
        webhook["children"][1]["facts"]["notAfter"],
        "2027-02-25T12:00:00Z"
    );
    assert_eq!(v["children"][0]["children"][0]["facts"]["entities"], 3);

    let list = show::json(&[tree.clone(), tree], false, true).unwrap();
    assert_eq!(list.lines().count(), 1, "compact is one line per document");
    let list: super::tree::StatusList = serde_json::from_str(&list).unwrap();
    assert_eq!(list.items.len(), 2);
}

#[test]
fn yaml_reads_back() {
    let tree = build(&ready_facts(), now());
    let yaml = show::yaml(std::slice::from_ref(&tree), true).unwrap();
    let back: Node = serde_saphyr::from_str(&yaml).unwrap();
    assert_eq!(back, tree);
}

#[test]
fn dot_draws_one_box_per_line_and_escapes_labels() {
    let mut tree = build(&ready_facts(), now());
    tree.message = "a \"quoted\" \\ message".into();
    tree.state = State::Degraded;
    tree.reason = "X".into();
    let dot = show::dot(&[tree.clone()]);
    assert!(dot.starts_with("digraph kab {\n"));
    assert_eq!(dot.matches("[label=").count(), tree.lines().len());
    assert!(dot.contains("  n0 -> n1;\n"));
    assert!(dot.contains(r#"X: a \"quoted\" \\ message"#), "{dot}");
    assert!(dot.contains(r##"fillcolor="#ffcdd2""##));
}

#[test]
fn colour_only_on_a_terminal_without_no_color() {
    use std::ffi::OsStr;
    assert!(show::use_colour(true, None));
    assert!(show::use_colour(true, Some(OsStr::new(""))));
    assert!(!show::use_colour(true, Some(OsStr::new("1"))));
    assert!(!show::use_colour(false, None));
    let tree = build(&ready_facts(), now());
    let coloured = show::text(std::slice::from_ref(&tree), now(), true);
    assert!(coloured.contains("\x1b[32mReady\x1b[0m"));
    let plain = show::text(&[tree], now(), false);
    assert!(!plain.contains('\x1b'));
    // Colour does not shift the columns.
    let strip = coloured.replace("\x1b[32m", "").replace("\x1b[0m", "");
    assert_eq!(strip, plain);
}

#[test]
fn durations_read_like_kubectl() {
    let cases = [
        (0, "0s"),
        (59, "59s"),
        (119, "119s"),
        (300, "5m0s"),
        (754, "12m"),
        (3 * 3600 + 5 * 60, "3h5m"),
        (20 * 3600, "20h"),
        (3 * 86_400 + 4 * 3600, "3d4h"),
        (89 * 86_400, "89d"),
        (800 * 86_400, "2y"),
        (-5, "0s"),
    ];
    for (secs, want) in cases {
        assert_eq!(show::human_duration(secs), want, "{secs}s");
    }
}

fn args(stack: Option<&str>, ns: Option<&str>, all: bool) -> StatusArgs {
    StatusArgs {
        stack: stack.map(str::to_owned),
        namespace: ns.map(str::to_owned),
        all_namespaces: all,
        watch: false,
        output: show::Format::Text,
    }
}

#[test]
fn targets_from_the_command_line() {
    let stack = |ns: &str, name: &str| Target::Stack {
        namespace: ns.into(),
        name: name.into(),
    };
    assert_eq!(
        target(&args(Some("shop/todo"), None, false), "default").unwrap(),
        stack("shop", "todo")
    );
    assert_eq!(
        target(&args(Some("todo"), Some("shop"), false), "default").unwrap(),
        stack("shop", "todo")
    );
    assert_eq!(
        target(&args(Some("todo"), None, false), "dev").unwrap(),
        stack("dev", "todo")
    );
    assert_eq!(
        target(&args(None, None, false), "dev").unwrap(),
        Target::Namespace("dev".into())
    );
    assert_eq!(target(&args(None, None, true), "dev").unwrap(), Target::All);
    let e = target(&args(Some("a/b/c"), None, false), "dev").unwrap_err();
    assert!(e.to_string().contains("use NAMESPACE/NAME"), "{e}");
    let e = target(&args(Some("shop/todo"), Some("other"), false), "dev").unwrap_err();
    assert!(e.to_string().contains("-n says other"), "{e}");
}

#[test]
fn errors_say_what_to_do() {
    assert_eq!(
        fetch::no_crd_message("kab"),
        "no KabStack CRD in this cluster — install kab first: kab install --print | kubectl apply --server-side -f -"
    );
    assert_eq!(
        fetch::not_found_message("shop", "todo", &["notes".into(), "orders".into()], "kab"),
        "KabStack shop/todo not found; stacks in namespace shop: notes, orders"
    );
    assert!(
        fetch::not_found_message("shop", "todo", &[], "kubectl kab")
            .contains("kubectl kab status -A")
    );
    let m = fetch::no_cluster_message("connection refused", Some("/tmp/kc"), "kab");
    assert!(
        m.contains("KUBECONFIG is /tmp/kc") && m.contains("kab dev"),
        "{m}"
    );
    let m = fetch::no_cluster_message("no config", None, "kab");
    assert!(m.contains("~/.kube/config"), "{m}");
}

#[test]
fn a_deployment_with_a_crash_looping_pod_is_failing() {
    let d: Deployment = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "todo-webhook", "namespace": "shop", "generation": 1},
        "spec": {"replicas": 2, "selector": {}, "template": {}},
        "status": {"observedGeneration": 1, "availableReplicas": 1, "updatedReplicas": 2,
                   "conditions": [{"type": "Available", "status": "True", "lastTransitionTime": "2026-11-27T11:00:00Z"}]}
    }))
    .unwrap();
    let pod: Pod = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "todo-webhook-abc", "namespace": "shop"},
        "status": {"phase": "Running", "containerStatuses": [{
            "name": "webhook", "image": "x", "imageID": "", "ready": false, "restartCount": 4,
            "state": {"waiting": {"reason": "CrashLoopBackOff"}}
        }]}
    }))
    .unwrap();
    let w = Workload::from_deployment(&d, &[Arc::new(pod)]);
    assert_eq!(
        (
            w.ready,
            w.failing,
            w.message.as_str(),
            w.ready_replicas,
            w.replicas
        ),
        (
            false,
            true,
            "1/2 available: pod todo-webhook-abc CrashLoopBackOff (4 restarts)",
            1,
            2
        )
    );
    assert_eq!(w.name, "shop/todo-webhook");
    assert_eq!(w.since, None, "Available=True does not date a failing line");
}

#[test]
fn a_crd_reports_established_and_versions() {
    let crd = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "todos.todo.example.com"},
        "spec": {"group": "todo.example.com", "scope": "Namespaced",
                 "names": {"kind": "Todo", "plural": "todos"},
                 "versions": [{"name": "v1", "served": true, "storage": true},
                              {"name": "v2", "served": false, "storage": false}]},
        "status": {"conditions": [{"type": "Established", "status": "True", "lastTransitionTime": "2026-11-27T12:00:00Z"}]}
    }))
    .unwrap();
    let c = EntityCrd::from_crd(&crd);
    assert!(c.established);
    assert_eq!(c.served, vec!["v1"]);
    assert_eq!(c.storage.as_deref(), Some("v1"));
    assert_eq!(c.since.map(|t| t.0), Some(reconciled_at()));
}

#[derive(clap::Parser)]
#[command(name = "kab")]
struct TestCli {
    #[command(subcommand)]
    command: TestCommand,
}

#[derive(clap::Subcommand)]
enum TestCommand {
    Status(StatusArgs),
}

#[test]
fn as_kubectl_kab_the_help_says_kubectl_kab() {
    use std::ffi::OsStr;
    assert!(super::is_kubectl_plugin(Some(OsStr::new(
        "/usr/local/bin/kubectl-kab"
    ))));
    assert!(!super::is_kubectl_plugin(Some(OsStr::new(
        "/usr/local/bin/kab"
    ))));
    assert!(!super::is_kubectl_plugin(None));

    let mut cmd = super::command_for::<TestCli>(Some(OsStr::new("/tmp/bin/kubectl-kab")));
    let err = cmd
        .try_get_matches_from_mut(["kubectl-kab", "status", "--help"])
        .unwrap_err();
    let help = err.to_string();
    assert!(help.contains("Usage: kubectl kab status"), "{help}");

    let mut cmd = super::command_for::<TestCli>(Some(OsStr::new("kab")));
    let help = cmd
        .try_get_matches_from_mut(["kab", "status", "--help"])
        .unwrap_err()
        .to_string();
    assert!(help.contains("Usage: kab status"), "{help}");
}

#[test]
fn completions_name_the_subcommands() {
    let args = super::CompletionsArgs {
        shell: clap_complete::Shell::Bash,
    };
    let mut cmd = super::command_for::<TestCli>(None);
    let mut out = Vec::new();
    let name = cmd.get_name().to_owned();
    clap_complete::generate(args.shell, &mut cmd, name, &mut out);
    let script = String::from_utf8(out).unwrap();
    assert!(script.contains("status"), "{script}");
    assert!(script.contains("--watch"));
}

#[test]
fn the_operators_admission_probe_shows_under_the_webhook() {
    let mut f = ready_facts();
    let st = f.stack.status.as_mut().unwrap();
    st.components.push(crate::api::ComponentStatus {
        kind: "AdmissionProbe".into(),
        name: "dry-run create".into(),
        ready: false,
        message: "a dry-run create did not reach the webhook: EOF".into(),
    });
    let tree = build(&f, now());
    let webhook = tree.find("Webhook", None).unwrap();
    let probe = webhook.children.last().unwrap();
    assert_eq!(
        (
            probe.kind.as_str(),
            probe.name.as_str(),
            probe.state,
            probe.reason.as_str()
        ),
        (
            "AdmissionProbe",
            "dry-run create",
            State::Progressing,
            "ProbeFailed"
        )
    );
    let out = show::text(&[tree], now(), false);
    assert!(out.contains("│  └─ AdmissionProbe dry-run create"), "{out}");
}
