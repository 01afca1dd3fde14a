//! `kvmbuild-init`: PID 1 of kvmbuild guests. The logic lives in [`initrd::guest`]; see the
//! crate documentation for its settings, exit statuses and how to build it statically.
#![cfg_attr(test, allow(clippy::cast_possible_truncation))]

fn main() {
    initrd::guest::main()
}
