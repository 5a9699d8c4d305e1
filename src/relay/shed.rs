//! Overload shedding: when the relay falls behind, the client sending the
//! most pays for it, not the others.
//!
//! The relay's worker reads every client's datagrams. When one client
//! floods (a backup pushing 64 KB datagrams, a P2P spray), the worker
//! never runs out of work, never sleeps, and so never gets the scheduler's
//! preference a waking thread gets: a quiet client's datagram then waits
//! until the busy worker is given a CPU again, for as long as the kernel
//! lets the flood's senders (and everything else) run first.
//!
//! The signal is each datagram's *sojourn*: how long it sat in the
//! listener's socket queue, from the kernel's receive timestamp
//! (`SO_TIMESTAMPNS`) to the moment the listener read it. The relay is
//! overloaded when another client's datagram waited longer than the
//! target (that client is already paying), or when the *heaviest* client's
//! own datagrams, those of the client that sent the most bytes in the
//! recent window, have all waited longer than the target for
//! [`INTERVAL`] (a standing queue, as CoDel judges one; a single late
//! datagram is not). Once overloaded, and until the listeners next find
//! every queue empty (their workers are about to sleep), the heaviest client's
//! datagrams are dropped (counted as `drops_total{reason="overload"}`);
//! for [`MEMORY`] after an overload, one late datagram of the heaviest
//! client starts the next at once, since its queue is known to build. Dropping costs a copy
//! out of the kernel, relaying costs a send and, in the sender's own
//! context, the kernel's delivery of it: the worker drains its queues and
//! sleeps, and wakes at once for the quiet client. The heavy client keeps
//! whatever the worker relays between episodes: the capacity left over.
//!
//! Never when only one client is active: one client alone cannot be
//! holding anyone up, and a single bulk sender must get all there is. Nor
//! when no client stands out: the heaviest is shed only while it sent more
//! than [`DOMINANCE`] times what the other active clients sent on average,
//! and at least [`LEAD`] more, and only while it sent at least a
//! [`SHARE`]th of all the recent bytes: a flood spread over many
//! addresses makes each of them light and some innocent client the
//! heaviest, whose datagrams are too small a part of the work for
//! dropping them to end the overload.
//! A burst of many clients sending alike (a LAN waking up, a game lobby
//! starting) that outruns the worker on a busy machine is not one client
//! holding up the others: shedding whichever of them happens to lead the
//! count would only drop a fair client's datagrams, so the kernel's queues
//! absorb it as they would without shedding.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use super::key::ClientId;
use super::shed_exempt::{Exempt, ExemptFlow};
use crate::sync::lock;

/// How long one window of the byte count lasts; "recent" is the last
/// window plus the current one.
const WINDOW: Duration = Duration::from_millis(250);
/// Clients followed per window at most; past that a newcomer takes the
/// lightest one's place (see [`Shedder::count`]), so a flooder is always
/// followed, however many light addresses were seen before it.
const TRACKED: usize = 64;
/// How long the heaviest client's datagrams must all have waited past the
/// target before that alone counts as an overload (CoDel's interval).
const INTERVAL: Duration = Duration::from_millis(100);
/// How long after an overload the heaviest client's late datagrams start
/// the next one at once.
const MEMORY: Duration = Duration::from_secs(1);
/// How many times the other active clients' average the heaviest client
/// must have sent to be shed: a flood (a 64 KB push, a spray of new flows,
/// a bulk stream among game flows) is far past it, one of several clients
/// sending alike is not.
const DOMINANCE: u64 = 2;
/// Bytes the heaviest client must have sent beyond the others' average to
/// be shed: while counts are small, one datagram more makes a client look
/// dominant. 64 KiB in the recent windows is more than one game flow
/// counts in them (60 datagrams a second, each counted as [`FLOOR`]
/// bytes: 45,000 in half a second), and one datagram of a 64 KB flood.
const LEAD: u64 = 64 << 10;
/// The heaviest client must also have sent at least this fraction
/// (1/`SHARE`) of all the recent bytes to be shed. A device spreading
/// its flood over many addresses of its own (a /24 of IPv4, any number
/// of forged ones) makes every one of them light: the heaviest client is
/// then some innocent one (an upload, a video call) whose bytes are a
/// small part of the work, so dropping them cannot end the overload and
/// only takes that client's datagrams, the flood's being relayed in
/// full. The lab had such a client lose all its datagrams to a flood
/// five times its size spread over 64 addresses. The relative test above
/// cannot see that: with many light clients their average is small.
const SHARE: u64 = 4;
/// Bytes a datagram counts at least: the relay's work is per packet, not
/// per byte, up to a full one (docs/BENCHMARKS.md measured 3.85 µs of
/// CPU per relayed 64-byte datagram and 3.68 µs per 1,200-byte one).
/// Counted by payload plus 64, a spray of one-byte datagrams weighed a
/// nineteenth of what 1,200-byte ones did for the same work: in the lab
/// a client uploading 100 datagrams of 1,200 bytes was shed, losing all
/// its datagrams while the relay was behind, for a spray of six times
/// as many one-byte datagrams from another client, which was relayed in
/// full. Bigger datagrams count their bytes: a 64 KB one is some 45
/// packets on the wire.
const FLOOR: u64 = 1_500;
/// How long the kernel drops a shed client's datagrams the first time
/// shedding starts (see [`SharedShedder::filter`]). Then they reach the
/// relay again: if the relay keeps up with them now, they are relayed, the
/// capacity left over; if not, the next late one (within [`MEMORY`])
/// starts the next overload and the next hold at once. Short enough that a
/// flood the relay can carry but for a hiccup loses little of it.
pub const HOLD: Duration = Duration::from_millis(100);
/// How many times longer each hold is than the one before, while the same
/// client is filtered again within [`MEMORY`] of its last hold's end, or
/// within as long as that hold lasted: 100 ms, 400 ms, 1.6 s, then
/// [`LONGEST`].
///
/// As long as the hold, not just [`MEMORY`]: after a long hold the relay
/// carries the returning flood for a while (its datagrams relayed end each
/// run of [`ARM`]) before it is late again: in the bench's 64 KB flood
/// that took 0.7 to 2.1 s after a 1.6 s hold, often past [`MEMORY`], and
/// the flood started again from [`HOLD`] (twice in 24 s, in a run of the
/// old doubling and in one of this growth with a window of [`MEMORY`]).
///
/// Each time a hold ends while the client still floods, its datagrams
/// queue at the listener again until the relay is late by the target and
/// a run of [`ARM`] bytes is shed by hand: the relay's worker busy with the
/// flood, the other clients' datagrams behind it. With a fixed 100 ms hold
/// that was a tenth of a lasting flood (in the bench's 64 KB flood the
/// filter went back on 66 times in 8 s, a median 16 ms after each hold),
/// and the slow round trips of the other clients' flows fell there.
/// Doubling up to 1.6 s still let a flood back in 22 times in 32 s (five
/// of them on the way up), and a 50 pps flow's p99 in the 150 ms after
/// each hold was 30.7 ms against 18.2 ms elsewhere. Growing four times
/// over, to [`LONGEST`], a flood that goes on is let back in a handful of
/// times a minute; a client that stopped is let in again soon anyway (see
/// [`QUIET`]) and its next flood starts from [`HOLD`], as does one that
/// floods again only longer after its last hold than that hold lasted.
const GROWTH: u32 = 4;
/// The longest hold, in [`HOLD`]s (6.4 s). What a lasting flood costs the
/// others comes at each hold's end; what the flooding client keeps of the
/// relay comes between holds, so past a few seconds a longer hold only
/// takes from a client that floods on and gives the others little more.
/// A hold ends early anyway once its client stops ([`QUIET`]).
const LONGEST: u32 = 64;
/// A hold ends early once the kernel has dropped fewer than
/// [`STILL_FLOODING`] of the client's datagrams in this long (as the
/// listeners report it, [`SharedShedder::kernel_dropped`]): the client
/// stopped, and a long hold must not keep out what it sends next.
pub const QUIET: Duration = Duration::from_millis(200);
/// How often a listener with a filter on looks at how many datagrams its
/// sockets dropped, and reports to the shedder.
pub const LOOK: Duration = Duration::from_millis(50);
/// Datagrams the kernel must drop within one [`LOOK`] on the listeners'
/// sockets, every listener task's together, for the client to count as
/// still flooding (320 a second: a
/// twentieth of a 64 KB flood the relay carries, nothing it ever had to
/// shed).
pub const STILL_FLOODING: u64 = 16;
/// Clients the kernel holds at once at most. Holding one, a device with
/// two addresses kept one held with a trickle of datagrams (above
/// [`STILL_FLOODING`]) while it flooded from the other, which was shed by
/// hand for as long as the first hold lasted (up to 6.4 s): a wake-up and
/// a copy per datagram, with the other clients' datagrams queued behind.
/// Each slot is two or four instructions of the filter every datagram
/// runs through; a device with more addresses than this floods from the
/// next one shed by hand, as before, and each address it floods from must
/// on its own be the heaviest client, more than twice the others'
/// average and a quarter of all the recent bytes, to be shed at all.
pub const SLOTS: usize = 4;
/// Bytes of one client (each datagram counted as at least [`FLOOR`]) the
/// listeners must have shed, none of another client's in between and the
/// last within [`MEMORY`], before the kernel is asked to drop that
/// client's datagrams. A shedding decision holds for one datagram; the
/// filter, for [`HOLD`] of everything the client sends. Where the
/// heaviest client only just counts as dominant (a busy client amid a
/// flood spread over many addresses, as the byte counts roll over), a few
/// of its datagrams are shed: the filter then took the requests it sent
/// in the next 100 ms as well (in the lab, 5 of 25). A lasting flood
/// passes this within a few of its datagrams (17 of 64 KB), and a flood
/// that sheds less costs the relay little to shed by hand.
///
/// A run ends when one of the client's datagrams is relayed: the relay
/// carried it then, and what was shed before was a hiccup's worth, not a
/// flood's. Counted across relayed datagrams, the few shed in each of
/// many brief overloads (a busy machine's scheduling delays, each over
/// within a millisecond) added up to a run, and a client sending 5,000
/// new flows a second, which the relay carried, was held in the kernel
/// 1.6 s at a time, again and again (see [`SharedShedder::offer`]).
const ARM: u64 = 1 << 20;

