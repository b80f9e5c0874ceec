//! The `kab` binary: the operator, and the commands a person uses.

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use kab::api::KabStack;
use kab::leader::{Election, stopped_or_lost};
use kab::operator::{self, OperatorConfig};
use kab::render::{self, Facts, Settings, Templates};
use kab::telemetry::{LogFormat, init_logs};
use std::path::PathBuf;
use std::sync::Arc;

#[derive(Parser)]
#[command(name = "kab", version, about = "Kubernetes as the backend of business applications", long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the operator: reconcile every KabStack (in a cluster, or against KUBECONFIG).
    #[command(after_help = "Examples:
  kab operator                                   # every namespace, KUBECONFIG or in-cluster config
  kab operator --namespace shop --leader-elect   # one namespace, one active replica
  kab operator --templates ./overrides --log-format json")]
    Operator(OperatorArgs),
    /// Print the KabStack CustomResourceDefinition.
    #[command(after_help = "Examples:
  kab crd | kubectl apply --server-side -f -
  kab crd > crds/kabstack.yaml")]
    Crd,
    /// Print every manifest the operator would apply for a stack, offline (like `helm template`).
    #[command(after_help = "Examples:
  kab render -f examples/todo.yaml
  kab render -f stack.yaml --templates ./overrides | kubectl diff -f -
  cat stack.yaml | kab render -f - -n shop")]
    Render {
        /// The KabStack YAML file (`-` for standard input).
        #[arg(short = 'f', long = "file")]
        file: PathBuf,
        /// Directory of template overrides, by file name.
        #[arg(long)]
        templates: Option<PathBuf>,
        /// Namespace to assume when the file has none.
        #[arg(short = 'n', long, default_value = "default")]
        namespace: String,
    },
    /// Run the whole thing locally: a local control plane (built on first use), the operator and
    /// the sample stack. Ctrl-C stops everything.
    #[command(after_help = "Examples:
  kab dev                                             # local plane + operator + examples/todo.yaml
  kab dev -f examples/minimal.yaml --exit-when-ready  # your stack; return once it is Ready
  kab dev --use-kubeconfig                            # against the cluster in KUBECONFIG")]
    Dev(kab::dev::DevArgs),
    /// Run a stack's admission webhook: HTTPS AdmissionReview v1 on /validate enforcing the
    /// stack's rules, with /healthz, /readyz and /metrics (run by the stack's Deployment;
    /// locally with KUBECONFIG and KAB_LISTEN_ADDR).
    #[command(after_help = "Examples:
  kab webhook --config /etc/kab/stack.json --tls-dir /etc/kab/tls
  KAB_LISTEN_ADDR=127.0.0.1:9443 kab webhook --config stack.json --tls-dir ./tls")]
    Webhook(kab::webhook::WebhookArgs),
    /// Run a stack's entity controller: publish every change of its entities to the broker
    /// (CloudEvents on NATS JetStream), call the notify URL, keep `status.kab` (run by the
    /// stack's Deployment; locally with KUBECONFIG, KAB_METRICS_ADDR and KAB_HOSTS_FILE).
    #[command(after_help = "Examples:
  kab entity-controller --config /etc/kab/stack.json
  KAB_METRICS_ADDR=127.0.0.1:9090 kab entity-controller --config stack.json --leader-elect false")]
    EntityController(kab::entity_controller::Args),
    /// Show a stack as a tree of its parts — entity API, webhook, entity controller, broker,
    /// config and RBAC — each with its state, what blocks it and for how long.
    #[command(after_help = "Examples:
  kab status shop/todo                  # one stack (or: kab status todo -n shop)
  kab status -A                         # every stack in every namespace
  kab status shop/todo --watch          # redraw on every change; Ctrl-C to stop
  kab status shop/todo -o json | jq '.children[] | {kind, state, reason, message}'
  kab status shop/todo -o dot | dot -Tsvg > todo.svg
  kubectl kab status shop/todo          # the same, as a kubectl plugin (kubectl-kab on PATH)

