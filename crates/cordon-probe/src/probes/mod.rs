//! One module per SECURITY.md §3 row.

pub mod capabilities;
pub mod cgroup_release_agent;
pub mod fd_leak;
pub mod host_sockets;
pub mod info_leaks;
pub mod io_uring;
pub mod keyring;
pub mod nested_userns;
pub mod pid_visibility;
pub mod syscall_abi;
pub mod tty_injection;
pub mod usermode_helpers;
