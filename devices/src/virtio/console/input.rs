//! A port's input: a host source read into a bounded buffer until end of file.
//!
//! A pollable source (a pipe, a socket, a terminal) is read once each time epoll reports it
//! readable, and only while the buffer has room. A source epoll refuses (a regular file,
//! `/dev/null`: `EPERM`) is always readable, so it is read directly whenever the buffer has
//! room. Either way the state outlives a device reset: bytes read but not yet delivered stay,
//! and so does end of file.

use std::collections::VecDeque;
use std::io::{self, Read};
use std::os::unix::io::RawFd;

use super::ConsoleInput;

/// Host input buffered for the guest at most, per port.
pub const PENDING_MAX: usize = 64 << 10;
/// Bytes read per read(2).
const READ_CHUNK: usize = 16 << 10;

/// One port's input source and what was read from it.
pub struct PortInput {
    source: Box<dyn ConsoleInput>,
    /// Bytes read, not yet in the guest's receive buffers.
    pub pending: VecDeque<u8>,
    /// The source ended (end of file, hang-up or a read error): nothing more will come.
    pub eof: bool,
    /// Whether epoll accepts the source; cleared when it refused.
    pub pollable: bool,
}

impl PortInput {
    pub fn new(source: Box<dyn ConsoleInput>) -> Self {
        Self {
            source,
            pending: VecDeque::new(),
            eof: false,
            pollable: true,
        }
    }

    /// The source's descriptor, for epoll.
    pub fn fd(&self) -> RawFd {
        self.source.as_raw_fd()
    }

    /// Whether more input should be read (there is room and the source has not ended).
    pub fn wants_data(&self) -> bool {
        !self.eof && self.pending.len() < PENDING_MAX
    }

    /// Whether everything the source will ever give has been delivered.
    pub fn drained(&self) -> bool {
        self.eof && self.pending.is_empty()
    }

    /// Reads once into the pending buffer (after epoll reported the source readable); returns
    /// the bytes read.
    pub fn read_once(&mut self) -> usize {
        let room = PENDING_MAX
            .saturating_sub(self.pending.len())
            .min(READ_CHUNK);
        if room == 0 || self.eof {
            return 0;
        }
        let mut buf = [0u8; READ_CHUNK];
        loop {
            match self.source.read(&mut buf[..room]) {
                Ok(0) => self.eof = true,
                Ok(n) => {
                    self.pending.extend(&buf[..n]);
                    return n;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(_) => self.eof = true,
            }
            return 0;
        }
    }

    /// For a source epoll refused: reads until the buffer is full or the source ends.
    pub fn fill_unpolled(&mut self) {
        if self.pollable {
            return;
        }
        while self.wants_data() && self.read_once() > 0 {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unpolled_source_is_read_up_to_the_bound_then_to_its_end() {
        let data: Vec<u8> = (0..PENDING_MAX + 100).map(|i| i as u8).collect();
        let mut input = PortInput::new(Box::new(tempfile_with(&data)));
        input.pollable = false;
        input.fill_unpolled();
        assert_eq!(input.pending.len(), PENDING_MAX);
        assert!(!input.eof);
        input.pending.drain(..PENDING_MAX);
        input.fill_unpolled();
        assert_eq!(input.pending.len(), 100);
        assert!(input.eof);
        input.pending.clear();
        assert!(input.drained());
    }

    fn tempfile_with(data: &[u8]) -> std::fs::File {
        use std::io::{Seek, Write};
        let mut f = tempfile::tempfile().unwrap();
        f.write_all(data).unwrap();
        f.rewind().unwrap();
        f
    }
}