/// One client's bytes in the previous and the current window.
#[derive(Debug, Clone, Copy)]
struct Sent {
    client: ClientId,
    previous: u64,
    current: u64,
}

impl Sent {
    fn recent(&self) -> u64 {
        self.previous + self.current
    }
}

/// The shedding state: the byte counts and whether the relay is
/// overloaded (shared by the listeners through [`SharedShedder`]).
#[derive(Debug)]
pub struct Shedder {
    /// Sojourn past which the relay counts as overloaded; `None`: never.
    target: Option<Duration>,
    clients: Vec<Sent>,
    /// Index in `clients` of the one with the most recent bytes.
    heaviest: Option<usize>,
    /// Clients with bytes in the recent windows.
    active: usize,
    /// The recent bytes of all of them.
    total: u64,
    /// When the current window started (a monotonic reading).
    window_start: Duration,
    /// When it ends (`window_start + WINDOW`), kept rather than added up
    /// for every datagram: `Duration`'s addition normalises nanoseconds
    /// and checks for overflow, a good part of [`Shedder::roll`]'s cost.
    window_end: Duration,
    /// Overloaded: shedding until the queues are next empty.
    overloaded: bool,
    /// Since when every datagram of the heaviest client waited past the
    /// target.
    late_since: Option<Duration>,
    /// When the relay was last found overloaded.
    last_overload: Option<Duration>,
}

impl Shedder {
    /// A shedder for `target` (zero: never shed).
    pub fn new(target: Duration) -> Self {
        Shedder {
            target: (!target.is_zero()).then_some(target),
            clients: Vec::with_capacity(TRACKED),
            heaviest: None,
            active: 0,
            total: 0,
            window_start: Duration::ZERO,
            window_end: WINDOW,
            overloaded: false,
            late_since: None,
            last_overload: None,
        }
    }

    /// Changes the target (on reload).
    pub fn set_target(&mut self, target: Duration) {
        self.target = (!target.is_zero()).then_some(target);
        if self.target.is_none() {
            self.overloaded = false;
        }
    }

    /// Whether shedding is on at all (the listener asks for the time only
    /// then).
    pub fn enabled(&self) -> bool {
        self.target.is_some()
    }

    /// Counts a datagram of `client` of `len` bytes that waited `sojourn`
    /// (unknown: `None`), read at `now` (monotonic); true when it is to be
    /// dropped.
    ///
    /// Called for every datagram a listener reads while shedding is on
    /// (the default), so kept inline in [`SharedShedder::offer`]: the calls
    /// themselves were a fifth of its cost under callgrind.
    #[inline]
    pub fn offer(&mut self, client: ClientId, len: usize, sojourn: Option<Duration>, now: Duration) -> bool {
        let Some(target) = self.target else { return false };
        self.roll(now);
        let i = self.count(client, (len as u64).max(FLOOR));
        let heaviest = self.heaviest == Some(i);
        match sojourn {
            Some(s) if s > target && !heaviest => self.overloaded = true,
            Some(s) if s > target => {
                let since = *self.late_since.get_or_insert(now);
                let recently = self.last_overload.is_some_and(|t| now < t + MEMORY);
                if recently || now >= since + INTERVAL {
                    self.overloaded = true;
                }
            }
            Some(_) if heaviest => self.late_since = None,
            _ => {}
        }
        if !self.overloaded || self.active < 2 {
            return false;
        }
        self.last_overload = Some(now);
        heaviest && self.dominant(i)
    }

    /// Whether client `i` sent more than [`DOMINANCE`] times what the other
    /// active clients sent on average, [`LEAD`] more, and at least a
    /// [`SHARE`]th of all the recent bytes.
    fn dominant(&self, i: usize) -> bool {
        let mine = self.clients[i].recent();
        let others = self.total.saturating_sub(mine);
        let peers = self.active.saturating_sub(1).max(1) as u64;
        let average = others / peers;
        mine > average.saturating_mul(DOMINANCE) && mine - average >= LEAD && mine.saturating_mul(SHARE) >= self.total
    }

    /// The client that dominates the recent work (see [`Shedder::dominant`]),
    /// overloaded or not: the one that would be shed. `None` while shedding
    /// is off or only one client is active.
    pub fn dominant_client(&self) -> Option<ClientId> {
        if self.target.is_none() || self.active < 2 {
            return None;
        }
        let i = self.heaviest?;
        let sent = self.clients.get(i)?;
        self.dominant(i).then_some(sent.client)
    }

    /// The kernel's filter dropped `datagrams` of `client` (see
    /// [`SharedShedder::kernel_dropped`]), reported at `now`: counted as
    /// that client's, each as [`FLOOR`] bytes (their sizes are not known),
    /// as if the listener had read and shed them.
    ///
    /// Uncounted, a held flood vanished from the windows while it went on
    /// (a hold grows up to 6.4 s, past the two windows): in the lab, a
    /// spray of one-byte datagrams held for 400 ms counted 75,000 bytes
    /// (50 datagrams the listener read between holds) against the 309,000
    /// of a client uploading beside it, and that client, the heaviest now,
    /// was shed in the next late round (its five requests lost) while the
    /// spray went on at six times its datagrams.
    pub fn dropped_in_kernel(&mut self, client: ClientId, datagrams: u64, now: Duration) {
        if self.target.is_none() {
            return;
        }
        self.roll(now);
        self.count(client, datagrams.saturating_mul(FLOOR));
    }

    /// Every listener found its queues empty: the overload, if any, is over.
    pub fn drained(&mut self) {
        self.overloaded = false;
        self.late_since = None;
    }

    /// Starts a new window when the current one is over.
    #[inline]
    fn roll(&mut self, now: Duration) {
        if now < self.window_end {
            return;
        }
        self.new_window(now);
    }

    /// [`Shedder::roll`] past the window's end: once a window, not per
    /// datagram, so out of line.
    #[cold]
    fn new_window(&mut self, now: Duration) {
        let skipped = now >= self.window_start + 2 * WINDOW;
        self.window_start = now;
        self.window_end = now + WINDOW;
        self.clients.retain_mut(|s| {
            s.previous = if skipped { 0 } else { s.current };
            s.current = 0;
            s.previous > 0
        });
        self.recount();
    }

    /// Adds `bytes` to `client`; returns its index (`usize::MAX` only if
    /// the table could hold nobody).
    ///
    /// The heaviest client is looked at first: a busy listener's datagrams
    /// are mostly its (a bulk flow, a flood), and a client is in `clients`
    /// at most once, so finding it there is finding it.
    #[inline]
    fn count(&mut self, client: ClientId, bytes: u64) -> usize {
        if let Some(h) = self.heaviest
            && let Some(s) = self.clients.get_mut(h)
            && s.client == client
        {
            // Still the heaviest with more bytes.
            s.current += bytes;
            self.total += bytes;
            return h;
        }
        let i = match self.clients.iter().position(|s| s.client == client) {
            Some(i) => i,
            None if self.clients.len() < TRACKED => {
                self.clients.push(Sent {
                    client,
                    previous: 0,
                    current: 0,
                });
                self.active += 1;
                self.clients.len() - 1
            }
            // Full: the newcomer takes the place of the lightest client,
            // counted from that one's bytes (as the Space-Saving count
            // does). Ignoring it instead let a device fill the table with
            // light addresses of its own and flood from one more: never
            // counted, never shed, while its late datagrams made the
            // relay overloaded and the heaviest client the table knew,
            // a quiet one, was shed in its place.
            None => {
                let lightest = self
                    .clients
                    .iter()
                    .enumerate()
                    .min_by_key(|(_, s)| s.recent())
                    .map(|(i, _)| i);
                let Some(i) = lightest else { return usize::MAX };
                self.clients[i].client = client;
                i
            }
        };
        self.clients[i].current += bytes;
        self.total += bytes;
        let most = self.heaviest.map_or(0, |h| self.clients[h].recent());
        if self.clients[i].recent() > most {
            self.heaviest = Some(i);
        }
        i
    }

