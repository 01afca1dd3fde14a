//! What a front end says when a VM cannot be built: the exit-status policy for
//! [`VmError`]s, and the front end's own names for the configuration fields an error is
//! about (`kvmbuild run --mem`, the QEMU entry point's `-m`).

use std::process::ExitCode;

use vmm::device_manager::mmio::VirtioError;
use vmm::device_manager::DeviceError;
use vmm::exit::ExitReason;
use vmm::loader::LoaderError;
use vmm::vm::{ConfigField, VmError};

use crate::{exit_code, fail};

/// How a front end names the configuration fields its options set.
pub struct OptionNames {
    pub memory: &'static str,
    pub vcpus: &'static str,
    pub disk: &'static str,
    pub share: &'static str,
    pub snapshot: &'static str,
}

/// `kvmbuild run` and `bench`.
pub const RUN: OptionNames = OptionNames {
    memory: "--mem",
    vcpus: "--cpus",
    disk: "--disk",
    share: "--vhost-user-fs",
    snapshot: "--restore",
};

/// `kvmbuild exec`.
pub const EXEC: OptionNames = OptionNames {
    memory: "--mem",
    vcpus: "--cpus",
    disk: "--disk",
    share: "--share",
    snapshot: "--warm",
};

/// The QEMU entry point.
pub const QEMU: OptionNames = OptionNames {
    memory: "-m",
    vcpus: "-smp",
    disk: "-drive",
    share: "-chardev",
    snapshot: "-loadvm",
};

impl OptionNames {
    fn name(&self, field: ConfigField) -> &'static str {
        match field {
            ConfigField::Memory => self.memory,
            ConfigField::Vcpus => self.vcpus,
            ConfigField::Disk => self.disk,
            ConfigField::Share => self.share,
            ConfigField::Snapshot => self.snapshot,
        }
    }
}

/// The exit status a [`VmError`] deserves: KVM missing, the user's input, or kvmbuild's (or
/// the host's) fault.
pub fn status(e: &VmError) -> u8 {
    if let Some(code) = setup_stop_status(e) {
        return code;
    }
    match e {
        VmError::Kvm(_) => exit_code::KVM_UNAVAILABLE,
        VmError::Loader(LoaderError::GuestWrite { .. }) => exit_code::INTERNAL,
        VmError::Loader(_) => exit_code::BAD_INPUT,
        e if e.field().is_some() => exit_code::BAD_INPUT,
        _ => exit_code::INTERNAL,
    }
}

/// How a run ended that its timeout or a stop signal cut short during set-up, while a
/// vhost-user back end had not answered; `None` for any other error.
fn setup_cut(e: &VmError) -> Option<ExitReason> {
    let VmError::Device(DeviceError::Virtio(VirtioError::Share { source, .. })) = e else {
        return None;
    };
    source.exit_reason()
}

/// The signal that stopped a run during set-up, when one did.
fn setup_stop_signal(e: &VmError) -> Option<i32> {
    (setup_cut(e)? == ExitReason::Stopped)
        .then(|| crate::terminal::stop_signal().unwrap_or(libc::SIGTERM))
}

/// The status of a run that its timeout or a stop signal ended during set-up: the same as if
/// they had stopped the guest (124, 128+N).
pub fn setup_stop_status(e: &VmError) -> Option<u8> {
    match setup_cut(e)? {
        ExitReason::Timeout => Some(exit_code::TIMEOUT),
        ExitReason::Stopped => {
            setup_stop_signal(e).map(|signal| u8::try_from(128 + signal).unwrap_or(u8::MAX))
        }
        _ => None,
    }
}

/// The one line a front end prints for `e`, naming its own option where one is at fault.
pub fn message(e: &VmError, names: &OptionNames) -> String {
    let chain = initrd::guest::error_chain(e);
    if let Some(signal) = setup_stop_signal(e) {
        let name = crate::terminal::signal_name(signal);
        return format!("stopped the guest on {name} during set-up: {chain}");
    }
    match e.field() {
        Some(field) => format!("{}: {chain}", names.name(field)),
        None => chain,
    }
}

/// Prints `e` as `names`' front end says it and returns its status.
pub fn report(e: &VmError, names: &OptionNames) -> ExitCode {
    fail(status(e), message(e, names))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_front_end_names_its_own_option() {
        let e = VmError::BadMemorySize(2, "a guest needs at least 4 MiB".into());
        assert_eq!(
            message(&e, &RUN),
            "--mem: 2 MiB of memory: a guest needs at least 4 MiB"
        );
        assert_eq!(
            message(&e, &QEMU),
            "-m: 2 MiB of memory: a guest needs at least 4 MiB"
        );
        assert_eq!(status(&e), exit_code::BAD_INPUT);
    }
}
