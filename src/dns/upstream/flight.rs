//! Single-flight: identical questions asked while one is already on its way
//! upstream wait for that one's answer instead of asking again.
//!
//! This is what defeats the birthday attack on a forwarder (RFC 5452 §5):
//! if 200 client queries for one name made 200 upstream queries, a spoofer
//! would need to match only one of 200 (port, ID) pairs. It also spares the
//! upstream a thundering herd when a popular name expires, and is what a
//! background refresh (prefetch, serve-stale) goes through so that it is
//! never asked twice at once either.
//!
//! The first caller for a key (the leader) runs the query in its own future:
//! nothing is spawned, so nothing can outlive the engine. Followers wait for
//! the leader's flight to land. If the leader is dropped before it has an
//! answer (its client went away), the followers see the flight abandoned
//! and one of them takes over as the new leader.
//!
//! A follower waits no longer than its own deadline, whoever leads: when
//! a leader is dropped, the follower that takes over asks with its own
//! deadline, which may be later than the others'. A LAN device that asks
//! on one TCP connection after another and resets each just before its
//! deadline could hand the flight from one of its queries to the next and
//! keep another client's identical question waiting for as long as it
//! went on (6.4 s in the lab for a `dns.timeout` of 1.5 s). Past its own
//! deadline a follower stops waiting ([`Late`]); the flight goes on and
//! still lands for the others.
//!
//! A flight is a mutex-guarded outcome and one `Notify`: most misses have
//! no follower at all, so what a flight costs its leader matters more than
//! what waiting costs. (A `watch` channel did the same job with eight
//! `Notify`s to wake on every answer: about 1,500 instructions per miss.)
//! For the same reason the flight is made by the first follower, not by
//! the leader: a leader alone holds only its place in the map (its key
//! and a number), and a miss allocates no flight (sized for an answer,
//! about 300 instructions with its free, callgrind).

use hashbrown::HashTable;
use hashbrown::hash_table::Entry;
use std::future::Future;
use std::hash::{BuildHasher, Hash};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use tokio::sync::Notify;
use tokio::time::Instant;

/// In-flight work by key; `V` is what every waiter gets a clone of.
#[derive(Debug)]
pub struct Flights<K, V> {
    map: Arc<Mutex<Map<K, V>>>,
    hasher: Hasher,
}

impl<K, V> Default for Flights<K, V> {
    fn default() -> Self {
        Flights {
            map: Arc::new(Mutex::new(Map {
                table: HashTable::new(),
                next_id: 0,
            })),
            hasher: Hasher::default(),
        }
    }
}

/// Whether a call ran the work itself or shared another's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Leader,
    Follower,
}

/// A follower's own deadline passed before the flight it waited on
/// landed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Late;

/// How a flight ended.
#[derive(Debug, Clone)]
enum Landed<V> {
    Value(V),
    /// The leader was dropped without a value.
    Abandoned,
}

/// One question on its way.
#[derive(Debug)]
struct Flight<V> {
    landed: Mutex<Option<Landed<V>>>,
    done: Notify,
}

impl<V: Clone> Flight<V> {
    fn land(&self, how: Landed<V>) {
        lock(&self.landed).get_or_insert(how);
        self.done.notify_waiters();
    }

    /// Waits until the flight lands; `None` if it was abandoned.
    async fn wait(&self) -> Option<V> {
        let notified = self.done.notified();
        tokio::pin!(notified);
        loop {
            // Registered before looking, so a landing in between still
            // wakes this waiter.
            notified.as_mut().enable();
            if let Some(landed) = lock(&self.landed).as_ref() {
                return match landed {
                    Landed::Value(v) => Some(v.clone()),
                    Landed::Abandoned => None,
                };
            }
            notified.as_mut().await;
            notified.set(self.done.notified());
        }
    }
}