    fn recount(&mut self) {
        self.active = self.clients.len();
        self.total = self.clients.iter().map(Sent::recent).sum();
        self.heaviest = self
            .clients
            .iter()
            .enumerate()
            .max_by_key(|(_, s)| s.recent())
            .map(|(i, _)| i);
    }
}

/// The one shedder of a relay, shared by all its listener tasks: every
/// listen address and every worker.
///
/// When it sheds a client it also asks the listeners to have the kernel
/// drop that client's datagrams for [`HOLD`] ([`filter`](Self::filter),
/// [`super::shed_filter`]): shedding in user space still costs the worker
/// a wake-up and a copy per datagram, a 64 KB one's copy being most of what
/// relaying it costs the listener.
///
/// A shedder per listener task judged each address's clients apart: a
/// flood over IPv6 was never shed for an IPv4 client's sake, nor the
/// reverse, although both wait for the same worker threads. (In the lab,
/// a v6 flood with a v4 client's datagrams late behind it shed nothing:
/// each listener saw one client alone.) The lock is taken once per
/// datagram while shedding is on and once per listener wake-up; no one
/// holds it across anything but the count.
#[derive(Debug)]
pub struct SharedShedder {
    state: Mutex<Shared>,
    /// The origin of the monotonic readings all listeners pass.
    start: Instant,
    /// Whether `Shared::filter` is set, as of the last change under the
    /// lock: a listener with no filter on looks here, not under the lock
    /// (and without a clock reading), after every round. Another
    /// listener task may see a new filter one round late; user-space
    /// shedding drops what passes meanwhile.
    filtering: AtomicBool,
}

#[derive(Debug)]
struct Shared {
    shedder: Shedder,
    /// Listener tasks whose last round ended with datagrams still queued.
    behind: usize,
    /// The clients the kernel is to drop, each until when (monotonic), at
    /// most [`SLOTS`], in the order they were held.
    holds: Vec<Hold>,
    /// The client shed last, the bytes shed of it since another was (or
    /// since a pause of [`MEMORY`]), and when.
    shed_run: Option<(ClientId, u64, Duration)>,
    /// Each recently held client, when its last hold ends (or ended), and
    /// how long it was, in [`HOLD`]s (see [`GROWTH`]); a client's entry
    /// goes once its hold ended because it stopped, or once it could no
    /// longer make the next hold longer.
    last_holds: Vec<LastHold>,
}

/// A recently held client (see `Shared::last_holds`).
#[derive(Debug, Clone, Copy)]
struct LastHold {
    client: ClientId,
    /// When its last hold ends (or ended).
    end: Duration,
    /// How long that hold was, in [`HOLD`]s.
    holds: u32,
    /// When the first hold of this run of growing holds began: the flows
    /// it lets through were opened well before that (see
    /// [`super::shed_exempt`]), and a flood going on through many holds
    /// never has its own flows count as established.
    since: Duration,
}

/// One client the kernel holds.
#[derive(Debug, Clone, Copy)]
struct Hold {
    filter: Filter,
    /// When the listeners last saw the kernel drop this client's
    /// datagrams at a flood's rate (or its hold began).
    dropping_at: Duration,
    /// What the listener tasks reported dropped of it since the first
    /// report of this [`LOOK`] (when that was, and the sum): each task
    /// looks at its own sockets only, and a flood queued in the sockets of
    /// several tasks shows each of them a share of its rate.
    reported: (Duration, u64),
    /// A listener task is choosing the flows this hold lets through
    /// ([`SharedShedder::claim_exempt`]).
    choosing: bool,
}

/// A client whose datagrams the listener sockets' filters drop, and until
/// when (a reading of [`SharedShedder::now`]), but for the flows it lets
/// through (see [`super::shed_exempt`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Filter {
    pub client: ClientId,
    pub until: Duration,
    /// When the first hold of the client's run of growing holds began.
    pub since: Duration,
    /// Its established light flows, let through; `None` until a listener
    /// has chosen them from the session table ([`SharedShedder::exempt`]).
    pub exempt: Option<Exempt>,
}

/// What a listener's sockets dropped while a filter was on, from their
/// drop counters (`shed_filter::Applied::look`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct KernelDrops {
    /// Every drop: the filter's, and those of a queue that was full.
    pub all: u64,
    /// Drops on sockets whose queue had room: the filter's alone, so the
    /// filtered client's datagrams.
    pub filtered: u64,
}

impl SharedShedder {
    /// A shedder for `target` (zero: never shed).
    pub fn new(target: Duration) -> Self {
        SharedShedder {
            state: Mutex::new(Shared {
                shedder: Shedder::new(target),
                behind: 0,
                holds: Vec::with_capacity(SLOTS),
                shed_run: None,
                last_holds: Vec::new(),
            }),
            start: Instant::now(),
            filtering: AtomicBool::new(false),
        }
    }

    /// The monotonic reading [`offer`](Self::offer) takes.
    pub fn now(&self) -> Duration {
        self.at(Instant::now())
    }

    /// [`now`](Self::now) at `instant`, a clock reading the caller took
    /// anyway.
    pub fn at(&self, instant: Instant) -> Duration {
        instant.saturating_duration_since(self.start)
    }

    /// Whether a kernel filter may be wanted: false means
    /// [`filter`](Self::filter) would say `None` (see `filtering`).
    pub fn filtering(&self) -> bool {
        self.filtering.load(Ordering::Relaxed)
    }

    /// [`Shedder::offer`], with the target as it is now (reload).
    pub fn offer(
        &self,
        target: Duration,
        client: ClientId,
        len: usize,
        sojourn: Option<Duration>,
        now: Duration,
    ) -> bool {
        let mut s = lock(&self.state);
        s.shedder.set_target(target);
        let shed = s.shedder.offer(client, len, sojourn, now);
        if shed {
            s.arm(client, len, now);
            self.filtering.store(!s.holds.is_empty(), Ordering::Relaxed);
        } else {
            s.relayed(client);
        }
        shed
    }

    /// The clients the listener sockets should drop at `now`: each one
    /// shed, for its hold after its shedding (re)started, and only while
    /// the kernel still drops its datagrams (see [`QUIET`]). Each hold
    /// ends on its own schedule.
    pub fn filter(&self, now: Duration) -> Vec<Filter> {
        let mut s = lock(&self.state);
        if !s.holds.is_empty() {
            let Shared { holds, last_holds, .. } = &mut *s;
            holds.retain(|h| {
                if now >= h.dropping_at + QUIET {
                    // The client stopped: its next flood starts from HOLD.
                    last_holds.retain(|l| l.client != h.filter.client);
                    false
                } else {
                    now < h.filter.until
                }
            });
            self.filtering.store(!s.holds.is_empty(), Ordering::Relaxed);
        }
        s.holds.iter().map(|h| h.filter).collect()
    }

    /// Whether the calling listener task is the one to choose the flows
    /// `client`'s hold lets through: the first to ask, while none are
    /// chosen. Choosing walks the client's flows under the session table's
    /// lock (up to 2.6 ms at 16,384 flows), and every task that saw the
    /// new hold before the flows were chosen used to walk them too.
    pub fn claim_exempt(&self, client: ClientId) -> bool {
        let mut s = lock(&self.state);
        match s.holds.iter_mut().find(|h| h.filter.client == client) {
            Some(h) if h.filter.exempt.is_none() && !h.choosing => {
                h.choosing = true;
                true
            }
            _ => false,
        }
    }

    /// The flows of `client`'s hold to let through, as the listener task
    /// that claimed them ([`SharedShedder::claim_exempt`]) chose them from
    /// the session table; a hold whose flows were chosen keeps them.
    pub fn exempt(&self, client: ClientId, flows: Exempt) {
        let mut s = lock(&self.state);
        if let Some(h) = s.holds.iter_mut().find(|h| h.filter.client == client) {
            h.filter.exempt.get_or_insert(flows);
        }
    }

    /// A flow of `client` that its hold let through came at a flood's
    /// rate: it is held with the rest of the client's datagrams for the
    /// rest of the hold (see [`super::shed_exempt`]).
    pub fn withdraw(&self, client: ClientId, flow: &ExemptFlow) {
        let mut s = lock(&self.state);
        if let Some(exempt) = s
            .holds
            .iter_mut()
            .find(|h| h.filter.client == client)
            .and_then(|h| h.filter.exempt.as_mut())
        {
            exempt.remove(flow);
        }
    }