No colour when stdout is not a terminal or NO_COLOR is set.")]
    Status(kab::cli::status::StatusArgs),
    /// Print a shell completion script.
    #[command(after_help = "Examples:
  kab completions bash > ~/.local/share/bash-completion/completions/kab
  kab completions zsh > \"${fpath[1]}/_kab\"
  kab completions fish > ~/.config/fish/completions/kab.fish")]
    Completions(kab::cli::CompletionsArgs),
    /// Print the operator's install manifests (CRD, namespace, ServiceAccount, RBAC, Deployment).
    #[command(after_help = "Examples:
  kab install --print | kubectl apply --server-side -f -          # install
  kab install --print | kubectl delete --ignore-not-found -f -    # uninstall (entity data stays)
  kab install --print --image registry.example.com/kab:0.1.0")]
    Install {
        /// Print the manifests (the only mode: kab never installs itself behind your back).
        #[arg(long, required = true)]
        print: bool,
        /// Namespace of the operator.
        #[arg(short = 'n', long, default_value = kab::install::NAMESPACE)]
        namespace: String,
        /// Operator image.
        #[arg(long)]
        image: Option<String>,
    },
    /// Operator Lifecycle Manager packaging.
    #[command(subcommand)]
    #[command(after_help = "Examples:
  kab olm bundle --version 0.1.0")]
    Olm(OlmCommand),
}

#[derive(Subcommand)]
enum OlmCommand {
    /// Write the registry+v1 bundle: <output-dir>/<version>/{manifests,metadata}/ and
    /// <output-dir>/bundle.Dockerfile (the same Deployment and RBAC as `kab install`).
    #[command(after_help = "Examples:
  kab olm bundle --version 0.1.0                   # olm/0.1.0/ and olm/bundle.Dockerfile
  kab olm bundle --version 0.2.0 --output-dir out")]
    Bundle {
        /// Version of the bundle (semver); the CSV is kab.v<version>.
        #[arg(long)]
        version: String,
        /// Directory of the bundles.
        #[arg(long, default_value = "olm")]
        output_dir: PathBuf,
    },
}

#[derive(clap::Args)]
struct OperatorArgs {
    /// Watch only this namespace (default: all namespaces).
    #[arg(long, env = "KAB_WATCH_NAMESPACE")]
    namespace: Option<String>,
    /// Directory of template overrides, by file name.
    #[arg(long, env = "KAB_TEMPLATES")]
    templates: Option<PathBuf>,
    /// Address of /healthz, /readyz and /metrics.
    #[arg(long, default_value = "0.0.0.0:8080")]
    metrics_addr: std::net::SocketAddr,
    /// Take a Lease so that only one replica reconciles.
    #[arg(long)]
    leader_elect: bool,
    /// Namespace of the leader-election Lease (default: the pod's namespace).
    #[arg(long, env = "POD_NAMESPACE", default_value = "kab-system")]
    lease_namespace: String,
    /// Stacks reconciled at once.
    #[arg(long, default_value_t = 16)]
    concurrency: u16,
    /// Image of kab for the webhook and entity controller.
    #[arg(long, env = "KAB_IMAGE")]
    kab_image: Option<String>,
    /// Image of the NATS server of managed brokers.
    #[arg(long, env = "KAB_NATS_IMAGE")]
    nats_image: Option<String>,
    /// The operator's own ServiceAccount, `namespace/name`: each stack binds it a Role that allows
    /// only the dry-run admission probe (create on that stack's entity).
    #[arg(
        long,
        env = "KAB_OPERATOR_SERVICE_ACCOUNT",
        default_value = "kab-system/kab-operator"
    )]
    service_account: String,
    /// Prove each webhook with a dry-run admission probe before calling it ready. Turn off only
    /// where webhooks are simulated (e.g. KWOK benchmarks): readiness then comes from the webhook
    /// Deployment and its registration alone.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    admission_probe: bool,
    /// Log format.
    #[arg(long, value_enum, default_value = "text")]
    log_format: LogFormat,
}

