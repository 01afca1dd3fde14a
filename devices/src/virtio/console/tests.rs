//! Multiport console tests: the test driver plays Linux's virtio_console driver.
