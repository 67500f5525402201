//! Doing file work as the sandbox's run user.
//!
//! Linux credentials belong to threads, not processes. A blocking thread switches its own
//! filesystem uid/gid and supplementary groups to the run user for the length of one
//! operation, so the kernel applies that user's permissions (`chmod 000` is honoured) and
//! creates files owned by that user. Raw syscalls are used on purpose: the libc wrappers of
//! `setgroups` (glibc and musl) broadcast the change to every thread of the process.
//!
//! Changing the fsuid from 0 to non-zero also drops the filesystem capabilities
//! (`CAP_DAC_OVERRIDE`, `CAP_FOWNER`, ...) from the thread's effective set; switching back
//! restores them from the permitted set, see capabilities(7).

use std::io;
use std::marker::PhantomData;
use std::sync::Once;

use crate::identity::Identity;

/// Most supplementary groups kept; `NGROUPS_MAX` on Linux is 65536.
const MAX_GROUPS: usize = 65536;

/// While alive, the current thread acts as another user for filesystem access. Dropping it
/// restores the thread's own credentials. Not `Send`: credentials are per thread. Work done
/// while acting must not create threads or processes: they would inherit the credentials.
pub struct ActingAs {
    saved_fsuid: u32,
    saved_fsgid: u32,
    saved_groups: Vec<u32>,
    _same_thread: PhantomData<*const ()>,
}

impl ActingAs {
    /// Switches the current thread to `identity`. Returns `None` when nothing needs switching:
    /// the thread already is that user, or the agent is unprivileged and so can only ever act
    /// as itself (a developer running it outside a sandbox).
    pub fn enter(identity: &Identity) -> io::Result<Option<ActingAs>> {
        let (fsuid, fsgid) = current_fs_ids();
        let saved_groups = current_groups()?;
        if fsuid == identity.uid
            && fsgid == identity.gid
            && same_groups(&saved_groups, &identity.groups)
        {
            return Ok(None);
        }
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            warn_unprivileged_once();
            return Ok(None);
        }
        let guard = ActingAs {
            saved_fsuid: fsuid,
            saved_fsgid: fsgid,
            saved_groups,
            _same_thread: PhantomData,
        };
        // Groups and gid first: once the fsuid is non-zero the thread still has CAP_SETGID
        // (not a filesystem capability), but doing it in this order never depends on that.
        // On any failure the guard's drop restores whatever was changed.
        set_groups(&identity.groups)?;
        set_fsgid(identity.gid)?;
        set_fsuid(identity.uid)?;
        Ok(Some(guard))
    }
}

impl Drop for ActingAs {
    fn drop(&mut self) {
        let restored = set_fsuid(self.saved_fsuid)
            .and_then(|()| set_fsgid(self.saved_fsgid))
            .and_then(|()| set_groups(&self.saved_groups));
        if let Err(error) = restored {
            // A pooled thread left with another user's credentials would run later work as
            // the wrong user. That must never happen, so stop rather than carry on.
            tracing::error!(%error, "cannot restore the agent's credentials; aborting");
            std::process::abort();
        }
    }
}

/// The kernel keeps groups sorted, so compare as sets.
fn same_groups(current: &[u32], wanted: &[u32]) -> bool {
    let mut wanted = wanted.to_vec();
    wanted.sort_unstable();
    wanted.dedup();
    current == wanted.as_slice()
}

fn warn_unprivileged_once() {
    static WARNED: Once = Once::new();
    WARNED.call_once(|| {
        tracing::warn!("agent is not root: file operations run as the agent's own user");
    });
}

/// `setfsuid(-1)` changes nothing and returns the current value.
fn current_fs_ids() -> (u32, u32) {
    // SAFETY: raw syscalls with scalar arguments; -1 is the documented "query" value.
    unsafe {
        let uid = libc::syscall(libc::SYS_setfsuid, -1i64) as u32;
        let gid = libc::syscall(libc::SYS_setfsgid, -1i64) as u32;
        (uid, gid)
    }
}

/// `setfsuid` reports no errors; the only way to know it worked is to read the value back.
fn set_fsuid(uid: u32) -> io::Result<()> {
    // SAFETY: raw syscall with scalar arguments.
    unsafe { libc::syscall(libc::SYS_setfsuid, uid as libc::c_long) };
    if current_fs_ids().0 != uid {
        return Err(io::Error::other(format!(
            "setfsuid({uid}) did not take effect"
        )));
    }
    Ok(())
}

fn set_fsgid(gid: u32) -> io::Result<()> {
    // SAFETY: raw syscall with scalar arguments.
    unsafe { libc::syscall(libc::SYS_setfsgid, gid as libc::c_long) };
    if current_fs_ids().1 != gid {
        return Err(io::Error::other(format!(
            "setfsgid({gid}) did not take effect"
        )));
    }
    Ok(())
}

/// Per-thread `setgroups`: the raw syscall, not the broadcasting libc wrapper.
fn set_groups(groups: &[u32]) -> io::Result<()> {
    let groups = &groups[..groups.len().min(MAX_GROUPS)];
    // SAFETY: the pointer and length describe a live slice of gid_t (u32) values.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_setgroups,
            groups.len() as libc::c_long,
            groups.as_ptr() as *const libc::gid_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn current_groups() -> io::Result<Vec<u32>> {
    // SAFETY: a zero size asks only for the count.
    let count = unsafe { libc::syscall(libc::SYS_getgroups, 0, std::ptr::null_mut::<u32>()) };
    if count < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut groups = vec![0u32; count as usize];
    // SAFETY: the buffer holds `count` gid_t values.
    let filled = unsafe {
        libc::syscall(
            libc::SYS_getgroups,
            count,
            groups.as_mut_ptr() as *mut libc::gid_t,
        )
    };
    if filled < 0 {
        return Err(io::Error::last_os_error());
    }
    groups.truncate(filled as usize);
    Ok(groups)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn is_root() -> bool {
        // SAFETY: geteuid has no preconditions.
        unsafe { libc::geteuid() == 0 }
    }

    #[test]
    fn switches_only_this_thread_and_restores() {
        if !is_root() {
            eprintln!("skipped: needs root to switch credentials");
            return;
        }
        let before = (current_fs_ids(), current_groups().unwrap());
        let nobody = Identity {
            uid: 65534,
            gid: 65533,
            groups: vec![65533, 4242],
            home: "/".into(),
            name: None,
        };
        // The other thread exists before the switch: a thread created while acting would
        // inherit the switched credentials, as clone(2) copies the creator's.
        let (go, wait) = std::sync::mpsc::channel::<()>();
        let other = std::thread::spawn(move || {
            wait.recv().unwrap();
            (current_fs_ids(), current_groups().unwrap())
        });
        let guard = ActingAs::enter(&nobody).unwrap();
        assert!(guard.is_some());
        assert_eq!(current_fs_ids(), (65534, 65533));
        assert_eq!(
            current_groups().unwrap(),
            vec![4242, 65533],
            "the kernel sorts groups"
        );
        go.send(()).unwrap();
        assert_eq!(
            other.join().unwrap(),
            before,
            "another thread keeps its credentials"
        );
        drop(guard);
        assert_eq!((current_fs_ids(), current_groups().unwrap()), before);
    }

    #[test]
    fn acting_as_oneself_changes_nothing() {
        let (uid, gid) = current_fs_ids();
        let me = Identity {
            uid,
            gid,
            groups: current_groups().unwrap(),
            home: "/".into(),
            name: None,
        };
        assert!(ActingAs::enter(&me).unwrap().is_none());
    }
}
