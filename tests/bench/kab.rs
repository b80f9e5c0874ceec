//! `cargo bench --bench kab -- <operator|webhook|pipeline|all>`: benchmarks of kab against a
//! baseline measured in the same run, on a local control plane each benchmark starts itself.
//! Each prints a table (figure, kab, baseline, ratio, target, result) and writes
//! `target/bench/<name>.json` (and `.txt`). See the README's "Benchmarks" section for the knobs.

mod common;
mod fixed_allow;
mod observer;
mod operator;
mod pipeline;
mod support;
mod webhook;

use std::process::ExitCode;

const USAGE: &str = "usage: cargo bench --bench kab -- <operator|webhook|pipeline|all|planning>";

fn main() -> ExitCode {
    // cargo passes `--bench`; flags are ignored, the first word names the benchmark.
    let words: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    // The baseline server of the webhook benchmark runs as a child process of this binary.
    if words.first().map(String::as_str) == Some(fixed_allow::SUBCOMMAND) {
        return fixed_allow::main(&words[1..]);
    }
    if words.first().map(String::as_str) == Some("planning") {
        return match operator::planning() {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("planning: {e:#}");
                ExitCode::FAILURE
            }
        };
    }
    let which = words
        .first()
        .map(String::as_str)
        .unwrap_or("all")
        .to_string();
    let names: Vec<&str> = match which.as_str() {
        "all" => vec!["operator", "webhook", "pipeline"],
        "operator" | "webhook" | "pipeline" => vec![which.as_str()],
        other => {
            eprintln!("unknown benchmark {other:?}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("tokio: {e}");
            return ExitCode::FAILURE;
        }
    };
    let mut failed = false;
    let mut tables = Vec::new();
    for name in names {
        let result = runtime.block_on(async {
            match name {
                "operator" => operator::run().await,
                "webhook" => webhook::run().await,
                _ => pipeline::run().await,
            }
        });
        match result {
            Ok(report) => tables.push(report.table()),
            Err(e) => {
                eprintln!("bench {name} failed: {e:#}");
                failed = true;
            }
        }
    }
    if tables.len() > 1 {
        println!("\n{}", tables.join("\n"));
    }
    runtime.shutdown_timeout(std::time::Duration::from_secs(5));
    if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}
