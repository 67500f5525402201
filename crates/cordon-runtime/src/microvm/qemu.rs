//! The QEMU command line of one microVM (see SECURITY.md, "MicroVM backend (V)").
//!
//! Paths are the ones inside the jail (`/vm/...`, see `plan::JAIL_VM_DIR`); QEMU never sees a
//! host path of the state directory. The channel's listening socket is inherited on fd 3.

use crate::plan::{JAIL_VM_DIR, LISTEN_FD};

/// The accelerator a VM runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Accel {
    Kvm,
    Tcg,
}

/// File names inside the VM directory.
pub(crate) const KERNEL: &str = "kernel";
pub(crate) const INITRAMFS: &str = "initramfs";
pub(crate) const RW_DISK: &str = "disk.img";

pub(crate) fn layer_image_name(index: usize) -> String {
    format!("l{index}.img")
}

/// TCG's translation cache in MiB: QEMU 7.2 defaults to 1 GiB, which the VM's cgroup would
/// have to carry; 64 MiB is plenty for one sandbox.
const TCG_TB_SIZE_MIB: u64 = 64;

/// What one VM is started with.
#[derive(Debug, Clone)]
pub(crate) struct VmShape {
    pub accel: Accel,
    pub memory_mib: u64,
    pub vcpus: u32,
    pub layers: usize,
    pub hostname: String,
    /// Extra kernel parameters (tests, the probe).
    pub extra_cmdline: Vec<String>,
    /// The host's TSC frequency, told to a TCG guest: with no PIT and no kvmclock it has no
    /// way to calibrate its TSC and hangs at boot otherwise (TCG's guest TSC is the host's).
    pub tsc_khz: Option<u64>,
}

/// The kernel command line: the console on hvc0, quiet, no reboot loop (`panic=-1` reboots,
/// and `-no-reboot` turns that into QEMU exiting, so a guest panic is a failed sandbox), and
/// the `cordon.*` parameters the agent's VM init reads.
pub(crate) fn kernel_cmdline(shape: &VmShape) -> String {
    let mut params = vec![
        "console=hvc0".to_string(),
        "quiet".to_string(),
        "panic=-1".to_string(),
        format!("cordon.layers={}", shape.layers),
        format!("cordon.hostname={}", shape.hostname),
    ];
    if let Some(khz) = shape.tsc_khz {
        params.push(format!("tsc_early_khz={khz}"));
    }
    // The wall clock: the machine has no RTC, so the guest would start in 1970 and reject
    // every TLS certificate (egress). The agent adds its uptime to this launch time.
    if let Ok(now) = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH) {
        params.push(format!("cordon.epoch_ms={}", now.as_millis()));
    }
    params.extend(shape.extra_cmdline.iter().cloned());
    params.join(" ")
}

/// The machine: microvm with no option ROMs, PIT, PIC, RTC or ISA serial (SECURITY.md V).
pub(crate) const MACHINE: &str = "microvm,x-option-roms=off,pit=off,pic=off,rtc=off,isa-serial=off";

/// argv of QEMU, `argv[0]` included.
pub(crate) fn args(binary: &str, shape: &VmShape) -> Vec<String> {
    let vm = |name: &str| format!("{JAIL_VM_DIR}/{name}");
    let mut args: Vec<String> = vec![
        binary.into(),
        "-M".into(),
        MACHINE.into(),
        "-nodefaults".into(),
        "-no-user-config".into(),
        "-display".into(),
        "none".into(),
        "-sandbox".into(),
        "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny".into(),
        "-no-reboot".into(),
        "-m".into(),
        format!("{}M", shape.memory_mib),
        "-smp".into(),
        shape.vcpus.to_string(),
    ];
    match shape.accel {
        Accel::Kvm => args.extend(["-accel".into(), "kvm".into(), "-cpu".into(), "host".into()]),
        // `max` offers RDRAND, which seeds the guest's CRNG at boot (virtio-rng adds the
        // host's entropy once its module is loaded); qemu64 has none, and getrandom() blocks.
        Accel::Tcg => args.extend([
            "-accel".into(),
            format!("tcg,tb-size={TCG_TB_SIZE_MIB}"),
            "-cpu".into(),
            "max".into(),
        ]),
    }
    args.extend([
        "-kernel".into(),
        vm(KERNEL),
        "-initrd".into(),
        vm(INITRAMFS),
        "-append".into(),
        kernel_cmdline(shape),
        // The console (hvc0) goes to QEMU's stdout, which nsinit's log copier bounds.
        "-device".into(),
        "virtio-serial-device".into(),
        "-chardev".into(),
        "stdio,id=con,signal=off".into(),
        "-device".into(),
        "virtconsole,chardev=con".into(),
        // The agent channel: the host's listening socket, inherited; one host connection at a
        // time.
        "-chardev".into(),
        format!("socket,id=chan,fd={LISTEN_FD},server=on,wait=off"),
        "-device".into(),
        "virtserialport,chardev=chan,name=cordon.channel".into(),
        // Entropy for the guest, rate-limited (1 MiB/s).
        "-object".into(),
        "rng-random,id=rng,filename=/dev/urandom".into(),
        "-device".into(),
        "virtio-rng-device,rng=rng,max-bytes=1048576,period=1000".into(),
    ]);
    args.extend(disk_args("rw", &vm(RW_DISK), "cordon-rw", false));
    for index in 0..shape.layers {
        let id = format!("l{index}");
        let serial = format!("cordon-l{index}");
        args.extend(disk_args(&id, &vm(&layer_image_name(index)), &serial, true));
    }
    args
}

fn disk_args(id: &str, file: &str, serial: &str, read_only: bool) -> Vec<String> {
    let mut drive = format!("if=none,id={id},file={file},format=raw,aio=threads");
    if read_only {
        drive.push_str(",readonly=on");
    } else {
        // The guest's discards punch holes, so the sparse image tracks real use.
        drive.push_str(",discard=unmap");
    }
    vec![
        "-drive".into(),
        drive,
        "-device".into(),
        format!("virtio-blk-device,drive={id},serial={serial}"),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_line_has_the_hardening_flags_and_no_network() {
        let shape = VmShape {
            accel: Accel::Tcg,
            memory_mib: 512,
            vcpus: 2,
            layers: 2,
            hostname: "box".into(),
            extra_cmdline: vec![],
            tsc_khz: Some(2_100_000),
        };
        let args = args("/usr/bin/qemu-system-x86_64", &shape);
        let line = args.join(" ");
        for flag in [
            "x-option-roms=off,pit=off,pic=off,rtc=off,isa-serial=off",
            "tsc_early_khz=2100000",
            "-nodefaults",
            "-no-user-config",
            "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny",
            "serial=cordon-rw",
            "serial=cordon-l0",
            "serial=cordon-l1",
            "cordon.layers=2",
            "cordon.epoch_ms=",
        ] {
            assert!(line.contains(flag), "{flag} missing in {line}");
        }
        for banned in [
            "-netdev",
            "-nic",
            "virtio-net",
            "9p",
            "mitigations=off",
            "-monitor",
        ] {
            assert!(!line.contains(banned), "{banned} in {line}");
        }
        let l1 = args
            .iter()
            .find(|a| a.contains("id=l1,"))
            .expect("l1 drive");
        assert!(l1.contains("readonly=on"));
    }
}
