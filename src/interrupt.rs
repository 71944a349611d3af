//! Ctrl-C (SIGINT), SIGTERM and SIGHUP while a pack is being written: the first one asks the
//! training loop to finish its current step, write a checkpoint and stop; a second one ends
//! the process at once (every file is written atomically, so the pack stays consistent and
//! the last checkpoint resumes). Long loops poll [`requested`]; only the binary installs the
//! handler, so a program using the library keeps its own signal handling.

use std::sync::atomic::{AtomicUsize, Ordering};

static SIGNALS: AtomicUsize = AtomicUsize::new(0);

/// The exit code of a run stopped by a signal (128 + SIGINT, as shells report it).
pub const EXIT_CODE: u8 = 130;

/// Installs the handler. Safe to call more than once (later calls do nothing); an error
/// means signals keep their default effect (the process ends at once).
pub fn install() -> Result<(), ctrlc::Error> {
    let handler = || {
        if SIGNALS.fetch_add(1, Ordering::SeqCst) == 0 {
            eprintln!(
                "\nstopping: finishing the current step and writing a checkpoint (interrupt again to stop at once)"
            );
        } else {
            eprintln!("\nstopped at once; the last checkpoint written resumes the run");
            std::process::exit(i32::from(EXIT_CODE));
        }
    };
    match ctrlc::set_handler(handler) {
        // Already installed by an earlier call: the handler is this one.
        Err(ctrlc::Error::MultipleHandlers) => Ok(()),
        other => other,
    }
}

/// Whether a stop has been asked for.
pub fn requested() -> bool {
    SIGNALS.load(Ordering::SeqCst) > 0
}
