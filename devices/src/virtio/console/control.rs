//! Control messages of a multiport console (virtio 1.2, section 5.3.6.2).
//!
//! Each message is `struct virtio_console_control { le32 id; le16 event; le16 value; }`,
//! followed, for [`PORT_NAME`], by the name's bytes (no NUL). The driver sends them on the
//! control transmit queue (c_ovq), the device on the control receive queue (c_ivq).

use std::collections::VecDeque;

use serde::{Deserialize, Serialize};

/// The header's size.
pub const HEADER_LEN: usize = 8;

/// The driver is ready for the device's ports (driver → device, value 1).
pub const DEVICE_READY: u16 = 0;
/// A port exists (device → driver).
pub const DEVICE_ADD: u16 = 1;
/// A port went away (device → driver); never sent by kvmbuild.
pub const DEVICE_REMOVE: u16 = 2;
/// The driver set up a port (driver → device, value 1; 0 when it failed).
pub const PORT_READY: u16 = 3;
/// The port is a console (hvc) port (device → driver); never sent by kvmbuild.
pub const CONSOLE_PORT: u16 = 4;
/// A console port's size changed (device → driver); never sent by kvmbuild.
pub const RESIZE: u16 = 5;
/// The sender's side of a port opened (value 1) or closed (value 0); both directions.
pub const PORT_OPEN: u16 = 6;
/// A port's name, in the bytes after the header (device → driver).
pub const PORT_NAME: u16 = 7;

/// One control message.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    pub id: u32,
    pub event: u16,
    pub value: u16,
    /// Bytes after the header (a port's name); empty for every other event.
    pub payload: Vec<u8>,
}

impl Message {
    /// A message without payload.
    pub fn new(id: u32, event: u16, value: u16) -> Self {
        Self {
            id,
            event,
            value,
            payload: Vec::new(),
        }
    }

    /// PORT_NAME for port `id`.
    pub fn name(id: u32, name: &str) -> Self {
        Self {
            payload: name.as_bytes().to_vec(),
            ..Self::new(id, PORT_NAME, 1)
        }
    }

    /// The message as the driver reads it.
    pub fn encode(&self) -> Vec<u8> {
        let mut bytes = Vec::with_capacity(HEADER_LEN + self.payload.len());
        bytes.extend_from_slice(&self.id.to_le_bytes());
        bytes.extend_from_slice(&self.event.to_le_bytes());
        bytes.extend_from_slice(&self.value.to_le_bytes());
        bytes.extend_from_slice(&self.payload);
        bytes
    }

    /// Parses a driver's message header; `None` when it is too short. What follows the
    /// header is ignored: no driver-to-device event carries a payload.
    pub fn decode(bytes: &[u8]) -> Option<Self> {
        let header: &[u8; HEADER_LEN] = bytes.get(..HEADER_LEN)?.try_into().ok()?;
        let [i0, i1, i2, i3, e0, e1, v0, v1] = *header;
        Some(Self::new(
            u32::from_le_bytes([i0, i1, i2, i3]),
            u16::from_le_bytes([e0, e1]),
            u16::from_le_bytes([v0, v1]),
        ))
    }
}

/// Messages waiting for the driver's control receive buffers.
///
/// Bounded: the device sends at most a handful of messages per port (DEVICE_ADD, PORT_NAME,
/// PORT_OPEN twice), each at most once per activation, so a full queue means a bug; the
/// message is then dropped rather than letting the queue grow.
pub struct Outbox {
    queue: VecDeque<Message>,
    limit: usize,
}

impl Outbox {
    /// An outbox for a device with `ports` ports.
    pub fn new(ports: usize) -> Self {
        Self {
            queue: VecDeque::new(),
            limit: 4 * ports + 4,
        }
    }

    /// Queues `message`; returns false if the outbox was full and it was dropped.
    pub fn push(&mut self, message: Message) -> bool {
        if self.queue.len() >= self.limit {
            return false;
        }
        self.queue.push_back(message);
        true
    }

    /// The next message to send.
    pub fn front(&self) -> Option<&Message> {
        self.queue.front()
    }

    /// Drops the message just sent.
    pub fn pop(&mut self) {
        self.queue.pop_front();
    }

    /// The messages waiting, first first, for a snapshot.
    pub fn saved(&self) -> Vec<Message> {
        self.queue.iter().cloned().collect()
    }

    /// An outbox for `ports` ports holding a snapshot's `messages`; `None` when they are
    /// more than it holds.
    pub fn restored(ports: usize, messages: Vec<Message>) -> Option<Self> {
        let mut outbox = Self::new(ports);
        messages
            .into_iter()
            .all(|m| outbox.push(m))
            .then_some(outbox)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_round_trip_little_endian() {
        let m = Message::new(0x0102_0304, PORT_OPEN, 1);
        assert_eq!(m.encode(), [4, 3, 2, 1, 6, 0, 1, 0]);
        assert_eq!(Message::decode(&m.encode()), Some(m));
        assert_eq!(Message::decode(&[0; 7]), None);
        let named = Message::name(2, "stdout");
        assert_eq!(&named.encode()[8..], b"stdout");
        assert_eq!(Message::decode(&named.encode()).unwrap().payload, b"");
    }

    #[test]
    fn the_outbox_is_bounded() {
        let mut outbox = Outbox::new(1);
        for i in 0..8 {
            assert!(outbox.push(Message::new(i, DEVICE_ADD, 1)));
        }
        assert!(!outbox.push(Message::new(9, DEVICE_ADD, 1)));
        assert_eq!(outbox.front().unwrap().id, 0);
        outbox.pop();
        assert_eq!(outbox.front().unwrap().id, 1);
    }
}
