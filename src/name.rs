//! `Name`: a directory entry's name as the overlay keeps it.
//!
//! One allocation per name, shared (reference counted) by the directory's
//! two indexes and the inode's links, behind a pointer of 8 bytes: a cached
//! tree of millions of entries is mostly names and the maps holding them.

use std::borrow::Borrow;
use std::cmp::Ordering;
use std::ffi::{OsStr, OsString};
use std::fmt;
use std::hash::{Hash, Hasher};
use std::ops::Deref;
use std::os::unix::ffi::OsStrExt;

use triomphe::ThinArc;

#[derive(Clone)]
pub struct Name(ThinArc<(), u8>);

impl Name {
    pub fn new(s: &OsStr) -> Name {
        Name(ThinArc::from_header_and_slice((), s.as_bytes()))
    }
}

impl Deref for Name {
    type Target = OsStr;
    fn deref(&self) -> &OsStr {
        OsStr::from_bytes(&self.0.slice)
    }
}

impl Borrow<OsStr> for Name {
    fn borrow(&self) -> &OsStr {
        self
    }
}

impl AsRef<OsStr> for Name {
    fn as_ref(&self) -> &OsStr {
        self
    }
}

impl From<&OsStr> for Name {
    fn from(s: &OsStr) -> Name {
        Name::new(s)
    }
}

impl From<OsString> for Name {
    fn from(s: OsString) -> Name {
        Name::new(&s)
    }
}

// Equality, order and hash are the bytes', as `Borrow<OsStr>` requires.
impl PartialEq for Name {
    fn eq(&self, other: &Name) -> bool {
        **self == **other
    }
}

impl Eq for Name {}

impl PartialOrd for Name {
    fn partial_cmp(&self, other: &Name) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Name {
    fn cmp(&self, other: &Name) -> Ordering {
        (**self).cmp(&**other)
    }
}

impl Hash for Name {
    fn hash<S: Hasher>(&self, state: &mut S) {
        (**self).hash(state)
    }
}

impl fmt::Debug for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&**self, f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::{BTreeMap, HashMap};

    #[test]
    fn a_name_is_found_by_its_bytes_in_both_kinds_of_map() {
        let raw = OsStr::from_bytes(b"caf\xe9 \n.txt"); // not UTF-8
        let n = Name::new(raw);
        assert_eq!(&*n, raw);
        assert_eq!(std::mem::size_of::<Name>(), 8);
        let mut b = BTreeMap::new();
        b.insert(n.clone(), 1);
        b.insert(Name::new(OsStr::new("a")), 2);
        assert_eq!(b.get(raw), Some(&1));
        assert_eq!(b.keys().next().map(|k| &**k), Some(OsStr::new("a")));
        let mut h = HashMap::new();
        h.insert(n, 3);
        assert_eq!(h.get(raw), Some(&3));
        assert_eq!(h.get(OsStr::new("b")), None);
    }
}
