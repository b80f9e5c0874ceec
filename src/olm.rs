//! The OLM bundle (registry+v1) that `kab olm bundle --version X` writes under `olm/`:
//!
//! ```text
//! olm/<X>/manifests/kab.clusterserviceversion.yaml   the CSV kab.v<X>
//! olm/<X>/manifests/kab.dev_kabstacks.yaml           the owned KabStack CRD (`kab crd`)
//! olm/<X>/metadata/annotations.yaml                  package, channels, media type
//! olm/bundle.Dockerfile                              FROM scratch + the same annotations as labels
//! ```
//!
//! The CSV's install strategy is the plain install's: the Deployment spec is
//! [`install::deployment_spec`], `clusterPermissions` are [`install::CLUSTER_GRANTS`] and
//! `permissions` are [`install::NAMESPACE_GRANTS`], so the two install paths cannot drift.
//! Generation is a pure function of a [`Release`]; what is not derived from the code (the
//! creation date, the version this one replaces) is read from the output directory, so
//! regenerating a version gives the same bytes.

use std::cmp::Ordering;
use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};
use base64::Engine as _;
use serde_json::{Value, json};

use crate::install;

/// OLM package name; the CSV is `kab.v<version>`.
pub const PACKAGE: &str = "kab";
/// The only channel (OLM's naming convention: `candidate` = pre-release, not yet supported for
/// production), and the default one.
pub const CHANNEL: &str = "candidate";
/// Oldest Kubernetes the operator supports.
pub const MIN_KUBE_VERSION: &str = "1.33.0";
/// Honest capability level: kab installs and configures its operands (Basic Install); operand
/// upgrades, backup and recovery are not proven yet (see README, "Install with OLM").
pub const CAPABILITIES: &str = "Basic Install";
/// OperatorHub categories (from the fixed list).
pub const CATEGORIES: &str = "Developer Tools, Database, Streaming & Messaging";

const CSV_FILE: &str = "kab.clusterserviceversion.yaml";
const CRD_FILE: &str = "kab.dev_kabstacks.yaml";
const REPOSITORY: &str = env!("CARGO_PKG_REPOSITORY");

/// The examples shipped as `alm-examples`, the console's default first: every file of
/// `examples/` (a test checks the list).
const EXAMPLES: &[(&str, &str)] = &[
    ("todo.yaml", include_str!("../examples/todo.yaml")),
    ("minimal.yaml", include_str!("../examples/minimal.yaml")),
    ("no-broker.yaml", include_str!("../examples/no-broker.yaml")),
    (
        "external-broker.yaml",
        include_str!("../examples/external-broker.yaml"),
    ),
];

/// The icon: a stack of three layers on Kubernetes blue.
const ICON_SVG: &str = r##"<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 64 64"><rect width="64" height="64" rx="12" fill="#326ce5"/><path d="M12 21 32 11l20 10-20 10z" fill="#fff"/><path d="M12 32l20 10 20-10M12 43l20 10 20-10" fill="none" stroke="#fff" stroke-width="4" stroke-linecap="round" stroke-linejoin="round"/></svg>"##;

/// What one bundle is generated from, besides the code.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Release {
    /// Semantic version, without a leading `v`.
    pub version: String,
    /// The CSV's `createdAt` (RFC 3339).
    pub created_at: String,
    /// The version this one upgrades from (`spec.replaces`), if any.
    pub replaces: Option<String>,
}

