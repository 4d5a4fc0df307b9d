//! Simulated partition leases: the lock table that the consumers' lease
//! sessions share, as PostgreSQL's advisory locks are. A session ends when
//! its consumer is killed (the process died) or when the scheduler expires
//! it (the process was paused past its lease) while the consumer runs on,
//! unaware until it next asks.

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet};
use std::rc::Rc;

use super::{Chaos, yield_now};
use crate::stores::{Leases, Members, StoreError, StoreResult};

/// Every lease session and what it holds.
#[derive(Debug, Default)]
pub struct LeaseTable {
    next_session: u32,
    /// Live sessions, by number, with the component that opened each.
    sessions: BTreeMap<u32, u8>,
    /// Sessions that joined the group as members (a member's id is its session's number).
    members: BTreeSet<u32>,
    /// Each held partition's session.
    partitions: BTreeMap<i32, u32>,
}

impl LeaseTable {
    fn end(&mut self, session: u32) {
        self.sessions.remove(&session);
        self.members.remove(&session);
        self.partitions.retain(|_, s| *s != session);
    }

    /// Ends the sessions of `component`, as the server does with those of
    /// a process that stopped renewing them.
    pub fn expire(&mut self, component: u8) {
        let ended: Vec<u32> = self.sessions.iter().filter(|(_, c)| **c == component).map(|(s, _)| *s).collect();
        for s in ended {
            self.end(s);
        }
    }

    /// Which session holds each partition.
    pub fn holders(&self) -> &BTreeMap<i32, u32> {
        &self.partitions
    }
}

/// One consumer's lease session.
pub struct SimLeases {
    pub chaos: Rc<Chaos>,
    pub table: Rc<RefCell<LeaseTable>>,
    pub component: u8,
    pub session: Option<u32>,
}

impl SimLeases {
    /// The live session, opening a new one if the last one ended.
    fn session(&mut self) -> u32 {
        let mut table = self.table.borrow_mut();
        match self.session {
            Some(s) if table.sessions.contains_key(&s) => s,
            _ => {
                table.next_session += 1;
                let s = table.next_session;
                table.sessions.insert(s, self.component);
                self.session = Some(s);
                s
            }
        }
    }

    async fn call(&self, what: &str) -> StoreResult<()> {
        yield_now().await;
        if self.chaos.fails(what) {
            return Err(StoreError::transient(format!("simulated lease failure: {what}")));
        }
        Ok(())
    }

    /// Reports a failure after the call took effect.
    fn answer<T>(&self, what: &str, value: T) -> StoreResult<T> {
        if self.chaos.outcome_lost(what) {
            return Err(StoreError::unknown(format!("simulated lost answer: {what}")));
        }
        Ok(value)
    }
}

impl Drop for SimLeases {
    fn drop(&mut self) {
        if let Some(s) = self.session {
            self.table.borrow_mut().end(s);
        }
    }
}

impl Leases for SimLeases {
    async fn members(&mut self) -> StoreResult<Members> {
        self.call("lease members").await?;
        let me = self.session();
        let mut table = self.table.borrow_mut();
        table.members.insert(me);
        let all = table.members.iter().copied().collect();
        drop(table);
        self.answer("lease members", Members { me, all })
    }

    async fn take(&mut self, p: i32) -> StoreResult<bool> {
        self.call("lease take").await?;
        let me = self.session();
        let holder = *self.table.borrow_mut().partitions.entry(p).or_insert(me);
        self.chaos.note(&("take", p, holder));
        self.answer("lease take", holder == me)
    }

    async fn release(&mut self, p: i32) -> StoreResult<()> {
        self.call("lease release").await?;
        let me = self.session();
        let mut table = self.table.borrow_mut();
        if table.partitions.get(&p) == Some(&me) {
            table.partitions.remove(&p);
        }
        drop(table);
        self.answer("lease release", ())
    }

    async fn held(&mut self) -> StoreResult<BTreeSet<i32>> {
        self.call("lease held").await?;
        let table = self.table.borrow();
        let held = match self.session {
            Some(s) if table.sessions.contains_key(&s) => {
                table.partitions.iter().filter(|(_, h)| **h == s).map(|(p, _)| *p).collect()
            }
            _ => BTreeSet::new(),
        };
        Ok(held)
    }
}
