//! End-to-end tests against one real local control plane (`kab::plane`).
//!
//! `cargo test --test e2e [-- FILTER...]`; `-- --list` lists the tests.
//! Environment: `KAB_E2E_JOBS` (parallel tests, default 4),
//! `KAB_E2E_TIMEOUT` (seconds per test, default 180), `KAB_E2E_FAST_KCM=1`
//! (lift KCM's client limits), `KAB_KEEP_PLANE=1` (keep the plane directory).
//! See `support/mod.rs` for how to add tests.

mod support;

mod cli_tests;
mod entity_tests;
mod install_tests;
mod operator_tests;
mod plane_tests;
mod runtime_tests;
mod webhook_tests;

fn main() -> std::process::ExitCode {
    // One entry per test module: `mod foo_tests;` above, `foo_tests::tests` here.
    support::main(&[
        plane_tests::tests,
        entity_tests::tests,
        operator_tests::tests,
        install_tests::tests,
        runtime_tests::tests,
        webhook_tests::tests,
        cli_tests::tests,
    ])
}
