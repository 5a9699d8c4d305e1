//! Shedding in the kernel: a classic BPF socket filter on the listener
//! sockets that drops one client's datagrams before they are queued.
//!
//! Shedding in user space ([`super::shed`]) still costs the relay's worker
//! a wake-up and a copy out of the kernel per datagram it drops: for a
//! flood of 64 KB datagrams that is most of what the flood costs, and
//! while the worker copies the flood, another client's datagram waits in
//! the shared queue for it. A socket filter runs when the kernel queues a
//! datagram (`udp_queue_rcv_one_skb` → `sk_filter_trim_cap`), in the
//! sender's softirq, after IP reassembly (a 64 KB datagram's fragments are
//! put back together in `ip_local_deliver` before UDP sees them) and after
//! the `SO_REUSEPORT` group picked its member: the filter is per socket, so
//! it goes on every member, and a datagram it drops is not handed to
//! another one. A dropped datagram is never queued, never wakes the
//! worker, never copied.
//!
//! The program matches a [`ClientId`] as the shedder counts them: an IPv4
//! source address, or the /64 of an IPv6 one. It reads the IP header at
//! `SKF_NET_OFF` (at filter time the packet's data starts at the UDP
//! header) and checks the version first, so one program is correct on a
//! socket of either family; anything else passes.
//!
//! What it dropped shows in the socket's drop counter (`sk_drops`, read
//! with `SO_MEMINFO`), which the kernel raises for a datagram the filter
//! refused as for one that found the queue full: [`drops`] reads it, and
//! the listener adds what it rose by while its filter was on to
//! `drops_total{reason="overload"}`. Only a socket whose queue had room
//! when looked at, then and the time before, is taken to have dropped
//! the filtered client's datagrams alone (see [`KernelDrops`]).

use std::io;
use std::os::fd::AsFd;
use std::time::Duration;

use socket2::{SockFilter, SockRef};
use tokio::net::UdpSocket;

use super::key::ClientId;
use super::shed::{Filter, KernelDrops, LOOK};

/// `SO_MEMINFO` (`asm-generic/socket.h`; the `libc` crate lacks it).
const SO_MEMINFO: libc::c_int = 55;
/// Words `SO_MEMINFO` returns (`SK_MEMINFO_VARS`).
const MEMINFO_WORDS: usize = 9;

const LD_B_ABS: u16 = (libc::BPF_LD | libc::BPF_B | libc::BPF_ABS) as u16;
const LD_W_ABS: u16 = (libc::BPF_LD | libc::BPF_W | libc::BPF_ABS) as u16;
const AND_K: u16 = (libc::BPF_ALU | libc::BPF_AND | libc::BPF_K) as u16;
const JEQ_K: u16 = (libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K) as u16;
const RET_K: u16 = (libc::BPF_RET | libc::BPF_K) as u16;

/// `k` of a load `at` bytes into the IP header.
fn net(at: i32) -> u32 {
    (libc::SKF_NET_OFF + at) as u32
}

/// The filter that drops `client`'s datagrams and passes all others
/// whole.
pub fn program(client: ClientId) -> Vec<SockFilter> {
    let version = |v: u32, to_pass: u8| {
        [
            SockFilter::new(LD_B_ABS, 0, 0, net(0)),
            SockFilter::new(AND_K, 0, 0, 0xf0),
            SockFilter::new(JEQ_K, 0, to_pass, v << 4),
        ]
    };
    let drop = SockFilter::new(RET_K, 0, 0, 0);
    let pass = SockFilter::new(RET_K, 0, 0, u32::MAX);
    let mut p = Vec::with_capacity(9);
    match client {
        ClientId::V4(addr) => {
            p.extend(version(4, 3));
            p.push(SockFilter::new(LD_W_ABS, 0, 0, net(12)));
            p.push(SockFilter::new(JEQ_K, 0, 1, addr));
        }
        ClientId::V6Prefix(prefix) => {
            p.extend(version(6, 5));
            p.push(SockFilter::new(LD_W_ABS, 0, 0, net(8)));
            p.push(SockFilter::new(JEQ_K, 0, 3, (prefix >> 32) as u32));
            p.push(SockFilter::new(LD_W_ABS, 0, 0, net(12)));
            p.push(SockFilter::new(JEQ_K, 0, 1, prefix as u32));
        }
    }
    p.push(drop);
    p.push(pass);
    p
}

