//! The subscription tree: one node per topic level, each subscription stored at the node its
//! filter ends at, keyed by subscriber id.

use super::SubOpts;
use std::collections::HashMap;

/// A node of the subscription tree: one topic level.
#[derive(Debug, Default)]
pub(super) struct Node {
    children: HashMap<Box<str>, Node>,
    /// Filters that end at this level, by subscriber.
    here: HashMap<u64, SubOpts>,
    /// Filters `<this level>/#`, by subscriber.
    hash: HashMap<u64, SubOpts>,
}

impl Node {
    /// Adds or replaces subscriber `sid`'s subscription to `filter`; whether it replaced one.
    pub(super) fn insert(&mut self, filter: &str, sid: u64, o: SubOpts) -> bool {
        let mut n = self;
        for level in filter.split('/') {
            if level == "#" {
                return n.hash.insert(sid, o).is_some();
            }
            n = n.children.entry(level.into()).or_default();
        }
        n.here.insert(sid, o).is_some()
    }

    /// Removes `sid`'s subscription to `filter`; whether there was one.
    pub(super) fn remove(&mut self, filter: &str, sid: u64) -> bool {
        let levels: Vec<&str> = filter.split('/').collect();
        self.remove_levels(&levels, sid)
    }

    fn remove_levels(&mut self, levels: &[&str], sid: u64) -> bool {
        match levels {
            [] => self.here.remove(&sid).is_some(),
            ["#"] => self.hash.remove(&sid).is_some(),
            [first, rest @ ..] => {
                let Some(child) = self.children.get_mut(*first) else {
                    return false;
                };
                let removed = child.remove_levels(rest, sid);
                if child.is_empty() {
                    self.children.remove(*first);
                }
                removed
            }
        }
    }

    pub(super) fn is_empty(&self) -> bool {
        self.children.is_empty() && self.here.is_empty() && self.hash.is_empty()
    }

    /// Calls `f` for every subscription matching `topic`; a filter beginning with a wildcard
    /// does not match a topic beginning with `$`.
    pub(super) fn matches(&self, topic: &str, f: &mut impl FnMut(u64, SubOpts)) {
        let levels: Vec<&str> = topic.split('/').collect();
        self.walk(&levels, 0, topic.starts_with('$'), f);
    }

    fn walk(&self, levels: &[&str], i: usize, dollar: bool, f: &mut impl FnMut(u64, SubOpts)) {
        let wild = !(i == 0 && dollar);
        if wild {
            for (s, o) in &self.hash {
                f(*s, *o);
            }
        }
        let Some(level) = levels.get(i) else {
            for (s, o) in &self.here {
                f(*s, *o);
            }
            return;
        };
        if let Some(child) = self.children.get(*level) {
            child.walk(levels, i + 1, dollar, f);
        }
        if wild && let Some(child) = self.children.get("+") {
            child.walk(levels, i + 1, dollar, f);
        }
    }
}
