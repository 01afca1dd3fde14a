//! The exit statuses kvmbuild's init reports on the exit port: the codes themselves are part of
//! the guest ABI ([`abi::status`], where the table is), and the mapping from what happened to
//! the command to one of them lives here.

pub use abi::status::*;

/// The status to report for a `waitpid` status word: the exit code, or 128+signal.
pub fn from_wait_status(raw: i32) -> u8 {
    if libc::WIFEXITED(raw) {
        // Exit codes are 8 bits: the low byte is the code.
        libc::WEXITSTATUS(raw).to_le_bytes()[0]
    } else if libc::WIFSIGNALED(raw) {
        // Signal numbers are masked to 7 bits, so 128 + signal fits a u8.
        128 + (libc::WTERMSIG(raw) & 0x7f).to_le_bytes()[0]
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
