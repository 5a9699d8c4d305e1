//! Shedding in the kernel: a classic BPF socket filter on the listener
//! sockets that drops the held clients' datagrams (up to
//! [`super::shed::SLOTS`] of them) before they are queued.
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
//! The program matches each [`ClientId`] as the shedder counts them: an IPv4
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
//! the filtered clients' datagrams alone (see [`KernelDrops`]); with
//! several held, the samples [`program`] lets through say whose.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsFd;
use std::time::Duration;

use socket2::{SockFilter, SockRef};
use tokio::net::UdpSocket;

use super::key::ClientId;
use super::shed::{Filter, KernelDrops, LOOK, STILL_FLOODING};
use super::shed_exempt::{EXEMPT, ExemptFlow};

/// `SO_MEMINFO` (`asm-generic/socket.h`; the `libc` crate lacks it).
const SO_MEMINFO: libc::c_int = 55;
/// Words `SO_MEMINFO` returns (`SK_MEMINFO_VARS`).
const MEMINFO_WORDS: usize = 9;

const LD_B_ABS: u16 = (libc::BPF_LD | libc::BPF_B | libc::BPF_ABS) as u16;
const LD_H_ABS: u16 = (libc::BPF_LD | libc::BPF_H | libc::BPF_ABS) as u16;
const LD_W_ABS: u16 = (libc::BPF_LD | libc::BPF_W | libc::BPF_ABS) as u16;
const AND_K: u16 = (libc::BPF_ALU | libc::BPF_AND | libc::BPF_K) as u16;
const JEQ_K: u16 = (libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K) as u16;
const RET_K: u16 = (libc::BPF_RET | libc::BPF_K) as u16;
const JA: u16 = (libc::BPF_JMP | libc::BPF_JA) as u16;
const MOD_K: u16 = (libc::BPF_ALU | libc::BPF_MOD | libc::BPF_K) as u16;

/// `k` of a load `at` bytes into the IP header.
fn net(at: i32) -> u32 {
    (libc::SKF_NET_OFF + at) as u32
}

/// `k` of a load of the UDP header's source port and of its destination
/// port: a plain offset counts from the packet's data, which starts at the
/// UDP header when a UDP socket's filter runs (the IP header lies before
/// it, read at `SKF_NET_OFF`).
const SOURCE_PORT: u32 = 0;
const DESTINATION_PORT: u32 = 2;

/// Clients one program holds at most ([`super::shed::SLOTS`] asks for no
/// more): each client's own instructions, its flows let through included,
/// stay within one conditional jump's reach (255), and all of them within
/// the kernel's 4,096 (32 IPv6 /64s with [`EXEMPT`] flows each: some 3,300).
const MOST: usize = 32;

/// One in how many of a held client's datagrams the filter lets through
/// while it holds several clients (see [`program`]).
pub const SAMPLE: u32 = 16;

/// One held client and the flows of it the filter lets through.
#[derive(Debug, Clone, Copy)]
pub struct Held<'a> {
    pub client: ClientId,
    pub exempt: &'a [ExemptFlow],
}

/// Where a jump goes.
#[derive(Clone, Copy)]
enum To {
    /// The next instruction.
    Next,
    /// A label (see [`Asm::label`]).
    At(usize),
}

/// A classic BPF program being written, its jumps to labels resolved at
/// the end.
#[derive(Default)]
struct Asm {
    code: Vec<(u16, To, To, u32)>,
    labels: Vec<Option<usize>>,
}

impl Asm {
    /// A label, placed later with [`place`](Self::place).
    fn label(&mut self) -> usize {
        self.labels.push(None);
        self.labels.len() - 1
    }

    /// Puts `label` at the next instruction.
    fn place(&mut self, label: usize) {
        if let Some(l) = self.labels.get_mut(label) {
            *l = Some(self.code.len());
        }
    }

    fn op(&mut self, op: u16, k: u32) {
        self.code.push((op, To::Next, To::Next, k));
    }

    fn jeq(&mut self, k: u32, jt: To, jf: To) {
        self.code.push((JEQ_K, jt, jf, k));
    }

    fn ja(&mut self, to: usize) {
        self.code.push((JA, To::At(to), To::Next, 0));
    }

    /// The program; `None` if a jump goes backwards, to no label, or (a
    /// conditional one) further than its one-byte offset reaches.
    fn finish(self) -> Option<Vec<SockFilter>> {
        let offset = |at: usize, to: To| -> Option<usize> {
            let target = match to {
                To::Next => at + 1,
                To::At(label) => (*self.labels.get(label)?)?,
            };
            target.checked_sub(at + 1)
        };
        self.code
            .iter()
            .enumerate()
            .map(|(at, &(op, jt, jf, k))| {
                Some(if op == JA {
                    // An unconditional jump's offset is its `k`.
                    SockFilter::new(op, 0, 0, u32::try_from(offset(at, jt)?).ok()?)
                } else if op == JEQ_K {
                    let near = |to| u8::try_from(offset(at, to)?).ok();
                    SockFilter::new(op, near(jt)?, near(jf)?, k)
                } else {
                    SockFilter::new(op, 0, 0, k)
                })
            })
            .collect()
    }
}

