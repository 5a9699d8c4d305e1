//! A netlink socket that commits nf_tables batches and waits for the
//! kernel's verdict on each message.

use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_NETFILTER};
use std::io;
use std::time::Duration;

use super::wire::{Batch, parse_acks};

/// How long the kernel gets to acknowledge a batch. Commits take micro-
/// to milliseconds; this only bounds a kernel or socket gone wrong.
const ACK_TIMEOUT: Duration = Duration::from_secs(2);
/// Receive buffer for acknowledgements: a full batch of errors echoes the
/// failed messages back, so leave room.
const RECV_BUFFER: usize = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum NftError {
    #[error("netlink socket: {0}")]
    Io(#[from] io::Error),
    /// The kernel refused message number `index` (from 0) of the batch;
    /// the whole transaction was rolled back.
    #[error("nf_tables refused message {index} of the batch: {}", io::Error::from_raw_os_error(*errno))]
    Refused { index: u32, errno: i32 },
    #[error("nf_tables did not acknowledge the batch in time")]
    Timeout,
}

impl NftError {
    /// The kernel's errno, if it refused something.
    pub fn errno(&self) -> Option<i32> {
        match self {
            NftError::Refused { errno, .. } => Some(*errno),
            _ => None,
        }
    }
}

pub struct NftSocket {
    sock: Socket,
    seq: u32,
    buf: Vec<u8>,
}

impl std::fmt::Debug for NftSocket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NftSocket").field("seq", &self.seq).finish()
    }
}

impl NftSocket {
    pub fn open() -> Result<NftSocket, NftError> {
        let mut sock = Socket::new(NETLINK_NETFILTER)?;
        sock.bind_auto()?;
        sock.connect(&SocketAddr::new(0, 0))?;
        // Failures echo the whole failed message back; that is fine.
        let _ = sock.set_rx_buf_sz(RECV_BUFFER);
        socket2::SockRef::from(&sock).set_read_timeout(Some(ACK_TIMEOUT))?;
        Ok(NftSocket {
            sock,
            seq: 1,
            buf: Vec::with_capacity(RECV_BUFFER),
        })
    }

    /// Builds a batch with `build` and commits it as one transaction:
    /// `Ok` only when the kernel acknowledged every message.
    pub fn commit(&mut self, build: impl FnOnce(&mut Batch)) -> Result<(), NftError> {
        let errnos = self.transact(build)?;
        match errnos.iter().position(|&e| e != 0) {
            Some(index) => Err(NftError::Refused {
                index: index as u32,
                errno: errnos[index],
            }),
            None => Ok(()),
        }
    }

    /// Sends a batch and returns the kernel's errno for each message (0 =
    /// accepted). The kernel reports every message of a failed batch, so a
    /// batch ending in a message bound to fail checks the others without
    /// changing anything (that is how `doctor` asks).
    pub fn transact(&mut self, build: impl FnOnce(&mut Batch)) -> Result<Vec<i32>, NftError> {
        let mut batch = Batch::new(self.seq);
        build(&mut batch);
        if batch.is_empty() {
            return Ok(Vec::new());
        }
        let seqs = batch.seqs();
        self.seq = seqs.end.wrapping_add(2);
        let bytes = batch.finish();
        self.sock.send(&bytes, 0)?;
        let expected = seqs.end.wrapping_sub(seqs.start);
        let mut errnos = vec![0; expected as usize];
        let mut acked = 0u32;
        while acked < expected {
            self.buf.clear();
            match self.sock.recv(&mut self.buf, 0) {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock || e.kind() == io::ErrorKind::TimedOut => {
                    return Err(NftError::Timeout);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e.into()),
            }
            for ack in parse_acks(&self.buf) {
                if ack.seq == seqs.start.wrapping_sub(1) && ack.errno != 0 {
                    // The batch as a whole was refused (EPERM without
                    // CAP_NET_ADMIN): no per-message answers follow.
                    return Err(NftError::Refused {
                        index: 0,
                        errno: ack.errno,
                    });
                }
                // Acknowledgements of an earlier batch that timed out are
                // not ours.
                let index = ack.seq.wrapping_sub(seqs.start);
                if let Some(slot) = errnos.get_mut(index as usize) {
                    *slot = ack.errno;
                    acked += 1;
                }
            }
        }
        Ok(errnos)
    }
}
