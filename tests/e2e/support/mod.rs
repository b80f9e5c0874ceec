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

mod ctx;
pub mod fixtures;
mod runner;
mod stack;
mod wait;

pub use ctx::Ctx;
pub use runner::{Test, main, qualified_name};
pub use stack::apply_rbac_entity_api_and_config;
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
