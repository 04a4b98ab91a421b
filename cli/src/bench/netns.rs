//! Network namespaces for the tunnel workload: made with `ip netns add`, entered by
//! threads with setns(2), deleted when dropped.
#![allow(unsafe_code)] // setns(2) has no safe wrapper in the crates the CLI uses.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

/// Whether a process with this id is alive (or exists at all, a zombie too).
fn process_exists(pid: u32) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
}

/// The process id in a name this workload gives its leftovers: `rsb<pid>` followed by
/// `suffix_after` (a namespace's `a`/`b`, a key file's `-<random>.key`).
fn run_pid(name: &str, suffix_ok: impl Fn(&str) -> bool) -> Option<u32> {
    let rest = name.strip_prefix("rsb")?;
    let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
    let pid = rest[..digits].parse().ok()?;
    suffix_ok(&rest[digits..]).then_some(pid)
}

/// Deletes what runs killed outright (SIGKILL, a crash) left behind: their network
/// namespaces and key files, named after a process that no longer exists.
pub fn remove_leftovers_of_dead_runs() {
    if let Ok(list) = run("ip", &["netns", "list"]) {
        for name in list
            .lines()
            .filter_map(|line| line.split_whitespace().next())
        {
            let ours = run_pid(name, |suffix| suffix == "a" || suffix == "b");
            if ours.is_some_and(|pid| !process_exists(pid)) {
                let _ = run("ip", &["netns", "del", name]);
            }
        }
    }
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        let ours = run_pid(name, |suffix| {
            suffix.starts_with('-') && suffix.ends_with(".key")
        });
        let is_file = entry.file_type().is_ok_and(|kind| kind.is_file());
        if is_file && ours.is_some_and(|pid| !process_exists(pid)) {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

/// Writes `contents` to a new file only this user can read, at a name no other user
/// can guess or have prepared (`<dir>/<prefix>-<random>.key`): never through a link
/// or over a file that is there.
pub fn write_private_key_file(
    dir: &std::path::Path,
    prefix: &str,
    contents: &str,
) -> io::Result<std::path::PathBuf> {
    use std::hash::{BuildHasher, Hasher};
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut last_error = None;
    for attempt in 0..16u32 {
        let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
        hasher.write_u32(attempt);
        let path = dir.join(format!("{prefix}-{:016x}.key", hasher.finish()));
        let opened = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&path);
        match opened {
            Ok(mut file) => {
                if let Err(err) = file.write_all(contents.as_bytes()) {
                    let _ = std::fs::remove_file(&path);
                    return Err(err);
                }
                return Ok(path);
            }
            Err(err) if err.kind() == io::ErrorKind::AlreadyExists => last_error = Some(err),
            Err(err) => return Err(err),
        }
    }
    Err(last_error.unwrap_or_else(|| io::Error::other("no free key file name")))
}

/// A network namespace this process made; deleted on drop.
pub struct Netns {
    name: String,
}

/// Runs `program args`; its stdout, or an error with its stderr.
pub fn run(program: &str, args: &[&str]) -> io::Result<String> {
    let out = Command::new(program).args(args).output()?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(io::Error::other(format!(
            "{program} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        )))
    }
}

impl Netns {
    /// A new namespace `name` with its loopback up.
    pub fn create(name: &str) -> io::Result<Netns> {
        let _ = run("ip", &["netns", "del", name]);
        run("ip", &["netns", "add", name])?;
        let netns = Netns {
            name: name.to_owned(),
        };
        netns.exec(&["ip", "link", "set", "lo", "up"])?;
        Ok(netns)
    }

    /// The namespace's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Runs a command inside the namespace.
    pub fn exec(&self, args: &[&str]) -> io::Result<String> {
        let mut all = vec!["netns", "exec", self.name.as_str()];
        all.extend_from_slice(args);
        run("ip", &all)
    }
}

/// Makes the child `command` starts get SIGTERM when this process (the thread that
/// starts it) ends, killed or by a signal, instead of running on, unwatched: a bench run
/// then cleans up as on its own SIGTERM, a tunnel removes its interface.
#[allow(unsafe_code)]
pub(crate) fn ends_with_this_process(command: &mut Command) {
    use std::os::unix::process::CommandExt;
    let parent = std::process::id();
    // SAFETY: the closure runs in the forked child before exec and makes only two
    // system calls (prctl, getppid), both async-signal-safe, and allocates nothing.
    unsafe {
        command.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // This process may have ended before the prctl: then nobody waits.
            if libc::getppid() as u32 != parent {
                return Err(std::io::Error::from_raw_os_error(libc::ESRCH));
            }
            Ok(())
        });
    }
}

/// What a run stopped from outside must delete: namespaces and a file.
type Leftovers = (Vec<String>, std::path::PathBuf);

/// The leftovers of the run under way, for whichever ends it early: a signal, or the
/// `--timeout` watchdog ([`clean_up_now`]).
static LEFTOVERS: Mutex<Option<Leftovers>> = Mutex::new(None);

/// Set once a signal's cleanup has begun (see [`wait_for_signal_cleanup`]).
static CLEANING_UP: AtomicBool = AtomicBool::new(false);

/// On a signal that would end the process (SIGINT, SIGTERM, SIGHUP of a closed
/// terminal, SIGQUIT, SIGUSR1/2, SIGALRM), deletes the namespaces `names` and the file
/// `leftover`, then exits as the signal would have: a bench run stopped half-way leaves
/// nothing behind (its children, started with [`ends_with_this_process`], end with it).
pub(crate) fn clean_up_on_signal(
    names: Vec<String>,
    leftover: std::path::PathBuf,
) -> io::Result<()> {
    use signal_hook::consts::{SIGALRM, SIGHUP, SIGINT, SIGQUIT, SIGTERM, SIGUSR1, SIGUSR2};
    *LEFTOVERS.lock().unwrap_or_else(|p| p.into_inner()) = Some((names, leftover));
    // One watcher for the process, whatever number of runs register leftovers: two
    // would both see the signal, and the one that found nothing left to delete would
    // end the process while the other was still deleting.
    static WATCHING: Mutex<bool> = Mutex::new(false);
    let mut watching = WATCHING.lock().unwrap_or_else(|p| p.into_inner());
    if *watching {
        return Ok(());
    }
    let mut signals = signal_hook::iterator::Signals::new([
        SIGINT, SIGTERM, SIGHUP, SIGQUIT, SIGUSR1, SIGUSR2, SIGALRM,
    ])?;
    std::thread::Builder::new()
        .name("bench-cleanup".into())
        .spawn(move || {
            if let Some(signal) = signals.forever().next() {
                CLEANING_UP.store(true, Ordering::SeqCst);
                clean_up_now();
                std::process::exit(128 + signal);
            }
        })?;
    *watching = true;
    Ok(())
}

/// Deletes what the run under way registered to be deleted if it is stopped early.
///
/// The registry stays locked while it deletes: a second caller (the watchdog and a
/// signal at once) waits until everything is gone, then finds nothing left.
pub fn clean_up_now() {
    let mut leftovers = LEFTOVERS.lock().unwrap_or_else(|p| p.into_inner());
    if let Some((names, leftover)) = leftovers.take() {
        for name in &names {
            let _ = run("ip", &["netns", "del", name]);
        }
        let _ = std::fs::remove_file(&leftover);
    }
}

/// For the run's own end: once a signal's cleanup has begun, waits for it to end the
/// process, which then exits as the signal says, rather than as the failure the cleanup
/// caused (the namespaces deleted under the run).
pub fn wait_for_signal_cleanup() {
    if CLEANING_UP.load(Ordering::SeqCst) {
        loop {
            std::thread::park();
        }
    }
}

/// Moves the calling thread into the namespace `name`: sockets it makes from now on
/// live there.
pub fn enter(name: &str) -> io::Result<()> {
    let file = File::open(format!("/run/netns/{name}"))?;
    // SAFETY: setns on a namespace descriptor we own; it changes this thread only.
    let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = run("ip", &["netns", "del", &self.name]);
    }
}

