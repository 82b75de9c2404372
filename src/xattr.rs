//! Extended attributes and POSIX ACLs: which names efscache accepts, and
//! the ACL rules a filesystem that offers `FUSE_POSIX_ACL` must apply itself
//! (the kernel checks permissions with the ACLs but leaves keeping mode and
//! ACL consistent to the filesystem). Pure: no I/O.
//!
//! ACLs travel as the kernel's xattr encoding (`system.posix_acl_access`,
//! `system.posix_acl_default`): a little-endian u32 version (2), then
//! entries of `tag: u16, perm: u16, id: u32`. The rules follow the kernel's
//! `posix_acl_equiv_mode`, `posix_acl_create_masq` and `posix_acl_chmod_masq`
//! (fs/posix_acl.c), so the overlay answers exactly what a local filesystem
//! (and later the backend) holds.

use std::collections::BTreeMap;
use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::OsStrExt;

/// An object's extended attributes, name -> value.
pub type Xattrs = BTreeMap<OsString, Vec<u8>>;

pub const ACL_ACCESS: &str = "system.posix_acl_access";
pub const ACL_DEFAULT: &str = "system.posix_acl_default";

/// The namespaces efscache stores and publishes, each probed on the backend
/// (and the cache disk) at mount.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Class {
    User,
    Trusted,
    Security,
    /// `system.posix_acl_access` / `system.posix_acl_default`.
    Acl,
    /// Anything else (other `system.*` names, unknown prefixes): refused.
    Unsupported,
}

pub fn classify(name: &OsStr) -> Class {
    let b = name.as_bytes();
    if b == ACL_ACCESS.as_bytes() || b == ACL_DEFAULT.as_bytes() {
        Class::Acl
    } else if b.starts_with(b"user.") {
        Class::User
    } else if b.starts_with(b"trusted.") {
        Class::Trusted
    } else if b.starts_with(b"security.") {
        Class::Security
    } else {
        Class::Unsupported
    }
}

/// Labels a host's security module puts on local files (the staging files
/// on the cache disk) describe that disk, not the user's file: never
/// copied from staging to the backend.
pub fn is_host_label(name: &OsStr) -> bool {
    let b = name.as_bytes();
    b == b"security.selinux" || b == b"security.apparmor" || b == b"security.SMACK64"
}

const VERSION: u32 = 2;
pub const USER_OBJ: u16 = 0x01;
pub const USER: u16 = 0x02;
pub const GROUP_OBJ: u16 = 0x04;
pub const GROUP: u16 = 0x08;
pub const MASK: u16 = 0x10;
pub const OTHER: u16 = 0x20;
const UNDEFINED_ID: u32 = u32::MAX;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AclEntry {
    pub tag: u16,
    pub perm: u16,
    pub id: u32,
}

/// A POSIX ACL in the kernel's order (as the kernel validated it).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Acl(pub Vec<AclEntry>);

#[derive(Debug, PartialEq, Eq)]
pub struct Malformed;

impl Acl {
    pub fn parse(b: &[u8]) -> Result<Acl, Malformed> {
        if b.len() < 4 || !(b.len() - 4).is_multiple_of(8) {
            return Err(Malformed);
        }
        if u32::from_le_bytes(b[0..4].try_into().expect("4 bytes")) != VERSION {
            return Err(Malformed);
        }
        let mut entries = Vec::with_capacity((b.len() - 4) / 8);
        for e in b[4..].chunks_exact(8) {
            let tag = u16::from_le_bytes([e[0], e[1]]);
            if ![USER_OBJ, USER, GROUP_OBJ, GROUP, MASK, OTHER].contains(&tag) {
                return Err(Malformed);
            }
            entries.push(AclEntry {
                tag,
                perm: u16::from_le_bytes([e[2], e[3]]) & 7,
                id: u32::from_le_bytes([e[4], e[5], e[6], e[7]]),
            });
        }
        Ok(Acl(entries))
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(4 + 8 * self.0.len());
        v.extend_from_slice(&VERSION.to_le_bytes());
        for e in &self.0 {
            v.extend_from_slice(&e.tag.to_le_bytes());
            v.extend_from_slice(&e.perm.to_le_bytes());
            v.extend_from_slice(&e.id.to_le_bytes());
        }
        v
    }

