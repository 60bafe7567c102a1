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
    if policy()? != libc::SCHED_OTHER {
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

/// The calling thread's policy (with `SCHED_RESET_ON_FORK` if that is set, so that a
/// policy set with it never counts as the normal one).
fn policy() -> std::io::Result<libc::c_int> {
    // SAFETY: sched_getscheduler takes no pointers; 0 names the calling thread.
    let policy = unsafe { libc::sched_getscheduler(0) };
    if policy < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(policy)
}

#[cfg(test)]
mod tests {
    fn is_batch() -> bool {
        super::policy().unwrap() == libc::SCHED_BATCH
    }

    #[test]
    fn a_normal_thread_becomes_batch_and_its_new_threads_inherit_it() {
        // A thread of its own: the policy is the thread's, not the test process's.
        std::thread::spawn(|| {
            assert!(!is_batch(), "test threads start normal");
            assert!(super::batch_if_normal().unwrap());
            assert!(is_batch());
            let child = std::thread::spawn(is_batch);
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
