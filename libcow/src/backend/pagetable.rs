//! A page-address → value hash table stored in the book (open addressing, linear probing).

use crate::book::BookVec;

/// Maps page addresses (never 0) to word-sized values.
#[derive(Default)]
pub struct PageTable {
    slots: BookVec<(usize, usize)>,
    used: usize,
}

fn hash(page: usize, mask: usize) -> usize {
    ((page >> 12).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 20) & mask
}

impl PageTable {
    fn mask(&self) -> usize {
        self.slots.len().wrapping_sub(1)
    }

    fn find(&self, page: usize) -> Option<usize> {
        if self.slots.is_empty() {
            return None;
        }
        let s = self.slots.as_slice();
        let mut i = hash(page, self.mask());
        loop {
            match s[i].0 {
                0 => return None,
                k if k == page => return Some(i),
                _ => i = (i + 1) & self.mask(),
            }
        }
    }

    /// The value for `page`.
    pub fn get(&self, page: usize) -> Option<usize> {
        self.find(page).map(|i| self.slots.as_slice()[i].1)
    }

    /// Sets `page` to `value`; returns the previous value.
    pub fn insert(&mut self, page: usize, value: usize) -> Option<usize> {
        debug_assert!(page != 0);
        if (self.used + 1) * 2 > self.slots.len() {
            self.grow();
        }
        let mask = self.mask();
        let s = self.slots.as_mut_slice();
        let mut i = hash(page, mask);
        loop {
            match s[i].0 {
                0 => {
                    s[i] = (page, value);
                    self.used += 1;
                    return None;
                }
                k if k == page => return Some(std::mem::replace(&mut s[i].1, value)),
                _ => i = (i + 1) & mask,
            }
        }
    }

    /// Removes `page`; returns its value.
    pub fn remove(&mut self, page: usize) -> Option<usize> {
        let mut i = self.find(page)?;
        let mask = self.mask();
        let s = self.slots.as_mut_slice();
        let value = s[i].1;
        // Backward-shift deletion keeps every probe sequence unbroken.
        let mut j = i;
        loop {
            j = (j + 1) & mask;
            if s[j].0 == 0 {
                break;
            }
            let home = hash(s[j].0, mask);
            let moves = if i <= j {
                home <= i || home > j
            } else {
                home <= i && home > j
            };
            if moves {
                s[i] = s[j];
                i = j;
            }
        }
        s[i] = (0, 0);
        self.used -= 1;
        Some(value)
    }

    /// Every `(page, value)`, in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = (usize, usize)> + '_ {
        self.slots.as_slice().iter().copied().filter(|e| e.0 != 0)
    }

    fn grow(&mut self) {
        let cap = (self.slots.len() * 2).max(1024);
        let mut old = std::mem::take(&mut self.slots);
        self.slots.reserve(cap);
        for _ in 0..cap {
            self.slots.push((0, 0));
        }
        self.used = 0;
        for &(k, v) in old.as_slice() {
            if k != 0 {
                self.insert(k, v);
            }
        }
        old.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn insert_get_remove_like_a_map() {
        let mut t = PageTable::default();
        let mut reference = std::collections::HashMap::new();
        let mut x = 0x1234_5678u64;
        for _ in 0..20000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let page = ((x % 5000) as usize + 1) << 12;
            if x.is_multiple_of(3) {
                assert_eq!(t.remove(page), reference.remove(&page));
            } else {
                assert_eq!(
                    t.insert(page, x as usize),
                    reference.insert(page, x as usize)
                );
            }
            assert_eq!(t.used, reference.len());
        }
        for (&k, &v) in &reference {
            assert_eq!(t.get(k), Some(v));
        }
        assert_eq!(t.iter().count(), reference.len());
    }
}
