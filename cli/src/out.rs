//! Lines for stdout and stderr that never panic.
//!
//! `println!` panics when stdout cannot be written — a reader of a pipe that went away
//! (`ringsock bench --json | head -1`), a full disk, `>/dev/full` — and a panic in a
//! server or tunnel skips its cleanup. The command line prints through these instead
//! (the crate roots shadow `println!`, `print!` and `eprintln!` with them): a line that
//! cannot be written is lost and the work goes on; the first such failure is kept, and
//! [`lost_output`] hands it to the end of `main`, so that the exit status of a command
//! whose output is its product says the output was lost (a benchmark whose JSON line
//! went nowhere did not do its job; a server's lines are only for whoever listens).

use std::fmt;
use std::io::{self, Write};
use std::sync::Mutex;

/// The first failed write to stdout.
static LOST: Mutex<Option<io::Error>> = Mutex::new(None);

fn keep_failure(result: io::Result<()>) {
    if let Err(err) = result {
        if let Ok(mut lost) = LOST.lock() {
            lost.get_or_insert(err);
        }
    }
}

/// Writes `args` and a newline to stdout; a failed write is kept for [`lost_output`].
pub fn line(args: fmt::Arguments<'_>) {
    keep_failure(writeln!(io::stdout().lock(), "{args}"));
}

/// Writes `args` to stdout; a failed write is kept for [`lost_output`].
pub fn text(args: fmt::Arguments<'_>) {
    keep_failure(write!(io::stdout().lock(), "{args}"));
}

/// Flushes stdout; a failure is kept for [`lost_output`].
pub fn flush() {
    keep_failure(io::stdout().flush());
}

/// Why some of stdout's output was lost, if it was: the first failed write (after a
/// last flush).
pub fn lost_output() -> Option<io::Error> {
    flush();
    LOST.lock().ok()?.take()
}

/// Writes `args` and a newline to stderr, ignoring a failed write.
pub fn error_line(args: fmt::Arguments<'_>) {
    let _ = writeln!(io::stderr().lock(), "{args}");
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_line_that_cannot_be_written_is_no_panic() {
        // The test harness captures stdout; what matters is that formatting works and
        // nothing unwraps a write.
        super::line(format_args!("{} {}", 1, "two"));
        super::text(format_args!("three"));
        super::error_line(format_args!("four"));
    }

    #[test]
    fn the_first_lost_write_is_kept_until_asked_for() {
        super::keep_failure(Err(std::io::Error::from_raw_os_error(libc::ENOSPC)));
        super::keep_failure(Err(std::io::Error::from_raw_os_error(libc::EPIPE)));
        let lost = super::LOST.lock().unwrap().take();
        assert_eq!(lost.and_then(|e| e.raw_os_error()), Some(libc::ENOSPC));
        super::keep_failure(Ok(()));
        assert!(super::LOST.lock().unwrap().is_none());
    }
}
