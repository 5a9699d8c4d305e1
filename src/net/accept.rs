//! Backing off when `accept(2)` fails.
//!
//! Out of descriptors (`EMFILE`, `ENFILE`) or memory, `accept` fails at once
//! for as long as the shortage lasts; retrying at once spins a core and
//! logging each failure floods the log. Each consecutive failure doubles
//! the pause (10 ms up to 1 s) and a success resets it; the warning is let
//! through once every ten seconds with the number held back.

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};

use crate::ratelog::RateLimit;

const FIRST: Duration = Duration::from_millis(10);
const LONGEST: Duration = Duration::from_secs(1);

/// The pause before the next `accept` of one listener.
#[derive(Debug)]
pub struct AcceptBackoff {
    what: &'static str,
    next: Duration,
    log: RateLimit,
}

impl AcceptBackoff {
    pub fn new(what: &'static str) -> Self {
        AcceptBackoff {
            what,
            next: FIRST,
            log: RateLimit::new(Duration::from_secs(10)),
        }
    }

    /// The next connection of `listener`, backing off after each failure.
    ///
    /// Cancel-safe (a listener's `accept` is, and so is the pause), so the
    /// caller can race it against its shutdown signal.
    pub async fn accept(&mut self, listener: &TcpListener) -> (TcpStream, SocketAddr) {
        loop {
            match listener.accept().await {
                Ok(v) => {
                    self.succeeded();
                    return v;
                }
                Err(e) => self.failed(&e).await,
            }
        }
    }

    /// A connection was accepted.
    pub fn succeeded(&mut self) {
        self.next = FIRST;
    }

    /// `accept` failed with `error`: logs (rate-limited) and waits.
    pub async fn failed(&mut self, error: &io::Error) {
        if let Some(held_back) = self.log.allow() {
            tracing::warn!(listener = self.what, %error, held_back, pause = ?self.next, "accept failed; backing off");
        }
        let pause = self.pause();
        tokio::time::sleep(pause).await;
    }

    /// The pause now, doubling the next one.
    fn pause(&mut self) -> Duration {
        let now = self.next;
        self.next = (self.next * 2).min(LONGEST);
        now
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pauses_double_up_to_a_second_and_reset_on_success() {
        let mut b = AcceptBackoff::new("test");
        let pauses: Vec<u128> = (0..9).map(|_| b.pause().as_millis()).collect();
        assert_eq!(pauses, [10, 20, 40, 80, 160, 320, 640, 1000, 1000]);
        b.succeeded();
        assert_eq!(b.pause(), FIRST);
    }
}