/// Removes the leader's entry when it finishes or is dropped, so a
/// cancelled leader never leaves a key that nobody will ever answer.
///
/// It finds its entry by the key's hash and its own number, so the key
/// itself moves into the map: no copy of it, and no second hashing.
struct Lead<'a, K, V: Clone> {
    map: &'a Mutex<Map<K, V>>,
    /// The key's hash while the entry is in the map.
    hash: Option<u64>,
    id: u64,
}

impl<K, V: Clone> Lead<'_, K, V> {
    /// Takes the entry out of the map; the flight its followers made, if
    /// any came.
    fn leave(&mut self) -> Option<Arc<Flight<V>>> {
        let hash = self.hash.take()?;
        let mut map = lock(self.map);
        let entry = map.table.find_entry(hash, |place| place.id == self.id).ok()?;
        entry.remove().0.flight
    }

    /// Leaves the map, then lands: a caller arriving from now on starts
    /// afresh rather than joining a finished flight. The value is cloned
    /// only for followers: most flights have none, and the leader keeps
    /// its value as it is (no shared box around it to allocate and unwrap).
    fn finish(mut self, value: &V) {
        if let Some(flight) = self.leave() {
            flight.land(Landed::Value(value.clone()));
        }
    }
}

impl<K, V: Clone> Drop for Lead<'_, K, V> {
    fn drop(&mut self) {
        // After `finish` this finds nothing. Followers hold the flight
        // while they wait, and cannot join it once it is out of the map.
        if let Some(flight) = self.leave() {
            flight.land(Landed::Abandoned);
        }
    }
}

/// Keys are names any client chooses: a seeded hasher, but a fast one
/// (SipHash over hickory's per-label hashing was a tenth of a cache
/// miss's instructions).
type Hasher = foldhash::quality::RandomState;

/// The questions in flight, and the number the next leader gets.
struct Map<K, V> {
    table: HashTable<Place<K, V>>,
    next_id: u64,
}

impl<K, V> std::fmt::Debug for Map<K, V> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Map").field("in_flight", &self.table.len()).finish()
    }
}