impl Release {
    /// The release of `version` for the bundles under `dir`: `createdAt` is kept from an existing
    /// CSV of that version (fixed once per version), else today at 00:00 UTC; `replaces` is the
    /// highest version below it that has a bundle in `dir`.
    pub fn for_dir(dir: &Path, version: &str) -> anyhow::Result<Release> {
        let version = version.strip_prefix('v').unwrap_or(version);
        let parsed = Semver::parse(version)?;
        let csv_path = dir.join(version).join("manifests").join(CSV_FILE);
        let created_at = match std::fs::read_to_string(&csv_path) {
            Ok(text) => {
                let csv: Value = serde_saphyr::from_str(&text)
                    .with_context(|| format!("reading {}", csv_path.display()))?;
                csv.pointer("/metadata/annotations/createdAt")
                    .and_then(Value::as_str)
                    .map(str::to_string)
                    .with_context(|| format!("{} has no createdAt", csv_path.display()))?
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let today = k8s_openapi::jiff::Timestamp::now().strftime("%Y-%m-%d");
                format!("{today}T00:00:00Z")
            }
            Err(e) => return Err(e).with_context(|| format!("reading {}", csv_path.display())),
        };
        let mut previous: Option<(Semver, String)> = None;
        if let Ok(entries) = std::fs::read_dir(dir) {
            for entry in entries.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                let Ok(v) = Semver::parse(&name) else {
                    continue;
                };
                if !entry.path().join("manifests").join(CSV_FILE).is_file() || v >= parsed {
                    continue;
                }
                if previous.as_ref().is_none_or(|(p, _)| v > *p) {
                    previous = Some((v, name));
                }
            }
        }
        Ok(Release {
            version: version.to_string(),
            created_at,
            replaces: previous.map(|(_, name)| format!("{PACKAGE}.v{name}")),
        })
    }
}

/// One generated file, relative to the output directory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BundleFile {
    /// Path relative to the output directory (`0.1.0/manifests/…`).
    pub path: PathBuf,
    /// Contents.
    pub contents: String,
}

/// Every file of the bundle of `release`.
pub fn bundle(release: &Release) -> anyhow::Result<Vec<BundleFile>> {
    Semver::parse(&release.version)?;
    let v = &release.version;
    let header = format!("# Generated by `kab olm bundle --version {v}`: do not edit.\n");
    let annotations = bundle_annotations();
    let mut metadata = String::from(&header);
    metadata.push_str("annotations:\n");
    for (k, val) in &annotations {
        metadata.push_str(&format!("  {k}: {val}\n"));
    }
    let mut dockerfile = format!(
        "# Generated by `kab olm bundle --version {v}`: do not edit.\n\
         # docker build -f olm/bundle.Dockerfile -t <registry>/kab-bundle:v{v} olm/\n\
         FROM scratch\n"
    );
    for (k, val) in &annotations {
        dockerfile.push_str(&format!("LABEL {k}={val}\n"));
    }
    dockerfile.push_str(&format!(
        "COPY {v}/manifests /manifests/\nCOPY {v}/metadata /metadata/\n"
    ));
    Ok(vec![
        BundleFile {
            path: Path::new(v).join("manifests").join(CSV_FILE),
            contents: format!(
                "{header}{}",
                serde_saphyr::to_string(&cluster_service_version(release)?)?
            ),
        },
        BundleFile {
            path: Path::new(v).join("manifests").join(CRD_FILE),
            contents: crate::crd_yaml()?,
        },
        BundleFile {
            path: Path::new(v).join("metadata").join("annotations.yaml"),
            contents: metadata,
        },
        BundleFile {
            path: PathBuf::from("bundle.Dockerfile"),
            contents: dockerfile,
        },
    ])
}

/// Writes `files` under `dir`, removing files of the same bundle directories that are no longer
/// generated. Returns the paths written.
pub fn write(dir: &Path, files: &[BundleFile]) -> anyhow::Result<Vec<PathBuf>> {
    let mut owned_dirs: Vec<PathBuf> = files
        .iter()
        .filter_map(|f| f.path.parent())
        .filter(|p| !p.as_os_str().is_empty())
        .map(|p| dir.join(p))
        .collect();
    owned_dirs.sort();
    owned_dirs.dedup();
    for d in &owned_dirs {
        let Ok(entries) = std::fs::read_dir(d) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_file() && !files.iter().any(|f| dir.join(&f.path) == path) {
                std::fs::remove_file(&path)
                    .with_context(|| format!("removing the stale {}", path.display()))?;
            }
        }
    }
    let mut written = Vec::new();
    for f in files {
        let path = dir.join(&f.path);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("creating {}", parent.display()))?;
        }
        std::fs::write(&path, &f.contents)
            .with_context(|| format!("writing {}", path.display()))?;
        written.push(path);
    }
    Ok(written)
}

