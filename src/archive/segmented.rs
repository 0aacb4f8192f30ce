//! A list for per-entry records of archives with very many entries.

/// Records per segment.
const SEGMENT: usize = 4096;

/// A list that grows a fixed-size segment at a time instead of doubling, so that appending never copies what it
/// holds: a zip of 100 000 entries writes each entry's record once, into memory touched once.
pub struct Segmented<T> {
    segments: Vec<Vec<T>>,
    len: usize,
}

impl<T> Default for Segmented<T> {
    fn default() -> Self {
        Segmented { segments: Vec::new(), len: 0 }
    }
}

impl<T> Segmented<T> {
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn push(&mut self, value: T) {
        match self.segments.last_mut() {
            Some(segment) if segment.len() < SEGMENT => segment.push(value),
            _ => {
                let mut segment = Vec::with_capacity(SEGMENT);
                segment.push(value);
                self.segments.push(segment);
            }
        }
        self.len += 1;
    }

    pub fn get(&self, index: usize) -> Option<&T> {
        self.segments.get(index / SEGMENT)?.get(index % SEGMENT)
    }

    pub fn get_mut(&mut self, index: usize) -> Option<&mut T> {
        self.segments.get_mut(index / SEGMENT)?.get_mut(index % SEGMENT)
    }

    pub fn iter(&self) -> impl Iterator<Item = &T> {
        self.segments.iter().flatten()
    }
}

impl<T> IntoIterator for Segmented<T> {
    type Item = T;
    type IntoIter = std::iter::Flatten<std::vec::IntoIter<Vec<T>>>;

    fn into_iter(self) -> Self::IntoIter {
        self.segments.into_iter().flatten()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holds_its_values_in_order_across_segments() {
        let mut list = Segmented::default();
        assert!(list.is_empty() && list.get(0).is_none());
        for n in 0..3 * SEGMENT + 5 {
            list.push(n);
        }
        assert_eq!(list.len(), 3 * SEGMENT + 5);
        assert_eq!(list.get(SEGMENT), Some(&SEGMENT));
        assert_eq!(list.get(3 * SEGMENT + 5), None);
        *list.get_mut(7).unwrap() = usize::MAX;
        assert_eq!(list.iter().filter(|&&n| n != usize::MAX).count(), 3 * SEGMENT + 4);
        let all: Vec<usize> = list.into_iter().collect();
        assert_eq!(all[..8], [0, 1, 2, 3, 4, 5, 6, usize::MAX]);
        assert_eq!(all.last(), Some(&(3 * SEGMENT + 4)));
    }
}
