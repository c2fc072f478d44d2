//! Changes waiting for the next batch: coalesced per path and bounded.

use std::collections::HashSet;

use agentvm_proto::watch::{Change, MAX_BATCH};

/// The most changes kept before they collapse into one [`Change::Rescan`].
pub const MAX_PENDING: usize = 8192;
/// The most bytes of changes one frame carries.
pub const MAX_BATCH_BYTES: usize = 64 << 10;

/// Changes since the last batch, in order.
#[derive(Debug)]
pub struct Pending {
    changes: Vec<Change>,
    /// Paths whose last change is a modify: another modify adds nothing.
    modified: HashSet<Vec<u8>>,
    /// Over the bound: everything collapses into one rescan.
    overflowed: bool,
    cap: usize,
}

impl Pending {
    pub fn new(cap: usize) -> Pending {
        Pending { changes: Vec::new(), modified: HashSet::new(), overflowed: false, cap }
    }

    pub fn is_empty(&self) -> bool {
        self.changes.is_empty() && !self.overflowed
    }

    /// Adds a change; a modify of a path whose last change was a modify is
    /// dropped, and past the bound all collapses into a rescan.
    pub fn push(&mut self, change: Change) {
        if self.overflowed {
            return;
        }
        match &change {
            Change::Modify { path, .. } => {
                if !self.modified.insert(path.clone()) {
                    return;
                }
            }
            Change::Create { path, .. } | Change::Delete { path, .. } => {
                self.modified.remove(path);
            }
            Change::Rename { from, to, .. } => {
                self.modified.remove(from);
                self.modified.remove(to);
            }
            Change::Rescan => return self.overflow(),
        }
        if self.changes.len() == self.cap {
            return self.overflow();
        }
        self.changes.push(change);
    }

    fn overflow(&mut self) {
        self.overflowed = true;
        self.changes = Vec::new();
        self.modified = HashSet::new();
    }

    /// The changes as batches of at most [`MAX_BATCH`] changes and
    /// `max_bytes` each, emptying this.
    pub fn take_batches(&mut self, max_bytes: usize) -> Vec<Vec<Change>> {
        let overflowed = std::mem::take(&mut self.overflowed);
        let changes = std::mem::take(&mut self.changes);
        self.modified.clear();
        if overflowed {
            return vec![vec![Change::Rescan]];
        }
        let mut batches: Vec<Vec<Change>> = Vec::new();
        let mut bytes = 0;
        for change in changes {
            let len = change.encoded_len();
            match batches.last_mut() {
                Some(batch) if batch.len() < MAX_BATCH && bytes + len <= max_bytes => batch.push(change),
                _ => batches.push(vec![change]),
            }
            bytes = if batches.last().is_some_and(|b| b.len() == 1) { len } else { bytes + len };
        }
        batches
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn modify(p: &str) -> Change {
        Change::Modify { path: p.as_bytes().to_vec(), dir: false }
    }

    fn create(p: &str) -> Change {
        Change::Create { path: p.as_bytes().to_vec(), dir: false }
    }

    #[test]
    fn a_burst_of_writes_to_one_file_is_one_modify() {
        let mut p = Pending::new(100);
        p.push(create("a"));
        for _ in 0..1000 {
            p.push(modify("a"));
            p.push(modify("b"));
        }
        assert_eq!(p.take_batches(MAX_BATCH_BYTES), [vec![create("a"), modify("a"), modify("b")]]);
        assert!(p.is_empty());
        p.push(modify("a"));
        assert_eq!(p.take_batches(MAX_BATCH_BYTES), [vec![modify("a")]], "a new window tells again");
    }

    #[test]
    fn a_modify_after_another_change_of_the_path_is_kept() {
        let mut p = Pending::new(100);
        p.push(modify("a"));
        p.push(Change::Delete { path: b"a".to_vec(), dir: false });
        p.push(create("a"));
        p.push(modify("a"));
        assert_eq!(p.take_batches(MAX_BATCH_BYTES)[0].len(), 4);
    }

    #[test]
    fn past_the_bound_everything_is_one_rescan() {
        let mut p = Pending::new(3);
        for i in 0..10 {
            p.push(create(&i.to_string()));
        }
        assert!(!p.is_empty());
        assert_eq!(p.take_batches(MAX_BATCH_BYTES), [vec![Change::Rescan]]);
        assert!(p.is_empty());
        assert_eq!(p.take_batches(MAX_BATCH_BYTES), Vec::<Vec<Change>>::new());
    }

    #[test]
    fn batches_keep_order_and_stay_under_their_bounds() {
        let mut p = Pending::new(MAX_PENDING);
        let all: Vec<Change> = (0..3000).map(|i| create(&format!("dir/file-{i:05}"))).collect();
        all.iter().cloned().for_each(|c| p.push(c));
        let batches = p.take_batches(4096);
        assert!(batches.iter().all(|b| b.len() <= MAX_BATCH));
        assert!(batches.iter().all(|b| b.iter().map(Change::encoded_len).sum::<usize>() <= 4096));
        assert_eq!(batches.concat(), all);
        let few = Pending::new(10).take_batches(4096);
        assert!(few.is_empty());
    }
}
