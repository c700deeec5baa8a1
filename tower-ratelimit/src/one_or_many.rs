//! A list that is almost always one item: inline when it is, boxed otherwise.

use std::{fmt, ops::Deref};

/// One item inline, or any other number boxed. Unlike a `SmallVec` of one it has no length or
/// capacity word: the tag lives in a niche of `T` where there is one (a `bool`, an enum's tag),
/// so it is exactly `T`'s size — what keeps a [`Verdict`](crate::Verdict) small enough to be
/// copied inline on the hot path.
#[derive(Clone, PartialEq, Eq)]
pub(crate) enum OneOrMany<T> {
    One(T),
    Many(Box<[T]>),
}

impl<T> Default for OneOrMany<T> {
    fn default() -> Self {
        // An empty boxed slice does not allocate.
        Self::Many(Box::default())
    }
}

impl<T> Deref for OneOrMany<T> {
    type Target = [T];

    #[inline]
    fn deref(&self) -> &[T] {
        match self {
            Self::One(item) => std::slice::from_ref(item),
            Self::Many(items) => items,
        }
    }
}

impl<T> FromIterator<T> for OneOrMany<T> {
    fn from_iter<I: IntoIterator<Item = T>>(iter: I) -> Self {
        let mut iter = iter.into_iter();
        let Some(first) = iter.next() else { return Self::default() };
        let Some(second) = iter.next() else { return Self::One(first) };
        let mut items = Vec::with_capacity(2 + iter.size_hint().0);
        items.push(first);
        items.push(second);
        items.extend(iter);
        Self::Many(items.into_boxed_slice())
    }
}

impl<T: fmt::Debug> fmt::Debug for OneOrMany<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.iter()).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn collects_zero_one_and_many() {
        assert!(OneOrMany::<u8>::from_iter([]).is_empty());
        assert!(matches!(OneOrMany::from_iter([7u8]), OneOrMany::One(7)));
        assert_eq!(&*OneOrMany::from_iter([1u8, 2, 3]), &[1, 2, 3]);
        assert_eq!(OneOrMany::from_iter([1u8]), OneOrMany::from_iter([1u8]));
    }

    #[test]
    fn takes_no_room_beyond_its_item_when_the_item_has_a_niche() {
        assert_eq!(size_of::<OneOrMany<crate::Decision>>(), size_of::<crate::Decision>());
        assert_eq!(size_of::<OneOrMany<crate::algorithm::QuotaReceipt>>(), size_of::<crate::algorithm::QuotaReceipt>());
    }
}

#[cfg(all(test, target_pointer_width = "64"))]
mod size_tests {
    /// A verdict is returned by value by every check: at 128 bytes or less it is copied with a
    /// few vector moves instead of a `memmove` call (measured: ~40% of a check's time at 256).
    #[test]
    fn a_verdict_fits_an_inline_copy() {
        assert!(size_of::<crate::Verdict>() <= 128, "{} bytes", size_of::<crate::Verdict>());
    }
}
