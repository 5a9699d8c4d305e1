//! nftables sets fed by DNS answers, over netlink, in-process.
//!
//! [`wire`] encodes nf_tables messages (a small subset: tables, sets, set
//! elements), [`socket`] commits them as batches and reads the kernel's
//! acknowledgements, and [`sets`] is the feeder: one thread that gathers
//! the updates of many answers into one transaction and tells each answer
//! when its elements are committed. No process is spawned per answer and
//! no C library is linked: the only dependency is `netlink-sys` for the
//! socket itself.

pub mod sets;
pub mod socket;
pub mod wire;

pub use sets::{NftSets, SetPair, Update};
pub use socket::{NftError, NftSocket};
