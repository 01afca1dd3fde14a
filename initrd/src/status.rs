//! The exit statuses kvmbuild's init reports on the exit port.
//!
//! The command's own status passes through unchanged, and a command killed by signal N reports
//! 128+N, as shells do. The init's own failures use the codes below; they sit below 124 and
//! 125, which `kvmbuild run` uses for a timeout and a guest reboot, and follow the shell's
//! 126/127 for commands that cannot run.
//!
//! | status | meaning |
//! |---|---|
//! | 0–255 | the command's exit status |
//! | 128+N | the command was killed by signal N |
//! | 119 | the init failed internally (could not fork, mount `/proc`, or it panicked) |
//! | 120 | bad settings: unknown `kvmbuild.*` key, malformed value, no `kvmbuild.cmd`, unusable `kvmbuild.tty` |
//! | 121 | a kernel module failed to load |
//! | 122 | a virtio-fs share or disk failed to mount |
//! | 123 | the working directory (`kvmbuild.cwd`) does not exist or cannot be entered |
//! | 126 | the command was found but cannot be executed (permissions, bad format) |
//! | 127 | the command was not found (also: its interpreter or dynamic loader is missing) |

/// The init failed internally: fork failed, `/proc` could not be mounted, or it panicked.
pub const INTERNAL: u8 = 119;
/// The settings are invalid, or name no command.
pub const BAD_CONFIG: u8 = 120;
/// A kernel module failed to load.
pub const MODULE_FAILED: u8 = 121;
/// A share or disk failed to mount.
pub const MOUNT_FAILED: u8 = 122;
/// The working directory cannot be entered.
pub const BAD_CWD: u8 = 123;
/// The command exists but cannot be executed.
pub const NOT_EXECUTABLE: u8 = 126;
/// The command does not exist.
pub const NOT_FOUND: u8 = 127;

/// The status to report for a `waitpid` status word: the exit code, or 128+signal.
pub fn from_wait_status(raw: i32) -> u8 {
    if libc::WIFEXITED(raw) {
        // Exit codes are 8 bits; the mask only makes the truncation explicit.
        (libc::WEXITSTATUS(raw) & 0xff) as u8
    } else if libc::WIFSIGNALED(raw) {
        (128 + (libc::WTERMSIG(raw) & 0x7f)) as u8
    } else {
        INTERNAL
    }
}

/// The status for a command that could not be executed, from `execve`'s errno: 127 when it
/// (or its interpreter) does not exist, 126 otherwise.
pub fn from_exec_errno(errno: i32) -> u8 {
    match errno {
        libc::ENOENT | libc::ENOTDIR => NOT_FOUND,
        _ => NOT_EXECUTABLE,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes_pass_through() {
        assert_eq!(from_wait_status(0), 0);
        assert_eq!(from_wait_status(7 << 8), 7);
        assert_eq!(from_wait_status(255 << 8), 255);
    }

    #[test]
    fn signals_are_128_plus_signo() {
        assert_eq!(from_wait_status(libc::SIGKILL), 137);
        // A core dump sets bit 7; the signal number is unchanged.
        assert_eq!(from_wait_status(libc::SIGSEGV | 0x80), 139);
    }

    #[test]
    fn exec_errors() {
        assert_eq!(from_exec_errno(libc::ENOENT), 127);
        assert_eq!(from_exec_errno(libc::EACCES), 126);
        assert_eq!(from_exec_errno(libc::ENOEXEC), 126);
    }

    #[test]
    fn real_processes_map_the_same_way() {
        use std::os::unix::process::ExitStatusExt;
        let out = std::process::Command::new("sh")
            .args(["-c", "exit 7"])
            .status()
            .unwrap();
        assert_eq!(from_wait_status(out.into_raw()), 7);
        let out = std::process::Command::new("sh")
            .args(["-c", "kill -TERM $$"])
            .status()
            .unwrap();
        assert_eq!(from_wait_status(out.into_raw()), 128 + 15);
    }
}