    /// A listener task's sockets dropped `dropped` datagrams of the
    /// clients `held` (its filter's, in its order) since it last looked
    /// ([`LOOK`] ago or more), at `now`, and the filter let `samples`
    /// through of each (the same order): once the tasks' reports of a
    /// client within one [`LOOK`] add up to [`STILL_FLOODING`] or more,
    /// it is still flooding and its hold stays.
    ///
    /// With one client held, what its filter dropped is all its own. With
    /// several, the kernel's count is shared out among them as the
    /// samples were ([`super::shed_filter::SAMPLE`]): a held client that
    /// stopped has none, gets none, and is let in within [`QUIET`],
    /// however much another held client floods. Shared out evenly, or
    /// judged on the sum, one flooding address kept a stopped one held,
    /// one the device had got held in another client's name among them.
    ///
    /// Those dropped where the queue had room also count as the client's
    /// work (see [`Shedder::dropped_in_kernel`]): a held flood stays the
    /// heaviest client while it goes on. A full queue's drops are
    /// another client's datagrams (the filtered one's never reach the
    /// queue): counted as the filtered client's, a device flooding past
    /// what the relay reads made a client held before it the heaviest and
    /// had it shed and held again, while its own flood went on unshed.
    ///
    /// Summed, not judged report by report: with two workers each task
    /// serves half of the listening sockets, and a flood from two client
    /// sockets that queue in different halves showed each task half its
    /// rate. Judged apart, a flood of up to twice the threshold's rate
    /// counted as stopped on both: its hold ended after [`QUIET`] and the
    /// next started from [`HOLD`] again, never growing.
    pub fn kernel_dropped(&self, held: &[ClientId], dropped: KernelDrops, samples: &[u64], now: Duration) {
        if dropped.all == 0 || held.is_empty() {
            return;
        }
        let sampled: u64 = samples.iter().sum();
        let mut s = lock(&self.state);
        for (i, &client) in held.iter().enumerate() {
            let share = |n: u64| match held.len() {
                1 => n,
                _ if sampled == 0 => 0,
                _ => n.saturating_mul(samples.get(i).copied().unwrap_or(0)) / sampled,
            };
            let (all, filtered) = (share(dropped.all), share(dropped.filtered));
            if filtered > 0 {
                s.shedder.dropped_in_kernel(client, filtered, now);
            }
            let Some(h) = s.holds.iter_mut().find(|h| h.filter.client == client) else {
                continue;
            };
            let (since, sum) = h.reported;
            let sum = if now >= since + LOOK {
                h.reported.0 = now;
                all
            } else {
                sum + all
            };
            h.reported.1 = sum;
            if sum >= STILL_FLOODING {
                h.dropping_at = h.dropping_at.max(now);
            }
        }
    }

    /// When the [`now`](Self::now) reading `at` falls.
    pub fn instant(&self, at: Duration) -> Instant {
        self.start + at
    }

    /// [`Shedder::dominant_client`]: the pool readers serve that client's
    /// replies after the others' (see `relay::reply_order`).
    pub fn dominant_client(&self) -> Option<ClientId> {
        lock(&self.state).shedder.dominant_client()
    }

    /// A listener task's round ended with datagrams still queued
    /// (`behind`) or with its queues empty; `was_behind` is what its round
    /// before said. The overload is over only when no listener is behind:
    /// one listener's empty queues say nothing of another's flood.
    pub fn round_ended(&self, was_behind: bool, behind: bool) {
        if was_behind && behind {
            return;
        }
        let mut s = lock(&self.state);
        if behind {
            s.behind += 1;
        } else if was_behind {
            s.behind = s.behind.saturating_sub(1);
        }
        if !behind && s.behind == 0 {
            s.shedder.drained();
        }
    }
}

impl Shared {
    /// `client`'s datagram was not shed: a run of its shedding (see
    /// [`ARM`]) is over. Without this, one late datagram a while after
    /// each hold, at most a second apart, shed a few more and put the
    /// filter back on with a longer hold: in the lab, a client that had
    /// flooded and then sent at 5,000 new flows a second, a rate the relay
    /// carries, had 88,557 datagrams shed in 20 s, 80,552 of them by the
    /// filter, and 7,630 of its 20,000 destinations never answered.
    fn relayed(&mut self, client: ClientId) {
        if self.shed_run.is_some_and(|(c, _, _)| c == client) {
            self.shed_run = None;
        }
    }

    /// `client`'s datagram of `len` bytes was shed at `now`: past [`ARM`]
    /// bytes of it in a row, the kernel's filter goes (back) on for it,
    /// beside any other clients held, while fewer than [`SLOTS`] are. A
    /// datagram shed here means the filter is not on for this client
    /// (yet, or any more).
    fn arm(&mut self, client: ClientId, len: usize, now: Duration) {
        let bytes = (len as u64).max(FLOOR);
        let run = match self.shed_run {
            Some((c, shed, last)) if c == client && now < last + MEMORY => shed + bytes,
            _ => bytes,
        };
        self.shed_run = Some((client, run, now));
        if run < ARM {
            return;
        }
        self.holds.retain(|h| now < h.filter.until);
        if self.holds.len() >= SLOTS || self.holds.iter().any(|h| h.filter.client == client) {
            return;
        }
        // Forgotten once they can no longer lengthen a hold.
        self.last_holds.retain(|l| now < l.end + MEMORY.max(HOLD * l.holds));
        // Back within MEMORY of its last hold, or within as long as that
        // hold lasted: the next one is longer (see GROWTH).
        let last = self.last_holds.iter().position(|l| l.client == client);
        let (holds, since) = match last.map(|i| self.last_holds[i]) {
            Some(l) => (l.holds.saturating_mul(GROWTH).min(LONGEST), l.since),
            None => (1, now),
        };
        let until = now + HOLD * holds;
        self.holds.push(Hold {
            filter: Filter {
                client,
                until,
                since,
                exempt: None,
            },
            dropping_at: now,
            reported: (Duration::ZERO, 0),
            choosing: false,
        });
        let entry = LastHold {
            client,
            end: until,
            holds,
            since,
        };
        match last {
            Some(i) => self.last_holds[i] = entry,
            None => self.last_holds.push(entry),
        }
    }
}

