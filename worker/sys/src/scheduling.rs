//! The CPU scheduling policy of the calling thread (`sched_getscheduler`,
//! `sched_setscheduler`).
#![allow(unsafe_code)]

/// Moves the calling thread from the normal policy (`SCHED_OTHER`) to `SCHED_BATCH`, which
/// threads it starts from now on inherit. `Ok(false)`: it ran under another policy (set on
/// purpose, say by systemd's `CPUSchedulingPolicy=`), which is left as it is.
///
/// Under `SCHED_BATCH` the kernel schedules the thread as before (same share of the CPU,
/// same nice value), except that its waking up never preempts the task running on that
/// CPU: it runs once that task sleeps or its time slice ends.
pub fn batch_if_normal() -> std::io::Result<bool> {
    // SAFETY: sched_getscheduler takes no pointers; 0 names the calling thread.
    let policy = unsafe { libc::sched_getscheduler(0) };
    if policy < 0 {
        return Err(std::io::Error::last_os_error());
    }
    if policy != libc::SCHED_OTHER {
        return Ok(false);
    }
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: `param` is a valid sched_param that outlives the call, which only reads it;
    // 0 names the calling thread.
    if unsafe { libc::sched_setscheduler(0, libc::SCHED_BATCH, &param) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(true)
}

/// Whether the calling thread runs under `SCHED_BATCH`.
pub fn is_batch() -> std::io::Result<bool> {
    // SAFETY: as in batch_if_normal.
    let policy = unsafe { libc::sched_getscheduler(0) };
    if policy < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(policy == libc::SCHED_BATCH)
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_normal_thread_becomes_batch_and_its_new_threads_inherit_it() {
        // A thread of its own: the policy is the thread's, not the test process's.
        std::thread::spawn(|| {
            assert!(!super::is_batch().unwrap(), "test threads start normal");
            assert!(super::batch_if_normal().unwrap());
            assert!(super::is_batch().unwrap());
            let child = std::thread::spawn(|| super::is_batch().unwrap());
            assert!(child.join().unwrap(), "a thread started later inherits it");
            assert!(
                !super::batch_if_normal().unwrap(),
                "already batch: left alone"
            );
        })
        .join()
        .unwrap();
    }
}