/// CPU seconds process `pid` has used so far: the sum of its threads' run time in
/// nanoseconds (`/proc/PID/task/*/schedstat`), where the kernel keeps it; else its user
/// and system time in clock ticks (`/proc/PID/stat`: 10 ms steps, which a short run
/// does not fill). None when neither can be read (the process is gone).
pub fn process_cpu_secs(pid: u32) -> Option<f64> {
    threads_run_secs(pid).or_else(|| ticks_cpu_secs(pid))
}

/// The sum of the run times of `pid`'s threads, in seconds.
fn threads_run_secs(pid: u32) -> Option<f64> {
    let mut nanos = 0u64;
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).ok()? {
        let path = task.ok()?.path().join("schedstat");
        // A thread that ended between the listing and the read has no time to add.
        let Ok(text) = std::fs::read_to_string(path) else {
            continue;
        };
        nanos += text.split_whitespace().next()?.parse::<u64>().ok()?;
    }
    Some(nanos as f64 / 1e9)
}

/// User and system time of `pid` from `/proc/PID/stat`, in seconds.
fn ticks_cpu_secs(pid: u32) -> Option<f64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces) start after ") ".
    let rest = &text[text.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    // SAFETY: sysconf has no memory-safety preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    (ticks > 0).then(|| (utime + stime) as f64 / ticks as f64)
}
