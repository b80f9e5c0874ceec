//! The two install paths on the real control plane, and the bundle checked by the validators
//! OperatorHub runs.
//!
//! - The plain install (`kab install --print | kubectl apply --server-side -f -`) gives an
//!   Available operator Deployment and exactly the shipped RBAC, and a stack becomes Ready with
//!   the operator running under that RBAC (the run's shared operator). Uninstalling it with
//!   `kubectl delete` is checked on a control plane of its own, because it removes the
//!   cluster-scoped objects (the KabStack CRD, the ClusterRole) the rest of the run relies on.
//! - OLM: olm-operator (built from its module) installs the committed bundle `olm/<version>/` on
//!   a control plane of its own, the CSV reaches `Succeeded`, and deleting the CSV leaves only
//!   what OLM keeps by design.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context as _, anyhow, bail, ensure};
use futures::TryStreamExt as _;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::authorization::v1::{
    ResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec,
};
use k8s_openapi::api::core::v1::{Namespace, ServiceAccount};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kab::api::KabStack;
use kab::plane::{Plane, Process, is_deployment_available};
use kube::ResourceExt as _;
use kube::api::{Api, ApiResource, DeleteParams, DynamicObject, ListParams, PostParams};
use kube::runtime::wait::conditions::is_crd_established;
use kube::runtime::{WatchStreamExt as _, watcher};
use serde_json::{Value, json};

use crate::support::operator::{GROUPS as OPERATOR_GROUPS, USER as OPERATOR_USER};
use crate::support::own_plane::{OwnPlane, restricted_namespace};
use crate::support::stack::IMAGE;
use crate::support::{
    Ctx, Test, apply_stack_with, is_ready, local_namespace, operator, qualified_name, todo_stack,
    wait_for,
};

pub fn tests() -> Vec<Test> {
    let name = |f: &str| qualified_name(module_path!(), f);
    vec![
        // Builds olm-validate on first use (about 40 s cold).
        Test::new(
            name("bundle_passes_the_operatorhub_validators"),
            bundle_passes_the_operatorhub_validators,
        )
        .timeout(Duration::from_secs(600)),
        Test::new(
            name("plain_install_runs_the_operator_under_the_shipped_rbac"),
            plain_install_runs_the_operator_under_the_shipped_rbac,
        ),
        // Starts a control plane of its own.
        Test::new(
            name("plain_uninstall_leaves_only_the_retained_entity_api"),
            plain_uninstall_leaves_only_the_retained_entity_api,
        )
        .timeout(Duration::from_secs(300)),
        // A control plane of its own, and olm-operator built on first use (about 2 min cold).
        Test::new(
            name("olm_installs_the_bundle_and_uninstall_leaves_what_olm_keeps"),
            olm_installs_the_bundle_and_uninstall_leaves_what_olm_keeps,
        )
        .timeout(Duration::from_secs(600)),
    ]
}

const TIMEOUT: Duration = Duration::from_secs(120);

/// Validator warnings that stay, each explained in the README ("Install with OLM").
const EXPLAINED_WARNINGS: &[&str] = &["CSV contains permissions to create CRD"];

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// The committed bundle of this version.
fn bundle_dir() -> PathBuf {
    repo().join("olm").join(env!("CARGO_PKG_VERSION"))
}

