//! The parts of the e2e support layer (`tests/e2e/support/`) the benchmarks use too, compiled from
//! the same files: the operator's install and start under the shipped RBAC, the waits, and HTTP.

#![allow(dead_code)] // the benchmarks use only some of the shared helpers

#[path = "../e2e/support/http.rs"]
pub mod http;
#[path = "../e2e/support/operator.rs"]
pub mod operator;
#[path = "../e2e/support/wait.rs"]
pub mod wait;
