//! Waiting for a running VM to end, and stopping its vCPU threads once it has.

use std::os::fd::AsRawFd;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use devices::exit::{ExitReason, VmExit};
use kvm_ioctls::VcpuFd;
use vmm_sys_util::eventfd::EventFd;

use crate::vcpu;

/// Waits until something requests an exit, the caller's `stop` event is signalled (also before
/// the wait began: a stop requested during set-up counts), or `deadline` passes.
pub(super) fn wait_for_exit(
    exit: &VmExit,
    stop: &EventFd,
    deadline: Option<Instant>,
) -> ExitReason {
    loop {
        if let Some(reason) = exit.reason() {
            return reason;
        }
        let wait_ms = match deadline {
            None => -1,
            Some(d) => match d.checked_duration_since(Instant::now()) {
                // Rounded up, so the wait never ends a moment before the deadline and spins.
                Some(left) => i32::try_from(left.as_micros().div_ceil(1000)).unwrap_or(i32::MAX),
                None => {
                    exit.request(ExitReason::Timeout);
                    continue;
                }
            },
        };
        let mut fds = [exit.event().as_raw_fd(), stop.as_raw_fd()].map(|fd| libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        });
        // SAFETY: `fds` is an array of valid pollfds that outlives the call.
        unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, wait_ms) };
        // The stop event is the caller's: it is read, never consumed, so it stays signalled
        // for whatever else the caller stops with it.
        if fds[1].revents & libc::POLLIN != 0 {
            exit.request(ExitReason::Stopped);
        }
        let _ = exit.event().read();
    }
}

/// How long vCPU threads get to leave `KVM_RUN` once the VM has ended. They take
/// microseconds; one that takes longer is stuck in the host kernel, and waiting on it would
/// turn a finished VM into a hung kvmbuild.
pub(super) const VCPU_STOP_GRACE: Duration = Duration::from_secs(5);
/// vCPUs still running are kicked again this often, so a kick lost in a race with entering
/// `KVM_RUN` (or any other way) costs this long, not the whole grace period.
const REKICK_INTERVAL: Duration = Duration::from_millis(10);

/// Kicks the vCPU threads out of `KVM_RUN` and joins them. Returns the vCPUs of the threads
/// that finished, and the indices of those still running after `grace`; the latter are left
/// behind (detached) for process exit to end.
pub(super) fn stop_vcpus<T>(
    threads: Vec<JoinHandle<T>>,
    grace: Duration,
) -> (Vec<(usize, T)>, Vec<usize>) {
    let started = Instant::now();
    let mut running: Vec<_> = threads.into_iter().enumerate().collect();
    let mut joined = Vec::with_capacity(running.len());
    let mut last_kick: Option<Instant> = None;
    let mut pause = Duration::from_micros(20);
    loop {
        // Threads that have already finished (a vCPU that ended the VM itself) cost no sleep.
        let (finished, still): (Vec<_>, Vec<_>) =
            running.into_iter().partition(|(_, t)| t.is_finished());
        for (index, thread) in finished {
            // A vCPU thread does not panic (the release profile aborts if it did).
            if let Ok(value) = thread.join() {
                joined.push((index, value));
            }
        }
        running = still;
        if running.is_empty() || started.elapsed() >= grace {
            break;
        }
        if last_kick.is_none_or(|at| at.elapsed() >= REKICK_INTERVAL) {
            running.iter().for_each(|(_, thread)| vcpu::kick(thread));
            last_kick = Some(Instant::now());
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(REKICK_INTERVAL);
    }
    joined.sort_by_key(|&(index, _)| index);
    (
        joined,
        running.into_iter().map(|(index, _)| index).collect(),
    )
}

/// The vCPUs back from their threads, in index order, when every one came back.
pub(super) fn all_returned(joined: Vec<(usize, VcpuFd)>, count: usize) -> Option<Vec<VcpuFd>> {
    (joined.len() == count).then(|| joined.into_iter().map(|(_, fd)| fd).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    #[test]
    fn finished_vcpu_threads_are_joined_and_stuck_ones_reported() {
        vcpu::install_kick_handler().unwrap();
        let release = Arc::new(AtomicBool::new(false));
        let quick = std::thread::spawn(|| 7);
        let stuck = std::thread::spawn({
            let release = release.clone();
            move || {
                while !release.load(Ordering::SeqCst) {
                    std::thread::sleep(Duration::from_millis(1));
                }
                8
            }
        });
        let started = Instant::now();
        let grace = Duration::from_millis(200);
        let (joined, stuck) = stop_vcpus(vec![quick, stuck], grace);
        assert_eq!((joined, stuck), (vec![(0, 7)], vec![1]));
        let waited = started.elapsed();
        assert!(waited >= grace && waited < grace * 10, "{waited:?}");
        release.store(true, Ordering::SeqCst);
    }

    #[test]
    fn threads_that_stop_at_once_cost_no_grace() {
        vcpu::install_kick_handler().unwrap();
        let threads = (0..4).map(|i| std::thread::spawn(move || i)).collect();
        let started = Instant::now();
        let (joined, stuck) = stop_vcpus(threads, Duration::from_secs(5));
        assert_eq!(joined, vec![(0, 0), (1, 1), (2, 2), (3, 3)]);
        assert!(stuck.is_empty());
        assert!(started.elapsed() < Duration::from_secs(1));
    }

    #[test]
    fn a_stop_requested_before_the_wait_ends_it_at_once() {
        let exit = VmExit::new().unwrap();
        let stop = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        stop.write(1).unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        assert_eq!(
            wait_for_exit(&exit, &stop, Some(deadline)),
            ExitReason::Stopped
        );
        // Still signalled for the caller.
        assert_eq!(stop.read().unwrap(), 1);
    }

    #[test]
    fn the_deadline_ends_the_wait() {
        let exit = VmExit::new().unwrap();
        let stop = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let deadline = Instant::now() + Duration::from_millis(30);
        assert_eq!(
            wait_for_exit(&exit, &stop, Some(deadline)),
            ExitReason::Timeout
        );
        assert!(Instant::now() >= deadline);
    }
}