    /// The three-entry ACL a mode stands for.
    pub fn from_mode(mode: u32) -> Acl {
        let e = |tag, perm: u32| AclEntry {
            tag,
            perm: (perm & 7) as u16,
            id: UNDEFINED_ID,
        };
        Acl(vec![e(USER_OBJ, mode >> 6), e(GROUP_OBJ, mode >> 3), e(OTHER, mode)])
    }

    /// Setting this as an object's access ACL: the object's new mode, and
    /// the ACL to store (None when the mode says it all: nothing is stored).
    pub fn equiv_mode(&self, mode: u32) -> (u32, Option<Acl>) {
        let mut bits = 0;
        let mut extended = false;
        let mut mask = None;
        for e in &self.0 {
            let p = u32::from(e.perm & 7);
            match e.tag {
                USER_OBJ => bits |= p << 6,
                GROUP_OBJ => bits |= p << 3,
                OTHER => bits |= p,
                MASK => {
                    mask = Some(p);
                    extended = true;
                }
                _ => extended = true,
            }
        }
        if let Some(m) = mask {
            bits = (bits & !0o070) | (m << 3);
        }
        let mode = (mode & !0o777) | bits;
        (mode, extended.then(|| self.clone()))
    }

    /// A new object in a directory with this default ACL, created with
    /// `mode` (no umask: the default ACL replaces it): its mode, and its
    /// access ACL if the mode alone does not say it all.
    pub fn create_masq(&self, mode: u32) -> (u32, Option<Acl>) {
        let mut acl = self.clone();
        let mut m = mode & 0o777;
        let mut extended = false;
        let (mut group_obj, mut mask) = (None, None);
        for (k, e) in acl.0.iter_mut().enumerate() {
            match e.tag {
                USER_OBJ => {
                    e.perm &= ((m >> 6) & 7) as u16;
                    m &= (u32::from(e.perm) << 6) | !0o700;
                }
                OTHER => {
                    e.perm &= (m & 7) as u16;
                    m &= u32::from(e.perm) | !0o007;
                }
                GROUP_OBJ => group_obj = Some(k),
                MASK => {
                    mask = Some(k);
                    extended = true;
                }
                _ => extended = true,
            }
        }
        if let Some(k) = mask.or(group_obj) {
            let e = &mut acl.0[k];
            e.perm &= ((m >> 3) & 7) as u16;
            m &= (u32::from(e.perm) << 3) | !0o070;
        }
        ((mode & !0o777) | (m & 0o777), extended.then_some(acl))
    }

    /// The ACL after `chmod(mode)`: owner, group class (the mask if there is
    /// one) and other entries take the mode's bits.
    pub fn chmod(&self, mode: u32) -> Acl {
        let mut acl = self.clone();
        let has_mask = acl.0.iter().any(|e| e.tag == MASK);
        for e in &mut acl.0 {
            match e.tag {
                USER_OBJ => e.perm = ((mode >> 6) & 7) as u16,
                OTHER => e.perm = (mode & 7) as u16,
                MASK => e.perm = ((mode >> 3) & 7) as u16,
                GROUP_OBJ if !has_mask => e.perm = ((mode >> 3) & 7) as u16,
                _ => {}
            }
        }
        acl
    }
}

