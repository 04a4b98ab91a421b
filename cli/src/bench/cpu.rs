//! Pinning and CPU accounting: the measured side on CPU 0, the plain peer on CPU 1, so
//! that figures taken on other stacks the same way compare; the CPU time each side spent.
#![allow(unsafe_code)]

use std::io;

/// The CPU of the measured side.
pub const MEASURED_CPU: usize = 0;

/// Pins the calling thread to `cpu`.
pub fn pin_to(cpu: usize) -> io::Result<()> {
    // SAFETY: cpu_set_t is a plain bit set; all zeroes is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    if cpu >= 8 * std::mem::size_of::<libc::cpu_set_t>() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "CPU out of range",
        ));
    }
    // SAFETY: `cpu` is inside the set (checked above); `set` is a live cpu_set_t.
    unsafe { libc::CPU_SET(cpu, &mut set) };
    // SAFETY: pid 0 is the calling thread; `set` is a live cpu_set_t of the size given.
    let rc = unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The CPU of the plain peer: 1 when the machine has two or more online CPUs, else 0.
///
/// Counts ONLINE CPUs, not `available_parallelism()`: that one honours the calling
/// thread's affinity, which a peer thread inherits from the already pinned main thread,
/// and would put the peer on CPU 0 too.
pub fn peer_cpu() -> usize {
    // SAFETY: sysconf has no memory-safety preconditions.
    let online = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) };
    if online > 1 {
        1
    } else {
        0
    }
}

/// Pins the calling thread as a plain peer when `pin` is set; a failure only loses the
/// pinning, which the run then reports through its busy fractions.
pub fn pin_peer(pin: bool) {
    if pin {
        let _ = pin_to(peer_cpu());
    }
}

/// CPU time (user + system, seconds) the calling thread has used.
pub fn thread_cpu_secs() -> f64 {
    // SAFETY: rusage is plain old data; all zeroes is a valid value.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: RUSAGE_THREAD fills the live `usage` struct.
    unsafe { libc::getrusage(libc::RUSAGE_THREAD, &mut usage) };
    let secs = |tv: libc::timeval| tv.tv_sec as f64 + tv.tv_usec as f64 * 1e-6;
    secs(usage.ru_utime) + secs(usage.ru_stime)
}

/// Per-CPU (busy, total) jiffies from /proc/stat; busy = not idle and not iowait.
#[derive(Debug, Clone, Default)]
pub struct CpuSample(Vec<(u64, u64)>);

impl CpuSample {
    /// Reads /proc/stat now (empty where it is unreadable).
    pub fn now() -> CpuSample {
        let text = std::fs::read_to_string("/proc/stat").unwrap_or_default();
        let per_cpu = text
            .lines()
            .filter(|l| l.starts_with("cpu") && l.as_bytes().get(3).is_some_and(u8::is_ascii_digit))
            .map(|line| {
                let v: Vec<u64> = line
                    .split_whitespace()
                    .skip(1)
                    .filter_map(|x| x.parse().ok())
                    .collect();
                let total: u64 = v.iter().take(8).sum();
                let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
                (total.saturating_sub(idle), total)
            })
            .collect();
        CpuSample(per_cpu)
    }

    /// The fraction of `cpu` that was busy between `self` and `later` (10 ms ticks).
    pub fn busy_until(&self, later: &CpuSample, cpu: usize) -> Option<f64> {
        let (a, b) = (self.0.get(cpu)?, later.0.get(cpu)?);
        let total = b.1.checked_sub(a.1)?;
        if total == 0 {
            return None;
        }
        Some((b.0.saturating_sub(a.0) as f64 / total as f64).min(1.0))
    }

    /// The seconds `cpu` was busy between `self` and `later` (10 ms ticks).
    pub fn busy_secs_until(&self, later: &CpuSample, cpu: usize) -> Option<f64> {
        let (a, b) = (self.0.get(cpu)?, later.0.get(cpu)?);
        // SAFETY: sysconf has no memory-safety preconditions.
        let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
        (ticks > 0).then(|| b.0.saturating_sub(a.0) as f64 / ticks as f64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thread_cpu_time_grows() {
        let before = thread_cpu_secs();
        let mut x = 0u64;
        for i in 0..5_000_000u64 {
            x = x.wrapping_mul(31).wrapping_add(i);
        }
        std::hint::black_box(x);
        assert!(thread_cpu_secs() >= before);
    }

    #[test]
    fn proc_stat_has_cpu0() {
        let a = CpuSample::now();
        let b = CpuSample::now();
        if !a.0.is_empty() {
            // Zero ticks between two immediate samples is allowed: then None.
            let busy = a.busy_until(&b, 0);
            assert!(busy.is_none_or(|x| (0.0..=1.0).contains(&x)));
        }
    }
}
