//! An in-memory conntrack table and a fault-injecting wrapper, for tests of the cleanup.

use std::sync::Arc;

use super::ConntrackTable;
use super::codec::{AF_INET, Entry};

/// An in-memory conntrack table; clones share it.
#[derive(Debug, Default, Clone)]
pub struct FakeConntrack {
    pub entries: Arc<std::sync::Mutex<Vec<Entry>>>,
}

impl FakeConntrack {
    pub fn entries(&self) -> Vec<Entry> {
        self.entries
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }
}

impl ConntrackTable for FakeConntrack {
    fn list(&mut self, family: u8) -> std::io::Result<Vec<Entry>> {
        Ok(self
            .entries()
            .into_iter()
            .filter(|e| (family == AF_INET) == e.orig.src.is_ipv4())
            .collect())
    }
    fn delete(&mut self, e: &Entry) -> std::io::Result<bool> {
        let mut v = self
            .entries
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let before = v.len();
        v.retain(|x| x != e);
        Ok(v.len() < before)
    }
}

/// Wraps a table and fails the deletes whose 1-based numbers are listed.
#[derive(Debug)]
pub struct FaultyConntrack<T> {
    pub inner: T,
    pub fail_deletes: Vec<usize>,
    deletes: usize,
}

impl<T> FaultyConntrack<T> {
    pub fn new(inner: T, fail_deletes: Vec<usize>) -> Self {
        FaultyConntrack {
            inner,
            fail_deletes,
            deletes: 0,
        }
    }
}

impl<T: ConntrackTable> ConntrackTable for FaultyConntrack<T> {
    fn list(&mut self, family: u8) -> std::io::Result<Vec<Entry>> {
        self.inner.list(family)
    }
    fn delete(&mut self, e: &Entry) -> std::io::Result<bool> {
        self.deletes += 1;
        if self.fail_deletes.contains(&self.deletes) {
            return Err(std::io::Error::other(format!(
                "injected fault on delete {}",
                self.deletes
            )));
        }
        self.inner.delete(e)
    }
}
