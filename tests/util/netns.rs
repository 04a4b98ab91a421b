//! Network namespaces a test creates for itself (`ip netns add`), entered with `setns`
//! on a thread of its own, removed when dropped. Needs root and iproute2; a test that
//! cannot have one prints "skipped: <why>" and returns.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

/// A network namespace, deleted on drop.
pub struct Netns {
    name: String,
}

static NEXT: AtomicU32 = AtomicU32::new(0);

impl Netns {
    /// Creates a namespace with its loopback up, or says why not (to print as "skipped").
    pub fn create(tag: &str) -> Result<Netns, String> {
        let name = format!(
            "rs-{tag}-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        run("ip", &["netns", "add", &name])
            .map_err(|why| format!("cannot create a network namespace: {why}"))?;
        let netns = Netns { name };
        netns.exec(&["ip", "link", "set", "lo", "up"])?;
        Ok(netns)
    }

    /// The namespace's name, for `ip netns exec`.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Runs a command inside the namespace; its stdout, or why it failed.
    pub fn exec(&self, args: &[&str]) -> Result<String, String> {
        let mut all = vec!["netns", "exec", self.name.as_str()];
        all.extend_from_slice(args);
        run("ip", &all)
    }

    /// Runs `body` on a new thread that has entered the namespace: sockets it creates
    /// live there. Panics in `body` are passed on.
    pub fn run<T: Send + 'static>(&self, body: impl FnOnce() -> T + Send + 'static) -> T {
        let path = format!("/run/netns/{}", self.name);
        let handle = std::thread::spawn(move || {
            let file = File::open(&path).unwrap_or_else(|e| panic!("open {path}: {e}"));
            // SAFETY: setns on a namespace descriptor we own; it affects this thread only.
            let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
            body()
        });
        match handle.join() {
            Ok(value) => value,
            Err(panic) => std::panic::resume_unwind(panic),
        }
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = run("ip", &["netns", "del", &self.name]);
    }
}

fn run(program: &str, args: &[&str]) -> Result<String, String> {
    let output = Command::new(program)
        .args(args)
        .output()
        .map_err(|e| format!("{program}: {e}"))?;
    if output.status.success() {
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    } else {
        Err(format!(
            "{program} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr).trim()
        ))
    }
}
