//! A small process-wide memo for the accountants: a ledger, a study's planning and
//! its parties ask for the same figure again and again (a charge's check, then the
//! charge; the coordinator and every agent of one process), and each may be a whole
//! PLD composition. Keys hold every input bit for bit; a full memo starts over.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::{Mutex, MutexGuard, OnceLock};

/// How many recent answers a memo keeps (a few hundred bytes each).
const ENTRIES: usize = 4096;

pub struct Memo<K, V> {
    map: OnceLock<Mutex<HashMap<K, V>>>,
}

impl<K: Eq + Hash, V: Copy> Default for Memo<K, V> {
    fn default() -> Self {
        Self::new()
    }
}

impl<K: Eq + Hash, V: Copy> Memo<K, V> {
    pub const fn new() -> Self {
        Memo { map: OnceLock::new() }
    }

    fn map(&self) -> MutexGuard<'_, HashMap<K, V>> {
        self.map
            .get_or_init(Mutex::default)
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    pub fn get(&self, key: &K) -> Option<V> {
        self.map().get(key).copied()
    }

    pub fn put(&self, key: K, value: V) {
        let mut map = self.map();
        if map.len() >= ENTRIES {
            map.clear();
        }
        map.insert(key, value);
    }

    pub fn clear(&self) {
        self.map().clear();
    }
}