/// Builds (or finds in the cache) a tool of `tests/go/build.sh`; returns its binary directory.
async fn go_tool(tool: &str) -> anyhow::Result<PathBuf> {
    let script = repo().join("tests/go/build.sh");
    let start = Instant::now();
    let out = tokio::process::Command::new("bash")
        .arg(&script)
        .arg(tool)
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .output()
        .await
        .with_context(|| format!("running {}", script.display()))?;
    ensure!(
        out.status.success(),
        "{} {tool}: {}\n{}",
        script.display(),
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let dir = stdout
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{tool} ")))
        .with_context(|| format!("build.sh {tool} printed no directory: {stdout}"))?;
    let built = String::from_utf8_lossy(&out.stderr);
    if let Some(line) = built.lines().find(|l| l.starts_with("built ")) {
        println!("install_tests: {line} ({:.0?})", start.elapsed());
    }
    Ok(PathBuf::from(dir.trim()))
}

/// Runs `kab` with `args`; returns its stdout.
async fn kab(args: &[&str]) -> anyhow::Result<String> {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_kab"))
        .args(args)
        .kill_on_drop(true)
        .output()
        .await?;
    ensure!(
        out.status.success(),
        "kab {}: {}\n{}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8(out.stdout)?)
}

/// Runs the plane's kubectl with its admin kubeconfig and `stdin`; returns stdout.
async fn kubectl(plane: &Plane, args: &[&str], stdin: &str) -> anyhow::Result<String> {
    use tokio::io::AsyncWriteExt as _;
    let mut child = tokio::process::Command::new(plane.bin("kubectl"))
        .arg("--kubeconfig")
        .arg(plane.kubeconfig_path())
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .context("starting kubectl")?;
    if let Some(mut input) = child.stdin.take() {
        input.write_all(stdin.as_bytes()).await?;
    }
    let out = child.wait_with_output().await?;
    ensure!(
        out.status.success(),
        "kubectl {}: {}\n{}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn available(d: Option<&Deployment>) -> bool {
    d.is_some_and(is_deployment_available)
}

fn entity_api_ready(s: Option<&KabStack>) -> bool {
    s.and_then(|s| s.status.as_ref())
        .and_then(|st| kab::status::condition(st, "EntityAPIReady"))
        .is_some_and(|c| c.status == "True")
}

/// `examples/todo.yaml` named `todo` in `ns`, with an entity group of its own.
fn install_stack(ns: &str) -> anyhow::Result<Value> {
    todo_stack(ns, "todo", &format!("{ns}.install.example.com"))
}

/// The rules of a role as comparable values.
fn rules_of(rules: Option<Vec<k8s_openapi::api::rbac::v1::PolicyRule>>) -> Value {
    serde_json::to_value(rules.unwrap_or_default()).unwrap_or_default()
}

async fn access(
    client: &kube::Client,
    verb: &str,
    group: &str,
    resource: &str,
    namespace: Option<&str>,
) -> anyhow::Result<bool> {
    let api: Api<SubjectAccessReview> = Api::all(client.clone());
    let review = SubjectAccessReview {
        spec: SubjectAccessReviewSpec {
            user: Some(OPERATOR_USER.into()),
            groups: Some(OPERATOR_GROUPS.iter().map(|g| g.to_string()).collect()),
            resource_attributes: Some(ResourceAttributes {
                verb: Some(verb.into()),
                group: Some(group.into()),
                resource: Some(resource.into()),
                namespace: namespace.map(str::to_string),
                ..Default::default()
            }),
            ..Default::default()
        },
        ..Default::default()
    };
    let answer = api.create(&PostParams::default(), &review).await?;
    Ok(answer.status.is_some_and(|s| s.allowed))
}

// ---------------------------------------------------------------------------------------------
// Validators
// ---------------------------------------------------------------------------------------------

async fn bundle_passes_the_operatorhub_validators(_ctx: Ctx) -> anyhow::Result<()> {
    let bin = go_tool("olm-validate").await?.join("olm-validate");
    let dir = bundle_dir();
    ensure!(
        dir.is_dir(),
        "{} is missing: run `cargo run -- olm bundle --version {}`",
        dir.display(),
        env!("CARGO_PKG_VERSION")
    );
    let out = tokio::process::Command::new(&bin)
        .arg(&dir)
        .kill_on_drop(true)
        .output()
        .await
        .with_context(|| format!("running {}", bin.display()))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    for line in stdout.lines() {
        println!("install_tests: olm-validate: {line}");
    }
    ensure!(
        out.status.success(),
        "olm-validate {}: {}\n{stdout}{}",
        dir.display(),
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    ensure!(
        stdout.lines().any(|l| l.contains(": 0 errors,")),
        "no summary line with 0 errors:\n{stdout}"
    );
    let unexplained: Vec<&str> = stdout
        .lines()
        .filter(|l| l.starts_with("WARNING "))
        .filter(|l| !EXPLAINED_WARNINGS.iter().any(|w| l.contains(w)))
        .collect();
    ensure!(
        unexplained.is_empty(),
        "fix these warnings, or explain them in the README and in EXPLAINED_WARNINGS:\n{}",
        unexplained.join("\n")
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Plain install
// ---------------------------------------------------------------------------------------------

async fn plain_install_runs_the_operator_under_the_shipped_rbac(ctx: Ctx) -> anyhow::Result<()> {
    // The run's operator runs as kab-system/kab-operator under the RBAC of these manifests;
    // applying them again with kubectl sets the same values (no conflict) and adds the
    // Deployment.
    operator(&ctx).await?;
    let manifests = kab(&["install", "--print", "--image", IMAGE]).await?;
    let started = Instant::now();
    ctx.kubectl_with_stdin(["apply", "--server-side", "-f", "-"], &manifests)
        .await?;
    let client = ctx.client();
    let ns = kab::install::NAMESPACE;
    let name = kab::install::NAME;

    let deployments: Api<Deployment> = Api::namespaced(client.clone(), ns);
    let deployment = wait_for(&deployments, name, available, TIMEOUT).await?;
    println!(
        "install_tests: plain install: Deployment {ns}/{name} Available {:.1?} after kubectl apply started",
        started.elapsed()
    );
    let pod = &deployment.spec.template;
    let pod_spec = pod.spec.as_ref().context("pod template without spec")?;
    ensure!(pod_spec.service_account_name.as_deref() == Some(name));
    ensure!(pod_spec.containers[0].image.as_deref() == Some(IMAGE));

    // The RBAC in the cluster is exactly the shipped one.
    let cluster_role = Api::<ClusterRole>::all(client.clone()).get(name).await?;
    ensure!(
        rules_of(cluster_role.rules)
            == serde_json::to_value(kab::install::policy_rules(kab::install::CLUSTER_GRANTS))?,
        "ClusterRole {name} differs from install::CLUSTER_GRANTS"
    );
    let role = Api::<Role>::namespaced(client.clone(), ns)
        .get(name)
        .await?;
    ensure!(
        rules_of(role.rules)
            == serde_json::to_value(kab::install::policy_rules(kab::install::NAMESPACE_GRANTS))?,
        "Role {ns}/{name} differs from install::NAMESPACE_GRANTS"
    );
    let subjects = json!([{"kind": "ServiceAccount", "name": name, "namespace": ns}]);
    let crb = Api::<ClusterRoleBinding>::all(client.clone())
        .get(name)
        .await?;
    ensure!(crb.role_ref.kind == "ClusterRole" && crb.role_ref.name == name);
    ensure!(serde_json::to_value(&crb.subjects)? == subjects, "{crb:?}");
    let rb = Api::<RoleBinding>::namespaced(client.clone(), ns)
        .get(name)
        .await?;
    ensure!(rb.role_ref.kind == "Role" && rb.role_ref.name == name);
    ensure!(serde_json::to_value(&rb.subjects)? == subjects, "{rb:?}");

    // What that RBAC lets the operator's identity do, and what not.
    let expected = [
        (
            "create",
            "apiextensions.k8s.io",
            "customresourcedefinitions",
            None,
            true,
        ),
        (
            "escalate",
            "rbac.authorization.k8s.io",
            "roles",
            Some("default"),
            true,
        ),
        ("create", "coordination.k8s.io", "leases", Some(ns), true),
        (
            "create",
            "coordination.k8s.io",
            "leases",
            Some("default"),
            false,
        ),
        (
            "create",
            "rbac.authorization.k8s.io",
            "clusterroles",
            None,
            false,
        ),
        (
            "escalate",
            "rbac.authorization.k8s.io",
            "clusterroles",
            None,
            false,
        ),
        (
            "bind",
            "rbac.authorization.k8s.io",
            "clusterroles",
            None,
            false,
        ),
        (
            "create",
            "rbac.authorization.k8s.io",
            "clusterrolebindings",
            None,
            false,
        ),
        ("delete", "", "pods", Some("default"), false),
        ("delete", "", "namespaces", None, false),
    ];
    for (verb, group, resource, namespace, allowed) in expected {
        let got = access(&client, verb, group, resource, namespace).await?;
        ensure!(
            got == allowed,
            "{OPERATOR_USER} {verb} {group}/{resource} in {namespace:?}: allowed={got}, want {allowed}"
        );
    }

    // A stack becomes Ready with the operator running under that RBAC.
    // In a namespace whose pods the local runtime runs: Ready includes a real admission call.
    let stack_ns = local_namespace(&ctx, "plain-install").await?;
    apply_stack_with(&client, &install_stack(&stack_ns)?).await?;
    let stacks: Api<KabStack> = Api::namespaced(client.clone(), &stack_ns);
    wait_for(&stacks, "todo", is_ready, TIMEOUT)
        .await
        .with_context(|| format!("KabStack {stack_ns}/todo not Ready"))?;

    // Leave the run's plane as it was: the shared operator's objects stay, the Deployment goes.
    deployments
        .delete(name, &DeleteParams::background())
        .await?;
    Ok(())
}

fn ar<K: kube::Resource<DynamicType = ()>>() -> ApiResource {
    ApiResource::erase::<K>(&())
}

fn olm_resource(version: &str, kind: &str, plural: &str) -> ApiResource {
    ApiResource {
        group: "operators.coreos.com".into(),
        version: version.into(),
        api_version: format!("operators.coreos.com/{version}"),
        kind: kind.into(),
        plural: plural.into(),
    }
}

fn csv_resource() -> ApiResource {
    olm_resource(
        "v1alpha1",
        "ClusterServiceVersion",
        "clusterserviceversions",
    )
}

/// Every object an install could leave behind: cluster-scoped ones as `Kind/name`, those of
/// `namespaces` as `namespace/Kind/name`. Kinds the cluster does not serve count as empty.
async fn objects(client: &kube::Client, namespaces: &[&str]) -> anyhow::Result<BTreeSet<String>> {
    use k8s_openapi::api::admissionregistration::v1::{
        MutatingWebhookConfiguration, ValidatingWebhookConfiguration,
    };
    use k8s_openapi::api::apps::v1::ReplicaSet;
    use k8s_openapi::api::coordination::v1::Lease;
    use k8s_openapi::api::core::v1::{ConfigMap, Pod, Secret, Service};
    let cluster = [
        ar::<CustomResourceDefinition>(),
        ar::<ClusterRole>(),
        ar::<ClusterRoleBinding>(),
        ar::<ValidatingWebhookConfiguration>(),
        ar::<MutatingWebhookConfiguration>(),
        ar::<Namespace>(),
        olm_resource("v1", "Operator", "operators"),
    ];
    let namespaced = [
        ar::<Deployment>(),
        ar::<ReplicaSet>(),
        ar::<Pod>(),
        ar::<ServiceAccount>(),
        ar::<Role>(),
        ar::<RoleBinding>(),
        ar::<Secret>(),
        ar::<ConfigMap>(),
        ar::<Service>(),
        ar::<Lease>(),
        csv_resource(),
        olm_resource("v1", "OperatorGroup", "operatorgroups"),
        olm_resource("v2", "OperatorCondition", "operatorconditions"),
    ];
    let mut all = BTreeSet::new();
    let mut scopes: Vec<(&ApiResource, Option<&str>)> = cluster.iter().map(|r| (r, None)).collect();
    for ns in namespaces {
        scopes.extend(namespaced.iter().map(|r| (r, Some(*ns))));
    }
    for (r, ns) in scopes {
        let api: Api<DynamicObject> = match ns {
            Some(ns) => Api::namespaced_with(client.clone(), ns, r),
            None => Api::all_with(client.clone(), r),
        };
        let list = match api.list(&ListParams::default()).await {
            Ok(list) => list,
            Err(kube::Error::Api(e)) if e.code == 404 => continue,
            Err(e) => return Err(e).with_context(|| format!("listing {}", r.plural)),
        };
        let prefix = ns.map(|ns| format!("{ns}/")).unwrap_or_default();
        all.extend(
            list.items
                .iter()
                .map(|o| format!("{prefix}{}/{}", r.kind, o.name_any())),
        );
    }
    Ok(all)
}

/// What an object of `expected` matches: a name, or a prefix ending in `*`.
fn matches(pattern: &str, object: &str) -> bool {
    match pattern.strip_suffix('*') {
        Some(prefix) => object.starts_with(prefix),
        None => object == pattern,
    }
}

/// Waits until the objects created since `before` are exactly those `expected` describes (each
/// pattern matching at least one); returns them. `why` explains a failure.
async fn wait_left(
    client: &kube::Client,
    namespaces: &[&str],
    before: &BTreeSet<String>,
    expected: &[&str],
    why: impl Fn() -> String,
) -> anyhow::Result<BTreeSet<String>> {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let left: BTreeSet<String> = objects(client, namespaces)
            .await?
            .difference(before)
            .cloned()
            .collect();
        let unexpected: Vec<&String> = left
            .iter()
            .filter(|o| !expected.iter().any(|p| matches(p, o)))
            .collect();
        let missing: Vec<&&str> = expected
            .iter()
            .filter(|p| !left.iter().any(|o| matches(p, o)))
            .collect();
        if unexpected.is_empty() && missing.is_empty() {
            return Ok(left);
        }
        if Instant::now() > deadline {
            bail!(
                "after {}s, left: {unexpected:?}; missing: {missing:?}\n{}",
                TIMEOUT.as_secs(),
                why()
            );
        }
        // Garbage collection has no single object to watch.
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

async fn plain_uninstall_leaves_only_the_retained_entity_api(_ctx: Ctx) -> anyhow::Result<()> {
    let plane = OwnPlane::start().await?;
    let result = plain_install_and_uninstall(plane.get()).await;
    plane.stop(result).await
}

async fn plain_install_and_uninstall(plane: &Plane) -> anyhow::Result<()> {
    let client = plane.client();
    let ns = "shop";
    let before = objects(&client, &[ns]).await?;
    let manifests = kab(&["install", "--print", "--image", IMAGE]).await?;
    kubectl(plane, &["apply", "--server-side", "-f", "-"], &manifests).await?;
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), kab::install::NAMESPACE);
    wait_for(&deployments, kab::install::NAME, available, TIMEOUT).await?;
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    wait_for(&crds, "kabstacks.kab.dev", is_crd_established(), TIMEOUT).await?;

    // A stack handled by the operator under the installed RBAC: its entity CRD is what stays.
    let operator = crate::support::operator::start(plane, &Default::default()).await?;
    restricted_namespace(&client, ns).await?;
    apply_stack_with(&client, &install_stack(ns)?).await?;
    // Pods are simulated here (the run's local runtime serves the shared plane only), so the
    // stack cannot become Ready (its admission probe needs a real webhook); the operator still
    // creates the entity API under the installed RBAC, and that is what must stay.
    let stacks: Api<KabStack> = Api::namespaced(client.clone(), ns);
    let stack = wait_for(&stacks, "todo", entity_api_ready, TIMEOUT)
        .await
        .with_context(|| format!("KabStack {ns}/todo has no entity API"))?;
    let entity_crd = stack
        .status
        .and_then(|s| s.entity)
        .context("the stack names its entity API")?;

    // Uninstall as the README says: the stacks first, in the foreground (a stack is gone only
    // once its children are: the KabStack CRD must outlive them, or the garbage collector can no
    // longer resolve their owner and leaves them behind), then the install.
    let started = Instant::now();
    kubectl(
        plane,
        &[
            "delete",
            "kabstacks",
            "--all",
            "--all-namespaces",
            "--cascade=foreground",
            "--timeout=120s",
        ],
        "",
    )
    .await?;
    let stacks_gone = started.elapsed();
    kubectl(
        plane,
        &["delete", "--ignore-not-found", "--timeout=120s", "-f", "-"],
        &manifests,
    )
    .await?;
    println!(
        "install_tests: plain uninstall: stacks deleted in {stacks_gone:.1?}, the install in {:.1?}",
        started.elapsed() - stacks_gone
    );
    drop(operator);

    let expected = [
        &format!("CustomResourceDefinition/{entity_crd}")[..], // deletionPolicy: Retain
        &format!("Namespace/{ns}"),
        &format!("{ns}/ServiceAccount/default"),
        &format!("{ns}/ConfigMap/kube-root-ca.crt"),
    ];
    wait_left(
        &client,
        &[ns, kab::install::NAMESPACE],
        &before,
        &expected,
        String::new,
    )
    .await?;
    println!(
        "install_tests: plain uninstall left {entity_crd} (deletionPolicy Retain) and nothing else"
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// OLM
// ---------------------------------------------------------------------------------------------

/// The directory of OLM's CRDs in the module the olm wrapper builds.
async fn olm_crds_dir() -> anyhow::Result<PathBuf> {
    let out = tokio::process::Command::new("go")
        .args([
            "mod",
            "download",
            "-json",
            "github.com/operator-framework/operator-lifecycle-manager",
        ])
        .current_dir(repo().join("tests/go/olm"))
        .kill_on_drop(true)
        .output()
        .await
        .context("running go mod download in tests/go/olm")?;
    ensure!(
        out.status.success(),
        "go mod download: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let info: Value = serde_json::from_slice(&out.stdout)?;
    let dir = info["Dir"]
        .as_str()
        .context("go mod download gave no Dir")?;
    Ok(Path::new(dir).join("deploy/chart/crds"))
}

/// olm-operator running against `plane`, after OLM's CRDs are Established.
async fn start_olm(plane: &Plane, olm_bin: &Path, crds_dir: &Path) -> anyhow::Result<Process> {
    // Server-side: the CSV CRD is too large for a client-side apply's annotation.
    let dir = crds_dir.to_string_lossy();
    kubectl(plane, &["apply", "--server-side", "-f", &dir], "").await?;
    let crds: Api<CustomResourceDefinition> = Api::all(plane.client());
    for entry in std::fs::read_dir(crds_dir)?.flatten() {
        let crd: Value = serde_saphyr::from_str(&std::fs::read_to_string(entry.path())?)?;
        let name = crd["metadata"]["name"].as_str().context("CRD name")?;
        // olm-operator exits at start-up when its kinds are not served yet.
        wait_for(&crds, name, is_crd_established(), TIMEOUT).await?;
    }
    restricted_namespace(&plane.client(), "olm").await?;
    let mut cmd = Command::new(olm_bin);
    cmd.args([
        "--namespace=olm",
        "--writeStatusName=",
        "--writePackageServerStatusName=",
    ])
    .env("KUBECONFIG", plane.kubeconfig_path());
    plane.spawn("olm-operator", cmd)
}

/// The ServiceAccount and RBAC the CSV's install strategy asks for, as catalog-operator creates
/// them: labelled `olm.managed=true` (olm-operator's informers filter on it), namespaced ones
/// owned by the CSV, cluster-scoped ones with the owner labels OLM's CSV finalizer deletes by.
fn csv_rbac(csv: &Value, ns: &str, uid: &str) -> anyhow::Result<Vec<Value>> {
    let name = csv["metadata"]["name"].as_str().context("CSV name")?;
    let labels = json!({"olm.managed": "true", "olm.owner": name,
                        "olm.owner.kind": "ClusterServiceVersion", "olm.owner.namespace": ns});
    let owners = json!([{"apiVersion": "operators.coreos.com/v1alpha1", "kind": "ClusterServiceVersion",
                         "name": name, "uid": uid, "controller": false, "blockOwnerDeletion": false}]);
    let strategy = &csv["spec"]["install"]["spec"];
    let mut objects = Vec::new();
    let mut accounts = BTreeSet::new();
    for (key, cluster) in [("permissions", false), ("clusterPermissions", true)] {
        for (i, p) in strategy[key].as_array().into_iter().flatten().enumerate() {
            let sa = p["serviceAccountName"]
                .as_str()
                .context("serviceAccountName")?;
            accounts.insert(sa.to_string());
            let (role_kind, binding_kind, meta) = if cluster {
                (
                    "ClusterRole",
                    "ClusterRoleBinding",
                    json!({"name": format!("{name}-{sa}-cluster-{i}"), "labels": labels}),
                )
            } else {
                (
                    "Role",
                    "RoleBinding",
                    json!({"name": format!("{name}-{sa}-{i}"), "namespace": ns,
                                                "labels": labels, "ownerReferences": owners}),
                )
            };
            objects.push(
                json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": role_kind,
                                "metadata": meta, "rules": p["rules"]}),
            );
            objects.push(json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": binding_kind, "metadata": meta,
                                "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": role_kind, "name": meta["name"]},
                                "subjects": [{"kind": "ServiceAccount", "name": sa, "namespace": ns}]}));
        }
    }
    for sa in accounts {
        objects.push(json!({"apiVersion": "v1", "kind": "ServiceAccount",
                            "metadata": {"name": sa, "namespace": ns, "labels": labels, "ownerReferences": owners}}));
    }
    Ok(objects)
}

/// One observed state of the CSV: seconds since it was created, phase, reason.
type Transition = (f64, String, String);

/// Records every distinct (phase, reason) of CSV `ns/name` until aborted.
fn record_transitions(
    api: Api<DynamicObject>,
    name: &str,
    since: Instant,
) -> (Arc<Mutex<Vec<Transition>>>, tokio::task::JoinHandle<()>) {
    let seen: Arc<Mutex<Vec<Transition>>> = Arc::default();
    let (out, name) = (seen.clone(), name.to_string());
    let task = tokio::spawn(async move {
        let mut stream = std::pin::pin!(watcher::watch_object(api, &name).default_backoff());
        while let Ok(Some(event)) = stream.try_next().await {
            let mut v = out.lock().unwrap_or_else(|p| p.into_inner());
            let (phase, reason) = match &event {
                None if v.is_empty() => continue, // not created yet
                None => ("(deleted)".to_string(), String::new()),
                Some(csv) => (
                    csv.data["status"]["phase"]
                        .as_str()
                        .unwrap_or("(no status)")
                        .into(),
                    csv.data["status"]["reason"].as_str().unwrap_or("").into(),
                ),
            };
            if v.last().is_none_or(|(_, p, r)| *p != phase || *r != reason) {
                v.push((since.elapsed().as_secs_f64(), phase, reason));
            }
        }
    });
    (seen, task)
}

fn show(transitions: &Arc<Mutex<Vec<Transition>>>) -> String {
    transitions
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .iter()
        .map(|(t, p, r)| format!("  {t:5.1}s {p} {r}"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The phase history OLM keeps in `status.conditions` (second resolution, its own clock).
fn olm_history(csv: &DynamicObject) -> String {
    csv.data["status"]["conditions"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|c| {
            format!(
                "  {} {} {}",
                c["lastTransitionTime"].as_str().unwrap_or("?"),
                c["phase"].as_str().unwrap_or("?"),
                c["reason"].as_str().unwrap_or("")
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Waits on a watch until `cond` holds for object `name` (None: absent); returns it.
async fn wait_dynamic(
    api: &Api<DynamicObject>,
    name: &str,
    cond: impl Fn(Option<&DynamicObject>) -> bool,
    timeout: Duration,
) -> anyhow::Result<Option<DynamicObject>> {
    let mut stream = std::pin::pin!(watcher::watch_object(api.clone(), name).default_backoff());
    let mut last = None;
    let found = tokio::time::timeout(timeout, async {
        while let Some(o) = stream.try_next().await? {
            if cond(o.as_ref()) {
                return Ok::<_, anyhow::Error>(o);
            }
            last = o.map(|o| o.data["status"].clone());
        }
        Err(anyhow!("the watch of {name} ended"))
    })
    .await;
    match found {
        Ok(r) => r,
        Err(_) => bail!(
            "timed out after {}s waiting for {name}; last status: {}",
            timeout.as_secs(),
            last.unwrap_or_default()
        ),
    }
}

async fn olm_installs_the_bundle_and_uninstall_leaves_what_olm_keeps(
    _ctx: Ctx,
) -> anyhow::Result<()> {
    let olm_bin = go_tool("olm").await?.join("olm");
    let crds_dir = olm_crds_dir().await?;
    let plane = OwnPlane::start().await?;
    let result = olm_install_and_uninstall(plane.get(), &olm_bin, &crds_dir).await;
    plane.stop(result).await
}

async fn olm_install_and_uninstall(
    plane: &Plane,
    olm_bin: &Path,
    crds_dir: &Path,
) -> anyhow::Result<()> {
    let client = plane.client();
    let manifests = bundle_dir().join("manifests");
    let csv_value: Value = serde_saphyr::from_str(&std::fs::read_to_string(
        manifests.join("kab.clusterserviceversion.yaml"),
    )?)?;
    let crd_text = std::fs::read_to_string(manifests.join("kab.dev_kabstacks.yaml"))?;
    let csv_name = format!("kab.v{}", env!("CARGO_PKG_VERSION"));
    ensure!(csv_value["metadata"]["name"] == csv_name.as_str());

    let mut olm = start_olm(plane, olm_bin, crds_dir).await?;
    let olm_log = olm.log_path().to_path_buf();
    let olm_says = || format!("olm-operator's log ends with:\n{}", tail(&olm_log, 30));
    let ns = "kab-olm";
    let before = objects(&client, &[ns]).await?;

    // A namespace with exactly one OperatorGroup targeting it (OwnNamespace), the owned CRD
    // (catalog-operator's job in a full OLM), the CSV, then the ServiceAccount and RBAC it asks
    // for, owned by it.
    restricted_namespace(&client, ns).await?;
    let og = json!({"apiVersion": "operators.coreos.com/v1", "kind": "OperatorGroup",
                    "metadata": {"name": "kab", "namespace": ns}, "spec": {"targetNamespaces": [ns]}});
    kubectl(
        plane,
        &["apply", "--server-side", "-f", "-"],
        &og.to_string(),
    )
    .await?;
    kubectl(plane, &["apply", "--server-side", "-f", "-"], &crd_text).await?;
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    wait_for(&crds, "kabstacks.kab.dev", is_crd_established(), TIMEOUT).await?;
    let csvs: Api<DynamicObject> = Api::namespaced_with(client.clone(), ns, &csv_resource());
    let mut csv: DynamicObject = serde_json::from_value(csv_value.clone())?;
    csv.metadata.namespace = Some(ns.into());
    let created = Instant::now();
    let (transitions, recorder) = record_transitions(csvs.clone(), &csv_name, created);
    let csv = csvs.create(&PostParams::default(), &csv).await?;
    let uid = csv.metadata.uid.as_deref().context("CSV uid")?;
    let rbac = csv_rbac(&csv_value, ns, uid)?;
    let yaml = serde_saphyr::to_string_multiple(&rbac)?;
    kubectl(plane, &["apply", "--server-side", "-f", "-"], &yaml).await?;

    // Pending → … → Succeeded once the operator Deployment OLM creates is Available (Failed
    // after 5 minutes in Installing otherwise).
    let done = |o: Option<&DynamicObject>| {
        o.is_some_and(|c| {
            matches!(
                c.data["status"]["phase"].as_str(),
                Some("Succeeded" | "Failed")
            )
        })
    };
    let csv = wait_dynamic(&csvs, &csv_name, done, Duration::from_secs(240))
        .await
        .map_err(|e| {
            anyhow!(
                "CSV {ns}/{csv_name}: {e:#}\nphases:\n{}\nolm-operator exited: {:?}\n{}",
                show(&transitions),
                olm.exited(),
                olm_says()
            )
        })?
        .context("CSV gone")?;
    let succeeded_after = created.elapsed();
    {
        // The recorder may not have seen the last event yet.
        let mut seen = transitions.lock().unwrap_or_else(|p| p.into_inner());
        let status = &csv.data["status"];
        let phase = status["phase"].as_str().unwrap_or("").to_string();
        if seen.last().is_none_or(|(_, p, _)| *p != phase) {
            let reason = status["reason"].as_str().unwrap_or("").to_string();
            seen.push((succeeded_after.as_secs_f64(), phase, reason));
        }
    }
    ensure!(
        csv.data["status"]["phase"] == "Succeeded",
        "CSV {ns}/{csv_name}: {}\n{}",
        csv.data["status"],
        olm_says()
    );
    println!(
        "install_tests: OLM: CSV {csv_name} Succeeded {succeeded_after:.1?} after its creation; \
         phases seen by a watch (seconds after creation):\n{}\nstatus.conditions:\n{}",
        show(&transitions),
        olm_history(&csv)
    );

    // The operator Deployment OLM created: Available, told which namespaces to watch.
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), ns);
    let deployment = wait_for(&deployments, kab::install::NAME, available, TIMEOUT).await?;
    let annotations = deployment
        .spec
        .template
        .metadata
        .and_then(|m| m.annotations)
        .unwrap_or_default();
    ensure!(
        annotations.get("olm.targetNamespaces").map(String::as_str) == Some(ns),
        "pod template annotations: {annotations:?}"
    );

    // OLM's steady state: the OperatorGroup's sync adds ClusterRoles for the provided API (to
    // aggregate into admin, edit, view).
    let cluster_roles: Api<ClusterRole> = Api::all(client.clone());
    for suffix in ["admin", "edit", "view", "crdview"] {
        let name = format!("kabstacks.kab.dev-v1alpha1-{suffix}");
        wait_for(
            &cluster_roles,
            &name,
            |r: Option<&ClusterRole>| r.is_some(),
            TIMEOUT,
        )
        .await?;
    }

    // Uninstall: delete the CSV. OLM's finalizer deletes the cluster-scoped RBAC it owns, the
    // garbage collector the Deployment, ServiceAccount and namespaced RBAC. OLM keeps the CRD
    // (the users' data) and the ClusterRoles it made for the API, which the CRD owns.
    let deleting = Instant::now();
    csvs.delete(&csv_name, &DeleteParams::background()).await?;
    wait_dynamic(&csvs, &csv_name, |o| o.is_none(), TIMEOUT)
        .await
        .with_context(olm_says)?;
    recorder.abort();
    let crd_and_roles = [
        "CustomResourceDefinition/kabstacks.kab.dev",
        "ClusterRole/kabstacks.kab.dev-v1alpha1-admin",
        "ClusterRole/kabstacks.kab.dev-v1alpha1-edit",
        "ClusterRole/kabstacks.kab.dev-v1alpha1-view",
        "ClusterRole/kabstacks.kab.dev-v1alpha1-crdview",
    ];
    let users = [
        &format!("Namespace/{ns}")[..],
        &format!("{ns}/OperatorGroup/kab"),
        "ClusterRole/olm.og.kab.admin-*", // the OperatorGroup's, deleted with it
        "ClusterRole/olm.og.kab.edit-*",
        "ClusterRole/olm.og.kab.view-*",
        &format!("{ns}/ServiceAccount/default"),
        &format!("{ns}/ConfigMap/kube-root-ca.crt"),
    ];
    let expected: Vec<&str> = crd_and_roles.iter().chain(&users).copied().collect();
    wait_left(&client, &[ns], &before, &expected, olm_says).await?;
    println!(
        "install_tests: OLM: CSV deleted and its objects gone in {:.1?}; OLM kept {crd_and_roles:?}",
        deleting.elapsed()
    );
    // The ClusterRoles OLM keeps go with the CRD.
    for role in cluster_roles
        .list(&ListParams::default())
        .await?
        .items
        .iter()
        .filter(|r| r.name_any().starts_with("kabstacks.kab.dev-"))
    {
        ensure!(
            role.owner_references()
                .iter()
                .any(|o| o.kind.eq_ignore_ascii_case("CustomResourceDefinition")
                    && o.name == "kabstacks.kab.dev"),
            "ClusterRole {} is not owned by the CRD: {:?}",
            role.name_any(),
            role.owner_references()
        );
    }
    // The user's part: the OperatorGroup and the namespace; OLM deletes the group's roles.
    kubectl(plane, &["delete", "namespace", ns, "--timeout=120s"], "").await?;
    wait_left(&client, &[ns], &before, &crd_and_roles, olm_says).await?;
    // Deleting the CRD (and every KabStack with it) is the user's decision; then nothing is left.
    kubectl(
        plane,
        &["delete", "crd", "kabstacks.kab.dev", "--timeout=120s"],
        "",
    )
    .await?;
    wait_left(&client, &[ns], &before, &[], olm_says).await?;
    ensure!(
        olm.exited().is_none(),
        "olm-operator exited\n{}",
        olm_says()
    );
    Ok(())
}
