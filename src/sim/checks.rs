//! The properties the simulation checks: those that hold at every moment
//! ([`World::check_always`]) and those that hold once everything is
//! drained ([`World::check_quiescent`]). Apart from the world they judge,
//! so that what is checked reads on its own.

use std::collections::{BTreeMap, BTreeSet};

use crate::change;
use crate::types::{Key, key_text};

use super::{SMALL_RANGES, World, source};

impl World {
    /// Every change the log holds (that decodes), as (key, version).
    fn logged(&self) -> BTreeSet<(Key, u64)> {
        self.log
            .borrow()
            .values()
            .filter_map(|v| change::decode(&self.schema, Some(v)).ok())
            .map(|c| (c.key(&self.schema), c.version))
            .collect()
    }

    /// The properties that must hold at every moment.
    pub fn check_always(&self) -> Result<(), String> {
        let table = self.table.borrow();
        for change in self.sink.borrow().parts.iter().flatten() {
            let key = change.key(&self.schema);
            match table.claimed.get(&(key.clone(), change.version)) {
                Some(Some(values)) if !change.deleted && *values == change.values => {}
                Some(None) if change.deleted => {}
                other => {
                    return Err(format!(
                        "sink holds key {} version {} ({}), which no claim handed out as such (claimed: {other:?})",
                        key_text(&key),
                        change.version,
                        if change.deleted { "deleted" } else { "a row" }
                    ));
                }
            }
        }
        let logged = self.logged();
        for (key, row) in &table.committed {
            if !row.sent {
                continue;
            }
            let k = key_text(key);
            if let Some(why) = &row.rejected {
                return Err(format!("row {k} is flagged both sent and rejected ({why})"));
            }
            if table.pending_load(row.addr) {
                // Sent by default, its chunk still to carry.
                continue;
            }
            if row.version == 0 {
                // Never written since init: its chunk published it as it is.
                let published = table.claimed.iter().any(|((c, v), values)| {
                    c == key && values.as_ref() == Some(&row.values) && logged.contains(&(key.clone(), *v))
                });
                if !published {
                    return Err(format!(
                        "row {k} was there at init and its chunk is done, but it is not in the log as it is"
                    ));
                }
                continue;
            }
            match table.claimed.get(&(key.clone(), row.version)) {
                Some(Some(values)) if *values == row.values => {}
                _ => {
                    return Err(format!(
                        "row {k} is flagged sent as version {}, but that is not what version {} of it was: \
                         a change after the claim was flagged sent without being published",
                        row.version, row.version
                    ));
                }
            }
            if !logged.contains(&(key.clone(), row.version)) {
                return Err(format!("row {k} is flagged sent as version {} but is not in the log", row.version));
            }
            if let Err(why) = source::Table::travels(&self.schema, &row.values) {
                return Err(format!("row {k} is flagged sent but cannot travel: {why}"));
            }
        }
        Ok(())
    }

    /// The properties that must hold once everything drained.
    pub fn check_quiescent(&self) -> Result<(), String> {
        let table = self.table.borrow();
        if let Some(key) = table.deletes.keys().next() {
            return Err(format!("the deletion of key {} is still unsent after draining", key_text(key)));
        }
        if let Some((chunk, _)) = table.chunks.iter().next() {
            return Err(format!("the initial load's chunk at {chunk:?} is still to carry after draining"));
        }
        let mut expected = BTreeMap::new();
        for (key, row) in &table.committed {
            let k = key_text(key);
            match (source::Table::travels(&self.schema, &row.values), &row.rejected) {
                (Ok(()), None) if row.sent => {
                    expected.insert(key.clone(), (&row.values, row.version));
                }
                (Ok(()), None) => return Err(format!("row {k} is still unsent after draining")),
                (Ok(()), Some(why)) => return Err(format!("row {k} could travel but was rejected: {why}")),
                (Err(why), None) => return Err(format!("row {k} cannot travel ({why}) but was not flagged rejected")),
                (Err(_), Some(_)) => {}
            }
        }
        let live = self.sink.borrow().final_rows();
        for (key, change) in &live {
            let k = key_text(key);
            match expected.get(key) {
                // The content, at a version no lower than the one flagged
                // (two claims of an unchanged row may leave the later's).
                Some((values, version)) if **values == change.values && *version <= change.version => {}
                Some((values, version)) => {
                    return Err(format!(
                        "sink FINAL has key {k} as version {} {:?}, the table has version {version} {values:?}",
                        change.version, change.values
                    ));
                }
                // A row that cannot travel any more: the sink keeps what it was.
                None if table.committed.get(key).is_some_and(|r| r.rejected.is_some()) => {}
                None => return Err(format!("sink FINAL has key {k}, which the table no longer has: a lost deletion")),
            }
        }
        if let Some(key) = expected.keys().find(|k| !live.contains_key(*k)) {
            return Err(format!("row {} is flagged sent but the sink does not hold it", key_text(key)));
        }
        let dead: BTreeSet<(i32, i64)> = self.log.borrow().dead_letters.iter().map(|(p, o, _)| (*p, *o)).collect();
        if let Some(missing) = self.poison.borrow().iter().find(|at| !dead.contains(at)) {
            return Err(format!(
                "poison record at partition {} offset {} never reached the dead-letter topic",
                missing.0, missing.1
            ));
        }
        drop(table);
        let report = self.verify(SMALL_RANGES).map_err(|e| format!("verify: {e:#}"))?;
        if !report.ok() {
            return Err(format!("verify finds the sink different from the table after draining:\n{report}"));
        }
        Ok(())
    }
}