/// The bundle annotations (`metadata/annotations.yaml` and the Dockerfile's labels), in order.
fn bundle_annotations() -> Vec<(&'static str, &'static str)> {
    vec![
        (
            "operators.operatorframework.io.bundle.mediatype.v1",
            "registry+v1",
        ),
        (
            "operators.operatorframework.io.bundle.manifests.v1",
            "manifests/",
        ),
        (
            "operators.operatorframework.io.bundle.metadata.v1",
            "metadata/",
        ),
        ("operators.operatorframework.io.bundle.package.v1", PACKAGE),
        ("operators.operatorframework.io.bundle.channels.v1", CHANNEL),
        (
            "operators.operatorframework.io.bundle.channel.default.v1",
            CHANNEL,
        ),
    ]
}

/// `image` with its tag replaced by `tag` (`ghcr.io/kab-dev/kab:0.1.0` → `…:<tag>`).
fn with_tag(image: &str, tag: &str) -> String {
    let name_end = image.rfind('/').map_or(0, |i| i + 1);
    let repo = match image[name_end..].find([':', '@']) {
        Some(i) => &image[..name_end + i],
        None => image,
    };
    format!("{repo}:{tag}")
}

/// The ClusterServiceVersion `kab.v<version>`.
pub fn cluster_service_version(release: &Release) -> anyhow::Result<Value> {
    let v = &release.version;
    let image = with_tag(&install::operator_image(), v);
    let nats_image = crate::render::Settings::default().nats_image;
    let mut examples = Vec::new();
    for (file, text) in EXAMPLES {
        let mut example: Value = serde_saphyr::from_str(text)
            .with_context(|| format!("examples/{file} is not valid YAML"))?;
        // The console creates the example in the namespace the user is looking at.
        if let Some(meta) = example.get_mut("metadata").and_then(|m| m.as_object_mut()) {
            meta.remove("namespace");
        }
        examples.push(example);
    }
    let permissions = |grants: &[install::Grant]| -> anyhow::Result<Value> {
        Ok(json!([{
            "serviceAccountName": install::NAME,
            "rules": serde_json::to_value(install::policy_rules(grants))?,
        }]))
    };
    let mut csv = json!({
        "apiVersion": "operators.coreos.com/v1alpha1",
        "kind": "ClusterServiceVersion",
        "metadata": {
            "name": format!("{PACKAGE}.v{v}"),
            "annotations": {
                "alm-examples": serde_json::to_string_pretty(&examples)?,
                "capabilities": CAPABILITIES,
                "categories": CATEGORIES,
                "containerImage": image,
                "createdAt": release.created_at,
                "description": "Declare a business entity in one KabStack: kab serves its API, enforces its rules, publishes its changes to NATS.",
                "operatorframework.io/suggested-namespace": install::NAMESPACE,
                "repository": REPOSITORY,
                "support": "kab maintainers",
            },
        },
        "spec": {
            "displayName": "kab",
            "description": DESCRIPTION,
            "version": v,
            "minKubeVersion": MIN_KUBE_VERSION,
            "maturity": "alpha",
            "keywords": ["backend", "crd", "admission-webhook", "business-rules", "nats", "jetstream", "events", "rest-api"],
            "maintainers": [{"name": "kab maintainers", "email": "maintainers@kab.dev"}],
            "provider": {"name": "kab", "url": REPOSITORY},
            "links": [
                {"name": "Source Code", "url": REPOSITORY},
                {"name": "Documentation", "url": format!("{REPOSITORY}#readme")},
                {"name": "Examples", "url": format!("{REPOSITORY}/tree/main/examples")},
            ],
            "icon": [{
                "base64data": base64::engine::general_purpose::STANDARD.encode(ICON_SVG),
                "mediatype": "image/svg+xml",
            }],
            // The operator watches one namespace (`--namespace`, from olm.targetNamespaces) or
            // all of them; a list of several namespaces is not supported.
            "installModes": [
                {"type": "OwnNamespace", "supported": true},
                {"type": "SingleNamespace", "supported": true},
                {"type": "MultiNamespace", "supported": false},
                {"type": "AllNamespaces", "supported": true},
            ],
            "install": {
                "strategy": "deployment",
                "spec": {
                    "clusterPermissions": permissions(install::CLUSTER_GRANTS)?,
                    "permissions": permissions(install::NAMESPACE_GRANTS)?,
                    "deployments": [{
                        "name": install::NAME,
                        "label": {"app.kubernetes.io/name": "kab", "app.kubernetes.io/component": "operator"},
                        "spec": install::deployment_spec(&image),
                    }],
                },
            },
            "customresourcedefinitions": {"owned": [owned_kabstack()]},
            "relatedImages": [
                {"name": "kab", "image": image},
                {"name": "nats", "image": nats_image},
            ],
        },
    });
    if let Some(replaces) = &release.replaces {
        csv["spec"]["replaces"] = json!(replaces);
    }
    Ok(csv)
}

