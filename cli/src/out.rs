//! Lines for stdout and stderr that never panic.
//!
//! `println!` panics when stdout cannot be written — a reader of a pipe that went away
//! (`ringsock bench --json | head -1`), a full disk, `>/dev/full` — and a panic in a
//! server or tunnel skips its cleanup. The command line prints through these instead
//! (the crate roots shadow `println!`, `print!` and `eprintln!` with them): a line that
//! cannot be written is lost, the work goes on, and the exit status still says how the
//! work went.

use std::fmt;
use std::io::{self, Write};

/// Writes `args` and a newline to stdout, ignoring a failed write.
pub fn line(args: fmt::Arguments<'_>) {
    let _ = writeln!(io::stdout().lock(), "{args}");
}

/// Writes `args` to stdout, ignoring a failed write.
pub fn text(args: fmt::Arguments<'_>) {
    let _ = write!(io::stdout().lock(), "{args}");
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
}