/// A question in flight: its leader's number (how the leader finds its
/// own entry among colliding keys), and the flight once a follower came.
struct Place<K, V> {
    key: K,
    id: u64,
    flight: Option<Arc<Flight<V>>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl<K: Eq + Hash, V: Clone> Flights<K, V> {
    /// Runs `work` for `key` unless the same key is already running, in
    /// which case waits for that run's result, until `until` at the
    /// latest ([`Late`] then). `work` is only called (and only awaited) by
    /// the leader, and must itself end by `until`: a leader is not cut
    /// short here, so that its followers get what it found.
    pub async fn run<F, Fut>(&self, key: K, until: Instant, work: F) -> Result<(V, Role), Late>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = V>,
    {
        let hash = self.hasher.hash_one(&key);
        let lead = loop {
            let flight = {
                let mut map = lock(&self.map);
                let Map { table, next_id } = &mut *map;
                let id = *next_id;
                match table.entry(hash, |place| place.key == key, |place| self.hasher.hash_one(&place.key)) {
                    Entry::Occupied(mut entry) => entry
                        .get_mut()
                        .flight
                        .get_or_insert_with(|| {
                            Arc::new(Flight {
                                landed: Mutex::new(None),
                                done: Notify::new(),
                            })
                        })
                        .clone(),
                    Entry::Vacant(entry) => {
                        entry.insert(Place { key, id, flight: None });
                        *next_id = id.wrapping_add(1);
                        break Lead {
                            map: &self.map,
                            hash: Some(hash),
                            id,
                        };
                    }
                }
            };
            // The same `until` however many leaders come and go.
            match tokio::time::timeout_at(until, flight.wait()).await {
                Ok(Some(v)) => return Ok((v, Role::Follower)),
                // The leader was dropped without an answer: try again,
                // possibly as the leader this time.
                Ok(None) => {}
                Err(_) => return Err(Late),
            }
        };
        let value = work().await;
        lead.finish(&value);
        Ok((value, Role::Leader))
    }

    /// Keys in flight now.
    pub fn len(&self) -> usize {
        lock(&self.map).table.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    /// A deadline no test reaches.
    fn far() -> Instant {
        Instant::now() + Duration::from_secs(3600)
    }

    #[tokio::test]
    async fn concurrent_callers_share_one_run() {
        let flights: Arc<Flights<&str, u32>> = Arc::default();
        let runs = Arc::new(AtomicUsize::new(0));
        let mut tasks = tokio::task::JoinSet::new();
        for _ in 0..200 {
            let (flights, runs) = (flights.clone(), runs.clone());
            tasks.spawn(async move {
                flights
                    .run("www.example.test", far(), || async {
                        runs.fetch_add(1, Ordering::SeqCst);
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        7
                    })
                    .await
            });
        }
        let mut leaders = 0;
        while let Some(r) = tasks.join_next().await {
            let (v, role) = r.unwrap().unwrap();
            assert_eq!(v, 7);
            leaders += usize::from(role == Role::Leader);
        }
        assert_eq!(runs.load(Ordering::SeqCst), 1);
        assert_eq!(leaders, 1);
        assert_eq!(flights.len(), 0, "finished flights are forgotten");
    }

    #[tokio::test]
    async fn a_dropped_leader_hands_over_to_a_follower() {
        let flights: Arc<Flights<u8, u32>> = Arc::default();
        let leader = {
            let flights = flights.clone();
            tokio::spawn(async move { flights.run(1, far(), std::future::pending::<u32>).await })
        };
        tokio::time::sleep(Duration::from_millis(10)).await;
        let follower = {
            let flights = flights.clone();
            tokio::spawn(async move { flights.run(1, far(), || async { 9 }).await })
        };
        tokio::time::sleep(Duration::from_millis(10)).await;
        leader.abort();
        let (v, role) = tokio::time::timeout(Duration::from_secs(5), follower)
            .await
            .expect("the follower must not hang")
            .unwrap()
            .unwrap();
        assert_eq!((v, role), (9, Role::Leader));
        assert_eq!(flights.len(), 0);
    }

    /// A key whose hash is the same for every value, as a spoofer would
    /// want two questions' hashes to be.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    struct Colliding(u32);

    impl Hash for Colliding {
        fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
            state.write_u8(0);
        }
    }

    /// Clients that go away mid-flight, leaders and followers alike, over
    /// keys whose hashes all collide: every follower still waiting gets
    /// the answer to its own key (never a neighbour's), none waits
    /// forever, and the map is left empty.
    #[tokio::test]
    async fn cancelled_callers_on_colliding_keys_leave_nothing_and_misanswer_nobody() {
        let flights: Arc<Flights<Colliding, u32>> = Arc::default();
        let mut leaders = Vec::new();
        let mut followers = Vec::new();
        for k in 0..50u32 {
            let f = flights.clone();
            leaders.push(tokio::spawn(async move {
                f.run(Colliding(k), far(), std::future::pending::<u32>).await
            }));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(flights.len(), 50);
        for k in 0..50u32 {
            for j in 0..4 {
                let f = flights.clone();
                let task = tokio::spawn(async move {
                    f.run(Colliding(k), far(), move || async move {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        k
                    })
                    .await
                });
                followers.push((k, j, task));
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        // Every leader's client goes away, and every other follower's.
        for l in &leaders {
            l.abort();
        }
        let mut kept = Vec::new();
        for (k, j, task) in followers {
            if j % 2 == 0 {
                task.abort();
            } else {
                kept.push((k, task));
            }
        }
        for (k, task) in kept {
            let (v, _) = tokio::time::timeout(Duration::from_secs(5), task)
                .await
                .expect("a follower must not wait forever")
                .unwrap()
                .unwrap();
            assert_eq!(v, k, "a follower got another key's answer");
        }
        assert_eq!(flights.len(), 0, "flights of clients gone are forgotten");
        // A flight that lands takes its own entry out, not a colliding
        // one's: asked again, its key is answered afresh.
        let pending = {
            let f = flights.clone();
            tokio::spawn(async move { f.run(Colliding(100), far(), std::future::pending::<u32>).await })
        };
        tokio::time::sleep(Duration::from_millis(10)).await;
        for _ in 0..2 {
            let asked = flights.run(Colliding(101), far(), || async { 101 });
            let (v, role) = tokio::time::timeout(Duration::from_secs(5), asked)
                .await
                .expect("a key asked again must not join a landed flight")
                .unwrap();
            assert_eq!((v, role), (101, Role::Leader));
        }
        assert_eq!(flights.len(), 1, "the colliding flight is still there");
        pending.abort();
    }

    /// Flights that currently hold a shared flight (made by a follower).
    fn shared(flights: &Flights<u8, u32>) -> usize {
        lock(&flights.map).table.iter().filter(|p| p.flight.is_some()).count()
    }

    /// A leader alone makes no flight to share (most misses have no
    /// follower); the first follower makes it, and still gets the answer.
    #[tokio::test]
    async fn only_a_follower_makes_a_flight_to_share() {
        let flights: Arc<Flights<u8, u32>> = Arc::default();
        let (release, released) = tokio::sync::oneshot::channel::<()>();
        let leader = {
            let flights = flights.clone();
            tokio::spawn(async move {
                flights
                    .run(1, far(), || async move {
                        let _ = released.await;
                        5
                    })
                    .await
            })
        };
        while flights.len() == 0 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        assert_eq!(shared(&flights), 0, "a leader alone shares nothing");
        let follower = {
            let flights = flights.clone();
            tokio::spawn(async move { flights.run(1, far(), || async { 9 }).await })
        };
        while shared(&flights) == 0 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        release.send(()).unwrap();
        let wait = Duration::from_secs(5);
        assert_eq!(
            tokio::time::timeout(wait, leader).await.unwrap().unwrap(),
            Ok((5, Role::Leader))
        );
        assert_eq!(
            tokio::time::timeout(wait, follower).await.unwrap().unwrap(),
            Ok((5, Role::Follower))
        );
        assert_eq!(flights.len(), 0);
    }

    #[tokio::test]
    async fn different_keys_do_not_wait_for_each_other() {
        let flights: Flights<u8, u8> = Flights::default();
        let (a, b) = tokio::join!(
            flights.run(1, far(), || async { 1 }),
            flights.run(2, far(), || async { 2 })
        );
        let (a, b) = (a.unwrap(), b.unwrap());
        assert_eq!((a.0, b.0), (1, 2));
        assert_eq!((a.1, b.1), (Role::Leader, Role::Leader));
    }

    /// A follower whose own deadline passes stops waiting, whoever leads
    /// and however often the lead changes hands; the flight goes on and
    /// lands for the followers still waiting.
    #[tokio::test]
    async fn a_follower_waits_no_longer_than_its_own_deadline() {
        let flights: Arc<Flights<u8, u32>> = Arc::default();
        let (release, released) = tokio::sync::oneshot::channel::<()>();
        let leader = {
            let f = flights.clone();
            tokio::spawn(async move {
                f.run(1, far(), || async move {
                    let _ = released.await;
                    5
                })
                .await
            })
        };
        tokio::time::sleep(Duration::from_millis(10)).await;
        let patient = {
            let f = flights.clone();
            tokio::spawn(async move { f.run(1, far(), || async { 6 }).await })
        };
        tokio::time::sleep(Duration::from_millis(10)).await;
        let until = Instant::now() + Duration::from_millis(50);
        let hurried = flights.run(1, until, || async { 7 });
        let late = tokio::time::timeout(Duration::from_secs(5), hurried)
            .await
            .expect("a follower past its deadline must stop waiting");
        assert_eq!(late, Err(Late));
        assert!(Instant::now() >= until);
        assert_eq!(flights.len(), 1, "the flight goes on");
        let _ = release.send(());
        assert_eq!(leader.await.unwrap(), Ok((5, Role::Leader)));
        assert_eq!(patient.await.unwrap(), Ok((5, Role::Follower)));
        assert_eq!(flights.len(), 0);
    }
}
