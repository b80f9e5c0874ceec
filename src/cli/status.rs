//! `kab status`: fetch the facts, build the trees (pure), print them; `--watch` redraws on every
//! change seen by watches on the stacks and their children.

use std::io::IsTerminal as _;
use std::pin::Pin;
use std::time::Duration;

use anyhow::bail;
use futures::{Stream, StreamExt as _};
use k8s_openapi::api::admissionregistration::v1::ValidatingWebhookConfiguration;
use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use k8s_openapi::jiff::Timestamp;
use kube::api::Api;
use kube::api::PartialObjectMeta;
use kube::runtime::{WatchStreamExt as _, watcher};

use super::fetch::{self, Cluster, Target};
use super::show::{self, Format};
use super::tree::{self, Node};
use crate::api::KabStack;
use crate::render::{KAB, LABEL_MANAGED_BY, LABEL_PART_OF, LABEL_STACK, LABEL_STACK_NAMESPACE};

/// Options of `kab status`.
#[derive(clap::Args, Debug, Clone)]
pub struct StatusArgs {
    /// The stack: `NAMESPACE/NAME`, or `NAME` in the namespace of `-n` (default: the kubeconfig
    /// context's). Without it: every stack of the namespace.
    pub stack: Option<String>,
    /// Namespace of the stack(s).
    #[arg(short = 'n', long)]
    pub namespace: Option<String>,
    /// Every stack in every namespace.
    #[arg(short = 'A', long, conflicts_with_all = ["stack", "namespace"])]
    pub all_namespaces: bool,
    /// Keep watching and redraw on every change (Ctrl-C to stop); with `-o json|yaml`, one
    /// document per change.
    #[arg(short = 'w', long)]
    pub watch: bool,
    /// Output format.
    #[arg(short = 'o', long, value_enum, default_value = "text")]
    pub output: Format,
}

/// Which stacks the arguments name.
pub fn target(args: &StatusArgs, default_namespace: &str) -> anyhow::Result<Target> {
    if args.all_namespaces {
        return Ok(Target::All);
    }
    let ns_flag = args.namespace.clone();
    match args.stack.as_deref() {
        None => Ok(Target::Namespace(
            ns_flag.unwrap_or_else(|| default_namespace.to_owned()),
        )),
        Some(s) => match s.split_once('/') {
            Some((ns, name)) if !ns.is_empty() && !name.is_empty() && !name.contains('/') => {
                if ns_flag.as_deref().is_some_and(|n| n != ns) {
                    bail!(
                        "{s} names namespace {ns}, but -n says {}",
                        ns_flag.unwrap_or_default()
                    );
                }
                Ok(Target::Stack {
                    namespace: ns.to_owned(),
                    name: name.to_owned(),
                })
            }
            Some(_) => bail!("{s} is not a stack: use NAMESPACE/NAME, or NAME with -n NAMESPACE"),
            None => Ok(Target::Stack {
                namespace: ns_flag.unwrap_or_else(|| default_namespace.to_owned()),
                name: s.to_owned(),
            }),
        },
    }
}

/// Prints the trees in the format; `compact` puts a JSON document on one line (`--watch`).
pub fn render(
    trees: &[Node],
    single: bool,
    format: Format,
    now: Timestamp,
    colour: bool,
    compact: bool,
) -> anyhow::Result<String> {
    Ok(match format {
        Format::Text => show::text(trees, now, colour),
        Format::Json => show::json(trees, single, compact)?,
        Format::Yaml => show::yaml(trees, single)?,
        Format::Dot => show::dot(trees),
    })
}

async fn fetch_trees(
    cluster: &Cluster,
    target: &Target,
    program: &str,
) -> anyhow::Result<Vec<Node>> {
    let stacks = fetch::stacks(cluster, target, program).await?;
    let facts = fetch::facts(&cluster.client, stacks).await;
    let now = Timestamp::now();
    Ok(facts.iter().map(|f| tree::build(f, now)).collect())
}

fn nothing_message(target: &Target) -> String {
    match target {
        Target::All => "no KabStack in any namespace".into(),
        Target::Namespace(ns) => {
            format!("no KabStack in namespace {ns} (-A shows every namespace)")
        }
        Target::Stack { namespace, name } => format!("KabStack {namespace}/{name} not found"),
    }
}

/// Runs `kab status`.
pub async fn run(args: StatusArgs) -> anyhow::Result<()> {
    let program = super::program();
    let cluster = fetch::connect(program).await?;
    let target = target(&args, &cluster.default_namespace)?;
    let single = matches!(target, Target::Stack { .. });
    let terminal = std::io::stdout().is_terminal();
    let colour = show::use_colour(terminal, std::env::var_os("NO_COLOR").as_deref());
    if args.watch {
        return watch(
            &cluster,
            &target,
            args.output,
            single,
            terminal,
            colour,
            program,
        )
        .await;
    }
    let trees = fetch_trees(&cluster, &target, program).await?;
    if trees.is_empty() && args.output == Format::Text {
        eprintln!("{}", nothing_message(&target));
        return Ok(());
    }
    let out = render(&trees, single, args.output, Timestamp::now(), colour, false)?;
    super::write_stdout(out.as_bytes())
}

type Changes = Pin<Box<dyn Stream<Item = ()> + Send>>;

