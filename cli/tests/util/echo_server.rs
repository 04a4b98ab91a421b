//! `ringsock echo-server` run as a child process, the way the CLI tests talk to it.

use std::io::{BufRead, BufReader, Read};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread::JoinHandle;

/// A running echo server; killed if dropped without [`stop`](EchoServer::stop).
pub struct EchoServer {
    child: Option<Child>,
    /// The real port of each address it listens on, in the order of `kinds`.
    pub ports: Vec<String>,
    /// Collects its stderr, when started with [`start_logged`](EchoServer::start_logged).
    log: Option<JoinHandle<String>>,
}

impl EchoServer {
    /// Starts `ringsock echo-server ARGS` and reads its `listening KIND IP:PORT` lines,
    /// one for each of `kinds` ("tcp", "udp"), in that order.
    pub fn start(args: &[&str], kinds: &[&str]) -> EchoServer {
        EchoServer::launch(args, kinds, false)
    }

    /// [`start`](EchoServer::start), keeping what it prints on stderr for
    /// [`stop_logged`](EchoServer::stop_logged).
    pub fn start_logged(args: &[&str], kinds: &[&str]) -> EchoServer {
        EchoServer::launch(args, kinds, true)
    }

    fn launch(args: &[&str], kinds: &[&str], logged: bool) -> EchoServer {
        let mut child = Command::new(env!("CARGO_BIN_EXE_ringsock"))
            .arg("echo-server")
            .args(args)
            .env_remove("RINGSOCK_BACKEND")
            .stdout(Stdio::piped())
            .stderr(if logged {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .spawn()
            .expect("start the echo server");
        // Read as it comes, so a full pipe never stalls the server.
        let log = child.stderr.take().map(|mut stderr| {
            std::thread::spawn(move || {
                let mut text = String::new();
                let _ = stderr.read_to_string(&mut text);
                text
            })
        });
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let mut server = EchoServer {
            child: Some(child),
            ports: Vec::new(),
            log,
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

    /// [`stop`](EchoServer::stop), and everything it printed on stderr (started with
    /// [`start_logged`](EchoServer::start_logged)).
    pub fn stop_logged(mut self) -> (ExitStatus, String) {
        let log = self.log.take().expect("started with start_logged");
        let status = self.stop();
        (status, log.join().unwrap())
    }

    /// Stops it with SIGTERM, as a service manager would, and returns how it exited.
    pub fn stop(mut self) -> ExitStatus {
        let mut child = self.child.take().expect("running");
        let pid = child.id() as libc::pid_t;
        #[allow(unsafe_code)]
        // SAFETY: kill has no memory-safety preconditions; pid is our own child.
        unsafe {
            libc::kill(pid, libc::SIGTERM)
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