/// Puts the filter for `client` on `socket`, in place of any other (the
/// kernel swaps programs atomically: no datagram passes unfiltered).
pub fn attach(socket: &impl AsFd, client: ClientId) -> io::Result<()> {
    SockRef::from(socket).attach_filter(&program(client))
}

/// Takes the filter off `socket`; one that had none is fine.
pub fn detach(socket: &impl AsFd) -> io::Result<()> {
    match SockRef::from(socket).detach_filter() {
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(()),
        other => other,
    }
}

/// The datagrams the kernel dropped for `socket` so far: refused by its
/// filter or finding its queue full (a counter that wraps).
pub fn drops(socket: &impl AsFd) -> io::Result<u32> {
    meminfo(socket).map(|m| m.drops)
}

/// What `SO_MEMINFO` says of a socket that matters here.
#[derive(Debug, Clone, Copy)]
struct MemInfo {
    drops: u32,
    /// Under half of its receive buffer queued: a datagram that arrived
    /// lately found room, so what the socket dropped, its filter did.
    room: bool,
}

fn meminfo(socket: &impl AsFd) -> io::Result<MemInfo> {
    use std::os::fd::AsRawFd;
    let mut info = [0u32; MEMINFO_WORDS];
    let mut len = std::mem::size_of_val(&info) as libc::socklen_t;
    // SAFETY: the kernel writes at most `len` bytes into `info`, which is
    // that long, and stores how many it wrote in `len`.
    let rc = unsafe {
        libc::getsockopt(
            socket.as_fd().as_raw_fd(),
            libc::SOL_SOCKET,
            SO_MEMINFO,
            info.as_mut_ptr().cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    let at = libc::SK_MEMINFO_DROPS as usize;
    if (len as usize) < (at + 1) * 4 {
        return Err(io::Error::other("SO_MEMINFO without a drop count"));
    }
    let (queued, buffer) = (
        info[libc::SK_MEMINFO_RMEM_ALLOC as usize],
        info[libc::SK_MEMINFO_RCVBUF as usize],
    );
    Ok(MemInfo {
        drops: info[at],
        room: queued < buffer / 2,
    })
}

/// The filter one listener task has on its sockets, and each socket's
/// drop counter when it went on.
#[derive(Debug, Default)]
pub struct Applied {
    filter: Option<Filter>,
    baselines: Vec<Option<u32>>,
    /// Each socket's drop counter when [`look`](Self::look) last read it,
    /// and when that was.
    looked: Vec<Option<u32>>,
    /// Whether each socket's queue had room then.
    room: Vec<bool>,
    looked_at: Duration,
}

impl Applied {
    /// Until when the filter on the sockets is to stay (a reading of
    /// [`super::shed::SharedShedder::now`]), if one is on.
    pub fn until(&self) -> Option<Duration> {
        self.filter.map(|f| f.until)
    }

    /// The filter on the sockets, if one is on.
    pub fn filter(&self) -> Option<Filter> {
        self.filter
    }

    /// When the listener is next to [`look`](Self::look) at what its
    /// filter drops, or its hold ends, whichever is first; `None` with no
    /// filter on.
    pub fn next_wake(&self) -> Option<Duration> {
        self.until().map(|until| until.min(self.looked_at + LOOK))
    }

    /// Whether a [`look`](Self::look) is due at `now`.
    pub fn look_due(&self, now: Duration) -> bool {
        self.filter.is_some() && now >= self.looked_at + LOOK
    }

    /// The datagrams `sockets` dropped since the last look (or since the
    /// filter went on), at `now`, and of those the filtered client's: the
    /// drops of sockets whose queue had room at this look and the last.
    /// A full queue drops anyone's datagrams (the filtered client's never
    /// reach it), and a flood that keeps a queue full keeps it full at
    /// the looks too.
    pub fn look<'a>(&mut self, sockets: impl Iterator<Item = &'a UdpSocket>, now: Duration) -> KernelDrops {
        let mut dropped = KernelDrops::default();
        for ((socket, last), room) in sockets.zip(self.looked.iter_mut()).zip(self.room.iter_mut()) {
            if let Ok(info) = meminfo(socket) {
                if let Some(before) = *last {
                    let n = u64::from(info.drops.wrapping_sub(before));
                    dropped.all += n;
                    if *room && info.room {
                        dropped.filtered += n;
                    }
                }
                *last = Some(info.drops);
                *room = info.room;
            }
        }
        self.looked_at = now;
        dropped
    }

    /// Brings the filters of `sockets` (always the same ones, in the same
    /// order) in line with `wanted`; returns the datagrams the kernel
    /// dropped for them while a filter that now came off was on.
    pub fn sync<'a>(&mut self, wanted: Option<Filter>, sockets: impl Iterator<Item = &'a UdpSocket> + Clone) -> u64 {
        if wanted == self.filter {
            return 0;
        }
        let Some(want) = wanted else {
            return self.clear(sockets);
        };
        let fresh = self.filter.is_none();
        for socket in sockets.clone() {
            if let Err(e) = attach(socket, want.client) {
                // User-space shedding still drops what passes.
                tracing::debug!(error = %e, "listener filter refused");
            }
        }
        if fresh {
            let infos: Vec<Option<MemInfo>> = sockets.map(|s| meminfo(s).ok()).collect();
            self.baselines = infos.iter().map(|i| i.map(|i| i.drops)).collect();
            self.room = infos.iter().map(|i| i.is_some_and(|i| i.room)).collect();
            // A look is due at once: it starts the counts from here.
            self.looked = self.baselines.clone();
            self.looked_at = Duration::ZERO;
        }
        tracing::debug!(client = ?want.client, until_ms = want.until.as_millis() as u64, "listener filter on");
        self.filter = Some(want);
        0
    }

    /// Takes any filter off `sockets`; returns what it dropped (see
    /// [`sync`](Self::sync)).
    pub fn clear<'a>(&mut self, sockets: impl Iterator<Item = &'a UdpSocket>) -> u64 {
        if self.filter.take().is_none() {
            return 0;
        }
        let mut dropped = 0;
        for (socket, baseline) in sockets.zip(std::mem::take(&mut self.baselines)) {
            if let Err(e) = detach(socket) {
                tracing::warn!(error = %e, "listener filter could not be taken off");
            }
            if let (Some(before), Ok(now)) = (baseline, drops(socket)) {
                dropped += u64::from(now.wrapping_sub(before));
            }
        }
        tracing::debug!(dropped, "listener filter off");
        dropped
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{SocketAddr, UdpSocket};

    fn id(s: &str) -> ClientId {
        ClientId::of(s.parse().unwrap())
    }

    fn receiver(addr: &str) -> UdpSocket {
        let r = UdpSocket::bind(addr).unwrap();
        r.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
        r
    }

    /// Sends one datagram naming `from` from `from` to `to`.
    fn send(from: &str, to: SocketAddr) {
        let s = UdpSocket::bind(from).unwrap();
        s.send_to(from.as_bytes(), to).unwrap();
    }

    /// Everything `r` has queued, as the senders named themselves.
    fn received(r: &UdpSocket) -> Vec<String> {
        let mut got = Vec::new();
        let mut buf = [0u8; 128];
        while let Ok(n) = r.recv(&mut buf) {
            got.push(String::from_utf8_lossy(&buf[..n]).into_owned());
        }
        got
    }

    #[test]
    fn an_ipv4_client_is_dropped_and_counted_and_the_others_pass() {
        let r = receiver("127.0.0.1:0");
        let to = r.local_addr().unwrap();
        let before = drops(&r).unwrap();
        attach(&r, id("127.0.0.2")).unwrap();
        for from in ["127.0.0.2:0", "127.0.0.3:0", "127.0.0.2:0", "127.0.0.1:0"] {
            send(from, to);
        }
        assert_eq!(received(&r), ["127.0.0.3:0", "127.0.0.1:0"]);
        assert_eq!(drops(&r).unwrap().wrapping_sub(before), 2);
        // Replaced: the other client is dropped now, the first passes.
        attach(&r, id("127.0.0.3")).unwrap();
        send("127.0.0.2:0", to);
        send("127.0.0.3:0", to);
        assert_eq!(received(&r), ["127.0.0.2:0"]);
        // Taken off: everyone passes, and taking it off twice is fine.
        detach(&r).unwrap();
        detach(&r).unwrap();
        send("127.0.0.3:0", to);
        assert_eq!(received(&r), ["127.0.0.3:0"]);
        assert_eq!(drops(&r).unwrap().wrapping_sub(before), 3);
    }

    /// With a filter on, a queue that fills drops other clients'
    /// datagrams: counted, but not as the filtered client's. Before, every
    /// drop of the listeners' sockets was taken to be the filtered
    /// client's.
    #[tokio::test]
    async fn a_full_queues_drops_are_not_the_filtered_clients() {
        let std = receiver("127.0.0.1:0");
        SockRef::from(&std).set_recv_buffer_size(4_096).unwrap();
        std.set_nonblocking(true).unwrap();
        let to = std.local_addr().unwrap();
        let reader = std.try_clone().unwrap();
        let r = tokio::net::UdpSocket::from_std(std).unwrap();
        let mut applied = Applied::default();
        let filter = Filter {
            client: id("127.0.0.2"),
            until: Duration::from_secs(60),
        };
        applied.sync(Some(filter), std::iter::once(&r));
        assert_eq!(applied.look(std::iter::once(&r), LOOK), KernelDrops::default());
        for _ in 0..10 {
            send("127.0.0.2:0", to);
        }
        let got = applied.look(std::iter::once(&r), 2 * LOOK);
        assert_eq!(got, KernelDrops { all: 10, filtered: 10 });
        // Another client fills the queue and more of its datagrams are
        // dropped; the filtered client's too, on the full queue.
        let other = std::net::UdpSocket::bind("127.0.0.3:0").unwrap();
        for _ in 0..200 {
            other.send_to(&[0; 1_000], to).unwrap();
        }
        send("127.0.0.2:0", to);
        let got = applied.look(std::iter::once(&r), 3 * LOOK);
        assert!(got.all > 10, "{got:?}");
        assert_eq!(got.filtered, 0, "{got:?}");
        // Read out, the queue has room again at the next looks.
        let mut buf = [0; 2_000];
        while reader.recv(&mut buf).is_ok() {}
        assert_eq!(applied.look(std::iter::once(&r), 4 * LOOK).filtered, 0);
        send("127.0.0.2:0", to);
        assert_eq!(
            applied.look(std::iter::once(&r), 5 * LOOK),
            KernelDrops { all: 1, filtered: 1 }
        );
    }

    #[test]
    fn an_ipv6_client_is_its_64_and_an_ipv4_filter_passes_ipv6() {
        let r = receiver("[::1]:0");
        let to = r.local_addr().unwrap();
        // A filter for an IPv4 client (its address bits those of ::1's
        // last word) and for another /64: IPv6 datagrams pass.
        attach(&r, ClientId::V4(1)).unwrap();
        send("[::1]:0", to);
        attach(&r, id("2001:db8::1")).unwrap();
        send("[::1]:0", to);
        assert_eq!(received(&r), ["[::1]:0", "[::1]:0"]);
        // ::1's /64 is ::/64: dropped, whatever the rest of the address.
        attach(&r, ClientId::V6Prefix(0)).unwrap();
        send("[::1]:0", to);
        assert!(received(&r).is_empty());
    }

    #[test]
    fn a_prefix_differing_in_either_word_passes() {
        let r = receiver("[::1]:0");
        let to = r.local_addr().unwrap();
        for prefix in [1u64 << 32, 1] {
            attach(&r, ClientId::V6Prefix(prefix)).unwrap();
            send("[::1]:0", to);
            assert_eq!(received(&r), ["[::1]:0"], "prefix {prefix:#x}");
        }
    }
}
