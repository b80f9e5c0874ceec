//! The render step, cached: what reconciles need of each rendered child (an [`Outline`]), kept
//! per stack for one (uid, generation, CA bundle) instead of the objects themselves. A stack is
//! reconciled several times per change while its children become ready, and rendering
//! (templates, YAML, typed checks) is most of a reconcile's CPU; the objects are rendered again
//! only for the children that are applied.

use super::Ctx;
use crate::api::KabStack;
use crate::render::{self, Child, Facts, LABEL_COMPONENT, LABEL_STACK, Rendered, Step};
use kube::api::DynamicObject;
use kube::runtime::reflector::ObjectRef;
use std::collections::HashSet;
use std::hash::{Hash, Hasher};
use std::sync::Arc;

/// What reconciles need of a rendered child, without keeping the object itself. The strings a
/// stack's children share (namespace, stack and component labels) are shared, the kind is static.
#[derive(Clone, Debug)]
pub struct Outline {
    /// The render step the child belongs to.
    pub step: Step,
    /// The template it comes from: a re-render renders just the templates to apply again.
    pub template: &'static str,
    /// The kind, e.g. `Deployment`.
    pub kind: &'static str,
    /// The namespace, for namespaced children.
    pub namespace: Option<Arc<str>>,
    /// The name.
    pub name: String,
    /// Whether the kind is namespaced.
    pub namespaced: bool,
    /// The `kab.dev/stack` label, to find a workload's pods.
    pub stack_label: Option<Arc<str>>,
    /// The component label, to find a workload's pods.
    pub component: Option<Arc<str>>,
    /// Hash of `group/kind/namespace/name`: the key of the applied memo.
    pub key: u64,
    /// Hash of the rendered object, compared with the last apply.
    pub hash: u64,
}

/// Shares equal strings among a stack's outlines.
#[derive(Default)]
struct Interner(HashSet<Arc<str>>);

impl Interner {
    fn get(&mut self, s: Option<&str>) -> Option<Arc<str>> {
        let s = s?;
        if let Some(shared) = self.0.get(s) {
            return Some(shared.clone());
        }
        let shared: Arc<str> = Arc::from(s);
        self.0.insert(shared.clone());
        Some(shared)
    }
}

impl Outline {
    fn of(child: &Child, strings: &mut Interner) -> Self {
        let labels = child.object.metadata.labels.as_ref();
        let label = |k: &str| labels.and_then(|l| l.get(k)).map(String::as_str);
        let kind = render::kind_for(&child.resource.api_version, &child.resource.kind)
            .map_or("(unsupported)", |k| k.resource.kind.as_str());
        Outline {
            template: child.template,
            step: child.step,
            kind,
            namespace: strings.get(child.object.metadata.namespace.as_deref()),
            name: child.name().to_owned(),
            namespaced: child.namespaced,
            stack_label: strings.get(label(LABEL_STACK)),
            component: strings.get(label(LABEL_COMPONENT)),
            key: child_key(child),
            hash: hash_object(&child.object),
        }
    }
}

/// The outlines of a stack's rendered children (sharing their common strings).
pub fn outlines(rendered: &Rendered) -> Vec<Outline> {
    let mut strings = Interner::default();
    rendered
        .children
        .iter()
        .map(|c| Outline::of(c, &mut strings))
        .collect()
}

/// The key of a child in the applied memo.
pub fn child_key(c: &Child) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    (
        &c.resource.group,
        &c.resource.kind,
        c.object.metadata.namespace.as_deref().unwrap_or(""),
        c.object.metadata.name.as_deref().unwrap_or(""),
    )
        .hash(&mut h);
    h.finish()
}

fn hash_object(obj: &DynamicObject) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    serde_json::to_string(obj).unwrap_or_default().hash(&mut h);
    h.finish()
}

/// A stack's children rendered for one (uid, generation, CA bundle), as outlines.
pub struct Prepared {
    /// Hash of (uid, generation, CA bundle).
    pub key: u64,
    /// One outline per child, in render order.
    pub children: Vec<Outline>,
    /// Hash of the desired (kind, name) set, for pruning.
    pub desired: u64,
}

/// The outlines of a stack's children for this (uid, generation, CA bundle), from the memo or
/// rendered now (then the rendering is returned too, for the applies it is needed for).
pub fn prepare(
    stack: &KabStack,
    ctx: &Ctx,
    facts: &Facts,
) -> Result<(Arc<Prepared>, Option<Rendered>), render::RenderError> {
    let key = {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        (
            &stack.metadata.uid,
            &stack.metadata.generation,
            &facts.ca_bundle_pem,
        )
            .hash(&mut h);
        h.finish()
    };
    let sref = ObjectRef::from_obj(stack);
    let cacheable = stack.metadata.uid.is_some() && stack.metadata.generation.is_some();
    if cacheable && let Some(p) = ctx.memo.prepared(&sref, key) {
        return Ok((p, None));
    }
    let rendered = render::render(&ctx.templates, stack, &ctx.settings, facts)?;
    let children = outlines(&rendered);
    let desired = {
        let mut set: Vec<u64> = children.iter().map(|c| c.key).collect();
        set.sort();
        let mut h = std::collections::hash_map::DefaultHasher::new();
        set.hash(&mut h);
        h.finish()
    };
    let prepared = Arc::new(Prepared {
        key,
        children,
        desired,
    });
    if cacheable {
        ctx.memo.record_prepared(&sref, prepared.clone());
    }
    Ok((prepared, Some(rendered)))
}

/// The objects of the children a plan applies.
pub enum Objects {
    /// Each with the index of its outline.
    Rendered(Vec<(usize, Child)>),
    /// A re-render did not give the child an outline names (rendering is deterministic, so this
    /// should not happen); the memo is dropped and the stack rendered afresh.
    Stale,
}

/// The objects for the outlines at `wanted`: taken from `fresh` when the stack was rendered just
/// now, otherwise rendered again (only their templates).
pub fn objects(
    stack: &KabStack,
    ctx: &Ctx,
    prepared: &Prepared,
    fresh: Option<Rendered>,
    wanted: &[usize],
    facts: &Facts,
) -> Result<Objects, render::RenderError> {
    if wanted.is_empty() {
        return Ok(Objects::Rendered(Vec::new()));
    }
    let rendered = match fresh {
        Some(r) => r,
        None => {
            let templates: HashSet<&str> = wanted
                .iter()
                .map(|&i| prepared.children[i].template)
                .collect();
            render::render_only(&ctx.templates, stack, &ctx.settings, facts, |file| {
                templates.contains(file)
            })?
        }
    };
    let mut children = rendered.children;
    let mut objects = Vec::with_capacity(wanted.len());
    for &i in wanted {
        let o = &prepared.children[i];
        let Some(at) = children
            .iter()
            .position(|c| c.template == o.template && child_key(c) == o.key)
        else {
            ctx.memo.drop_prepared(&ObjectRef::from_obj(stack));
            return Ok(Objects::Stale);
        };
        objects.push((i, children.swap_remove(at)));
    }
    Ok(Objects::Rendered(objects))
}
