//! Shared strings for values that many objects repeat: an endpoint's node name and zone are
//! one of a few thousand per cluster, held by up to a million endpoints at 100k services.
//! Each distinct value is stored once; a value nothing holds any more is dropped at the next
//! purge, which runs when the set has doubled since the last one (so a churn of names
//! cannot grow it without bound).

use std::collections::HashSet;
use std::sync::{Arc, LazyLock, Mutex, PoisonError};

/// Purges never run below this many names.
const MIN_PURGE: usize = 1024;

#[derive(Debug)]
pub struct Interner {
    set: HashSet<Arc<str>>,
    purge_at: usize,
}

impl Default for Interner {
    fn default() -> Self {
        Interner {
            set: HashSet::new(),
            purge_at: MIN_PURGE,
        }
    }
}

impl Interner {
    /// The shared copy of `s`.
    pub fn get(&mut self, s: &str) -> Arc<str> {
        if let Some(a) = self.set.get(s) {
            return Arc::clone(a);
        }
        if self.set.len() >= self.purge_at {
            self.set.retain(|a| Arc::strong_count(a) > 1);
            self.purge_at = (self.set.len() * 2).max(MIN_PURGE);
        }
        let a: Arc<str> = Arc::from(s);
        self.set.insert(Arc::clone(&a));
        a
    }

    pub fn len(&self) -> usize {
        self.set.len()
    }

    pub fn is_empty(&self) -> bool {
        self.set.is_empty()
    }
}

static NAMES: LazyLock<Mutex<Interner>> = LazyLock::new(Mutex::default);

/// The process-wide shared copy of `s`.
pub fn intern(s: &str) -> Arc<str> {
    NAMES.lock().unwrap_or_else(PoisonError::into_inner).get(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_copy_per_value_and_unheld_values_are_purged() {
        let mut i = Interner::default();
        let a = i.get("node-a");
        let b = i.get("node-a");
        assert!(Arc::ptr_eq(&a, &b));
        assert_eq!(&*a, "node-a");
        // A churn of names nobody keeps: the set stays bounded, the held name survives.
        for n in 0..10 * MIN_PURGE {
            drop(i.get(&format!("gone-{n}")));
        }
        assert!(i.len() <= MIN_PURGE + 1, "{}", i.len());
        assert!(Arc::ptr_eq(&a, &i.get("node-a")));
    }
}
