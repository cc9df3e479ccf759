//! A process' threads as /proc shows them, for the tests that check where
//! and how the engine's threads run (`mod proc_threads;`).

/// (name, tid) of the threads of process `pid` (`"self"`: this one) whose
/// name starts with `prefix`, sorted. A thread that exits meanwhile is
/// skipped.
pub fn named(pid: &str, prefix: &str) -> Vec<(String, libc::pid_t)> {
    let mut v: Vec<_> = std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .flatten()
        .filter_map(|t| {
            let comm = std::fs::read_to_string(t.path().join("comm")).ok()?;
            let comm = comm.trim_end();
            let tid = t.file_name().to_str()?.parse().ok()?;
            comm.starts_with(prefix).then(|| (comm.to_string(), tid))
        })
        .collect();
    v.sort();
    v
}

/// `Cpus_allowed_list` of thread `tid` of process `pid`; None if the thread
/// is gone.
pub fn cpu_list(pid: &str, tid: libc::pid_t) -> Option<String> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
        .map(|c| c.trim().to_string())
}
