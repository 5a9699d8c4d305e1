//! The transparent UDP relay.
//!
//! Data flows one way through these modules:
//!
//! ```text
//! datagram ─▶ listener ─▶ decide ─▶ table (flow → session) ─▶ session ─▶ upstream socket ─▶ server
//!                 │                    ▲
//!                 └─▶ open_backlog ─▶ opener ─▶ open (new flows, off the listener's path:
//!                                     tasks     pool socket or own socket, task)
//!
//! server ─▶ inbound (pool / cone / SOCKS5 readers) ─▶ reply (socket bound to the
//!           original destination) ─▶ client
//! ```
//!
//! * [`listener`] reads redirected datagrams and their original destination;
//! * [`decide`] says what happens to each (relay, DNS, drop), for the
//!   listener and for `tproxyd explain` alike;
//! * [`open_backlog`] holds new flows (and their first datagrams) until
//!   one of the [`opener`] tasks opens them, so the listener never waits
//!   (a flow a reload came between is decided again: [`redecide`]);
//! * [`open`] makes a new flow's [`session`] and starts its task;
//! * [`table`] maps each flow to its session, bounded and fair between
//!   clients (a quota each, eviction from the heaviest, a [`rate`] bucket
//!   for new flows; clients weighed in a `load_order` kept up to date
//!   when read); removing an entry ends the flow;
//! * [`upstream_batch`] sends the runs of many flows (a listener's batch,
//!   an opener's round) with one system call per upstream socket;
//! * [`pool`] allocates shared upstream sockets, within the descriptor
//!   [`budget`];
//! * [`inbound`] reads upstream sockets and hands replies to [`reply`]
//!   (a full-cone flow's only from remotes the rules let through:
//!   [`cone_filter`]),
//!   which sends them from the spoofed original address; [`pool_readers`]
//!   records which reader watches which pool socket;
//! * [`context`] holds all of it behind methods and owns every task;
//! * [`shed`] drops the heaviest client's datagrams while the listener
//!   is behind, so the others are not held up by it;
//! * [`slice`] bounds how long any of these tasks keeps a worker thread
//!   before the others (and the established flows) get it.
//!
//! Lower modules never name higher ones: `pool` knows no session,
//! `session` no table, `table` no pool.

pub mod account;
pub mod budget;
pub mod clock;
pub mod cone_filter;
pub mod context;
pub mod decide;
pub mod expiry;
pub mod inbound;
pub mod key;
pub mod listener;
mod load_order;
pub mod open;
pub mod open_backlog;
pub mod opener;
pub mod pool;
mod pool_order;
pub mod pool_readers;
mod pool_taken;
pub mod rate;
pub mod ready_set;
pub mod redecide;
pub mod reply;
mod reply_order;
pub mod rules;
pub mod session;
pub mod shed;
pub mod shed_exempt;
pub mod shed_filter;
pub mod slice;
pub mod socks5;
pub mod socks_queue;
pub mod table;
pub mod upstream_batch;

pub use context::RelayContext;
pub use decide::{Decision, Host, decide};
pub use key::{ClientId, FlowKey, Target};