/// Watches on everything the trees show: the stacks, their workloads and pods, entity CRDs and
/// webhook registrations. Each event is one item (content is re-read by the fetch).
fn changes(client: &kube::Client, target: &Target) -> Vec<Changes> {
    fn ticks<S, T, E>(s: S) -> Changes
    where
        S: Stream<Item = Result<T, E>> + Send + 'static,
    {
        s.map(|_| ()).boxed()
    }
    let c = client.clone();
    let part_of = format!("{LABEL_PART_OF}={KAB}");
    let managed = format!("{LABEL_MANAGED_BY}={KAB}");
    let cfg = watcher::Config::default;
    let (stacks, children_ns, children_sel, reg_sel): (
        Api<KabStack>,
        Option<String>,
        String,
        String,
    ) = match target {
        Target::All => (Api::all(c.clone()), None, part_of.clone(), managed.clone()),
        Target::Namespace(ns) => (
            Api::namespaced(c.clone(), ns),
            Some(ns.clone()),
            part_of.clone(),
            format!("{managed},{LABEL_STACK_NAMESPACE}={ns}"),
        ),
        Target::Stack { namespace, name } => (
            Api::namespaced(c.clone(), namespace),
            Some(namespace.clone()),
            format!("{LABEL_STACK}={name}"),
            format!("{managed},{LABEL_STACK}={name},{LABEL_STACK_NAMESPACE}={namespace}"),
        ),
    };
    let stack_cfg = match target {
        Target::Stack { name, .. } => cfg().fields(&format!("metadata.name={name}")),
        _ => cfg(),
    };
    fn scoped<K>(c: &kube::Client, ns: &Option<String>) -> Api<K>
    where
        K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>,
    {
        match ns {
            Some(ns) => Api::namespaced(c.clone(), ns),
            None => Api::all(c.clone()),
        }
    }
    vec![
        ticks(watcher(stacks, stack_cfg).default_backoff()),
        ticks(
            watcher(
                scoped::<Deployment>(&c, &children_ns),
                cfg().labels(&children_sel),
            )
            .default_backoff(),
        ),
        ticks(
            watcher(
                scoped::<StatefulSet>(&c, &children_ns),
                cfg().labels(&children_sel),
            )
            .default_backoff(),
        ),
        ticks(
            watcher(scoped::<Pod>(&c, &children_ns), cfg().labels(&children_sel)).default_backoff(),
        ),
        ticks(
            watcher(
                Api::<PartialObjectMeta<CustomResourceDefinition>>::all(c.clone()),
                cfg().labels(&managed),
            )
            .default_backoff(),
        ),
        ticks(
            watcher(
                Api::<PartialObjectMeta<ValidatingWebhookConfiguration>>::all(c.clone()),
                cfg().labels(&reg_sel),
            )
            .default_backoff(),
        ),
    ]
}

/// One frame of `--watch`: the trees, or why there are none.
#[derive(Clone, PartialEq)]
enum Frame {
    Trees(Vec<Node>),
    Error(String),
}

#[allow(clippy::too_many_arguments)]
async fn watch(
    cluster: &Cluster,
    target: &Target,
    format: Format,
    single: bool,
    terminal: bool,
    colour: bool,
    program: &str,
) -> anyhow::Result<()> {
    // The first fetch fails as the one-shot command would (no cluster, no CRD, ...).
    let first = fetch_trees(cluster, target, program).await?;
    let mut events = futures::stream::select_all(changes(&cluster.client, target));
    let redraw_in_place = terminal && format == Format::Text;
    // On a terminal the FOR column moves on: redraw the same facts every second.
    let mut clock = tokio::time::interval(Duration::from_secs(1));
    clock.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let stop = crate::shutdown_signal();
    tokio::pin!(stop);

    let mut frame = Frame::Trees(first);
    let mut shown_frame: Option<Frame> = None;
    let mut shown_text = String::new();
    loop {
        let text = match &frame {
            Frame::Trees(trees) if trees.is_empty() => format!("{}\n", nothing_message(target)),
            Frame::Trees(trees) => render(trees, single, format, Timestamp::now(), colour, true)?,
            Frame::Error(e) => format!("{e}\n"),
        };
        let changed = shown_frame.as_ref() != Some(&frame);
        let out = if redraw_in_place && text != shown_text {
            // Home, clear the screen, draw.
            Some(format!(
                "\x1b[H\x1b[2J{text}\nwatching {program} status (redraws on every change; Ctrl-C to stop)\n"
            ))
        } else if !redraw_in_place && changed {
            match (&frame, format) {
                (Frame::Error(e), _) => {
                    eprintln!("{e}");
                    None
                }
                (_, Format::Yaml) => Some(format!("---\n{text}")),
                (_, Format::Text | Format::Dot) if shown_frame.is_some() => {
                    Some(format!("\n{text}"))
                }
                _ => Some(text.clone()),
            }
        } else {
            None
        };
        if let Some(out) = out
            && !super::emit(out.as_bytes())?
        {
            return Ok(()); // the reader went away
        }
        shown_text = text;
        shown_frame = Some(frame.clone());

        // Wait for a change (or, on a terminal, the clock), then let a burst of events settle.
        let mut refetch = false;
        tokio::select! {
            _ = &mut stop => return Ok(()),
            ev = events.next() => {
                if ev.is_none() {
                    bail!("the watches ended");
                }
                refetch = true;
            }
            _ = clock.tick(), if redraw_in_place => {}
        }
        if refetch {
            let settle = tokio::time::sleep(Duration::from_millis(150));
            tokio::pin!(settle);
            loop {
                tokio::select! {
                    _ = &mut settle => break,
                    ev = events.next() => if ev.is_none() { break },
                }
            }
            frame = match fetch_trees(cluster, target, program).await {
                Ok(trees) => Frame::Trees(trees),
                Err(e) => Frame::Error(format!("{e:#}")),
            };
        }
    }
}
