//! The commands a person uses: `kab status` (a live tree of a stack's parts), shell completions,
//! and running as a kubectl plugin (`kubectl kab …` when the binary is named `kubectl-kab`).

pub mod fetch;
pub mod hints;
pub mod show;
pub mod status;
pub mod tree;

use std::ffi::{OsStr, OsString};

use clap::{CommandFactory, FromArgMatches};

/// The file name that makes kab a kubectl plugin.
pub const KUBECTL_PLUGIN: &str = "kubectl-kab";

/// Whether `argv0` (a path) names the kubectl plugin.
pub fn is_kubectl_plugin(argv0: Option<&OsStr>) -> bool {
    argv0
        .and_then(|a| std::path::Path::new(a).file_name())
        .is_some_and(|f| f == KUBECTL_PLUGIN)
}

/// How a person invokes this binary: `kubectl kab` when run as the plugin, else `kab`.
pub fn program() -> &'static str {
    if is_kubectl_plugin(std::env::args_os().next().as_deref()) {
        "kubectl kab"
    } else {
        "kab"
    }
}

/// The command line of `P`, named after how it was invoked: as `kubectl-kab`, usage and help say
/// `kubectl kab …`.
pub fn command_for<P: CommandFactory>(argv0: Option<&OsStr>) -> clap::Command {
    let cmd = P::command();
    if is_kubectl_plugin(argv0) {
        cmd.name(KUBECTL_PLUGIN).bin_name("kubectl kab")
    } else {
        cmd
    }
}

/// Parses the process arguments into `P` (like [`clap::Parser::parse`]), naming the program
/// after `argv[0]`.
pub fn parse<P: CommandFactory + FromArgMatches>() -> P {
    let args: Vec<OsString> = std::env::args_os().collect();
    let mut cmd = command_for::<P>(args.first().map(OsString::as_os_str));
    let mut matches = cmd
        .try_get_matches_from_mut(args)
        .unwrap_or_else(|e| e.exit());
    P::from_arg_matches_mut(&mut matches).unwrap_or_else(|e| e.format(&mut cmd).exit())
}

/// Options of `kab completions`.
#[derive(clap::Args, Debug, Clone)]
pub struct CompletionsArgs {
    /// The shell.
    #[arg(value_enum)]
    pub shell: clap_complete::Shell,
}

/// Writes the completion script of `cmd` for `shell` to stdout.
pub fn print_completions(args: &CompletionsArgs, mut cmd: clap::Command) -> anyhow::Result<()> {
    let name = cmd.get_name().to_owned();
    let mut script = Vec::new();
    clap_complete::generate(args.shell, &mut cmd, name, &mut script);
    write_stdout(&script)
}

/// Writes to stdout; a reader that went away (`kab status | head`) is not an error.
pub fn write_stdout(bytes: &[u8]) -> anyhow::Result<()> {
    emit(bytes).map(drop)
}

/// Writes to stdout: `false` when the reader went away.
fn emit(bytes: &[u8]) -> anyhow::Result<bool> {
    use std::io::Write as _;
    let mut out = std::io::stdout().lock();
    match out.write_all(bytes).and_then(|()| out.flush()) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(false),
        Err(e) => Err(e.into()),
    }
}

#[cfg(test)]
mod tests;
