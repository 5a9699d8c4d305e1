//! The daemon's scheduling priority: the nice value its threads run at.
//!
//! Every datagram tproxyd relays waits until the runtime's worker thread
//! has a CPU, twice per round trip, where the kernel forwards in softirq
//! and waits for no thread at all. In the 64 KB flood of the abuse bench
//! (two senders flat out, the relay's worker and the lab's servers on two
//! CPUs) a scheduler trace found the worker runnable and off its CPU for
//! most of another client's slow waits, up to 17-66 ms at a time: at nice
//! 0 it takes turns, tick by tick, with any busy process. At nice -5
//! those waits nearly vanished in that flood, but the same setting made
//! the 20,000-destination flood's tail worse (docs/BENCHMARKS.md, "Relay
//! under abuse"), so it is an operator's choice (`nice` in the config),
//! not a default: unset, the daemon keeps the value it was started with.
//!
//! Linux keeps the nice value per thread and a new thread inherits its
//! creator's, so it is set once, on the main thread, before the runtime
//! starts its workers (and before privileges are dropped: lowering it
//! needs `CAP_SYS_NICE`).

use std::io;

/// A nice value, -20 (most favoured) to 19.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Nice(i8);

/// A nice value outside -20..=19.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("nice must be between -20 and 19, not {0}")]
pub struct OutOfRange(pub i64);

/// Setting the calling thread's nice value failed.
#[derive(Debug, thiserror::Error)]
#[error("cannot set the nice value to {nice}: {source}")]
pub struct SetError {
    pub nice: i8,
    #[source]
    pub source: io::Error,
}

impl Nice {
    pub fn new(value: i64) -> Result<Nice, OutOfRange> {
        match i8::try_from(value) {
            Ok(v) if (-20..=19).contains(&v) => Ok(Nice(v)),
            _ => Err(OutOfRange(value)),
        }
    }

    pub fn get(self) -> i8 {
        self.0
    }
}

/// Sets the calling thread's nice value; threads it creates afterwards
/// inherit it.
pub fn set_thread_nice(nice: Nice) -> Result<(), SetError> {
    // `PRIO_PROCESS` with 0 names the calling thread on Linux.
    // SAFETY: plain system call with integer arguments.
    let r = unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, libc::c_int::from(nice.0)) };
    if r < 0 {
        return Err(SetError {
            nice: nice.0,
            source: io::Error::last_os_error(),
        });
    }
    Ok(())
}

/// The calling thread's nice value.
pub fn thread_nice() -> io::Result<i32> {
    // getpriority may return -1 as a value: errno tells an error apart.
    nix::errno::Errno::clear();
    // SAFETY: plain system call with integer arguments.
    let v = unsafe { libc::getpriority(libc::PRIO_PROCESS, 0) };
    if v == -1 && nix::errno::Errno::last_raw() != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_kernels_range_is_a_nice_value() {
        assert_eq!(Nice::new(-20).map(Nice::get), Ok(-20));
        assert_eq!(Nice::new(19).map(Nice::get), Ok(19));
        assert_eq!(Nice::new(0).map(Nice::get), Ok(0));
        assert_eq!(Nice::new(-21), Err(OutOfRange(-21)));
        assert_eq!(Nice::new(20), Err(OutOfRange(20)));
        assert_eq!(Nice::new(i64::MIN), Err(OutOfRange(i64::MIN)));
        assert_eq!(Nice::new(300), Err(OutOfRange(300)));
    }

    #[test]
    fn a_thread_keeps_its_value_and_passes_it_to_the_threads_it_starts() {
        // On a thread of its own: the value stays with that thread. Raising
        // it needs no privilege.
        let (own, child) = std::thread::spawn(|| {
            let start = thread_nice().expect("getpriority");
            let target = Nice::new(i64::from(start.max(0) + 3).min(19)).expect("in range");
            set_thread_nice(target).expect("raising the nice value");
            let own = thread_nice().expect("getpriority");
            let child = std::thread::spawn(|| thread_nice().expect("getpriority"))
                .join()
                .expect("child");
            assert_eq!(own, i32::from(target.get()));
            (own, child)
        })
        .join()
        .expect("thread");
        assert_eq!(child, own);
    }
}