/// The filter that drops the datagrams of every client in `clients` and
/// passes all others whole; with `sample`, one in that many of the held
/// clients' datagrams passes too. No flow is let through: see
/// [`exempting`].
pub fn program(clients: &[ClientId], sample: Option<u32>) -> Vec<SockFilter> {
    let held: Vec<Held<'_>> = clients.iter().map(|&client| Held { client, exempt: &[] }).collect();
    exempting(&held, sample)
}

/// The filter that drops the datagrams of every client in `held` but for
/// its flows let through (see [`super::shed_exempt`]), and passes all
/// others whole; with `sample`, one in that many of the held clients'
/// other datagrams passes too.
///
/// The kernel counts what a filter drops in one counter per socket: it
/// cannot say whose datagrams those were. With one client held they are
/// its own; with several, the few that pass (a random draw,
/// `SKF_AD_RANDOM`, one in [`SAMPLE`]) are the listener's only way to
/// tell which of them still floods, and to share the count out among
/// them (`shed::SharedShedder::kernel_dropped`). The listener sheds those
/// by hand, a sixteenth of what shedding them all by hand cost.
///
/// An IPv4 datagram's source is compared with each IPv4 client in turn,
/// an IPv6 one's first word of the /64 and then the second with each
/// IPv6 client; any other datagram passes. A held client's datagram is
/// then compared with each of its flows let through: the destination
/// address (at `SKF_NET_OFF`, as the source), the client's port and the
/// destination port (in the UDP header); one that matches passes. A
/// client's flows of the other family are left out (they cannot match).
pub fn exempting(held: &[Held<'_>], sample: Option<u32>) -> Vec<SockFilter> {
    let held = &held[..held.len().min(MOST)];
    assemble(held, sample).unwrap_or_else(|| {
        // Out of reach (not for MOST clients of EXEMPT flows each, which
        // the tests build): the clients held whole, as before.
        let whole: Vec<Held<'_>> = held.iter().map(|h| Held { exempt: &[], ..*h }).collect();
        assemble(&whole, sample).unwrap_or_default()
    })
}

/// The words of an IPv6 address, as the filter loads them.
fn words(ip: std::net::Ipv6Addr) -> [u32; 4] {
    let b = ip.to_bits();
    [(b >> 96) as u32, (b >> 64) as u32, (b >> 32) as u32, b as u32]
}

fn assemble(held: &[Held<'_>], sample: Option<u32>) -> Option<Vec<SockFilter>> {
    let mut a = Asm::default();
    let (v6, held_at, pass) = (a.label(), a.label(), a.label());
    let v4 = a.label();
    a.op(LD_B_ABS, net(0));
    a.op(AND_K, 0xf0);
    a.jeq(4 << 4, To::At(v4), To::Next);
    a.ja(v6);
    a.place(v4);
    a.op(LD_W_ABS, net(12));
    for h in held {
        let ClientId::V4(addr) = h.client else { continue };
        let other = a.label();
        a.jeq(addr, To::Next, To::At(other));
        let flows = h.exempt.iter().filter_map(|f| match f.dst.ip() {
            IpAddr::V4(ip) => Some((vec![(16, ip.to_bits())], f.port, f.dst.port())),
            IpAddr::V6(_) => None,
        });
        let through = exempt_flows(&mut a, flows, (held_at, pass));
        a.place(other);
        if through {
            // The flows' loads took the source's place.
            a.op(LD_W_ABS, net(12));
        }
    }
    a.ja(pass);
    a.place(v6);
    let is_v6 = a.label();
    a.jeq(6 << 4, To::At(is_v6), To::Next);
    a.ja(pass);
    a.place(is_v6);
    for h in held {
        let ClientId::V6Prefix(p) = h.client else { continue };
        let other = a.label();
        a.op(LD_W_ABS, net(8));
        a.jeq((p >> 32) as u32, To::Next, To::At(other));
        a.op(LD_W_ABS, net(12));
        a.jeq(p as u32, To::Next, To::At(other));
        let flows = h.exempt.iter().filter_map(|f| match f.dst.ip() {
            IpAddr::V6(ip) => {
                let w = words(ip);
                Some((
                    vec![(24, w[0]), (28, w[1]), (32, w[2]), (36, w[3])],
                    f.port,
                    f.dst.port(),
                ))
            }
            IpAddr::V4(_) => None,
        });
        exempt_flows(&mut a, flows, (held_at, pass));
        a.place(other);
    }
    a.ja(pass);
    a.place(held_at);
    if let Some(one_in) = sample.filter(|&n| n > 1) {
        let random = (libc::SKF_AD_OFF + libc::SKF_AD_RANDOM) as u32;
        a.op(LD_W_ABS, random);
        a.op(MOD_K, one_in);
        a.jeq(0, To::At(pass), To::Next);
    }
    a.op(RET_K, 0);
    a.place(pass);
    a.op(RET_K, u32::MAX);
    a.finish()
}

/// Writes a held client's checks of its flows let through (each the words
/// of its destination address at their offsets in the IP header, the
/// client's port and the destination port) and its jump to `held_at` for
/// everything else; a match passes. True when there was a flow to check.
fn exempt_flows(
    a: &mut Asm,
    flows: impl Iterator<Item = (Vec<(i32, u32)>, u16, u16)>,
    (held_at, pass): (usize, usize),
) -> bool {
    let through = a.label();
    let mut any = false;
    for (address, port, dst_port) in flows {
        any = true;
        let next = a.label();
        for (at, word) in address {
            a.op(LD_W_ABS, net(at));
            a.jeq(word, To::Next, To::At(next));
        }
        a.op(LD_H_ABS, SOURCE_PORT);
        a.jeq(u32::from(port), To::Next, To::At(next));
        a.op(LD_H_ABS, DESTINATION_PORT);
        a.jeq(u32::from(dst_port), To::At(through), To::Next);
        a.place(next);
    }
    a.ja(held_at);
    if any {
        // Past that jump: passes (a conditional jump may not reach the end).
        a.place(through);
        a.ja(pass);
    }
    any
}

/// Puts the filter for `clients` on `socket`, in place of any other (the
/// kernel swaps programs atomically: no datagram passes unfiltered);
/// with more than one, one in [`SAMPLE`] of their datagrams passes.
pub fn attach(socket: &impl AsFd, clients: &[ClientId]) -> io::Result<()> {
    let held: Vec<Held<'_>> = clients.iter().map(|&client| Held { client, exempt: &[] }).collect();
    attach_held(socket, &held)
}

/// [`attach`], letting each held client's flows in `held` through.
///
/// The kernel charges a filter's size to the socket's option memory
/// (`net.core.optmem_max`, 20 KiB by default before Linux 6.9): a program
/// it refuses is put on without the flows, the clients held whole, as
/// before.
pub fn attach_held(socket: &impl AsFd, held: &[Held<'_>]) -> io::Result<()> {
    let sample = (held.len() > 1).then_some(SAMPLE);
    let sock = SockRef::from(socket);
    match sock.attach_filter(&exempting(held, sample)) {
        Err(e) if held.iter().any(|h| !h.exempt.is_empty()) => {
            tracing::debug!(error = %e, "listener filter refused with flows let through; held whole");
            let whole: Vec<ClientId> = held.iter().map(|h| h.client).collect();
            sock.attach_filter(&program(&whole, sample))
        }
        other => other,
    }
}

/// Bytes one flow let through may carry a [`LOOK`], as a rate (see
/// [`Carried`]): [`STILL_FLOODING`] full-sized Ethernet datagrams. A game or a call sends a few hundred
/// bytes a few times a look; a video call at 3 Mbit/s some 19 KB. Counting
/// datagrams alone let a flow of 64 KB datagrams through whole below 16 a
/// look: some 80 MB a second over 8 such flows of a forger's own in the
/// lab, none of it shed.
pub const LIGHT_BYTES: u64 = STILL_FLOODING * 1_500;

/// How far ahead of time a flow let through may run: two [`LOOK`]s' worth
/// of a light flow's datagrams and bytes at once (a video call's key frame
/// comes as a burst), and a light flow's rate from there on.
const BURST: Duration = Duration::from_millis(2 * LOOK.as_millis() as u64);

/// What one flow let through carried: when it would be due again had it
/// kept to a light flow's rate, for its datagrams ([`STILL_FLOODING`] a
/// [`LOOK`]) and for its bytes ([`LIGHT_BYTES`] a [`LOOK`]), each a
/// theoretical arrival time in nanoseconds of the shedder's clock (the
/// generic cell rate algorithm: a token bucket kept as one time).
///
/// Why a rate and not a count per look: a look is due every [`LOOK`], but
/// a busy listener comes to it late, and a count of one look's worth then
/// withdrew a real flow that kept to the bounds (a tester's lab: a
/// 3 Mbit/s flow lost 407 of its 1,090 datagrams). The rate does not care
/// when the looks come; and each datagram is judged by when it came (the
/// listener passes its receive time), so that a queue read at once after
/// the relay fell behind is not taken for a burst.
#[derive(Debug, Clone, Copy, Default)]
struct Carried {
    datagrams_due: u64,
    bytes_due: u64,
    /// Ran further ahead than [`BURST`] since the last look.
    heavy: bool,
}

impl Carried {
    /// Counts a datagram of `len` bytes at `now` (ns); true when the flow
    /// now runs further ahead than a light flow may. A datagram past the
    /// bounds is not counted: it is shed.
    fn take(&mut self, len: usize, now: u64) -> bool {
        let look = LOOK.as_nanos() as u64;
        let datagrams = self.datagrams_due.max(now) + look / STILL_FLOODING;
        let bytes = self.bytes_due.max(now) + (len as u64).saturating_mul(look) / LIGHT_BYTES;
        let burst = BURST.as_nanos() as u64;
        if datagrams - now > burst || bytes - now > burst {
            self.heavy = true;
        } else {
            self.datagrams_due = datagrams;
            self.bytes_due = bytes;
        }
        self.heavy
    }
}

/// What a listener task counted of the held clients' exempt flows: one
/// count per flow slot of each hold, kept while the holds are the same.
#[derive(Debug, Default)]
struct Passed {
    counts: Vec<[Carried; EXEMPT]>,
}

/// What became of one datagram of an exempt flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Light: relayed, shed by no one.
    Light,
    /// Past a flood's rate or bytes in this look: shed, and the flow
    /// withdrawn.
    Heavy,
}

impl Passed {
    /// Starts over for `holds` holds.
    pub fn reset(&mut self, holds: usize) {
        self.counts.clear();
        self.counts.resize(holds, [Carried::default(); EXEMPT]);
    }

    /// Counts a datagram of `len` bytes of flow `slot` of hold `hold`, read
    /// at `now` (the shedder's clock).
    pub fn count(&mut self, hold: usize, slot: usize, len: usize, now: Duration) -> Verdict {
        let Some(c) = self.counts.get_mut(hold).and_then(|c| c.get_mut(slot)) else {
            return Verdict::Light;
        };
        let now = u64::try_from(now.as_nanos()).unwrap_or(u64::MAX);
        if c.take(len, now) {
            Verdict::Heavy
        } else {
            Verdict::Light
        }
    }

    /// The (hold, slot) of every flow that went past a light flow's rate
    /// or bytes since the last look.
    pub fn take_heavy(&mut self) -> Vec<(usize, usize)> {
        let mut heavy = Vec::new();
        for (hold, counts) in self.counts.iter_mut().enumerate() {
            for (slot, c) in counts.iter_mut().enumerate() {
                if std::mem::take(&mut c.heavy) {
                    heavy.push((hold, slot));
                }
            }
        }
        heavy
    }
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
    /// The holds the filter carries out, in the shedder's order; empty:
    /// no filter on.
    filters: Vec<Filter>,
    baselines: Vec<Option<u32>>,
    /// Each socket's drop counter when [`look`](Self::look) last read it,
    /// and when that was.
    looked: Vec<Option<u32>>,
    /// Whether each socket's queue had room then.
    room: Vec<bool>,
    looked_at: Duration,
    /// The held clients' datagrams the filter let through since the last
    /// look, one count per entry of `filters` (see [`program`]).
    samples: Vec<u64>,
    /// The datagrams of their flows let through since the last look.
    passed: Passed,
}

impl Applied {
    /// When the first of the holds on the sockets ends (a reading of
    /// [`super::shed::SharedShedder::now`]), if a filter is on.
    pub fn until(&self) -> Option<Duration> {
        self.filters.iter().map(|f| f.until).min()
    }

    /// The holds the filter on the sockets carries out.
    pub fn filters(&self) -> &[Filter] {
        &self.filters
    }

    /// Whether the filter lets some of its clients' datagrams through
    /// (it holds more than one).
    pub fn sampling(&self) -> bool {
        self.filters.len() > 1
    }

    /// What becomes of a datagram of `client` from its port `port` to
    /// `dst`, of `len` bytes, that the listener read: `None` unless it is
    /// one of a held client's flows the filter lets through, which is
    /// relayed while the flow is light and shed past a flood's rate or
    /// [`LIGHT_BYTES`] a [`LOOK`] (see [`super::shed_exempt`]), at `now`
    /// (the shedder's clock). Asked before [`sampled`](Self::sampled).
    #[inline]
    pub fn through(
        &mut self,
        client: ClientId,
        port: u16,
        dst: Option<SocketAddr>,
        len: usize,
        now: Duration,
    ) -> Option<Verdict> {
        if self.filters.is_empty() {
            return None;
        }
        let hold = self.filters.iter().position(|f| f.client == client)?;
        let slot = self.filters[hold].exempt.as_ref()?.position(port, dst?)?;
        Some(self.passed.count(hold, slot, len, now))
    }

    /// The flows let through that came at a flood's rate since the last
    /// call, each with its client: to be held with the rest of it
    /// (`shed::SharedShedder::withdraw`).
    pub fn take_heavy(&mut self) -> Vec<(ClientId, ExemptFlow)> {
        let heavy = self.passed.take_heavy();
        heavy
            .into_iter()
            .filter_map(|(hold, slot)| {
                let f = self.filters.get(hold)?;
                let flow = f.exempt.as_ref()?.flows_at(slot)?;
                Some((f.client, flow))
            })
            .collect()
    }

    /// Notes a datagram of `client` the listener read: true when that
    /// client is held, so the datagram is one the filter let through as
    /// a sample and is to be shed.
    pub fn sampled(&mut self, client: ClientId) -> bool {
        match self.filters.iter().position(|f| f.client == client) {
            Some(i) => {
                if let Some(n) = self.samples.get_mut(i) {
                    *n += 1;
                }
                true
            }
            None => false,
        }
    }

    /// When the listener is next to [`look`](Self::look) at what its
    /// filter drops, or a hold ends, whichever is first; `None` with no
    /// filter on.
    pub fn next_wake(&self) -> Option<Duration> {
        self.until().map(|until| until.min(self.looked_at + LOOK))
    }

    /// Whether a [`look`](Self::look) is due at `now`.
    pub fn look_due(&self, now: Duration) -> bool {
        !self.filters.is_empty() && now >= self.looked_at + LOOK
    }

    /// The datagrams `sockets` dropped since the last look (or since the
    /// filter went on), at `now`, and of those the filtered clients': the
    /// drops of sockets whose queue had room at this look and the last.
    /// A full queue drops anyone's datagrams (the filtered clients' never
    /// reach it), and a flood that keeps a queue full keeps it full at
    /// the looks too. Also returns the samples each held client had
    /// since the last look (in the order of [`filters`](Self::filters)).
    pub fn look<'a>(&mut self, sockets: impl Iterator<Item = &'a UdpSocket>, now: Duration) -> (KernelDrops, Vec<u64>) {
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
        let samples = std::mem::replace(&mut self.samples, vec![0; self.filters.len()]);
        (dropped, samples)
    }

    /// Brings the filters of `sockets` (always the same ones, in the same
    /// order) in line with `wanted`; returns the datagrams the kernel
    /// dropped for them while a filter that now came off was on.
    ///
    /// The program is rebuilt only when the held clients change: a hold
    /// that only moved its end needs none.
    pub fn sync<'a>(&mut self, wanted: &[Filter], sockets: impl Iterator<Item = &'a UdpSocket> + Clone) -> u64 {
        if wanted.is_empty() {
            return self.clear(sockets);
        }
        let same = wanted.len() == self.filters.len()
            && wanted
                .iter()
                .zip(&self.filters)
                .all(|(a, b)| a.client == b.client && a.exempt == b.exempt);
        if !same {
            let flows: Vec<Vec<ExemptFlow>> = wanted
                .iter()
                .map(|f| f.exempt.iter().flat_map(|e| e.flows().copied()).collect())
                .collect();
            let held: Vec<Held<'_>> = wanted
                .iter()
                .zip(&flows)
                .map(|(f, flows)| Held {
                    client: f.client,
                    exempt: flows,
                })
                .collect();
            for socket in sockets.clone() {
                if let Err(e) = attach_held(socket, &held) {
                    // User-space shedding still drops what passes.
                    tracing::debug!(error = %e, "listener filter refused");
                }
            }
            tracing::debug!(held = ?held, "listener filter on");
        }
        if self.filters.is_empty() {
            let infos: Vec<Option<MemInfo>> = sockets.map(|s| meminfo(s).ok()).collect();
            self.baselines = infos.iter().map(|i| i.map(|i| i.drops)).collect();
            self.room = infos.iter().map(|i| i.is_some_and(|i| i.room)).collect();
            // A look is due at once: it starts the counts from here.
            self.looked = self.baselines.clone();
            self.looked_at = Duration::ZERO;
        }
        if !same {
            self.samples = vec![0; wanted.len()];
            self.passed.reset(wanted.len());
        }
        self.filters = wanted.to_vec();
        0
    }

    /// Takes any filter off `sockets`; returns what it dropped (see
    /// [`sync`](Self::sync)).
    pub fn clear<'a>(&mut self, sockets: impl Iterator<Item = &'a UdpSocket>) -> u64 {
        if std::mem::take(&mut self.filters).is_empty() {
            return 0;
        }
        self.samples.clear();
        self.passed.reset(0);
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
    use crate::relay::shed::SLOTS;
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
        attach(&r, &[id("127.0.0.2")]).unwrap();
        for from in ["127.0.0.2:0", "127.0.0.3:0", "127.0.0.2:0", "127.0.0.1:0"] {
            send(from, to);
        }
        assert_eq!(received(&r), ["127.0.0.3:0", "127.0.0.1:0"]);
        assert_eq!(drops(&r).unwrap().wrapping_sub(before), 2);
        // Replaced: the other client is dropped now, the first passes.
        attach(&r, &[id("127.0.0.3")]).unwrap();
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

    /// What `applied` finds dropped at `now`, without the samples.
    fn drops_at(applied: &mut Applied, r: &tokio::net::UdpSocket, now: Duration) -> KernelDrops {
        applied.look(std::iter::once(r), now).0
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
            since: Duration::ZERO,
            exempt: None,
        };
        applied.sync(&[filter], std::iter::once(&r));
        assert_eq!(drops_at(&mut applied, &r, LOOK), KernelDrops::default());
        for _ in 0..10 {
            send("127.0.0.2:0", to);
        }
        let got = drops_at(&mut applied, &r, 2 * LOOK);
        assert_eq!(got, KernelDrops { all: 10, filtered: 10 });
        // Another client fills the queue and more of its datagrams are
        // dropped; the filtered client's too, on the full queue.
        let other = std::net::UdpSocket::bind("127.0.0.3:0").unwrap();
        for _ in 0..200 {
            other.send_to(&[0; 1_000], to).unwrap();
        }
        send("127.0.0.2:0", to);
        let got = drops_at(&mut applied, &r, 3 * LOOK);
        assert!(got.all > 10, "{got:?}");
        assert_eq!(got.filtered, 0, "{got:?}");
        // Read out, the queue has room again at the next looks.
        let mut buf = [0; 2_000];
        while reader.recv(&mut buf).is_ok() {}
        assert_eq!(drops_at(&mut applied, &r, 4 * LOOK).filtered, 0);
        send("127.0.0.2:0", to);
        assert_eq!(
            drops_at(&mut applied, &r, 5 * LOOK),
            KernelDrops { all: 1, filtered: 1 }
        );
    }

    #[test]
    fn an_ipv6_client_is_its_64_and_an_ipv4_filter_passes_ipv6() {
        let r = receiver("[::1]:0");
        let to = r.local_addr().unwrap();
        // A filter for an IPv4 client (its address bits those of ::1's
        // last word) and for another /64: IPv6 datagrams pass.
        attach(&r, &[ClientId::V4(1)]).unwrap();
        send("[::1]:0", to);
        attach(&r, &[id("2001:db8::1")]).unwrap();
        send("[::1]:0", to);
        assert_eq!(received(&r), ["[::1]:0", "[::1]:0"]);
        // ::1's /64 is ::/64: dropped, whatever the rest of the address.
        attach(&r, &[ClientId::V6Prefix(0)]).unwrap();
        send("[::1]:0", to);
        assert!(received(&r).is_empty());
    }

    /// `clients`' exact program (no samples) on `r`.
    fn hold(r: &UdpSocket, clients: &[ClientId]) {
        SockRef::from(r).attach_filter(&program(clients, None)).unwrap();
    }

    #[test]
    fn several_ipv4_clients_are_dropped_among_ipv6_ones_and_the_others_pass() {
        let r = receiver("127.0.0.1:0");
        let to = r.local_addr().unwrap();
        let before = drops(&r).unwrap();
        // Two IPv4 clients held among IPv6 ones (whose words are those of
        // other loopback addresses, and must not match them).
        let v6 = |s: &str| {
            let a = u64::from(u32::from(s.parse::<std::net::Ipv4Addr>().unwrap()));
            ClientId::V6Prefix(a << 32 | a)
        };
        hold(
            &r,
            &[
                v6("127.0.0.4"),
                id("127.0.0.2"),
                v6("127.0.0.5"),
                id("127.0.0.3"),
                id("2001:db8::1"),
            ],
        );
        for from in [
            "127.0.0.2:0",
            "127.0.0.4:0",
            "127.0.0.3:0",
            "127.0.0.5:0",
            "127.0.0.1:0",
            "127.0.0.3:0",
        ] {
            send(from, to);
        }
        assert_eq!(received(&r), ["127.0.0.4:0", "127.0.0.5:0", "127.0.0.1:0"]);
        assert_eq!(drops(&r).unwrap().wrapping_sub(before), 3);
        // The full set of slots, each held, the first and last included.
        let held: Vec<ClientId> = (2..2 + SLOTS).map(|i| id(&format!("127.0.0.{i}"))).collect();
        hold(&r, &held);
        for i in 1..=2 + SLOTS {
            send(&format!("127.0.0.{i}:0"), to);
        }
        assert_eq!(
            received(&r),
            ["127.0.0.1:0".to_string(), format!("127.0.0.{}:0", 2 + SLOTS)]
        );
    }

    #[test]
    fn several_ipv6_prefixes_are_matched_on_both_words_among_ipv4_clients() {
        let r = receiver("[::1]:0");
        let to = r.local_addr().unwrap();
        // ::1's /64 is ::/64. Prefixes differing from it in either word,
        // and IPv4 clients with its words: it passes.
        let near = [
            ClientId::V6Prefix(1 << 32),
            ClientId::V4(0),
            ClientId::V6Prefix(1),
            ClientId::V4(1),
        ];
        hold(&r, &near);
        send("[::1]:0", to);
        assert_eq!(received(&r), ["[::1]:0"]);
        // Among them, at any place: dropped.
        for at in 0..=near.len() {
            let mut held = near.to_vec();
            held.insert(at, ClientId::V6Prefix(0));
            hold(&r, &held);
            send("[::1]:0", to);
            assert!(received(&r).is_empty(), "held at {at}");
        }
    }

    /// Holding several, the filter lets some of their datagrams through
    /// (how the listener tells them apart), and not the others.
    #[test]
    fn holding_several_lets_a_sample_of_their_datagrams_through() {
        let r = receiver("127.0.0.1:0");
        let to = r.local_addr().unwrap();
        let before = drops(&r).unwrap();
        SockRef::from(&r)
            .attach_filter(&program(&[id("127.0.0.2"), id("127.0.0.3")], Some(2)))
            .unwrap();
        let s = UdpSocket::bind("127.0.0.2:0").unwrap();
        for _ in 0..200 {
            s.send_to(b"x", to).unwrap();
        }
        let passed = received(&r).len();
        let dropped = drops(&r).unwrap().wrapping_sub(before) as usize;
        assert_eq!(passed + dropped, 200);
        assert!(passed > 0 && dropped > 0, "passed {passed}, dropped {dropped}");
        // One held: no samples.
        attach(&r, &[id("127.0.0.2")]).unwrap();
        for _ in 0..200 {
            s.send_to(b"x", to).unwrap();
        }
        assert!(received(&r).is_empty());
    }

    /// The listener's bookkeeping: the held clients' datagrams read are
    /// samples, counted per client, and handed over at each look.
    #[tokio::test]
    async fn samples_are_counted_per_held_client_and_taken_at_each_look() {
        let std = receiver("127.0.0.1:0");
        std.set_nonblocking(true).unwrap();
        let r = tokio::net::UdpSocket::from_std(std).unwrap();
        let mut applied = Applied::default();
        let f = |c: &str, ms: u64| Filter {
            client: id(c),
            until: Duration::from_millis(ms),
            since: Duration::ZERO,
            exempt: None,
        };
        applied.sync(&[f("127.0.0.2", 100)], std::iter::once(&r));
        assert!(!applied.sampling());
        applied.sync(&[f("127.0.0.2", 100), f("127.0.0.3", 400)], std::iter::once(&r));
        assert!(applied.sampling());
        assert_eq!(applied.until(), Some(Duration::from_millis(100)));
        for c in ["127.0.0.3", "127.0.0.9", "127.0.0.3", "127.0.0.2"] {
            assert_eq!(applied.sampled(id(c)), c != "127.0.0.9");
        }
        assert_eq!(applied.look(std::iter::once(&r), LOOK).1, [1, 2]);
        assert_eq!(applied.look(std::iter::once(&r), 2 * LOOK).1, [0, 0]);
        // The first hold ends: the other's samples are its own.
        applied.sync(&[f("127.0.0.3", 400)], std::iter::once(&r));
        assert_eq!(applied.until(), Some(Duration::from_millis(400)));
        applied.sampled(id("127.0.0.3"));
        assert_eq!(applied.look(std::iter::once(&r), 3 * LOOK).1, [1]);
        applied.sync(&[], std::iter::once(&r));
        assert_eq!(applied.until(), None);
    }

    /// `held`'s exact program (no samples) on `r`, each with its flows.
    fn hold_with(r: &UdpSocket, held: &[(ClientId, Vec<ExemptFlow>)]) {
        SockRef::from(r)
            .attach_filter(&exempting(&borrowed(held), None))
            .unwrap();
    }

    /// Each held client with its flows, as the filter's builder takes them.
    fn borrowed(held: &[(ClientId, Vec<ExemptFlow>)]) -> Vec<Held<'_>> {
        held.iter()
            .map(|(client, exempt)| Held {
                client: *client,
                exempt,
            })
            .collect()
    }

    fn flow(port: u16, dst: SocketAddr) -> ExemptFlow {
        ExemptFlow { port, dst }
    }

    /// A flow let through stays light up to a flood's rate of datagrams
    /// and up to a light flow's bytes in a look, each flow counted apart,
    /// and a look starts the counts anew. Counting datagrams alone (as
    /// before) lets the 64 KB datagrams through.
    #[test]
    fn a_let_through_flow_is_heavy_past_a_floods_rate_or_a_light_flows_bytes() {
        let mut p = Passed::default();
        p.reset(2);
        let t = Duration::from_secs(7);
        // At once: two looks' worth (BURST) of datagrams, of bytes.
        let small = (0..2 * STILL_FLOODING)
            .map(|_| p.count(0, 0, 100, t))
            .collect::<Vec<_>>();
        assert!(small.iter().all(|v| *v == Verdict::Light));
        assert_eq!(p.count(0, 0, 100, t), Verdict::Heavy);
        // Full-sized datagrams: light up to LIGHT_BYTES, in another slot.
        for _ in 0..2 * LIGHT_BYTES / 1_500 {
            assert_eq!(p.count(0, 1, 1_500, t), Verdict::Light);
        }
        assert_eq!(p.count(0, 1, 1, t), Verdict::Heavy);
        // 64 KB datagrams: heavy from the first.
        assert_eq!(p.count(1, 0, 65_000, t), Verdict::Heavy);
        assert_eq!(p.take_heavy(), [(0, 0), (0, 1), (1, 0)]);
        assert_eq!(p.count(5, 0, 65_000, t), Verdict::Light, "no such hold");
        assert!(p.take_heavy().is_empty(), "a look takes what it reported");
        // Slot (1, 0) took nothing: a light datagram passes.
        assert_eq!(p.count(1, 0, 1_000, t), Verdict::Light);
    }

    /// The bounds are a rate, whenever the looks come: a 3 Mbit/s call
    /// (1,200-byte datagrams every 3.2 ms, 15.6 a look) stays light for a
    /// whole second with no look at all, and a flow twice as fast goes
    /// heavy once it has run two looks ahead (some 65 datagrams, 100 ms). A count of one look's worth, as before,
    /// withdrew the call whenever a look came late.
    #[test]
    fn a_let_through_flow_is_held_to_a_rate_however_late_the_looks_come() {
        let mut p = Passed::default();
        p.reset(1);
        let t = Duration::from_secs(7);
        let call: Vec<Verdict> = (0..312u32)
            .map(|i| p.count(0, 0, 1_200, t + i * Duration::from_micros(3_200)))
            .collect();
        assert!(call.iter().all(|v| *v == Verdict::Light));
        assert!(p.take_heavy().is_empty(), "the call was withdrawn");
        let t = t + Duration::from_secs(1);
        let twice: Vec<Verdict> = (0..200u32)
            .map(|i| p.count(0, 0, 1_200, t + i * Duration::from_micros(1_600)))
            .collect();
        let first_heavy = twice.iter().position(|v| *v == Verdict::Heavy);
        assert!(first_heavy.is_some_and(|i| (50..80).contains(&i)), "{first_heavy:?}");
        assert_eq!(p.take_heavy(), [(0, 0)]);
    }

    /// A held client's flow let through passes: from its port, to its
    /// destination address and port, each word of them compared; the
    /// rest of the client's datagrams are dropped, others pass.
    #[test]
    fn a_held_clients_flow_let_through_passes_and_nothing_else_of_it() {
        let r = receiver("127.0.0.1:0");
        let to = r.local_addr().unwrap();
        let s = UdpSocket::bind("127.0.0.2:0").unwrap();
        let port = s.local_addr().unwrap().port();
        let other_port = UdpSocket::bind("127.0.0.2:0").unwrap();
        let before = drops(&r).unwrap();
        let near = |ip: &str, p: u16| flow(port, SocketAddr::new(ip.parse().unwrap(), p));
        // Flows that are not this one: another destination address, port,
        // or client port; and one of another family.
        let others = vec![
            near("127.0.0.3", to.port()),
            near("127.0.0.1", to.port() ^ 1),
            flow(port ^ 1, to),
            near("::1", to.port()),
        ];
        hold_with(&r, &[(id("127.0.0.2"), others.clone())]);
        s.send_to(b"flow", to).unwrap();
        assert!(received(&r).is_empty());
        // Among them, at any place: passes, from that port only.
        for at in 0..=others.len() {
            let mut flows = others.clone();
            flows.insert(at, flow(port, to));
            hold_with(&r, &[(id("127.0.0.4"), vec![flow(port, to)]), (id("127.0.0.2"), flows)]);
            s.send_to(b"flow", to).unwrap();
            other_port.send_to(b"other port", to).unwrap();
            send("127.0.0.3:0", to);
            assert_eq!(received(&r), ["flow", "127.0.0.3:0"], "flow at {at}");
        }
        assert_eq!(drops(&r).unwrap().wrapping_sub(before), 1 + others.len() as u32 + 1);
    }

    #[test]
    fn an_ipv6_clients_flow_is_matched_on_every_word_of_its_destination() {
        let r = receiver("[::1]:0");
        let to = r.local_addr().unwrap();
        let s = UdpSocket::bind("[::1]:0").unwrap();
        let port = s.local_addr().unwrap().port();
        let at = |ip: &str| flow(port, SocketAddr::new(ip.parse().unwrap(), to.port()));
        // ::1 differing in each word in turn, and IPv4 flows: held.
        let others = vec![
            at("1::1"),
            at("0:0:1::1"),
            at("::1:0:0:1"),
            at("::2"),
            at("127.0.0.1"),
            flow(port, SocketAddr::new("0.0.0.1".parse().unwrap(), to.port())),
        ];
        let me = ClientId::V6Prefix(0);
        hold_with(&r, &[(me, others.clone())]);
        s.send_to(b"flow", to).unwrap();
        assert!(received(&r).is_empty());
        let mut flows = others;
        flows.push(at("::1"));
        hold_with(&r, &[(ClientId::V4(1), vec![at("::1")]), (me, flows)]);
        s.send_to(b"flow", to).unwrap();
        assert_eq!(received(&r), ["flow"]);
    }

    /// `count` clients, every one an IPv6 /64 with all its flows, the
    /// last client's last flow from `port` to `to`, the others' flows
    /// from other ports.
    fn v6_clients(count: usize, port: u16, to: SocketAddr) -> Vec<(ClientId, Vec<ExemptFlow>)> {
        let others = |c: u64| -> Vec<ExemptFlow> {
            (0..EXEMPT as u16)
                .map(|i| {
                    let dst = std::net::Ipv6Addr::from(u128::from(c) << 64 | 1);
                    flow(port ^ (i + 1), SocketAddr::new(dst.into(), to.port()))
                })
                .collect()
        };
        let mut held: Vec<(ClientId, Vec<ExemptFlow>)> =
            (1..count as u64).map(|c| (ClientId::V6Prefix(c), others(c))).collect();
        let mut last = others(0);
        last[EXEMPT - 1] = flow(port, to);
        held.push((ClientId::V6Prefix(0), last));
        held
    }

    /// The longest program the shedder asks for: every held client an
    /// IPv6 /64 with all its flows, its last flow matched like its first.
    /// And the longest one [`exempting`] builds keeps every jump within
    /// reach and the kernel's 4,096 instructions.
    #[test]
    fn the_longest_programs_fit_and_match() {
        let r = receiver("[::1]:0");
        let to = r.local_addr().unwrap();
        let s = UdpSocket::bind("[::1]:0").unwrap();
        let port = s.local_addr().unwrap().port();
        let held = v6_clients(SLOTS, port, to);
        hold_with(&r, &held);
        s.send_to(b"flow", to).unwrap();
        send("[::1]:0", to);
        assert_eq!(received(&r), ["flow"]);
        let most = v6_clients(MOST, port, to);
        let whole = assemble(&borrowed(&most), Some(SAMPLE)).expect("every jump within reach");
        assert!(
            whole.len() < 4_096 && whole.len() > MOST * EXEMPT * 12,
            "{}",
            whole.len()
        );
    }

    #[test]
    fn a_prefix_differing_in_either_word_passes() {
        let r = receiver("[::1]:0");
        let to = r.local_addr().unwrap();
        for prefix in [1u64 << 32, 1] {
            attach(&r, &[ClientId::V6Prefix(prefix)]).unwrap();
            send("[::1]:0", to);
            assert_eq!(received(&r), ["[::1]:0"], "prefix {prefix:#x}");
        }
    }
}
