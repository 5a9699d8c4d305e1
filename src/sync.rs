//! The one way this crate takes a `std::sync::Mutex`.
//!
//! A panic while a lock is held poisons it; every table guarded here stays
//! consistent at each step of its methods (at worst a counter is off), so a
//! poisoned lock is taken anyway instead of taking the daemon down with it.

use std::sync::{Mutex, MutexGuard, PoisonError};

/// Locks `m`, ignoring poison.
pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}