const DESCRIPTION: &str = r#"kab turns a Kubernetes cluster into the backend of business applications. One `KabStack` declares a business entity, and the kab operator builds everything around it:

- the entity's **CustomResourceDefinition**: the API server is its REST API, etcd its store, watches its change feed;
- an **admission webhook** that enforces the stack's business rules (unique fields, immutable fields, a maximum count, an external check) before anything is stored;
- an **entity controller** that publishes every change as a CloudEvent to a **NATS JetStream** broker, which kab runs for the stack (or uses yours);
- least-privilege **RBAC** for the stack's readers and writers;
- one aggregated health in the stack's status (`Ready`, and what blocks it).

```yaml
apiVersion: kab.dev/v1alpha1
kind: KabStack
metadata: {name: todo}
spec:
  entity:
    group: todo.example.com
    kind: Todo
    versions:
      - name: v1
        schema: {type: object, required: [code], properties: {code: {type: string}}}
  rules:
    - {name: unique-code, unique: {fields: [spec.code]}}
```

### Install modes

The operator watches every namespace (AllNamespaces) or one (OwnNamespace, SingleNamespace). Whatever the mode, it needs cluster-wide permissions: creating each stack's entity CRD and webhook registration is the product. Every rule of its RBAC, and why it needs it, is listed in the source (`src/install.rs`).

### Before you uninstall

Delete your KabStacks first, in the foreground (`kubectl delete kabstacks --all -A --cascade=foreground`), so that the operator removes their webhook registrations and Kubernetes their children while the KabStack API still exists. Entity CRDs with `deletionPolicy: Retain` (the default) stay with your data, by design.
"#;

fn descriptor(path: &str, name: &str, description: &str, x: &[&str]) -> Value {
    json!({"path": path, "displayName": name, "description": description, "x-descriptors": x})
}

/// The owned KabStack API with its UI descriptors.
fn owned_kabstack() -> Value {
    use crate::api::KabStack;
    use kube::Resource as _;
    let text = "urn:alm:descriptor:com.tectonic.ui:text";
    let pods = "urn:alm:descriptor:com.tectonic.ui:podCount";
    let select = |v: &str| format!("urn:alm:descriptor:com.tectonic.ui:select:{v}");
    json!({
        "name": format!("{}.{}", <KabStack as kube::Resource>::plural(&()), KabStack::group(&())),
        "version": KabStack::version(&()),
        "kind": KabStack::kind(&()),
        "displayName": "Kab Stack",
        "description": "A business entity and its backend: the entity's API (a CRD), a webhook enforcing its business rules, an entity controller publishing its changes, a NATS broker and least-privilege RBAC.",
        "resources": [
            {"kind": "CustomResourceDefinition", "version": "v1", "name": ""},
            {"kind": "ValidatingWebhookConfiguration", "version": "v1", "name": ""},
            {"kind": "Deployment", "version": "v1", "name": ""},
            {"kind": "StatefulSet", "version": "v1", "name": ""},
            {"kind": "Service", "version": "v1", "name": ""},
            {"kind": "Secret", "version": "v1", "name": ""},
            {"kind": "ConfigMap", "version": "v1", "name": ""},
            {"kind": "ServiceAccount", "version": "v1", "name": ""},
            {"kind": "Role", "version": "v1", "name": ""},
            {"kind": "RoleBinding", "version": "v1", "name": ""},
            {"kind": "PodDisruptionBudget", "version": "v1", "name": ""},
            {"kind": "NetworkPolicy", "version": "v1", "name": ""},
        ],
        "specDescriptors": [
            descriptor("entity.group", "Entity group", "API group of the entity (your domain).", &[text]),
            descriptor("entity.kind", "Entity kind", "Kind of the entity, e.g. Todo.", &[text]),
            descriptor("entity.deletionPolicy", "Deletion policy", "Retain keeps the entity API and its data when the stack is deleted; Delete removes them.",
                       &[&select("Retain"), &select("Delete")]),
            descriptor("webhook.replicas", "Webhook replicas", "Pods of the business-rule webhook.", &[pods]),
            descriptor("webhook.failurePolicy", "Webhook failure policy", "Fail refuses writes when the webhook cannot be reached; Ignore lets them through.",
                       &[&select("Fail"), &select("Ignore")]),
            descriptor("controller.replicas", "Entity controller replicas", "Pods of the entity controller.", &[pods]),
            descriptor("broker.mode", "Broker mode", "Managed runs NATS for the stack, External uses broker.url, None publishes nothing.",
                       &[&select("Managed"), &select("External"), &select("None")]),
            descriptor("broker.replicas", "Broker replicas", "NATS servers of a managed broker (1 or 3).", &[pods]),
            descriptor("paused", "Paused", "When true the operator writes nothing but status.",
                       &["urn:alm:descriptor:com.tectonic.ui:booleanSwitch"]),
        ],
        "statusDescriptors": [
            descriptor("phase", "Phase", "Progressing, Ready, Degraded, Failed, Paused or Deleting.",
                       &["urn:alm:descriptor:io.kubernetes.phase"]),
            descriptor("conditions", "Conditions", "Ready, Reconciled and one condition per part of the stack.",
                       &["urn:alm:descriptor:io.kubernetes.conditions"]),
            descriptor("entity", "Entity API", "The entity API served: <plural>.<group>.", &[text]),
            descriptor("components", "Components", "One row per child: whether it is ready, and what blocks it.", &[]),
            descriptor("certificate.notAfter", "Webhook certificate expiry", "When the webhook's serving certificate expires.", &[text]),
            descriptor("observedGeneration", "Observed generation", "The generation of the spec the status describes.", &[text]),
        ],
    })
}

