//! `ringsock echo-server` run as a child process, the way the CLI tests talk to it.

use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{mpsc, Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use super::MUST_HAPPEN;

/// A running echo server; killed if dropped without [`stop`](EchoServer::stop).
pub struct EchoServer {
    child: Option<Child>,
    /// The real port of each address it listens on, in the order of `kinds`.
    pub ports: Vec<String>,
    stderr: Arc<Lines>,
    stderr_reader: Option<std::thread::JoinHandle<()>>,
}

/// How the child is started beyond its arguments.
#[derive(Default)]
pub struct Setup<'a> {
    /// RLIMIT_NOFILE (soft and hard) of the server process.
    pub nofile: Option<u64>,
    /// RLIMIT_AS (soft and hard, bytes) of the server process.
    pub address_space: Option<u64>,
    /// Extra environment variables.
    pub env: &'a [(&'a str, &'a str)],
    /// The network namespace to run it in (`ip netns exec`, which execs the server in
    /// the same process).
    pub netns: Option<&'a str>,
    /// The program to run instead of the one cargo built (a copy of it, say).
    pub exe: Option<&'a std::path::Path>,
}

/// The server's stderr, line by line as it comes.
#[derive(Default)]
struct Lines {
    lines: Mutex<Vec<String>>,
    grew: Condvar,
}

impl EchoServer {
    /// Starts `ringsock echo-server ARGS` and reads its `listening KIND IP:PORT` lines,
    /// one for each of `kinds` ("tcp", "udp"), in that order.
    pub fn start(args: &[&str], kinds: &[&str]) -> EchoServer {
        EchoServer::start_with(args, kinds, Setup::default())
    }

    /// [`start`](EchoServer::start) with a descriptor limit or extra environment.
    pub fn start_with(args: &[&str], kinds: &[&str], setup: Setup<'_>) -> EchoServer {
        let mut command = match setup.netns {
            Some(name) => {
                let mut command = Command::new("ip");
                command
                    .args(["netns", "exec", name])
                    .arg(env!("CARGO_BIN_EXE_ringsock"));
                command
            }
            None => Command::new(
                setup
                    .exe
                    .unwrap_or(std::path::Path::new(env!("CARGO_BIN_EXE_ringsock"))),
            ),
        };
        command
            .arg("echo-server")
            .args(args)
            .env_remove("RINGSOCK_BACKEND")
            .envs(setup.env.iter().copied())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let limits = [
            (libc::RLIMIT_NOFILE, setup.nofile),
            (libc::RLIMIT_AS, setup.address_space),
        ];
        for (resource, value) in limits {
            let Some(value) = value else { continue };
            let limit = libc::rlimit {
                rlim_cur: value as libc::rlim_t,
                rlim_max: value as libc::rlim_t,
            };
            #[allow(unsafe_code)]
            // SAFETY: the hook only calls setrlimit, which is async-signal-safe, on a
            // struct it owns.
            unsafe {
                command.pre_exec(move || {
                    if libc::setrlimit(resource, &limit) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        let mut child = command.spawn().expect("start the echo server");
        let stderr = Arc::new(Lines::default());
        let reader = {
            let stderr = stderr.clone();
            let pipe = child.stderr.take().unwrap();
            // Ends at the pipe's end, when the server exits.
            std::thread::spawn(move || {
                for line in BufReader::new(pipe).lines() {
                    let Ok(line) = line else { break };
                    stderr.lines.lock().unwrap().push(line);
                    stderr.grew.notify_all();
                }
            })
        };
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let mut server = EchoServer {
            child: Some(child),
            ports: Vec::new(),
            stderr,
            stderr_reader: Some(reader),
        };
        for kind in kinds {
            let line = lines.next().and_then(Result::ok).unwrap_or_default();
            let prefix = format!("listening {kind} ");
            // On a bad line the server is killed by Drop as the panic unwinds.
            let addr = line
                .strip_prefix(&prefix)
                .unwrap_or_else(|| panic!("expected {prefix:?}..., got {line:?}"));
            let port = addr.rsplit(':').next().unwrap().to_string();
            assert_ne!(port, "0");
            server.ports.push(port);
        }
        server
    }

    /// The first port it listens on.
    pub fn port(&self) -> &str {
        &self.ports[0]
    }

    /// Waits for it to exit on its own (no signal); fails after `limit`.
    pub fn wait_exit(mut self, limit: Duration) -> ExitStatus {
        let mut child = self.child.take().expect("running");
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "the echo server did not exit within {limit:?}; stderr:\n{}",
                self.stderr().join("\n")
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// The server's process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// Its stderr so far.
    pub fn stderr(&self) -> Vec<String> {
        self.stderr.lines.lock().unwrap().clone()
    }

    /// Waits until `done` holds for its stderr so far; fails naming `what` after
    /// MUST_HAPPEN.
    pub fn wait_for_stderr(&self, what: &str, done: impl Fn(&[String]) -> bool) {
        let deadline = Instant::now() + MUST_HAPPEN;
        let mut lines = self.stderr.lines.lock().unwrap();
        while !done(&lines) {
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(
                !left.is_zero(),
                "{what}: not within {MUST_HAPPEN:?}; stderr:\n{}",
                lines.join("\n")
            );
            lines = self.stderr.grew.wait_timeout(lines, left).unwrap().0;
        }
    }

    /// Stops it with SIGTERM, as a service manager would, and returns how it exited.
    pub fn stop(self) -> ExitStatus {
        self.stop_within(MUST_HAPPEN).0
    }

    /// [`start`](EchoServer::start); its stderr is always kept (see
    /// [`stop_logged`](EchoServer::stop_logged)).
    pub fn start_logged(args: &[&str], kinds: &[&str]) -> EchoServer {
        EchoServer::start(args, kinds)
    }

    /// [`stop`](EchoServer::stop), and everything it printed on stderr.
    pub fn stop_logged(self) -> (ExitStatus, String) {
        let (status, lines) = self.stop_within(MUST_HAPPEN);
        (status, lines.join("\n"))
    }

    /// Kills it with SIGKILL (no chance to clean up) and returns once it is gone.
    pub fn kill(mut self) -> ExitStatus {
        let mut child = self.child.take().expect("running");
        let _ = child.kill();
        child.wait().unwrap()
    }

    /// Stops it with SIGTERM; fails if it has not exited within `limit`. Returns how it
    /// exited and everything it wrote to stderr.
    pub fn stop_within(mut self, limit: Duration) -> (ExitStatus, Vec<String>) {
        let mut child = self.child.take().expect("running");
        let pid = child.id() as libc::pid_t;
        #[allow(unsafe_code)]
        // SAFETY: kill has no memory-safety preconditions; pid is our own child, not yet
        // waited for.
        unsafe {
            libc::kill(pid, libc::SIGTERM)
        };
        let (sender, exited) = mpsc::channel();
        std::thread::spawn(move || {
            let _ = sender.send(child.wait());
        });
        let status = match exited.recv_timeout(limit) {
            Ok(status) => status.unwrap(),
            Err(_) => {
                #[allow(unsafe_code)]
                // SAFETY: as above; the waiting thread reaps it.
                unsafe {
                    libc::kill(pid, libc::SIGKILL)
                };
                panic!(
                    "the echo server did not exit within {limit:?} of SIGTERM; stderr:\n{}",
                    self.stderr().join("\n")
                );
            }
        };
        if let Some(reader) = self.stderr_reader.take() {
            reader.join().unwrap();
        }
        (status, self.stderr())
    }
}

impl Drop for EchoServer {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
