//! `auto` falls back to epoll where io_uring is forbidden, as under a container's seccomp
//! profile; a forced `uring` there is a clear error. The child process gets a seccomp
//! filter that makes io_uring_setup fail with EPERM, exactly what Docker's default profile
//! does.

use std::os::unix::process::CommandExt;
use std::process::{Command, Output};

/// io_uring_setup's number: the same on every architecture (added after the tables
/// were unified).
const NR_IO_URING_SETUP: u32 = 425;

/// Installs, in the calling process, a filter that fails io_uring_setup with EPERM.
fn forbid_io_uring() -> std::io::Result<()> {
    // Classic BPF opcodes: BPF_LD|BPF_W|BPF_ABS, BPF_JMP|BPF_JEQ|BPF_K, BPF_RET|BPF_K.
    const BPF_LD_W_ABS: u16 = 0x20;
    const BPF_JMP_JEQ_K: u16 = 0x15;
    const BPF_RET_K: u16 = 0x06;
    const SECCOMP_RET_ALLOW: u32 = 0x7fff_0000;
    const SECCOMP_RET_ERRNO: u32 = 0x0005_0000;
    let filter = [
        // Load seccomp_data.nr (offset 0).
        libc::sock_filter {
            code: BPF_LD_W_ABS,
            jt: 0,
            jf: 0,
            k: 0,
        },
        libc::sock_filter {
            code: BPF_JMP_JEQ_K,
            jt: 0,
            jf: 1,
            k: NR_IO_URING_SETUP,
        },
        libc::sock_filter {
            code: BPF_RET_K,
            jt: 0,
            jf: 0,
            k: SECCOMP_RET_ERRNO | libc::EPERM as u32,
        },
        libc::sock_filter {
            code: BPF_RET_K,
            jt: 0,
            jf: 0,
            k: SECCOMP_RET_ALLOW,
        },
    ];
    let program = libc::sock_fprog {
        len: filter.len() as u16,
        filter: filter.as_ptr() as *mut libc::sock_filter,
    };
    #[allow(unsafe_code)]
    // SAFETY: prctl reads `program` and `filter`, both alive for the call; it runs in
    // the forked child before exec, where only async-signal-safe calls are made.
    unsafe {
        if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        if libc::prctl(libc::PR_SET_SECCOMP, libc::SECCOMP_MODE_FILTER, &program) != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

fn run_without_io_uring(args: &[&str]) -> Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_ringsock"));
    command.args(args).env_remove("RINGSOCK_BACKEND");
    #[allow(unsafe_code)]
    // SAFETY: the hook only calls prctl, which is async-signal-safe.
    unsafe {
        command.pre_exec(forbid_io_uring);
    }
    command.output().expect("run ringsock under seccomp")
}

#[test]
fn auto_uses_epoll_where_seccomp_forbids_io_uring() {
    let out = run_without_io_uring(&["demo"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}{stderr}");
    assert!(stdout.contains("client received the response: \"Hello, World!\""));
    assert!(stdout.contains("driver: epoll"), "{stdout}");
    assert!(stderr.contains("io_uring unavailable"), "{stderr}");
    assert!(stderr.contains("using epoll"), "{stderr}");
}

#[test]
fn forcing_uring_where_it_is_forbidden_is_a_clear_error() {
    let out = run_without_io_uring(&["demo", "--backend", "uring"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.starts_with("error: PermissionDenied: "), "{stderr}");
    assert!(stderr.contains("io_uring"), "{stderr}");
}

#[test]
fn the_same_environment_variable_forces_the_driver() {
    let out = Command::new(env!("CARGO_BIN_EXE_ringsock"))
        .arg("demo")
        .env("RINGSOCK_BACKEND", "epoll")
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("driver: epoll"));
    let out = Command::new(env!("CARGO_BIN_EXE_ringsock"))
        .arg("demo")
        .env("RINGSOCK_BACKEND", "bogus")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    // The message names the variable: a value set far away is otherwise hard to find.
    assert!(
        stderr.starts_with("error: InvalidArgument: ") && stderr.contains("RINGSOCK_BACKEND"),
        "{stderr}"
    );
}

#[test]
fn the_spin_variable_is_read_and_a_bad_value_refused_on_each_driver() {
    // auto is io_uring wherever it can start (RINGSOCK_REQUIRE_URING makes CI sure of it).
    for backend in ["auto", "epoll"] {
        for (spin, ok) in [("off", true), ("soon", false)] {
            let out = Command::new(env!("CARGO_BIN_EXE_ringsock"))
                .arg("demo")
                .env("RINGSOCK_BACKEND", backend)
                .env("RINGSOCK_SPIN", spin)
                .output()
                .unwrap();
            let stderr = String::from_utf8_lossy(&out.stderr);
            if ok {
                assert!(out.status.success(), "{backend} {spin}: {stderr}");
            } else {
                assert_eq!(out.status.code(), Some(1), "{backend} {spin}");
                assert!(
                    stderr.starts_with("error: InvalidArgument: ")
                        && stderr.contains("RINGSOCK_SPIN"),
                    "{stderr}"
                );
            }
        }
    }
}
