//! # ringsock-cli
//!
//! The `ringsock` command line (`cli/src/main.rs`: the demo, an echo server and client,
//! `ringsock bench`) and, in this library, the benchmark workloads it runs.
//!
//! - [`bench`](mod@bench): the workloads of `ringsock bench`, as `docs/benchmarks.md` in
//!   the repository defines them, each measured against the same plain std peers.
//!
//! It uses only the public API of the [`ringsock`] library.

#![deny(unsafe_code)]
#![deny(missing_docs)]
#![warn(clippy::undocumented_unsafe_blocks)]
#![warn(unsafe_op_in_unsafe_fn)]

// Printing never panics here (see `out`): these shadow the standard macros in every
// module declared below.
macro_rules! println {
    () => { $crate::out::line(format_args!("")) };
    ($($arg:tt)*) => { $crate::out::line(format_args!($($arg)*)) };
}
#[allow(unused_macros)]
macro_rules! print {
    ($($arg:tt)*) => { $crate::out::text(format_args!($($arg)*)) };
}
#[allow(unused_macros)]
macro_rules! eprintln {
    () => { $crate::out::error_line(format_args!("")) };
    ($($arg:tt)*) => { $crate::out::error_line(format_args!($($arg)*)) };
}

pub mod bench;
pub mod out;