/// The names of `xattrs` in listxattr(2) form: each NUL-terminated.
/// `trusted.*` names are shown only to privileged callers, as local
/// filesystems do.
pub fn list_bytes<'a>(names: impl Iterator<Item = &'a OsString>, privileged: bool) -> Vec<u8> {
    let mut out = Vec::new();
    for n in names {
        if !privileged && classify(n) == Class::Trusted {
            continue;
        }
        out.extend_from_slice(n.as_bytes());
        out.push(0);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn e(tag: u16, perm: u16, id: u32) -> AclEntry {
        AclEntry { tag, perm, id }
    }

    #[test]
    fn round_trips_and_rejects_garbage() {
        let acl = Acl(vec![
            e(USER_OBJ, 6, UNDEFINED_ID),
            e(USER, 4, 1000),
            e(GROUP_OBJ, 4, UNDEFINED_ID),
            e(MASK, 4, UNDEFINED_ID),
            e(OTHER, 0, UNDEFINED_ID),
        ]);
        assert_eq!(Acl::parse(&acl.to_bytes()), Ok(acl));
        assert_eq!(Acl::parse(b"\x02\0\0"), Err(Malformed));
        assert_eq!(Acl::parse(b"\x01\0\0\0"), Err(Malformed));
        assert_eq!(Acl::parse(b"\x02\0\0\0\x40\0\0\0\0\0\0\0"), Err(Malformed));
    }

    #[test]
    fn a_minimal_acl_is_just_a_mode() {
        let (mode, keep) = Acl::from_mode(0o751).equiv_mode(0o4000);
        assert_eq!(mode, 0o4751);
        assert_eq!(keep, None);
    }

    #[test]
    fn the_mask_becomes_the_group_bits() {
        let acl = Acl(vec![
            e(USER_OBJ, 7, UNDEFINED_ID),
            e(USER, 7, 1000),
            e(GROUP_OBJ, 5, UNDEFINED_ID),
            e(MASK, 6, UNDEFINED_ID),
            e(OTHER, 1, UNDEFINED_ID),
        ]);
        let (mode, keep) = acl.equiv_mode(0o644);
        assert_eq!(mode, 0o761);
        assert_eq!(keep, Some(acl));
    }

    #[test]
    fn chmod_rewrites_owner_mask_and_other() {
        let acl = Acl(vec![
            e(USER_OBJ, 7, UNDEFINED_ID),
            e(USER, 7, 1000),
            e(GROUP_OBJ, 5, UNDEFINED_ID),
            e(MASK, 7, UNDEFINED_ID),
            e(OTHER, 5, UNDEFINED_ID),
        ]);
        let c = acl.chmod(0o640);
        assert_eq!(c.0.iter().map(|e| e.perm).collect::<Vec<_>>(), vec![6, 7, 5, 4, 0]);
        // Without a mask, the owning group's entry takes the group bits.
        let c = Acl::from_mode(0o777).chmod(0o640);
        assert_eq!(c, Acl::from_mode(0o640));
    }

    #[test]
    fn create_masks_the_default_acl_with_the_requested_mode() {
        // setfacl -d -m u:1000:rwx,m::rwx on a directory with mode 755.
        let default = Acl(vec![
            e(USER_OBJ, 7, UNDEFINED_ID),
            e(USER, 7, 1000),
            e(GROUP_OBJ, 5, UNDEFINED_ID),
            e(MASK, 7, UNDEFINED_ID),
            e(OTHER, 5, UNDEFINED_ID),
        ]);
        // open(O_CREAT, 0666): the mask takes the group bits, rw-.
        let (mode, acl) = default.create_masq(0o100666);
        assert_eq!(mode, 0o100664);
        let acl = acl.expect("extended");
        assert_eq!(acl.0.iter().map(|e| e.perm).collect::<Vec<_>>(), vec![6, 7, 5, 6, 4]);
        // A default ACL that is only a mode gives no access ACL, just the mode.
        let (mode, acl) = Acl::from_mode(0o750).create_masq(0o40777);
        assert_eq!((mode, acl), (0o40750, None));
    }

    #[test]
    fn names_are_classified_and_listed() {
        assert_eq!(classify(OsStr::new("user.a")), Class::User);
        assert_eq!(classify(OsStr::new(ACL_DEFAULT)), Class::Acl);
        assert_eq!(classify(OsStr::new("system.nfs4_acl")), Class::Unsupported);
        assert_eq!(classify(OsStr::new("os2.x")), Class::Unsupported);
        let names: Vec<OsString> = vec!["trusted.t".into(), "user.u".into()];
        assert_eq!(list_bytes(names.iter(), false), b"user.u\0");
        assert_eq!(list_bytes(names.iter(), true), b"trusted.t\0user.u\0");
    }
}
