//! KVM or TCG: decided once per process by a probe VM.
//!
//! `/dev/kvm` existing proves little: with broken nested virtualization, guests hang or die
//! with an emulation failure. So KVM is used only when `/dev/kvm` opens, answers the KVM API
//! version, and a probe guest (the real kernel, `-accel kvm`) boots to its init within a
//! short bound. Anything else means TCG.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::io::AsyncReadExt;

use super::qemu::Accel;

/// `KVM_GET_API_VERSION`; the stable API has answered 12 since Linux 2.6.22.
const KVM_GET_API_VERSION: libc::c_ulong = 0xAE00;
const KVM_API_VERSION: libc::c_int = 12;
/// Bound on the probe's error output we keep.
const PROBE_OUTPUT_MAX: usize = 256 << 10;

static DECISION: tokio::sync::OnceCell<Accel> = tokio::sync::OnceCell::const_new();

/// What the probe needs.
#[derive(Debug, Clone)]
pub(crate) struct Probe {
    pub qemu: PathBuf,
    pub kernel: PathBuf,
    pub timeout: Duration,
}

/// The process-wide decision, probing on first use.
pub(crate) async fn decide(probe: &Probe) -> Accel {
    *DECISION
        .get_or_init(|| async {
            let accel = match kvm_answers() {
                Err(reason) => {
                    tracing::info!(%reason, "microVMs use TCG (no hardware isolation)");
                    Accel::Tcg
                }
                Ok(()) => match probe_boot(probe).await {
                    Ok(()) => {
                        tracing::info!("KVM probe guest reached its init: microVMs use KVM");
                        Accel::Kvm
                    }
                    Err(reason) => {
                        tracing::warn!(%reason, "KVM probe guest failed: microVMs use TCG (no hardware isolation)");
                        Accel::Tcg
                    }
                },
            };
            accel
        })
        .await
}

/// The decision if one was made.
pub(crate) fn decided() -> Option<Accel> {
    DECISION.get().copied()
}

fn kvm_answers() -> Result<(), String> {
    use std::os::fd::AsRawFd;
    let kvm = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .map_err(|e| format!("/dev/kvm: {e}"))?;
    // SAFETY: an argument-less ioctl on an fd we own.
    let version = unsafe { libc::ioctl(kvm.as_raw_fd(), KVM_GET_API_VERSION, 0) };
    if version != KVM_API_VERSION {
        return Err(format!("/dev/kvm answers API version {version}"));
    }
    Ok(())
}

/// Boots the guest kernel under KVM to its init and no further: `rdinit` names no file, so
/// the kernel, having brought every CPU, timer and device up, fails to start init, panics and
/// (`panic=-1`, `-no-reboot`) QEMU exits with status 0. A hang or an emulation failure
/// (broken nested KVM) never gets there. The probe runs our own kernel, nothing a tenant
/// supplied, with QEMU's own sandbox on.
async fn probe_boot(probe: &Probe) -> Result<(), String> {
    let mut child = tokio::process::Command::new(&probe.qemu)
        .args([
            "-M",
            super::qemu::MACHINE,
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-sandbox",
            "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny",
            "-no-reboot",
            "-accel",
            "kvm",
            "-cpu",
            "host",
            "-m",
            "256M",
            "-kernel",
        ])
        .arg(&probe.kernel)
        .args([
            "-append",
            "quiet panic=-1 rdinit=/cordon-kvm-probe root=/dev/cordon-kvm-probe",
        ])
        .env_clear()
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("spawn {}: {e}", probe.qemu.display()))?;
    let mut stderr = child.stderr.take().expect("piped stderr");
    let waited = tokio::time::timeout(probe.timeout, child.wait()).await;
    let result = match waited {
        Ok(Ok(status)) if status.success() => Ok(()),
        Ok(Ok(status)) => {
            let mut text = Vec::new();
            let _ = (&mut stderr)
                .take(PROBE_OUTPUT_MAX as u64)
                .read_to_end(&mut text)
                .await;
            Err(format!(
                "QEMU {status}: {}",
                String::from_utf8_lossy(&text).trim()
            ))
        }
        Ok(Err(e)) => Err(format!("waiting for QEMU: {e}")),
        Err(_) => Err(format!(
            "the guest did not reach init within {:?}",
            probe.timeout
        )),
    };
    let _ = child.start_kill();
    let _ = child.wait().await;
    result
}

/// The host's TSC frequency in kHz, measured once against the monotonic clock (TCG hands
/// the host's TSC to the guest).
pub(crate) fn host_tsc_khz() -> u64 {
    static KHZ: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *KHZ.get_or_init(|| {
        // SAFETY: rdtsc has no preconditions on x86_64.
        let tsc = || unsafe { core::arch::x86_64::_rdtsc() };
        let (start, t0) = (std::time::Instant::now(), tsc());
        std::thread::sleep(Duration::from_millis(50));
        let (elapsed, t1) = (start.elapsed(), tsc());
        let khz = (t1.wrapping_sub(t0) as u128 * 1_000_000 / elapsed.as_micros().max(1)) / 1000;
        // Whole MHz: the measurement's noise is well below that.
        ((khz as u64 + 500) / 1000).max(1) * 1000
    })
}

/// Whether `path` exists as a regular file (a clear error for a missing guest kernel).
pub(crate) fn require_file(path: &Path, what: &str) -> Result<(), crate::RuntimeError> {
    if std::fs::metadata(path).is_ok_and(|m| m.is_file()) {
        Ok(())
    } else {
        Err(crate::RuntimeError::InvalidSpec(format!(
            "{what} {} is missing (run `cordon prepare`)",
            path.display()
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A probe guest that cannot boot never yields KVM, whatever the host's KVM can do.
    #[tokio::test]
    async fn a_probe_guest_that_does_not_boot_means_no_kvm() {
        let qemu = PathBuf::from("/usr/bin/qemu-system-x86_64");
        if !qemu.is_file() {
            eprintln!("skipped: no QEMU");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let kernel = dir.path().join("not-a-kernel");
        std::fs::write(&kernel, b"garbage").unwrap();
        let probe = Probe {
            qemu,
            kernel,
            timeout: Duration::from_secs(5),
        };
        assert!(probe_boot(&probe).await.is_err());
    }

    #[test]
    fn the_host_tsc_frequency_is_plausible() {
        let khz = host_tsc_khz();
        assert!((100_000..10_000_000).contains(&khz), "{khz} kHz");
        assert_eq!(khz % 1000, 0);
    }
}
