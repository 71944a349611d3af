//! The `mtpack` command: parse, run, map the outcome to an exit code
//! (0 ok, 1 a check found something wanting, 2 error).

// Nothing read from a file may panic: fallible paths return errors (tests may unwrap).
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

use std::process::ExitCode;

/// Large freed blocks kept for the next request of their size (see `mtpack::alloc`).
#[global_allocator]
static ALLOC: mtpack::alloc::Recycling = mtpack::alloc::Recycling::new();

fn main() -> ExitCode {
    mtpack::alloc::tune_for_training();
    // The whole command on a pool thread: the training step's kernels then split their
    // work without waking parked threads (see mtpack::parallel).
    match mtpack::parallel::on_pool(mtpack::cli::main) {
        Ok(mtpack::cli::Outcome::Ok) => ExitCode::from(0),
        Ok(mtpack::cli::Outcome::CheckFailed) => ExitCode::from(1),
        Err(e) => {
            eprintln!("error: {e:#}");
            let interrupted = matches!(e.downcast_ref(), Some(mtpack::adapt::AdaptError::Interrupted { .. }));
            ExitCode::from(if interrupted { mtpack::interrupt::EXIT_CODE } else { 2 })
        }
    }
}