/// How long a datagram stamped `received` (`CLOCK_REALTIME`, as the
/// kernel stamps with `SO_TIMESTAMPNS`) has waited at `now` (the same
/// clock); `None` when unknown, or when the clock stepped back.
pub fn sojourn(received: Option<Duration>, now: Duration) -> Option<Duration> {
    received.and_then(|r| now.checked_sub(r))
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    fn id(s: &str) -> ClientId {
        ClientId::of(s.parse().unwrap())
    }

    /// The one client held at `now`, if any.
    fn one(s: &SharedShedder, now: Duration) -> Option<Filter> {
        let held = s.filter(now);
        assert!(held.len() <= 1, "{held:?}");
        held.first().copied()
    }

    /// The relay falls behind (its listener's round ended with datagrams
    /// left), and a flood and a quiet client each have a datagram offered:
    /// the set-up of every hold. Says whether each was shed.
    fn fall_behind(s: &SharedShedder, flood: ClientId, quiet: ClientId, now: Duration) -> [bool; 2] {
        s.round_ended(false, true);
        [
            s.offer(5 * MS, flood, 65_000, Some(MS), now),
            s.offer(5 * MS, quiet, 100, Some(20 * MS), now),
        ]
    }

    /// `n` datagrams the filter dropped, every queue with room.
    fn held(n: u64) -> KernelDrops {
        KernelDrops { all: n, filtered: n }
    }

    /// A hold's flows let through are chosen once (by the listener task
    /// that claims them first), one that came at a flood's rate is taken out, and a run of
    /// growing holds keeps when its first began: the flood's own flows,
    /// opened as it started, never count as established in a later one.
    #[test]
    fn a_holds_flows_let_through_are_chosen_once_and_a_heavy_one_withdrawn() {
        let (flood, quiet) = (id("192.0.2.10"), id("192.0.2.11"));
        let s = SharedShedder::new(5 * MS);
        let now = 10 * MS;
        assert_eq!(fall_behind(&s, flood, quiet, now), [false, false]);
        for _ in 0..ARM.div_ceil(65_000) {
            assert!(s.offer(5 * MS, flood, 65_000, Some(MS), now));
        }
        let held = one(&s, now).unwrap();
        assert_eq!((held.since, held.exempt), (now, None));
        let flow = |port| ExemptFlow {
            port,
            dst: "198.51.100.7:6000".parse().unwrap(),
        };
        // One task claims the choice; the others do not walk the table.
        assert!(s.claim_exempt(flood));
        assert!(!s.claim_exempt(flood), "two tasks would both walk the table");
        assert!(!s.claim_exempt(quiet), "not held: nothing to choose");
        s.exempt(flood, Exempt::new([flow(1), flow(2)]));
        assert!(!s.claim_exempt(flood), "chosen already");
        s.exempt(flood, Exempt::new([flow(3)]));
        s.exempt(quiet, Exempt::new([flow(3)]));
        let flows = |s: &SharedShedder| -> Vec<ExemptFlow> {
            one(s, now)
                .and_then(|f| f.exempt)
                .iter()
                .flat_map(|e| e.flows().copied().collect::<Vec<_>>())
                .collect()
        };
        assert_eq!(flows(&s), [flow(1), flow(2)]);
        s.withdraw(flood, &flow(1));
        s.withdraw(quiet, &flow(2));
        assert_eq!(flows(&s), [flow(2)]);
        // It ends; the flood goes on and is held again, longer, its flows
        // to choose anew, from before the first hold.
        let later = now + HOLD + MS;
        assert_eq!(one(&s, later), None);
        assert!(s.offer(5 * MS, flood, 65_000, Some(MS), later));
        let again = one(&s, later).unwrap();
        assert_eq!(
            (again.until, again.since, again.exempt),
            (later + GROWTH * HOLD, now, None)
        );
        assert!(s.claim_exempt(flood), "a new hold is chosen for anew");
    }

    #[test]
    fn only_the_heaviest_client_is_shed_and_only_while_overloaded() {
        let (heavy, light) = (id("192.0.2.10"), id("192.0.2.11"));
        let mut s = Shedder::new(5 * MS);
        let now = 10 * MS;
        // Fresh datagrams: nothing is shed.
        assert!(!s.offer(heavy, 65_000, Some(MS), now));
        assert!(!s.offer(light, 100, Some(MS), now));
        assert!(!s.offer(heavy, 65_000, Some(MS), now));
        // The heavy client's own late datagrams: not before they have all
        // been late for an interval.
        assert!(!s.offer(heavy, 65_000, Some(9 * MS), now));
        assert!(!s.offer(heavy, 65_000, Some(9 * MS), now + INTERVAL - MS));
        // Then the heavy client is shed, even its fresh datagrams, the
        // light one never, late or not.
        assert!(s.offer(heavy, 65_000, Some(9 * MS), now + INTERVAL));
        assert!(s.offer(heavy, 65_000, Some(MS), now + INTERVAL));
        assert!(!s.offer(light, 100, Some(20 * MS), now));
        assert!(!s.offer(light, 100, Some(MS), now));
        // The queues ran empty: relayed again.
        s.drained();
        let now = now + INTERVAL;
        assert!(!s.offer(heavy, 65_000, Some(MS), now));
        // Soon after, one late datagram of the heavy client is enough.
        assert!(s.offer(heavy, 65_000, Some(6 * MS), now + MS));
        s.drained();
        // Long after, a light client's late datagram starts an overload at
        // once: it is the one paying.
        let later = now + MEMORY + INTERVAL;
        assert!(!s.offer(heavy, 65_000, Some(6 * MS), later));
        assert!(!s.offer(light, 100, Some(7 * MS), later));
        assert!(s.offer(heavy, 65_000, None, later));
    }

    #[test]
    fn the_dominant_client_is_named_overloaded_or_not_and_only_among_several() {
        let (heavy, light) = (id("192.0.2.10"), id("192.0.2.11"));
        let mut s = Shedder::new(5 * MS);
        let now = 10 * MS;
        assert!(!s.offer(heavy, 65_000, Some(MS), now));
        // Alone: not dominant over anyone.
        assert_eq!(s.dominant_client(), None);
        assert!(!s.offer(light, 100, Some(MS), now));
        assert!(!s.offer(heavy, 65_000, Some(MS), now));
        assert_eq!(s.dominant_client(), Some(heavy));
        // Clients sending alike: no one dominates.
        let mut alike = Shedder::new(5 * MS);
        for _ in 0..100 {
            alike.offer(heavy, 1_200, Some(MS), now);
            alike.offer(light, 1_200, Some(MS), now);
        }
        assert_eq!(alike.dominant_client(), None);
        // Shedding off: nobody.
        let mut off = Shedder::new(Duration::ZERO);
        off.offer(heavy, 65_000, Some(MS), now);
        off.offer(light, 100, Some(MS), now);
        assert_eq!(off.dominant_client(), None);
    }

    #[test]
    fn a_heavy_datagram_on_time_restarts_the_interval() {
        let (heavy, light) = (id("192.0.2.10"), id("192.0.2.11"));
        let mut s = Shedder::new(5 * MS);
        assert!(!s.offer(light, 100, Some(MS), Duration::ZERO));
        assert!(!s.offer(heavy, 65_000, Some(9 * MS), Duration::ZERO));
        assert!(!s.offer(heavy, 65_000, Some(MS), INTERVAL / 2));
        assert!(!s.offer(heavy, 65_000, Some(9 * MS), INTERVAL));
        // Late again since INTERVAL: overloaded an interval after that.
        assert!(!s.offer(heavy, 65_000, Some(9 * MS), INTERVAL * 2 - MS));
        assert!(s.offer(heavy, 65_000, Some(9 * MS), INTERVAL * 2));
    }

    /// The counts as a plain tally would keep them, recomputed from
    /// scratch: every client once, `total` their sum, `heaviest` one with
    /// the most recent bytes, `active` how many there are.
    fn assert_counts_hold(s: &Shedder, step: usize) {
        for (i, a) in s.clients.iter().enumerate() {
            assert!(
                s.clients[i + 1..].iter().all(|b| b.client != a.client),
                "step {step}: a client twice"
            );
        }
        assert_eq!(
            s.total,
            s.clients.iter().map(Sent::recent).sum::<u64>(),
            "step {step}: total"
        );
        assert_eq!(s.active, s.clients.len(), "step {step}: active");
        let most = s.clients.iter().map(Sent::recent).max();
        assert_eq!(s.heaviest.map(|h| s.clients[h].recent()), most, "step {step}: heaviest");
    }

    #[test]
    fn counting_the_heaviest_first_keeps_every_count_a_tally_would() {
        // More clients than are followed (the lightest gives its place up),
        // one of them sending most datagrams, as a flood among others
        // does, over several windows; each count lands on its own client.
        let mut rng = crate::test_rng::XorShift::new(0x5deece66d);
        let clients: Vec<ClientId> = (0..TRACKED + 16)
            .map(|i| ClientId::of(std::net::IpAddr::from([198, 51, 100, i as u8])))
            .collect();
        let mut s = Shedder::new(5 * MS);
        for step in 0..20_000 {
            let client = if rng.below(3) == 0 {
                clients[rng.below(clients.len())]
            } else {
                clients[0]
            };
            let len = 1 + rng.below(70_000);
            let now = (step as u32 / 16) * MS;
            let before = s.clients.iter().find(|c| c.client == client).map_or(0, Sent::recent);
            s.roll(now);
            let rolled = s.clients.iter().find(|c| c.client == client).map_or(0, Sent::recent);
            let i = s.count(client, (len as u64).max(FLOOR));
            assert!(before >= rolled, "step {step}");
            let after = &s.clients[i];
            assert_eq!(after.client, client, "step {step}");
            // Its count grew by the datagram, from its own count or, when
            // it took the lightest's place, from that one's.
            assert!(after.recent() >= (len as u64).max(FLOOR), "step {step}");
            if rolled > 0 {
                assert_eq!(after.recent(), rolled + (len as u64).max(FLOOR), "step {step}");
            }
            assert_counts_hold(&s, step);
        }
    }

    #[test]
    fn a_window_ends_exactly_one_window_after_it_started() {
        let (a, b) = (id("192.0.2.10"), id("192.0.2.11"));
        let mut s = Shedder::new(5 * MS);
        s.offer(a, 1_500, None, Duration::ZERO);
        // Just before the end: the same window.
        s.offer(b, 1_500, None, WINDOW - Duration::from_nanos(1));
        assert_eq!(s.clients.iter().map(|c| c.current).sum::<u64>(), 3_000);
        // At the end: a new one, the old counts as the previous window.
        s.offer(b, 1_500, None, WINDOW);
        assert_eq!(s.clients.iter().map(|c| c.current).sum::<u64>(), 1_500);
        assert_eq!(s.total, 4_500);
        // A window later than that with nothing in between: one more roll,
        // from the new start, not from the first.
        s.offer(a, 1_500, None, 2 * WINDOW - Duration::from_nanos(1));
        assert_eq!(s.total, 6_000);
        s.offer(a, 1_500, None, 2 * WINDOW);
        assert_eq!(s.total, 1_500 + 3_000);
        // Two whole windows skipped: nothing recent is left but this one.
        s.offer(b, 1_500, None, 5 * WINDOW);
        assert_eq!(s.total, 1_500);
        assert_eq!(s.active, 1);
    }

    #[test]
    fn one_client_alone_is_never_shed() {
        let only = id("2001:db8::10");
        let mut s = Shedder::new(5 * MS);
        for i in 0..1_000 {
            assert!(!s.offer(only, 65_000, Some(100 * MS), i * MS));
        }
        // Its other addresses in the same /64 are the same client.
        assert!(!s.offer(id("2001:db8::99"), 100, Some(100 * MS), 1_000 * MS));
    }

    #[test]
    fn a_client_quiet_for_two_windows_no_longer_counts() {
        let (a, b) = (id("192.0.2.10"), id("192.0.2.11"));
        let mut s = Shedder::new(5 * MS);
        assert!(!s.offer(a, 65_000, Some(MS), Duration::ZERO));
        assert!(!s.offer(b, 100, Some(10 * MS), Duration::ZERO));
        assert!(s.offer(a, 65_000, Some(10 * MS), Duration::ZERO));
        // Two windows later b has sent nothing since: a is alone.
        s.drained();
        assert!(!s.offer(a, 65_000, Some(10 * MS), 2 * WINDOW));
        assert!(!s.offer(a, 65_000, Some(10 * MS), 2 * WINDOW + MS));
    }

    #[test]
    fn the_heaviest_is_judged_by_recent_bytes_not_by_who_came_first() {
        let (early, late) = (id("192.0.2.10"), id("192.0.2.11"));
        let mut s = Shedder::new(5 * MS);
        assert!(!s.offer(early, 10_000, Some(MS), Duration::ZERO));
        for _ in 0..10 {
            assert!(!s.offer(late, 60_000, Some(MS), Duration::ZERO));
        }
        // The early one's late datagram: the late one is the heaviest.
        assert!(!s.offer(early, 100, Some(50 * MS), MS));
        assert!(s.offer(late, 100, Some(MS), MS));
    }

    #[test]
    fn clients_sending_alike_are_never_shed_however_late() {
        let clients: Vec<ClientId> = (0..10).map(|c| id(&format!("192.0.2.{}", 150 + c))).collect();
        let mut s = Shedder::new(5 * MS);
        // A burst of equal flows from ten clients, every datagram late,
        // long enough for any interval: overloaded, yet no one stands out.
        for round in 0..200u32 {
            for c in &clients {
                let len = 64 + (round as usize % 7) * 10;
                assert!(
                    !s.offer(*c, len, Some(50 * MS), round * MS),
                    "round {round} client {c:?}"
                );
            }
        }
        // One of them starts a flood: it is shed, the others still not.
        let flooder = clients[3];
        let now = 200 * MS;
        let shed = (0..50).filter(|_| s.offer(flooder, 65_000, Some(50 * MS), now)).count();
        assert!(shed > 0, "the flooder stands out now");
        assert!(!s.offer(clients[4], 100, Some(50 * MS), now));
    }

    #[test]
    fn one_listener_caught_up_does_not_end_anothers_overload() {
        let (flood, quiet) = (id("2001:db8:1::10"), id("192.0.2.10"));
        let s = SharedShedder::new(5 * MS);
        let now = 10 * MS;
        // Two listeners, one per family: the flood's is behind, the quiet
        // client's late datagram makes the relay overloaded.
        assert_eq!(fall_behind(&s, flood, quiet, now), [false, false]);
        assert!(s.offer(5 * MS, flood, 65_000, Some(MS), now));
        // The quiet client's listener caught up: the flood is still shed.
        s.round_ended(false, false);
        assert!(s.offer(5 * MS, flood, 65_000, Some(MS), now));
        // The flood's listener caught up too: the overload is over.
        s.round_ended(true, false);
        assert!(!s.offer(5 * MS, flood, 65_000, Some(MS), now));
    }

    #[test]
    fn the_kernel_drops_a_client_only_after_a_run_of_its_datagrams_was_shed_and_for_a_hold() {
        let (flood, quiet) = (id("192.0.2.10"), id("192.0.2.11"));
        let s = SharedShedder::new(5 * MS);
        let now = 10 * MS;
        assert_eq!(fall_behind(&s, flood, quiet, now), [false, false]);
        // Shed, but not yet a run of ARM bytes: no filter.
        let per_datagram = 65_000;
        let run = ARM.div_ceil(per_datagram) as usize;
        for _ in 1..run {
            assert!(s.offer(5 * MS, flood, 65_000, Some(MS), now));
        }
        assert_eq!(one(&s, now), None);
        assert!(s.offer(5 * MS, flood, 65_000, Some(MS), now + MS));
        let want = Some(Filter {
            client: flood,
            until: now + MS + HOLD,
            since: now + MS,
            exempt: None,
        });
        assert_eq!(one(&s, now + MS), want);
        // Shedding on does not stretch the hold ...
        assert!(s.offer(5 * MS, flood, 65_000, Some(MS), now + 2 * MS));
        assert_eq!(one(&s, now + 2 * MS), want);
        // ... it ends, and a datagram shed after it starts the next one.
        assert_eq!(one(&s, now + MS + HOLD), None);
        assert!(s.offer(5 * MS, flood, 65_000, Some(MS), now + 2 * MS + HOLD));
        assert_eq!(one(&s, now + 2 * MS + HOLD).map(|f| f.client), Some(flood));
    }

    /// A client that flooded, was held, and now sends 5,000 small
    /// datagrams a second, which the relay carries but for brief delays:
    /// every 20 ms the other client's datagram is late, the relay is
    /// overloaded until the listener's round ends a moment later, and the
    /// few of the client's datagrams read in that round are shed. Counted
    /// on from its flood's run, across the datagrams relayed in between,
    /// those few put the filter back on at the first brief overload, for
    /// twice its last hold.
    #[test]
    fn a_client_relayed_between_brief_overloads_is_not_held_in_the_kernel() {
        let (client, quiet) = (id("192.0.2.10"), id("192.0.2.11"));
        let s = SharedShedder::new(5 * MS);
        let mut now = 10 * MS;
        // Its flood: held once; the hold ends, and what it sends now
        // finds the queue empty.
        shed_until_filtered(&s, client, quiet, now);
        now += HOLD;
        assert_eq!(one(&s, now), None);
        let (mut shed, mut relayed) = (0, 0);
        // Three seconds at 100 datagrams per 20 ms.
        for _ in 0..150 {
            for _ in 0..95 {
                relayed += usize::from(!s.offer(5 * MS, client, 8, Some(MS), now));
            }
            now += 10 * MS;
            s.round_ended(false, true);
            assert!(!s.offer(5 * MS, quiet, 100, Some(8 * MS), now));
            for _ in 0..5 {
                shed += usize::from(s.offer(5 * MS, client, 8, Some(8 * MS), now));
            }
            s.round_ended(true, false);
            assert_eq!(
                one(&s, now),
                None,
                "held at {now:?} after {shed} shed and {relayed} relayed"
            );
            now += 10 * MS;
        }
        // Shed in the brief overloads, relayed in between.
        assert_eq!((shed, relayed), (150 * 5, 150 * 95));
    }

    /// Sheds `flood` by hand at `now` (overloaded by `quiet`'s late
    /// datagram) until the filter goes on; returns its hold.
    fn shed_until_filtered(s: &SharedShedder, flood: ClientId, quiet: ClientId, now: Duration) -> Duration {
        fall_behind(s, flood, quiet, now);
        for _ in 0..=ARM.div_ceil(65_000) {
            s.offer(5 * MS, flood, 65_000, Some(MS), now);
            if let Some(f) = one(s, now) {
                assert_eq!(f.client, flood);
                s.round_ended(true, false);
                return f.until - now;
            }
        }
        panic!("never filtered");
    }

    /// A listener with no filter on asks `filtering` and skips the lock
    /// when it says no: it must say yes as soon as a shed datagram puts a
    /// filter on, before anyone asked `filter`, and no once the hold ended.
    #[test]
    fn filtering_says_whether_a_filter_is_wanted_without_the_lock() {
        let (flood, quiet) = (id("192.0.2.10"), id("192.0.2.11"));
        let s = SharedShedder::new(5 * MS);
        let now = 10 * MS;
        assert!(!s.filtering());
        assert_eq!(fall_behind(&s, flood, quiet, now), [false, false]);
        let mut shed = 0;
        while !s.filtering() {
            assert!(s.offer(5 * MS, flood, 65_000, Some(MS), now));
            shed += 1;
            assert!(shed <= ARM.div_ceil(65_000), "no filter after {shed} shed");
        }
        let until = one(&s, now).map(|f| f.until);
        assert_eq!(until, Some(now + HOLD));
        assert!(s.filtering());
        assert_eq!(one(&s, now + HOLD), None);
        assert!(!s.filtering());
    }

    #[test]
    fn a_hold_doubles_while_the_client_keeps_flooding_and_ends_when_it_stops() {
        let (flood, quiet) = (id("192.0.2.10"), id("192.0.2.11"));
        let s = SharedShedder::new(5 * MS);
        let mut now = 10 * MS;
        let mut holds = Vec::new();
        for _ in 0..6 {
            let hold = shed_until_filtered(&s, flood, quiet, now);
            holds.push(hold);
            // The kernel keeps dropping its datagrams: the hold is kept
            // to its end.
            let end = now + hold;
            while now + LOOK < end {
                now += LOOK;
                s.kernel_dropped(&[flood], held(STILL_FLOODING), &[0], now);
                assert!(one(&s, now).is_some(), "off early at {now:?} of a hold to {end:?}");
            }
            now = end;
            assert_eq!(one(&s, now), None);
            // Back at once: relayed for a moment, late again, shed.
            now += 5 * MS;
        }
        assert_eq!(holds, [HOLD, 4 * HOLD, 16 * HOLD, 64 * HOLD, 64 * HOLD, 64 * HOLD]);
        // The client stops: too few dropped, the filter comes off within
        // QUIET, long before its hold ends.
        let start = now;
        assert_eq!(shed_until_filtered(&s, flood, quiet, now), 64 * HOLD);
        now += LOOK;
        s.kernel_dropped(&[flood], held(STILL_FLOODING - 1), &[0], now);
        assert!(one(&s, now).is_some());
        assert_eq!(one(&s, start + QUIET), None);
        // Its next flood starts from HOLD again.
        assert_eq!(shed_until_filtered(&s, flood, quiet, start + QUIET + MS), HOLD);
        // And so does one that comes back long after its last hold.
        let later = start + QUIET + MS + HOLD + MEMORY + MEMORY;
        s.kernel_dropped(&[flood], held(STILL_FLOODING), &[0], start + QUIET + 50 * MS);
        assert_eq!(one(&s, start + QUIET + MS + HOLD), None);
        assert_eq!(shed_until_filtered(&s, flood, quiet, later), HOLD);
    }

    /// A client flooding for 32 s, held in the kernel and back at once
    /// each time its hold ends: every return costs the other clients a
    /// run shed by hand behind the flood. Doubling to 1.6 s let it back 23
    /// times; growing fourfold to 6.4 s, 8. When it stops, the filter comes
    /// off within QUIET as before, and its next flood starts from HOLD.
    #[test]
    fn a_lasting_flood_is_let_back_in_a_handful_of_times_and_released_once_it_stops() {
        let (flood, quiet) = (id("192.0.2.10"), id("192.0.2.11"));
        let s = SharedShedder::new(5 * MS);
        let start = 10 * MS;
        let mut now = start;
        let mut holds = Vec::new();
        while now < start + Duration::from_secs(32) {
            let hold = shed_until_filtered(&s, flood, quiet, now);
            holds.push(hold);
            now = held_through(&s, flood, now, hold) + 5 * MS;
        }
        assert!(holds.len() <= 8, "let back {} times: {holds:?}", holds.len());
        assert_eq!(holds.iter().max(), Some(&(LONGEST * HOLD)));
        // Relayed for a while after its hold before it is late again (the
        // relay carries a returning flood for a second or two): held as
        // long again.
        now += Duration::from_secs(2);
        let hold = shed_until_filtered(&s, flood, quiet, now);
        assert_eq!(hold, LONGEST * HOLD, "back 2 s after a hold of {:?}", LONGEST * HOLD);
        now = held_through(&s, flood, now, hold);
        // It stops: off within QUIET of the last flood-rate report.
        let last = now;
        assert_eq!(shed_until_filtered(&s, flood, quiet, now), LONGEST * HOLD);
        now += LOOK;
        s.kernel_dropped(&[flood], held(1), &[0], now);
        assert!(one(&s, now).is_some());
        assert_eq!(one(&s, last + QUIET), None);
        // Back later, it starts from HOLD, and climbs again.
        now = last + QUIET + MS;
        for want in [1, 4, 16, 64] {
            let hold = shed_until_filtered(&s, flood, quiet, now);
            assert_eq!(hold, want * HOLD);
            now = held_through(&s, flood, now, hold) + 5 * MS;
        }
        // Away for longer than its last hold lasted: from HOLD again.
        now += LONGEST * HOLD;
        assert_eq!(shed_until_filtered(&s, flood, quiet, now), HOLD);
    }

    /// Sheds `flood` by hand at `now` (overloaded by `quiet`'s late
    /// datagram) until the kernel holds it, whoever else it holds; returns
    /// its hold.
    fn shed_until_held(s: &SharedShedder, flood: ClientId, quiet: ClientId, now: Duration) -> Duration {
        fall_behind(s, flood, quiet, now);
        // Shed once it is the heaviest, by far, and then for a run of ARM.
        for _ in 0..=4 * ARM.div_ceil(65_000) {
            s.offer(5 * MS, flood, 65_000, Some(MS), now);
            if let Some(f) = s.filter(now).into_iter().find(|f| f.client == flood) {
                s.round_ended(true, false);
                return f.until - now;
            }
        }
        panic!("never held");
    }

    fn clients(held: &[Filter]) -> Vec<ClientId> {
        held.iter().map(|f| f.client).collect()
    }

    /// A device holds one address of its own with a trickle while it
    /// floods from another: held in the kernel too, not shed by hand for
    /// as long as the first hold lasts. Holding one client at a time, the
    /// second flood was never held (SLOTS = 1 fails this).
    #[test]
    fn a_device_with_two_addresses_has_both_held_at_once() {
        let (first, second, quiet) = (id("192.0.2.10"), id("2001:db8:1::10"), id("192.0.2.11"));
        let s = SharedShedder::new(5 * MS);
        let mut now = 10 * MS;
        // The first floods and is held; then it trickles, just above the
        // rate that keeps a hold, for a second (until its fourth hold).
        for want in [1, 4, 16] {
            assert_eq!(shed_until_held(&s, first, quiet, now), want * HOLD);
            now = held_through(&s, first, now, want * HOLD) + 5 * MS;
        }
        assert_eq!(shed_until_held(&s, first, quiet, now), 64 * HOLD);
        now += LOOK;
        s.kernel_dropped(&[first], held(STILL_FLOODING), &[0], now);
        // The second floods: shed by hand, then held beside the first.
        assert_eq!(shed_until_held(&s, second, quiet, now), HOLD);
        assert_eq!(clients(&s.filter(now)), [first, second]);
        // Both report, told apart by their samples: both stay held.
        let end = now + HOLD;
        while now + LOOK < end {
            now += LOOK;
            s.kernel_dropped(&[first, second], held(10 * STILL_FLOODING), &[1, 9], now);
            assert_eq!(clients(&s.filter(now)), [first, second]);
        }
        // Each hold ends on its own schedule: the second's first.
        assert_eq!(clients(&s.filter(end)), [first]);
        // The second returns at once: held four times as long.
        assert_eq!(shed_until_held(&s, second, quiet, end + MS), 4 * HOLD);
        assert_eq!(clients(&s.filter(end + MS)), [first, second]);
    }

    /// Two clients held: one stops, the other floods on. The one that
    /// stopped has no samples and is let in within QUIET, its next flood
    /// starting from HOLD; the other stays held. Judged on the sum of
    /// what the filter dropped, a flood from one address kept any other
    /// held address in too, one got held in an innocent client's name.
    #[test]
    fn a_held_client_that_stops_is_let_in_while_another_floods_on() {
        let (forged, flood, quiet) = (id("192.0.2.10"), id("192.0.2.66"), id("192.0.2.11"));
        let s = SharedShedder::new(5 * MS);
        let start = 10 * MS;
        assert_eq!(shed_until_held(&s, forged, quiet, start), HOLD);
        assert_eq!(shed_until_held(&s, flood, quiet, start), HOLD);
        // Both flood on through their holds, and are back at once: a
        // third hold of each, of 1.6 s.
        let mut now = start;
        for hold in [HOLD, 4 * HOLD] {
            let end = now + hold;
            while now + LOOK < end {
                now += LOOK;
                s.kernel_dropped(&[forged, flood], held(100), &[3, 3], now);
                assert_eq!(clients(&s.filter(now)), [forged, flood]);
            }
            now = end + 5 * MS;
            assert!(s.filter(now).is_empty());
            assert_eq!(shed_until_held(&s, forged, quiet, now), 4 * hold);
            assert_eq!(shed_until_held(&s, flood, quiet, now), 4 * hold);
        }
        assert_eq!(clients(&s.filter(now)), [forged, flood]);
        // The forged address stops; the flood goes on, every sample its.
        let stopped = now;
        while now < stopped + QUIET {
            now += LOOK;
            s.kernel_dropped(&[forged, flood], held(100), &[0, 6], now);
        }
        assert_eq!(clients(&s.filter(stopped + QUIET)), [flood]);
        // Its next flood starts from HOLD; the other's holds still grow.
        assert_eq!(shed_until_held(&s, forged, quiet, now), HOLD);
        assert_eq!(
            s.filter(now)
                .iter()
                .find(|f| f.client == flood)
                .map(|f| f.until - stopped),
            Some(16 * HOLD)
        );
    }

    /// A device with more addresses than SLOTS has SLOTS of them held; the
    /// next is shed by hand, as before, and is held once a slot is free.
    #[test]
    fn no_more_than_slots_clients_are_held() {
        let quiet = id("192.0.2.11");
        let floods: Vec<ClientId> = (0..=SLOTS).map(|i| id(&format!("192.0.2.{}", 100 + i))).collect();
        let s = SharedShedder::new(5 * MS);
        let now = 10 * MS;
        for f in &floods[..SLOTS] {
            assert_eq!(shed_until_held(&s, *f, quiet, now), HOLD);
        }
        let last = floods[SLOTS];
        s.round_ended(false, true);
        s.offer(5 * MS, quiet, 100, Some(20 * MS), now);
        let shed = (0..=8 * ARM.div_ceil(65_000))
            .filter(|_| s.offer(5 * MS, last, 65_000, Some(MS), now))
            .count();
        assert!(shed as u64 > ARM.div_ceil(65_000), "shed {shed}");
        assert_eq!(clients(&s.filter(now)), floods[..SLOTS]);
        s.round_ended(true, false);
        // The holds end: the next run of it is held.
        assert!(s.filter(now + HOLD).is_empty());
        assert_eq!(shed_until_held(&s, last, quiet, now + HOLD), HOLD);
    }

    /// The kernel drops `flood`'s datagrams at a flood's rate from `now`
    /// to the end of its `hold`: the filter stays on until then, and is
    /// off at that end, which is returned.
    fn held_through(s: &SharedShedder, flood: ClientId, mut now: Duration, hold: Duration) -> Duration {
        let end = now + hold;
        while now + LOOK < end {
            now += LOOK;
            s.kernel_dropped(&[flood], held(STILL_FLOODING), &[0], now);
            assert!(one(s, now).is_some(), "off early at {now:?} of a hold to {end:?}");
        }
        assert_eq!(one(s, end), None);
        end
    }

    #[test]
    fn a_flood_two_listener_tasks_each_see_half_of_keeps_its_holds_doubling() {
        let (flood, quiet) = (id("192.0.2.10"), id("192.0.2.11"));
        let s = SharedShedder::new(5 * MS);
        let mut now = 10 * MS;
        let mut holds = Vec::new();
        for _ in 0..5 {
            let hold = shed_until_filtered(&s, flood, quiet, now);
            holds.push(hold);
            // Two tasks look in turn, each seeing half the flood's rate:
            // below the threshold alone, at it together.
            let end = now + hold;
            while now + LOOK < end {
                now += LOOK;
                s.kernel_dropped(&[flood], held(STILL_FLOODING / 2), &[0], now);
                s.kernel_dropped(&[flood], held(STILL_FLOODING / 2), &[0], now + MS);
                assert!(one(&s, now + MS).is_some(), "off early at {now:?} of a hold to {end:?}");
            }
            now = end;
            assert_eq!(one(&s, now), None);
            now += 5 * MS;
        }
        assert_eq!(holds, [HOLD, 4 * HOLD, 16 * HOLD, 64 * HOLD, 64 * HOLD]);
        // Half the threshold from one task alone: the client stopped.
        let start = now;
        assert_eq!(shed_until_filtered(&s, flood, quiet, now), 64 * HOLD);
        now += LOOK;
        s.kernel_dropped(&[flood], held(STILL_FLOODING / 2), &[0], now);
        now += LOOK;
        s.kernel_dropped(&[flood], held(STILL_FLOODING / 2), &[0], now);
        assert_eq!(one(&s, start + QUIET), None);
    }

    #[test]
    fn a_flood_held_in_the_kernel_keeps_counting_so_a_busy_client_beside_it_is_not_shed() {
        let (spray, busy) = (id("192.0.2.66"), id("192.0.2.10"));
        let s = SharedShedder::new(5 * MS);
        let start = 10 * MS;
        shed_until_filtered(&s, spray, busy, start);
        // For a second the kernel drops the spray's datagrams (100 a look,
        // as the listeners report them), long enough for what was shed by
        // hand to leave the windows; the busy client uploads 100
        // datagrams of 1,200 bytes every 200 ms, on time.
        let mut now = start;
        for look in 1..=20u32 {
            now = start + look * LOOK;
            s.kernel_dropped(&[spray], held(100), &[0], now);
            if look % 4 == 0 {
                for _ in 0..100 {
                    assert!(
                        !s.offer(5 * MS, busy, 1_200, Some(MS), now),
                        "an on-time upload was shed"
                    );
                }
            }
        }
        // Between holds 50 of the spray's datagrams reach the listener,
        // late, then the busy client's requests, late behind them.
        s.round_ended(false, true);
        for _ in 0..50 {
            s.offer(5 * MS, spray, 1, Some(30 * MS), now);
        }
        for _ in 0..5 {
            assert!(
                !s.offer(5 * MS, busy, 3, Some(30 * MS), now),
                "the busy client was shed"
            );
        }
        assert!(s.offer(5 * MS, spray, 1, Some(30 * MS), now), "the spray was not shed");
    }

    /// A client is held in the kernel; another device floods past what
    /// the relay reads, and the listeners' full queues drop the rest of
    /// its datagrams. Those are the flood's, not the held client's:
    /// counted as the held client's (300 a look against the 50 the
    /// listeners read of the flood), they kept it the heaviest, shed and
    /// held again in the next late round, while the flood went on unshed.
    #[test]
    fn a_full_queues_drops_do_not_weigh_on_the_held_client() {
        let (first, flood, busy) = (id("192.0.2.10"), id("192.0.2.66"), id("192.0.2.11"));
        let s = SharedShedder::new(5 * MS);
        let start = 10 * MS;
        shed_until_filtered(&s, first, busy, start);
        let mut now = start;
        for look in 1..=20u32 {
            now = start + look * LOOK;
            for _ in 0..50 {
                s.offer(5 * MS, flood, 1_200, Some(MS), now);
            }
            s.kernel_dropped(&[first], KernelDrops { all: 300, filtered: 0 }, &[0], now);
            if look % 4 == 0 {
                for _ in 0..20 {
                    s.offer(5 * MS, busy, 1_200, Some(MS), now);
                }
            }
        }
        s.round_ended(false, true);
        for _ in 0..5 {
            assert!(
                !s.offer(5 * MS, busy, 3, Some(30 * MS), now),
                "the busy client was shed"
            );
        }
        assert!(
            s.offer(5 * MS, flood, 1_200, Some(30 * MS), now),
            "the flood was not shed"
        );
    }

    #[test]
    fn a_flood_spread_over_many_addresses_does_not_get_a_busy_client_shed() {
        let mut s = Shedder::new(5 * MS);
        let now = 10 * MS;
        // An upload of 100 KB from one client, on time.
        let busy = id("192.0.2.10");
        for _ in 0..84 {
            assert!(!s.offer(busy, 1_200, Some(MS), now));
        }
        // Five times that from one device, spread over 63 addresses of
        // its own, and late: each address is lighter than the upload.
        let spread: Vec<ClientId> = (0..63).map(|i| id(&format!("192.0.2.{}", 100 + i))).collect();
        for _ in 0..7 {
            for a in &spread {
                assert!(!s.offer(*a, 1_200, Some(30 * MS), now), "a light address was shed");
            }
        }
        // The busy client is the heaviest, but only a sixth of the work:
        // dropping it would not end the overload.
        for _ in 0..10 {
            assert!(!s.offer(busy, 1_200, Some(30 * MS), now), "the busy client was shed");
        }
        // The same client flooding past a quarter of the work is shed.
        let shed = (0..200).filter(|_| s.offer(busy, 1_200, Some(30 * MS), now)).count();
        assert!(shed > 0, "a client holding a quarter of the work was never shed");
    }

    #[test]
    fn a_spray_of_tiny_datagrams_weighs_its_work_not_its_bytes() {
        let (upload, spray) = (id("192.0.2.10"), id("192.0.2.66"));
        let mut s = Shedder::new(5 * MS);
        let now = 10 * MS;
        // 100 datagrams of 1,200 bytes, and six times as many of one byte:
        // the spray is the heavier, however few bytes it carries.
        for i in 0..600 {
            if i % 6 == 0 {
                assert!(!s.offer(upload, 1_200, Some(MS), now));
            }
            assert!(!s.offer(spray, 1, Some(MS), now));
        }
        // Overloaded: the upload's late datagram is not shed, the spray is.
        assert!(!s.offer(upload, 1_200, Some(30 * MS), now), "the upload was shed");
        assert!(s.offer(spray, 1, Some(MS), now), "the spray was not shed");
    }

    #[test]
    fn a_target_of_zero_never_sheds() {
        let mut s = Shedder::new(Duration::ZERO);
        assert!(!s.enabled());
        for c in ["192.0.2.10", "192.0.2.11", "192.0.2.10"] {
            assert!(!s.offer(id(c), 65_000, Some(Duration::from_secs(1)), MS));
        }
    }

    #[test]
    fn sojourn_is_unknown_without_a_stamp_or_when_the_clock_stepped_back() {
        assert_eq!(sojourn(Some(2 * MS), 5 * MS), Some(3 * MS));
        assert_eq!(sojourn(None, 5 * MS), None);
        assert_eq!(sojourn(Some(6 * MS), 5 * MS), None);
    }

    #[test]
    fn a_flood_from_beyond_a_full_table_is_followed_and_shed_not_the_quiet_client() {
        let mut s = Shedder::new(5 * MS);
        let now = 10 * MS;
        let quiet = id("192.0.2.10");
        assert!(!s.offer(quiet, 600, Some(MS), now));
        for i in 0..TRACKED - 1 {
            assert!(!s.offer(id(&format!("192.0.2.{}", 100 + i)), 1, Some(MS), now));
        }
        // The table is full; the flood comes from one more address, late.
        let flood = id("192.0.2.66");
        for _ in 0..100 {
            s.offer(flood, 1_200, Some(30 * MS), now);
        }
        assert!(!s.offer(quiet, 3, Some(30 * MS), now), "the quiet client was shed");
        assert!(s.offer(flood, 1_200, Some(30 * MS), now), "the flood was not shed");
    }
}
