//! The e2e harness (`harness = false`): one control plane for the whole run,
//! tests run concurrently against it.
//!
//! # Adding tests
//!
//! A test is an `async fn name(ctx: Ctx) -> anyhow::Result<()>`. A module of
//! tests exposes `pub fn tests() -> Vec<Test>`, usually with
//! `e2e_tests![fn_a, fn_b]` (names become `module::fn_a`, like libtest), and is
//! registered in `main.rs` with `mod foo_tests;` plus `foo_tests::tests` in the
//! list passed to [`main`]. `Test::new(name, f).timeout(d)` overrides the
//! per-test deadline.
//!
//! # Shared resources
//!
//! Something started once for the whole run (e.g. the operator) is a type
//! whose `Drop` stops it, obtained with [`Ctx::shared`]: the first test that
//! asks starts it, the others get the same `Arc`, and the harness drops it
//! after the last test, before the plane stops. Start processes with
//! `ctx.plane().spawn(name, cmd)` so they die with the run and log into the
//! plane's logs directory:
//!
//! ```ignore
//! struct Operator(kab::plane::Process);
//! let op = ctx.shared(|plane| async move {
//!     let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_kab"));
//!     cmd.env("KUBECONFIG", plane.kubeconfig_path());
//!     Ok(Operator(plane.spawn("operator", cmd)?))
//! }).await?;
//! ```

#![allow(dead_code)] // helpers for test modules that may not all use them

//! # What tests share
//!
//! Helpers used by more than one test module live here, never in a test module (no test module
//! imports another): the run's operator and the todo stack ([`stack`]), the local runtime
//! ([`runtime`]), waits ([`wait`]), the operator process ([`operator`]), HTTP ([`http`]), the
//! audit log ([`audit`]), TLS handshakes ([`tls`]) and a plane of a test's own ([`own_plane`]).
//! `operator`, `wait` and `http` are also compiled into the benchmarks (`tests/bench/support.rs`):
//! they must not use the e2e context.

pub mod audit;
mod ctx;
pub mod fixtures;
pub mod http;
pub mod operator;
pub mod own_plane;
mod runner;
pub mod runtime;
pub mod stack;
pub mod tls;
pub mod wait;

pub use ctx::Ctx;
pub use runner::{Test, main, qualified_name};
pub use runtime::{Runtime, local_namespace, runtime};
pub use stack::{
    READY_TIMEOUT, apply_rbac_entity_api_and_config, apply_stack, apply_stack_with, condition,
    group_for, is_ready, operator, ready_todo, todo_stack, wait_condition, wait_ready,
};
pub use wait::{wait_deleted, wait_for};

/// `e2e_tests![a, b]`: a `Vec<Test>` of async fns named `module::a`, `module::b`.
macro_rules! e2e_tests {
    ($($f:ident),* $(,)?) => {
        vec![$(
            $crate::support::Test::new(
                $crate::support::qualified_name(module_path!(), stringify!($f)),
                $f,
            )
        ),*]
    };
}
pub(crate) use e2e_tests;
