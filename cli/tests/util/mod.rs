//! Helpers of the CLI tests.
#![allow(dead_code)]

use std::time::Duration;

pub mod echo_server;
pub mod tunnel_pair;

/// How long a wait for something that must happen may take before the test fails
/// (instead of hanging). Never used to make something happen.
pub const MUST_HAPPEN: Duration = Duration::from_secs(20);

/// Everything an exited child wrote to its piped stderr.
pub fn stderr_of(child: &mut std::process::Child) -> String {
    use std::io::Read;
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .expect("stderr piped")
        .read_to_string(&mut stderr)
        .expect("read the child's stderr");
    stderr
}

/// Runs `command` to its end and returns what it printed; fails the test (killing it)
/// if it has not exited within MUST_HAPPEN.
pub fn output_within(command: &mut std::process::Command) -> std::process::Output {
    let child = command
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start ringsock");
    let pid = child.id() as libc::pid_t;
    let (sender, exited) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = sender.send(child.wait_with_output());
    });
    match exited.recv_timeout(MUST_HAPPEN) {
        Ok(output) => output.expect("wait for ringsock"),
        Err(_) => {
            #[allow(unsafe_code)]
            // SAFETY: kill has no memory-safety preconditions; pid is our child, which
            // the waiting thread reaps.
            unsafe {
                libc::kill(pid, libc::SIGKILL)
            };
            panic!("{command:?} did not exit within {MUST_HAPPEN:?}");
        }
    }
}
