//! Who held which caption in which round, per stable sample id.
//!
//! A defense that re-pairs captions every few epochs needs to know which pairs
//! keep changing (a poison is pushed around, a clean pair settles), and a run
//! that resumes from a checkpoint needs the same history back: hence the
//! compact, versioned, deterministic byte format.

use std::collections::{HashMap, HashSet};

use crate::error::{Error, Result};

const MAGIC: &[u8; 8] = b"OTMHIST1";

/// Per-sample assignment history across rounds.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct History {
    entries: HashMap<i64, Vec<(i64, i64)>>,
}

impl History {
    /// An empty history.
    pub fn new() -> Self {
        Self::default()
    }

    /// Records that in `round` sample `ids[i]` held caption `captions[i]`.
    ///
    /// All or nothing: refuses (and records nothing) when the lengths differ,
    /// an id repeats, or an id already has this round or a later one.
    pub fn record(&mut self, round: i64, ids: &[i64], captions: &[i64]) -> Result<()> {
        if ids.len() != captions.len() {
            return Err(Error::invalid(format!(
                "ids and captions must have the same length, got {} and {}",
                ids.len(),
                captions.len()
            )));
        }
        let mut seen = HashSet::with_capacity(ids.len());
        for &id in ids {
            if !seen.insert(id) {
                return Err(Error::invalid(format!(
                    "id {id} appears twice in one round"
                )));
            }
            if let Some(&(last, _)) = self.entries.get(&id).and_then(|v| v.last()) {
                if last >= round {
                    return Err(Error::invalid(format!(
                        "id {id} already has round {last}; rounds must increase (got {round})"
                    )));
                }
            }
        }
        for (&id, &c) in ids.iter().zip(captions) {
            self.entries.entry(id).or_default().push((round, c));
        }
        Ok(())
    }

    /// `(round, caption)` pairs of sample `id`, oldest first (empty if unknown).
    pub fn get(&self, id: i64) -> &[(i64, i64)] {
        self.entries.get(&id).map_or(&[], |v| v.as_slice())
    }

    /// How many times sample `id`'s caption differed from the round before.
    pub fn changes(&self, id: i64) -> usize {
        self.get(id).windows(2).filter(|w| w[0].1 != w[1].1).count()
    }

    /// Number of samples with at least one record.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether nothing was recorded.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The sample ids, ascending.
    pub fn ids(&self) -> Vec<i64> {
        let mut ids: Vec<i64> = self.entries.keys().copied().collect();
        ids.sort_unstable();
        ids
    }

    /// A byte string that [`History::from_bytes`] reads back; ids in ascending
    /// order, so equal histories give equal bytes. Little-endian:
    /// `OTMHIST1`, u64 sample count, then per sample i64 id, u64 record
    /// count and that many (i64 round, i64 caption).
    pub fn to_bytes(&self) -> Vec<u8> {
        let records: usize = self.entries.values().map(Vec::len).sum();
        let mut out = Vec::with_capacity(16 + self.entries.len() * 16 + records * 16);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&(self.entries.len() as u64).to_le_bytes());
        for id in self.ids() {
            let v = &self.entries[&id];
            out.extend_from_slice(&id.to_le_bytes());
            out.extend_from_slice(&(v.len() as u64).to_le_bytes());
            for &(round, caption) in v {
                out.extend_from_slice(&round.to_le_bytes());
                out.extend_from_slice(&caption.to_le_bytes());
            }
        }
        out
    }

    /// Reads what [`History::to_bytes`] wrote; refuses anything else.
    pub fn from_bytes(bytes: &[u8]) -> Result<History> {
        let mut r = Reader { bytes, pos: 0 };
        if r.take(8)? != MAGIC {
            return Err(Error::Corrupt(
                "not an otmatch history (bad magic bytes)".into(),
            ));
        }
        let count = r.u64()?;
        let mut entries = HashMap::new();
        let mut previous: Option<i64> = None;
        for _ in 0..count {
            let id = r.i64()?;
            if previous.is_some_and(|p| p >= id) {
                return Err(Error::Corrupt(format!(
                    "history ids out of order at id {id}"
                )));
            }
            previous = Some(id);
            let n = r.u64()?;
            // Each record is 16 bytes: refuse counts the input cannot hold
            // before allocating for them.
            if n > (r.remaining() / 16) as u64 {
                return Err(Error::Corrupt("history is truncated".into()));
            }
            let mut v = Vec::with_capacity(n as usize);
            for _ in 0..n {
                let round = r.i64()?;
                let caption = r.i64()?;
                if v.last().is_some_and(|&(last, _)| last >= round) {
                    return Err(Error::Corrupt(format!("rounds of id {id} do not increase")));
                }
                v.push((round, caption));
            }
            entries.insert(id, v);
        }
        if r.remaining() != 0 {
            return Err(Error::Corrupt(format!(
                "{} unexpected bytes after the history",
                r.remaining()
            )));
        }
        Ok(History { entries })
    }
}

struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        if self.remaining() < n {
            return Err(Error::Corrupt("history is truncated".into()));
        }
        let s = &self.bytes[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    fn remaining(&self) -> usize {
        self.bytes.len() - self.pos
    }

    fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(
            self.take(8)?.try_into().expect("8 bytes"),
        ))
    }

    fn i64(&mut self) -> Result<i64> {
        Ok(i64::from_le_bytes(
            self.take(8)?.try_into().expect("8 bytes"),
        ))
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn records_counts_changes_and_round_trips() {
        let mut h = History::new();
        h.record(0, &[10, 20], &[1, 2]).unwrap();
        h.record(1, &[10, 20], &[1, 5]).unwrap();
        h.record(3, &[20], &[2]).unwrap();
        assert_eq!(h.get(20), &[(0, 2), (1, 5), (3, 2)]);
        assert_eq!(h.changes(20), 2);
        assert_eq!(h.changes(10), 0);
        assert!(h.get(99).is_empty());
        assert_eq!(h.len(), 2);
        let b = h.to_bytes();
        assert_eq!(History::from_bytes(&b).unwrap(), h);
        assert_eq!(h.clone().to_bytes(), b);
    }

    #[test]
    fn refuses_bad_records_without_partial_updates() {
        let mut h = History::new();
        h.record(2, &[1, 2], &[5, 6]).unwrap();
        let before = h.clone();
        assert!(h
            .record(3, &[1, 1], &[0, 0])
            .unwrap_err()
            .to_string()
            .contains("twice"));
        assert!(h
            .record(2, &[3, 2], &[0, 0])
            .unwrap_err()
            .to_string()
            .contains("rounds must increase"));
        assert!(h
            .record(4, &[3], &[0, 1])
            .unwrap_err()
            .to_string()
            .contains("same length"));
        assert_eq!(h, before);
    }

    #[test]
    fn refuses_corrupt_bytes() {
        let mut h = History::new();
        h.record(0, &[1, 2], &[3, 4]).unwrap();
        let b = h.to_bytes();
        for cut in [0, 5, 8, 15, 20, b.len() - 1] {
            assert!(History::from_bytes(&b[..cut]).is_err(), "cut at {cut}");
        }
        let mut extra = b.clone();
        extra.push(0);
        assert!(History::from_bytes(&extra)
            .unwrap_err()
            .to_string()
            .contains("unexpected bytes"));
        let mut magic = b.clone();
        magic[0] = b'X';
        assert!(History::from_bytes(&magic)
            .unwrap_err()
            .to_string()
            .contains("magic"));
        let mut huge = b[..16].to_vec();
        huge.extend_from_slice(&1i64.to_le_bytes());
        huge.extend_from_slice(&u64::MAX.to_le_bytes());
        assert!(History::from_bytes(&huge).is_err());
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 64, .. ProptestConfig::default() })]
        #[test]
        fn bytes_round_trip(rounds in prop::collection::vec(prop::collection::btree_map(-50i64..50, -3i64..9, 0..20), 0..6)) {
            let mut h = History::new();
            for (r, m) in rounds.iter().enumerate() {
                let ids: Vec<i64> = m.keys().copied().collect();
                let caps: Vec<i64> = m.values().copied().collect();
                h.record(r as i64, &ids, &caps).unwrap();
            }
            let back = History::from_bytes(&h.to_bytes()).unwrap();
            prop_assert_eq!(&back, &h);
            for id in h.ids() {
                prop_assert_eq!(back.changes(id), h.changes(id));
            }
        }
    }
}