/// A semantic version (MAJOR.MINOR.PATCH[-PRE][+BUILD]), ordered by precedence.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Semver {
    core: [u64; 3],
    pre: Vec<String>,
}

impl Semver {
    fn parse(text: &str) -> anyhow::Result<Semver> {
        let bad = || format!("{text:?} is not a semantic version (MAJOR.MINOR.PATCH, e.g. 0.1.0)");
        let (rest, build) = match text.split_once('+') {
            Some((r, b)) => (r, Some(b)),
            None => (text, None),
        };
        let (core, pre) = match rest.split_once('-') {
            Some((c, p)) => (c, Some(p)),
            None => (rest, None),
        };
        let ident_ok =
            |s: &str| !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '-');
        let numeric = |s: &str| !s.is_empty() && s.chars().all(|c| c.is_ascii_digit());
        let parts: Vec<&str> = core.split('.').collect();
        if parts.len() != 3
            || parts
                .iter()
                .any(|p| !numeric(p) || (p.len() > 1 && p.starts_with('0')))
        {
            bail!(bad());
        }
        let mut nums = [0u64; 3];
        for (n, p) in nums.iter_mut().zip(&parts) {
            *n = p.parse().with_context(bad)?;
        }
        let pre: Vec<String> = match pre {
            Some(p) => p.split('.').map(str::to_string).collect(),
            None => Vec::new(),
        };
        if pre
            .iter()
            .any(|p| !ident_ok(p) || (numeric(p) && p.len() > 1 && p.starts_with('0')))
            || build.is_some_and(|b| !b.split('.').all(ident_ok))
        {
            bail!(bad());
        }
        Ok(Semver { core: nums, pre })
    }
}

impl Ord for Semver {
    fn cmp(&self, other: &Self) -> Ordering {
        self.core
            .cmp(&other.core)
            .then_with(|| match (self.pre.is_empty(), other.pre.is_empty()) {
                (true, true) => Ordering::Equal,
                (true, false) => Ordering::Greater,
                (false, true) => Ordering::Less,
                (false, false) => {
                    for (a, b) in self.pre.iter().zip(&other.pre) {
                        let o = match (a.parse::<u64>(), b.parse::<u64>()) {
                            (Ok(x), Ok(y)) => x.cmp(&y),
                            (Ok(_), Err(_)) => Ordering::Less,
                            (Err(_), Ok(_)) => Ordering::Greater,
                            (Err(_), Err(_)) => a.cmp(b),
                        };
                        if o != Ordering::Equal {
                            return o;
                        }
                    }
                    self.pre.len().cmp(&other.pre.len())
                }
            })
    }
}

