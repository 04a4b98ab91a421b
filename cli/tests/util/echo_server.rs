//! `ringsock echo-server` run as a child process, the way the CLI tests talk to it.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, ExitStatus, Stdio};

/// A running echo server; killed if dropped without [`stop`](EchoServer::stop).
pub struct EchoServer {
    child: Option<Child>,
    /// The real port of each address it listens on, in the order of `kinds`.
    pub ports: Vec<String>,
}

impl EchoServer {
    /// Starts `ringsock echo-server ARGS` and reads its `listening KIND IP:PORT` lines,
    /// one for each of `kinds` ("tcp", "udp"), in that order.
    pub fn start(args: &[&str], kinds: &[&str]) -> EchoServer {
        let mut child = Command::new(env!("CARGO_BIN_EXE_ringsock"))
            .arg("echo-server")
            .args(args)
            .env_remove("RINGSOCK_BACKEND")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("start the echo server");
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let mut server = EchoServer {
            child: Some(child),
            ports: Vec::new(),
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

    /// Stops it with SIGTERM, as a service manager would, and returns how it exited.
    pub fn stop(self) -> ExitStatus {
        self.signal(libc::SIGTERM)
    }

    /// Kills it with SIGKILL (no chance to clean up) and returns once it is gone.
    pub fn kill(self) -> ExitStatus {
        self.signal(libc::SIGKILL)
    }

    fn signal(mut self, signal: libc::c_int) -> ExitStatus {
        let mut child = self.child.take().expect("running");
        let pid = child.id() as libc::pid_t;
        #[allow(unsafe_code)]
        // SAFETY: kill has no memory-safety preconditions; pid is our own child.
        unsafe {
            libc::kill(pid, signal)
        };
        child.wait().unwrap()
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
