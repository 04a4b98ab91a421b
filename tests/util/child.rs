//! Scenarios that change process-wide state (RLIMIT_NOFILE) or count the process's
//! descriptors would disturb, or be disturbed by, the tests running in parallel threads
//! of this process; so each runs alone in a child process: this test binary again,
//! filtered to one ignored test, told by an environment variable which accept path to
//! run on.

use std::future::Future;
use std::process::Command;

use ringsock::runtime::Builder;
use ringsock::Backend;

/// Set in the child's environment; its value names the path.
const CHILD_ENV: &str = "RINGSOCK_TEST_CHILD";

/// The ways a listener can accept, each tested on its own.
pub const ACCEPT_PATHS: [&str; 3] = ["uring", "uring-single", "epoll"];

/// One path per engine (io_uring's with its default capabilities, epoll), for a
/// scenario that is not about the ways of accepting.
pub const BACKEND_PATHS: [&str; 2] = ["uring", "epoll"];

/// The runtime of an accept path: io_uring (with multishot accept where the kernel has
/// it), io_uring without multishot accept (one ACCEPT per connection), or epoll.
pub fn runtime_for(path: &str) -> (Builder, Backend) {
    match path {
        "uring" => (Builder::new().backend(Backend::Uring), Backend::Uring),
        "uring-single" => {
            let builder = Builder::new()
                .backend(Backend::Uring)
                .disable("multishot-accept".parse().expect("a capability name"));
            (builder, Backend::Uring)
        }
        "epoll" => (Builder::new().backend(Backend::Epoll), Backend::Epoll),
        other => panic!("no accept path {other:?}"),
    }
}

/// In the child: the path it runs on. `None` in the ordinary test run, where the
/// ignored test does nothing.
pub fn path() -> Option<String> {
    let path = std::env::var(CHILD_ENV).ok();
    if path.is_none() {
        eprintln!("{CHILD_ENV} is not set: only meaningful in its own process");
    }
    path
}

/// The line a child prints when its scenario passed on `path`.
pub fn passed(name: &str, path: &str) -> String {
    format!("{name} passed on {path}")
}

/// Runs the ignored test `name` alone in a child process on `path`; fails with the
/// child's output unless it passed and printed [`passed`]. Where io_uring cannot start
/// the child says so and skips (unless RINGSOCK_REQUIRE_URING is set).
pub fn run_alone(name: &str, path: &str) {
    let exe = std::env::current_exe().expect("test binary path");
    let output = Command::new(exe)
        .args([
            name,
            "--exact",
            "--ignored",
            "--test-threads=1",
            "--nocapture",
        ])
        .env(CHILD_ENV, path)
        .output()
        .expect("run the child test process");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success() && stdout.contains("1 passed"),
        "{name} on {path} failed ({}):\n{stdout}\n{stderr}",
        output.status
    );
    if stderr.contains("skipped on io_uring") {
        return;
    }
    assert!(
        stdout.contains(&passed(name, path)),
        "{name} on {path}:\n{stdout}\n{stderr}"
    );
}

/// Runs the ignored test `name` alone in a child process on each engine's path.
pub fn run_alone_on_each_backend(name: &str) {
    for path in BACKEND_PATHS {
        run_alone(name, path);
    }
}

/// In the child that [`run_alone`] started for the ignored test `name`: runs `test` on
/// the runtime of its path and says it passed. Nothing in the ordinary test run.
pub fn run_child<F, Fut>(name: &str, test: F)
where
    F: Fn(Backend) -> Fut,
    Fut: Future<Output = ()>,
{
    let Some(path) = path() else { return };
    let (builder, backend) = runtime_for(&path);
    super::on_runtime_of(builder, backend, &test);
    println!("{}", passed(name, &path));
}

/// Descriptors open in this process now (the one that reads the directory included).
pub fn open_descriptors() -> usize {
    std::fs::read_dir("/proc/self/fd")
        .expect("/proc/self/fd")
        .count()
}
