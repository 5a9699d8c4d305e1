//! Linux socket glue: every `setsockopt`, control message and raw packet
//! tproxyd needs lives below this module, so the relay and DNS code above it
//! deal only in addresses and payloads.

pub mod accept;
pub mod poll;
pub mod raw;
pub mod recv;
pub mod send;
pub mod sockets;

use std::io;

/// True for the errors a non-blocking socket returns when it has nothing to
/// give (or no room to take) right now.
pub fn would_block(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::WouldBlock
}
