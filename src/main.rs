//! The `kab` binary: the operator, and the commands a person uses.

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use kab::api::KabStack;
use kab::operator::{self, OperatorConfig};
use kab::render::{self, Facts, Settings, Templates};
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
    ///
    /// Example: kab operator --namespace shop --leader-elect
    Operator(OperatorArgs),
    /// Print the KabStack CustomResourceDefinition.
    ///
    /// Example: kab crd | kubectl apply --server-side -f -
    Crd,
    /// Print every manifest the operator would apply for a stack, offline (like `helm template`).
    ///
    /// Example: kab render -f examples/todo.yaml
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
    ///
    /// Example: kab dev            (or, against the cluster in KUBECONFIG: kab dev --use-kubeconfig)
    Dev(kab::dev::DevArgs),
    /// Print the operator's install manifests (CRD, namespace, ServiceAccount, RBAC, Deployment).
    ///
    /// Install:   kab install --print | kubectl apply --server-side -f -
    /// Uninstall: kab install --print | kubectl delete --ignore-not-found -f -
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
    /// Log format.
    #[arg(long, value_enum, default_value = "text")]
    log_format: LogFormat,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

fn init_logs(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,kube=warn"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn main() -> std::process::ExitCode {
    // One crypto provider only (kube's ring), installed before anything builds a TLS config.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let cli = Cli::parse();
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
        Command::Install {
            print: _,
            namespace,
            image,
        } => {
            let image = image.unwrap_or_else(kab::install::operator_image);
            print!("{}", kab::install::manifests(&namespace, &image)?);
            Ok(())
        }
    }
}

async fn run_operator(args: OperatorArgs) -> anyhow::Result<()> {
    init_logs(args.log_format);
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
    let config = OperatorConfig {
        namespace: args.namespace,
        templates_dir: args.templates,
        settings,
        concurrency: args.concurrency,
    };
    let metrics = Arc::new(kab::metrics::Metrics::new());
    let server = tokio::spawn(metrics.clone().serve(args.metrics_addr));

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        kab::shutdown_signal().await;
        let _ = stop_tx.send(true);
    });

    let mut lease_lost: Option<tokio::sync::watch::Receiver<bool>> = None;
    if args.leader_elect {
        let identity = std::env::var("POD_NAME")
            .unwrap_or_else(|_| format!("kab-operator-{}", std::process::id()));
        let manager = kube_lease_manager::LeaseManagerBuilder::new(client.clone(), "kab-operator")
            .with_namespace(&args.lease_namespace)
            .with_identity(&identity)
            .build()
            .await
            .context("setting up leader election")?;
        let (mut leader, _task) = manager.watch().await;
        tracing::info!(%identity, namespace = %args.lease_namespace, "waiting to become the leader");
        let mut stop = stop_rx.clone();
        loop {
            if *leader.borrow_and_update() {
                break;
            }
            tokio::select! {
                r = leader.changed() => r.context("leader election stopped")?,
                _ = stop.changed() => return Ok(()),
            }
        }
        tracing::info!("became the leader");
        lease_lost = Some(leader);
    }
    metrics.set_ready(true);

    let mut stop = stop_rx.clone();
    let shutdown = async move {
        match lease_lost {
            Some(mut leader) => {
                tokio::select! {
                    _ = stop.changed() => {}
                    _ = async { while leader.changed().await.is_ok() { if !*leader.borrow() { break; } } } => {
                        tracing::error!("lost leadership: stopping");
                    }
                }
            }
            None => {
                let _ = stop.changed().await;
            }
        }
    };
    tracing::info!("kab operator starting");
    operator::run(client, config, metrics, shutdown).await?;
    server.abort();
    tracing::info!("kab operator stopped");
    Ok(())
}
