//! Releasing a finished VM off the critical path.
//!
//! Closing the last fd of a KVM VM makes the kernel destroy it, and that waits for SRCU grace
//! periods (off-CPU stacks show `mmu_notifier_unregister`, `kvm_arch_pre_destroy_vm` and
//! `kvm_destroy_vm` itself; with a PIT, the issue traced its clean-up too): measured on this
//! project's shared PVM host, 14-17 ms with an in-kernel PIT and 9-20 ms without one. A process
//! that exits pays the same waits in its exit (the kernel closes its fds and tears down its
//! address space, whose KVM MMU notifier also waits), and whoever waits for the process waits
//! for it too.
//!
//! So a finished [`Vm`](crate::vm::Vm) hands its VM fd and guest RAM to the caller as
//! [`Remains`] instead of releasing them. The caller then either
//! - drops them when it suits it: a caller that times boots drops the previous VM's before its
//!   clock starts, or
//! - calls [`Remains::release_after_exit`] when the process is about to exit: a keeper process
//!   that shares the address space (`CLONE_VM`) and holds the VM fd outlives it, so the
//!   process's own exit is neither the last user of the address space nor the last holder of
//!   the VM, and the grace periods are waited for by the keeper alone, after the exit status
//!   has been reported.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use kvm_ioctls::VmFd;
use vm_memory::GuestMemoryMmap;

/// A stopped VM's KVM fd and guest RAM. Dropping them releases the VM here and now (closing
/// its fd waits for the kernel to destroy it).
#[allow(dead_code, reason = "held only to be dropped, in this order")]
pub struct Remains {
    // Field order matters: the VM (and its memory slots) is dropped before the memory.
    pub(crate) fd: VmFd,
    pub(crate) mem: GuestMemoryMmap,
}

impl std::fmt::Debug for Remains {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Remains").finish_non_exhaustive()
    }
}

impl Remains {
    /// For a process about to exit: hands the VM to a keeper process that releases it once
    /// this process has exited, so the exit is not delayed by the VM's destruction. Call it
    /// last, after every output is written; the keeper holds no other fd of this process (the
    /// standard streams included), so readers see end-of-file as this process exits. If no
    /// keeper can be started, the VM is released here.
    pub fn release_after_exit(self) {
        if keeper::spawn(self.fd.as_raw_fd()).is_ok() {
            // The keeper holds the VM fd and the address space; this process's copies go
            // with its exit, which no longer destroys either.
            std::mem::forget(self);
        }
    }
}

mod keeper {
    //! The keeper: a process created with `CLONE_VM` (sharing this process's memory and, for
    //! want of its own, its thread pointer), so it runs on raw system calls only: no libc, no
    //! errno, no allocation, no locks.

    use super::*;

    const STACK_SIZE: usize = 64 << 10;

    /// What the keeper keeps: the VM fd and the read end of a pipe whose write end only this
    /// process holds.
    #[repr(C)]
    struct Keep {
        vm_fd: RawFd,
        exit_pipe: RawFd,
    }

    pub(super) fn spawn(vm_fd: RawFd) -> std::io::Result<()> {
        let mut fds = [0; 2];
        // SAFETY: `fds` has room for the two fds pipe2 writes.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: pipe2 just returned these two fds; nobody else owns them.
        let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        // SAFETY: an anonymous private mapping with no address hint; checked below.
        let stack = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                STACK_SIZE,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_STACK,
                -1,
                0,
            )
        };
        if stack == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        // Leaked on purpose: the keeper reads it after this process is gone (the memory is
        // shared and lives as long as the keeper).
        let keep = Box::into_raw(Box::new(Keep {
            vm_fd,
            exit_pipe: read.as_raw_fd(),
        }));
        // SAFETY: `keeper_main` uses only raw system calls on its own stack (the top of the
        // mapping above) and the leaked `Keep`; CLONE_VM shares memory and SIGCHLD lets
        // whoever inherits the keeper reap it.
        let pid = unsafe {
            libc::clone(
                keeper_main,
                stack.cast::<u8>().add(STACK_SIZE).cast(),
                libc::CLONE_VM | libc::SIGCHLD,
                keep.cast(),
            )
        };
        if pid < 0 {
            let error = std::io::Error::last_os_error();
            // SAFETY: the clone failed, so nothing else uses the mapping or `keep`.
            unsafe {
                libc::munmap(stack, STACK_SIZE);
                drop(Box::from_raw(keep));
            }
            return Err(error);
        }
        // The write end stays open until this process exits: that end-of-file is the keeper's
        // signal. The keeper closed its own copies of everything else already.
        std::mem::forget(write);
        drop(read);
        Ok(())
    }

    /// Closes every fd but the two in `Keep`, blocks signals, waits for the pipe's end of file
    /// (this process has exited) and exits, which closes the VM fd and drops the address space.
    extern "C" fn keeper_main(arg: *mut libc::c_void) -> libc::c_int {
        // SAFETY: `arg` is the `Keep` leaked by `spawn`, never freed.
        let keep = unsafe { &*arg.cast::<Keep>() };
        let all: u64 = !0;
        // SAFETY: raw system calls on integers and on this stack's own buffers.
        unsafe {
            syscall(
                libc::SYS_rt_sigprocmask,
                [libc::SIG_SETMASK as u64, &all as *const u64 as u64, 0, 8],
            );
            let (a, b) = (
                keep.vm_fd.min(keep.exit_pipe) as u64,
                keep.vm_fd.max(keep.exit_pipe) as u64,
            );
            for (first, last) in [
                (0, a.wrapping_sub(1)),
                (a + 1, b.wrapping_sub(1)),
                (b + 1, u64::from(u32::MAX)),
            ] {
                if first <= last && last != u64::MAX {
                    syscall(libc::SYS_close_range, [first, last, 0, 0]);
                }
            }
            let mut byte = 0u8;
            loop {
                let read = syscall(
                    libc::SYS_read,
                    [keep.exit_pipe as u64, &mut byte as *mut u8 as u64, 1, 0],
                );
                if read != -(libc::EINTR as i64) {
                    break;
                }
            }
            syscall(libc::SYS_exit, [0, 0, 0, 0]);
        }
        0
    }

    /// A system call without libc (so without errno, which lives in the parent's thread).
    ///
    /// # Safety
    /// The arguments must be valid for system call `nr`.
    unsafe fn syscall(nr: libc::c_long, args: [u64; 4]) -> i64 {
        let ret: i64;
        // SAFETY: the x86-64 Linux system call convention; the caller vouches for the arguments.
        unsafe {
            std::arch::asm!(
                "syscall",
                inlateout("rax") nr => ret,
                in("rdi") args[0],
                in("rsi") args[1],
                in("rdx") args[2],
                in("r10") args[3],
                lateout("rcx") _,
                lateout("r11") _,
                options(nostack),
            );
        }
        ret
    }
}