impl PartialOrd for Semver {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn committed_dir() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("olm")
    }

    fn release() -> Release {
        Release {
            version: "1.2.3".into(),
            created_at: "2026-01-02T00:00:00Z".into(),
            replaces: Some("kab.v1.2.2".into()),
        }
    }

    /// The committed `olm/` must be what `kab olm bundle --version <Cargo version>` writes
    /// (`KAB_BLESS=1` rewrites it).
    #[test]
    fn committed_bundle_is_current() {
        let dir = committed_dir();
        let version = env!("CARGO_PKG_VERSION");
        let files = bundle(&Release::for_dir(&dir, version).unwrap()).unwrap();
        if crate::bless() {
            write(&dir, &files).unwrap();
        }
        let mut stale = Vec::new();
        for f in &files {
            let committed = std::fs::read_to_string(dir.join(&f.path)).unwrap_or_default();
            if committed != f.contents {
                stale.push(f.path.display().to_string());
            }
        }
        let mut extra = Vec::new();
        for sub in ["manifests", "metadata"] {
            for entry in std::fs::read_dir(dir.join(version).join(sub))
                .into_iter()
                .flatten()
                .flatten()
            {
                let rel = Path::new(version).join(sub).join(entry.file_name());
                if !files.iter().any(|f| f.path == rel) {
                    extra.push(rel.display().to_string());
                }
            }
        }
        assert!(
            stale.is_empty() && extra.is_empty(),
            "olm/ is stale (differs: {stale:?}, not generated: {extra:?}): run \
             `cargo run -- olm bundle --version {version}` (or KAB_BLESS=1 cargo test --lib olm)"
        );
    }

    #[test]
    fn examples_are_every_file_of_the_examples_directory() {
        let mut files: Vec<String> =
            std::fs::read_dir(Path::new(env!("CARGO_MANIFEST_DIR")).join("examples"))
                .unwrap()
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.ends_with(".yaml"))
                .collect();
        files.sort();
        let mut listed: Vec<&str> = EXAMPLES.iter().map(|(f, _)| *f).collect();
        listed.sort_unstable();
        assert_eq!(files, listed, "add the new example to olm::EXAMPLES");
    }

    #[test]
    fn csv_installs_exactly_the_plain_install() {
        let csv = cluster_service_version(&release()).unwrap();
        let docs: Vec<Value> =
            serde_saphyr::from_multiple(&install::manifests(install::NAMESPACE, "img").unwrap())
                .unwrap();
        let doc = |kind: &str| docs.iter().find(|d| d["kind"] == kind).unwrap().clone();
        let strategy = &csv["spec"]["install"]["spec"];
        assert_eq!(
            strategy["clusterPermissions"][0]["rules"],
            doc("ClusterRole")["rules"]
        );
        assert_eq!(strategy["permissions"][0]["rules"], doc("Role")["rules"]);
        for p in ["clusterPermissions", "permissions"] {
            assert_eq!(strategy[p][0]["serviceAccountName"], install::NAME);
        }
        // Same Deployment but for the image and the watched namespace, which OLM's
        // olm.targetNamespaces annotation sets.
        let deployment = &strategy["deployments"][0];
        assert_eq!(deployment["name"], install::NAME);
        let mut spec = deployment["spec"].clone();
        let container = &mut spec["template"]["spec"]["containers"][0];
        assert_eq!(container["image"], "ghcr.io/kab-dev/kab:1.2.3");
        let env = container["env"].as_array_mut().unwrap();
        let watch = env
            .iter()
            .position(|e| e["name"] == "KAB_WATCH_NAMESPACE")
            .unwrap();
        assert_eq!(
            env.remove(watch)["valueFrom"]["fieldRef"]["fieldPath"],
            "metadata.annotations['olm.targetNamespaces']"
        );
        let plain = install::deployment_spec("ghcr.io/kab-dev/kab:1.2.3");
        let mut plain_without_watch = plain.clone();
        plain_without_watch["template"]["spec"]["containers"][0]["env"]
            .as_array_mut()
            .unwrap()
            .retain(|e| e["name"] != "KAB_WATCH_NAMESPACE");
        assert_eq!(spec, plain_without_watch);
        let mut plain_deploy = doc("Deployment")["spec"].clone();
        plain_deploy["template"]["spec"]["containers"][0]["image"] =
            json!("ghcr.io/kab-dev/kab:1.2.3");
        let kab_image = plain_deploy["template"]["spec"]["containers"][0]["env"]
            .as_array_mut()
            .unwrap()
            .iter_mut()
            .find(|e| e["name"] == "KAB_IMAGE");
        if let Some(e) = kab_image {
            e["value"] = json!("ghcr.io/kab-dev/kab:1.2.3");
        }
        assert_eq!(plain_deploy, plain_without_watch);
        // Every container asks for CPU and memory.
        let requests = &plain["template"]["spec"]["containers"][0]["resources"]["requests"];
        assert!(requests["cpu"].is_string() && requests["memory"].is_string());
    }

    #[test]
    fn csv_has_what_operatorhub_reviewers_check() {
        let r = release();
        let csv = cluster_service_version(&r).unwrap();
        let ann = &csv["metadata"]["annotations"];
        assert_eq!(csv["metadata"]["name"], "kab.v1.2.3");
        assert_eq!(csv["spec"]["version"], "1.2.3");
        assert_eq!(csv["spec"]["replaces"], "kab.v1.2.2");
        assert_eq!(ann["createdAt"], "2026-01-02T00:00:00Z");
        assert_eq!(csv["spec"]["minKubeVersion"], "1.33.0");
        assert!(ann["description"].as_str().unwrap().len() <= 135);
        let examples: Vec<Value> =
            serde_json::from_str(ann["alm-examples"].as_str().unwrap()).unwrap();
        assert_eq!(examples.len(), EXAMPLES.len());
        for e in &examples {
            assert_eq!(e["kind"], "KabStack");
            assert_eq!(e["apiVersion"], "kab.dev/v1alpha1");
            assert!(e["metadata"].get("namespace").is_none());
            let _: crate::api::KabStack = serde_json::from_value(e.clone()).unwrap();
        }
        let modes: Vec<(&str, bool)> = csv["spec"]["installModes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| {
                (
                    m["type"].as_str().unwrap(),
                    m["supported"].as_bool().unwrap(),
                )
            })
            .collect();
        assert_eq!(modes.len(), 4);
        assert!(
            modes.contains(&("AllNamespaces", true)) && modes.contains(&("MultiNamespace", false))
        );
        let images: Vec<&str> = csv["spec"]["relatedImages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| i["image"].as_str().unwrap())
            .collect();
        assert_eq!(
            images,
            [
                "ghcr.io/kab-dev/kab:1.2.3",
                crate::render::Settings::default().nats_image.as_str()
            ]
        );
        let owned = &csv["spec"]["customresourcedefinitions"]["owned"][0];
        assert_eq!(owned["name"], "kabstacks.kab.dev");
        assert_eq!(owned["version"], "v1alpha1");
        let status_paths: Vec<&str> = owned["statusDescriptors"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d["path"].as_str().unwrap())
            .collect();
        assert!(status_paths.contains(&"conditions") && status_paths.contains(&"phase"));
        let icon = csv["spec"]["icon"][0]["base64data"].as_str().unwrap();
        let svg = base64::engine::general_purpose::STANDARD
            .decode(icon)
            .unwrap();
        assert!(svg.starts_with(b"<svg"));
        // The CSV deserializes into what OLM reads: a Deployment spec and RBAC rules.
        let strategy = &csv["spec"]["install"]["spec"];
        let _: k8s_openapi::api::apps::v1::DeploymentSpec =
            serde_json::from_value(strategy["deployments"][0]["spec"].clone()).unwrap();
        let _: Vec<k8s_openapi::api::rbac::v1::PolicyRule> =
            serde_json::from_value(strategy["clusterPermissions"][0]["rules"].clone()).unwrap();
    }

    #[test]
    fn bundle_layout_and_annotations() {
        let files = bundle(&release()).unwrap();
        let paths: Vec<String> = files.iter().map(|f| f.path.display().to_string()).collect();
        assert_eq!(
            paths,
            [
                "1.2.3/manifests/kab.clusterserviceversion.yaml",
                "1.2.3/manifests/kab.dev_kabstacks.yaml",
                "1.2.3/metadata/annotations.yaml",
                "bundle.Dockerfile"
            ]
        );
        let ann: Value = serde_saphyr::from_str(&files[2].contents).unwrap();
        let ann = &ann["annotations"];
        assert_eq!(
            ann["operators.operatorframework.io.bundle.mediatype.v1"],
            "registry+v1"
        );
        assert_eq!(
            ann["operators.operatorframework.io.bundle.manifests.v1"],
            "manifests/"
        );
        assert_eq!(
            ann["operators.operatorframework.io.bundle.metadata.v1"],
            "metadata/"
        );
        assert_eq!(
            ann["operators.operatorframework.io.bundle.package.v1"],
            "kab"
        );
        assert_eq!(
            ann["operators.operatorframework.io.bundle.channels.v1"],
            "candidate"
        );
        let docker = &files[3].contents;
        assert!(docker.contains("FROM scratch\n"));
        assert!(docker.contains("LABEL operators.operatorframework.io.bundle.package.v1=kab\n"));
        assert!(docker.contains("COPY 1.2.3/manifests /manifests/\n"));
        // One object per manifest file.
        for f in &files[..2] {
            let docs: Vec<Value> = serde_saphyr::from_multiple(&f.contents).unwrap();
            assert_eq!(docs.len(), 1, "{}", f.path.display());
        }
        // Deterministic.
        assert_eq!(files, bundle(&release()).unwrap());
    }

    #[test]
    fn release_keeps_created_at_and_replaces_the_previous_version() {
        let tmp = tempfile::tempdir().unwrap();
        let first = Release {
            version: "0.1.0".into(),
            created_at: "2026-01-01T00:00:00Z".into(),
            replaces: None,
        };
        write(tmp.path(), &bundle(&first).unwrap()).unwrap();
        assert_eq!(Release::for_dir(tmp.path(), "0.1.0").unwrap(), first);
        assert_eq!(Release::for_dir(tmp.path(), "v0.1.0").unwrap(), first);
        // A directory that is not a bundle, and a higher version, are not replaced.
        std::fs::create_dir_all(tmp.path().join("0.0.9")).unwrap();
        let later = Release {
            version: "0.3.0".into(),
            ..first.clone()
        };
        write(tmp.path(), &bundle(&later).unwrap()).unwrap();
        let next = Release::for_dir(tmp.path(), "0.2.0-rc.1").unwrap();
        assert_eq!(next.replaces.as_deref(), Some("kab.v0.1.0"));
        assert!(next.created_at.ends_with("T00:00:00Z"));
        // A stale file of a bundle directory is removed on regeneration.
        let stale = tmp.path().join("0.1.0/manifests/old.yaml");
        std::fs::write(&stale, "x").unwrap();
        write(tmp.path(), &bundle(&first).unwrap()).unwrap();
        assert!(!stale.exists());
    }

    #[test]
    fn versions_are_semantic() {
        for bad in [
            "", "1", "1.2", "01.2.3", "1.2.3.4", "1.2.x", "1.2.3-", "1.2.3-01", "v",
        ] {
            assert!(Semver::parse(bad).is_err(), "{bad:?}");
        }
        let order = [
            "0.1.0-alpha",
            "0.1.0-alpha.1",
            "0.1.0-alpha.beta",
            "0.1.0-beta.2",
            "0.1.0-beta.11",
            "0.1.0-rc.1",
            "0.1.0",
            "0.2.0",
            "1.0.0+build.7",
        ];
        for w in order.windows(2) {
            assert!(
                Semver::parse(w[0]).unwrap() < Semver::parse(w[1]).unwrap(),
                "{w:?}"
            );
        }
        assert_eq!(
            with_tag("ghcr.io/kab-dev/kab:0.1.0", "2.0.0"),
            "ghcr.io/kab-dev/kab:2.0.0"
        );
        assert_eq!(
            with_tag("localhost:5000/kab", "1.0.0"),
            "localhost:5000/kab:1.0.0"
        );
        assert_eq!(with_tag("kab@sha256:abc", "1.0.0"), "kab:1.0.0");
    }
}