fn main() -> std::process::ExitCode {
    limit_malloc_arenas();
    // One crypto provider only (kube's ring), installed before anything builds a TLS config.
    let _ = rustls::crypto::ring::default_provider().install_default();
    // Named after argv[0]: as `kubectl-kab`, help and usage say `kubectl kab …`.
    let cli: Cli = kab::cli::parse();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("kab: cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("kab: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// glibc gives each thread that allocates concurrently its own heap arena (up to 8 per core) and
/// rarely hands their free pages back: a watch-cache process such as the operator then holds far
/// more resident memory than it uses. One arena, because each arena keeps its own slack; the
/// per-thread caches keep small allocations off the arena lock (see the README's benchmark
/// section for what it saves). `MALLOC_ARENA_MAX` in the environment still wins.
fn limit_malloc_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    if std::env::var_os("MALLOC_ARENA_MAX").is_none() {
        // SAFETY: mallopt only sets an allocator parameter; called before other threads exist.
        unsafe {
            libc::mallopt(libc::M_ARENA_MAX, 1);
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Crd => {
            print!("{}", kab::crd_yaml()?);
            Ok(())
        }
        Command::Render {
            file,
            templates,
            namespace,
        } => {
            let text = if file.as_os_str() == "-" {
                std::io::read_to_string(std::io::stdin())
                    .context("reading the stack from standard input")?
            } else {
                std::fs::read_to_string(&file)
                    .with_context(|| format!("reading {}", file.display()))?
            };
            let mut stack: KabStack = serde_saphyr::from_str(&text)
                .with_context(|| format!("{} is not a valid KabStack", file.display()))?;
            if stack.metadata.namespace.is_none() {
                stack.metadata.namespace = Some(namespace);
            }
            if let Err(e) = kab::validate::validate(&stack) {
                anyhow::bail!("invalid KabStack {}: {e}", file.display());
            }
            let templates = Templates::load(templates.as_deref())?;
            let rendered = render::render(
                &templates,
                &stack,
                &Settings::default(),
                &Facts {
                    ca_bundle_pem: None,
                },
            )?;
            print!("{}", render::to_yaml(&rendered));
            Ok(())
        }
        Command::Operator(args) => run_operator(args).await,
        Command::Dev(args) => kab::dev::run(args).await,
        Command::Webhook(args) => kab::webhook::run(args).await,
        Command::EntityController(args) => kab::entity_controller::run(args).await,
        Command::Status(args) => kab::cli::status::run(args).await,
        Command::Completions(args) => {
            let argv0 = std::env::args_os().next();
            kab::cli::print_completions(&args, kab::cli::command_for::<Cli>(argv0.as_deref()))
        }
        Command::Install {
            print: _,
            namespace,
            image,
        } => {
            let image = image.unwrap_or_else(kab::install::operator_image);
            print!("{}", kab::install::manifests(&namespace, &image)?);
            Ok(())
        }
        Command::Olm(OlmCommand::Bundle {
            version,
            output_dir,
        }) => {
            let release = kab::olm::Release::for_dir(&output_dir, &version)?;
            for path in kab::olm::write(&output_dir, &kab::olm::bundle(&release)?)? {
                println!("{}", path.display());
            }
            Ok(())
        }
    }
}

async fn run_operator(args: OperatorArgs) -> anyhow::Result<()> {
    init_logs(args.log_format, "info,kube=warn");
    let client = kube::Client::try_default()
        .await
        .context("connecting to Kubernetes (in-cluster config or KUBECONFIG)")?;
    let mut settings = Settings::default();
    if let Some(i) = args.kab_image {
        settings.kab_image = i;
    }
    if let Some(i) = args.nats_image {
        settings.nats_image = i;
    }
    settings.operator_service_account = if args.admission_probe {
        let (ns, name) = args.service_account.split_once('/').ok_or_else(|| {
            anyhow::anyhow!(
                "--service-account {:?}: expected namespace/name, e.g. kab-system/kab-operator",
                args.service_account
            )
        })?;
        Some((ns.to_string(), name.to_string()))
    } else {
        None
    };
    let config = OperatorConfig {
        // OLM sets olm.targetNamespaces to "" in AllNamespaces mode: empty means all.
        namespace: args.namespace.filter(|n| !n.trim().is_empty()),
        templates_dir: args.templates,
        settings,
        concurrency: args.concurrency,
    };
    let metrics = Arc::new(kab::metrics::Metrics::new());
    let listener = tokio::net::TcpListener::bind(args.metrics_addr)
        .await
        .with_context(|| format!("listening on {} for health and metrics", args.metrics_addr))?;
    let server = tokio::spawn(kab::telemetry::serve_health(listener, metrics.clone()));

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        kab::shutdown_signal().await;
        let _ = stop_tx.send(true);
    });

    let mut election = None;
    if args.leader_elect {
        let identity = std::env::var("POD_NAME")
            .unwrap_or_else(|_| format!("kab-operator-{}", std::process::id()));
        let manager = kube_lease_manager::LeaseManagerBuilder::new(client.clone(), "kab-operator")
            .with_namespace(&args.lease_namespace)
            .with_identity(&identity)
            .build()
            .await
            .context("setting up leader election")?;
        tracing::info!(%identity, namespace = %args.lease_namespace, "waiting to become the leader");
        let Some(won) = Election::win(manager, stop_rx.clone()).await? else {
            return Ok(()); // stopped while waiting
        };
        tracing::info!("became the leader");
        election = Some(won);
    }
    metrics.set_ready(true);

    let leader = election.as_ref().map(Election::leader);
    let shutdown = async move {
        if stopped_or_lost(leader, stop_rx).await {
            tracing::error!("lost leadership: stopping");
        }
    };
    tracing::info!("kab operator starting");
    operator::run(client, config, metrics, shutdown).await?;
    if let Some(election) = election {
        election.release().await;
    }
    server.abort();
    tracing::info!("kab operator stopped");
    Ok(())
}
